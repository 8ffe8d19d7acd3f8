"""One (model, recipe) task, run in its own worker process under a memory and time limit.

:func:`execute_task` is the task function both executors call (the local thread pool and
Ray): it starts a fresh worker process (forked from a fork server that has already imported
onnxcompress, so a task starts in milliseconds instead of seconds), waits for it with the
time limit, kills it past the limit, and turns whatever happened -- a result, an exception,
a crash, a kill -- into one result row. Nothing the model does can take the caller down.

Inside the worker (:func:`child_main`): stdout/stderr go to the task's log file, the address
space is capped with ``RLIMIT_AS``, :func:`onnxcompress.optimize` writes into the task's
scratch folder, and only a finished model is moved into place (``os.replace``), then the
full report and the result row are written (temp file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import signal
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .. import __version__
from ..api import optimize  # noqa: F401  (imported here so the fork server preloads it)
from ..errors import GateFailedError, OnnxCompressError
from ..recipe import Recipe
from .summary import summarize_report

#: Failure kinds that a rerun with the same inputs would reproduce exactly: recorded as
#: finished (cached). The others (timeout, memory, crash, error) are retried by a rerun.
CACHEABLE_FAILURES = ("input", "gate")

_ctx_lock = threading.Lock()
_ctx = None
_live: set = set()
_live_lock = threading.Lock()


def _context():
    """Fork server context (POSIX) with onnxcompress preloaded; spawn elsewhere."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            # numpy's BLAS in the workers: one thread, as Ray gives a 1-CPU task (OMP_NUM_THREADS=1),
            # so both executors compute the same floats (summation order) and write the same bytes
            # (set only while the fork server starts: this process's environment is left as it was)
            blas = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
            saved = {v: os.environ.get(v) for v in blas}
            for var in blas:
                os.environ.setdefault(var, "1")
            try:
                if "forkserver" in multiprocessing.get_all_start_methods():
                    ctx = multiprocessing.get_context("forkserver")
                    ctx.set_forkserver_preload(["onnxcompress.zoo.worker"])
                    from multiprocessing import forkserver

                    forkserver.ensure_running()
                else:  # pragma: no cover - Windows
                    ctx = multiprocessing.get_context("spawn")
            finally:
                for var, val in saved.items():
                    if val is None:
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = val
            _ctx = ctx
        return _ctx


def kill_all() -> None:
    """Kill every worker process this process started (used on Ctrl-C)."""
    with _live_lock:
        procs = list(_live)
    for p in procs:
        try:
            p.kill()
        except Exception:  # noqa: BLE001
            pass


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tail(path: Path, n: int = 400) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][-n:] if lines else ""


def execute_task(spec: dict) -> dict:
    """Run one task in a fresh worker process; never raises for anything the task does.

    Args:
        spec: the task (see ``runner._spec``): model, recipe (name), recipe_data (the recipe), key, model_path,
            output, report, log, work_dir, timeout_s, memory_limit_mb, threads.

    Returns:
        The result row: ``status`` (``ok``/``failed``), ``kind`` of failure, ``error`` message,
        the metrics of :func:`summarize_report`, ``wall_s``.
    """
    work = Path(spec["work_dir"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    task_file = work / "task.json"
    result_file = work / "result.json"
    write_json_atomic(task_file, spec)
    base = {"model": spec["model"], "recipe": spec["recipe"], "key": spec["key"], "status": "failed",
            "host": os.uname().nodename if hasattr(os, "uname") else "", "log": spec["log"]}
    t0 = time.perf_counter()
    timeout = spec.get("timeout_s")
    limit = spec.get("memory_limit_mb")
    try:
        proc = _context().Process(target=child_main, args=(str(task_file),),
                                  name=f"zoo:{spec['model']}/{spec['recipe']}")
        proc.start()
    except Exception as exc:  # noqa: BLE001 - e.g. fork refused
        return {**base, "kind": "crash", "error": f"could not start the worker process: {exc}",
                "wall_s": round(time.perf_counter() - t0, 2)}
    with _live_lock:
        _live.add(proc)
    try:
        proc.join(timeout)
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
    finally:
        with _live_lock:
            _live.discard(proc)
    wall = round(time.perf_counter() - t0, 2)
    if timed_out:
        return {**base, "kind": "timeout", "wall_s": wall,
                "error": f"time limit: still running after {timeout:g} s, worker killed"}
    if result_file.is_file():
        try:
            row = json.loads(result_file.read_text())
            row.update({k: v for k, v in base.items() if k not in row})
            row["wall_s"] = wall
            return row
        except ValueError:
            pass
    code = proc.exitcode
    tail = _tail(Path(spec["log"]))
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        how = f"worker process died ({sig})"
    else:
        how = f"worker process exited with code {code} without a result"
    kind = "crash"
    if limit and (code is None or code != 0):
        kind = "memory"
        how = f"memory limit: {how} while capped at {limit} MB"
    elif code == -signal.SIGKILL:
        how += " -- killed from outside, or by the system's out-of-memory killer"
    return {**base, "kind": kind, "wall_s": wall, "error": how + (f"; log: {tail}" if tail else "")}


# ----------------------------------------------------------------------------- inside the worker


def _set_threads(n: int | None) -> None:
    """Give every ONNX Runtime session of this worker ``n`` intra-op threads (so parallel
    tasks do not oversubscribe the CPUs and latency is measured under a known budget)."""
    if not n:
        return
    from .. import runtime

    orig = runtime.make_session

    def make_session(model, *, threads=None, **kw):
        return orig(model, threads=threads or n, **kw)

    runtime.make_session = make_session
    for mod in list(sys.modules.values()):  # modules that imported the name directly
        if getattr(mod, "__name__", "").startswith("onnxcompress") and getattr(mod, "make_session", None) is orig:
            mod.make_session = make_session


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_MEMORY_TEXT = re.compile(r"bad_alloc|allocat|out of memory|memory|can't start new thread|Cannot allocate", re.I)


def _vm_peak_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _memory_failure(limit: int | None, text: str, exc: BaseException | None = None) -> str | None:
    """A message when a failure is (most likely) the memory cap: a MemoryError, an allocation
    message, or a peak address space that reached half of the cap (libraries report a refused
    allocation in many ways: 'bad allocation', 'Failed to serialize proto', ...)."""
    peak = _vm_peak_mb()
    if isinstance(exc, MemoryError) or (limit and (_MEMORY_TEXT.search(text) or (peak and peak >= 0.5 * limit))):
        if not limit:
            return f"out of memory ({text})"
        return (f"memory limit: the task failed under the {limit} MB address-space cap"
                + f": {text}")
    return None


def _lift_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    except Exception:  # noqa: BLE001
        pass


def child_main(task_file: str) -> None:
    """Entry point of the worker process: run the task, write ``result.json``."""
    spec = json.loads(Path(task_file).read_text())
    work = Path(task_file).parent
    log = open(spec["log"], "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    print(f"onnxcompress {__version__} zoo task {spec['model']} / {spec['recipe']} (key {spec['key'][:16]}) "
          f"pid {os.getpid()}", flush=True)
    # scratch files (session skeletons, spilled calibration samples) go into the task's own
    # folder, which the runner removes even when this process is killed or exits without atexit
    import tempfile

    tempfile.tempdir = str(work)
    limit = spec.get("memory_limit_mb")
    if limit:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = int(limit) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        row = _run(spec, work)
    except BaseException as exc:  # noqa: BLE001 - everything becomes a failed row
        _lift_limit()
        text = f"{type(exc).__name__}: {exc}".strip()
        traceback.print_exc()
        mem = _memory_failure(limit, text, exc)
        if mem:
            kind, text = "memory", mem
        else:
            kind = "error"
            text += " (traceback in the task log)"
        row = {"model": spec["model"], "recipe": spec["recipe"], "key": spec["key"], "status": "failed",
               "kind": kind, "error": text}
    _lift_limit()
    sys.stdout.flush()
    write_json_atomic(work / "result.json", row)


def _run(spec: dict, work: Path) -> dict:
    rec = Recipe.from_dict(spec["recipe_data"], where=f"zoo recipe {spec['recipe']}")
    _set_threads(spec.get("threads"))
    final = Path(spec["output"])
    scratch = work / final.name
    row: dict[str, Any] = {"model": spec["model"], "recipe": spec["recipe"], "key": spec["key"]}
    report = None
    try:
        res = optimize(spec["model_path"], scratch, recipe=rec, progress=lambda s: print(f"  {s}", flush=True))
        report = res.report
        row.update(status="ok", kind=None, error=None)
    except GateFailedError as exc:
        report = getattr(exc, "report", None)
        row.update(status="failed", kind="gate", error=f"gate missed: {exc}")
    except OnnxCompressError as exc:
        _lift_limit()  # the diagnosis itself needs memory
        mem = _memory_failure(spec.get("memory_limit_mb"), str(exc))
        if mem:  # not the input's fault: must not be cached as a permanent failure
            traceback.print_exc()
            row.update(status="failed", kind="memory", error=mem)
        else:
            row.update(status="failed", kind="input", error=str(exc))
    if report is not None:
        row.update(summarize_report(report))
    if row["status"] == "ok":
        final.parent.mkdir(parents=True, exist_ok=True)
        data = scratch.with_name(scratch.name + ".data")
        if data.exists():
            os.replace(data, final.with_name(final.name + ".data"))
        row["output_sha256"] = _sha256(scratch)
        os.replace(scratch, final)
        row["output"] = str(final)
        row["output_bytes"] = final.stat().st_size
        report["output"] = str(final)
    if report is not None:
        Path(spec["report"]).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(spec["report"]), report)
        row["report"] = spec["report"]
    return row
