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

Guards (so that no worker outlives the batch, and none depends on the caller's folder):

* the worker and the fork server die with their parent (Linux: ``PR_SET_PDEATHSIG``; every
  platform: a watchdog thread in the worker that exits when the process that started it is
  gone), and the worker enforces its own time limit (``SIGALRM``, a little after the parent's);
* the fork server starts with ``PYTHONSAFEPATH`` (no current folder on ``sys.path``), the
  worker moves into its task folder, drops the caller's folder from ``sys.path`` and checks
  that it runs the same onnxcompress package as the caller;
* a worker that ends without a result is classified by its cause: ``timeout``, ``import``
  (died before the task started), ``memory`` (under a cap, with an allocation failure in its
  log) or ``crash`` (a signal or an exit code).
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
CACHEABLE_FAILURES = ("input", "gate", "budget")

#: The worker stops itself this many seconds after its time limit (the parent kills it at the
#: limit; the worker's own limit only matters when the parent is gone or stuck).
SELF_LIMIT_GRACE_S = 2.0
_EXIT_OWN_TIMEOUT = 124  # exit status of a worker whose watchdog hit the time limit
_EXIT_ORPHANED = 125  # exit status of a worker whose parent is gone
#: Set (to the parent's pid) only while the fork server starts: tells the preloaded module that
#: it runs inside the fork server, which then asks to die with that parent.
_FORKSERVER_ENV = "ONNXCOMPRESS_ZOO_FORKSERVER_OF"

_ctx_lock = threading.Lock()
_ctx = None
_live: set = set()
_live_lock = threading.Lock()


def die_with_parent() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent exits (``prctl
    PR_SET_PDEATHSIG``; the "parent" is the thread that forked it). Returns whether it is armed;
    a no-op elsewhere (the worker's watchdog thread covers other platforms)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - no libc/prctl: the watchdog still applies
        return False


if os.environ.get(_FORKSERVER_ENV) == str(os.getppid()):
    # imported as the fork server's preload: die with the zoo process that started it (otherwise a
    # `kill -9` of that process leaves the fork server and its workers running); if that process
    # already died between the check and prctl, leave now
    _parent = int(os.environ.pop(_FORKSERVER_ENV))
    if die_with_parent() and os.getppid() != _parent:
        os._exit(0)


def _context():
    """Fork server context (POSIX) with onnxcompress preloaded; spawn elsewhere.

    The fork server is started with ``PYTHONSAFEPATH=1`` (Python 3.11+: no current folder on
    its ``sys.path``, so a folder named ``onnxcompress`` in the current folder cannot shadow
    the package) and, when started from the main thread, asks to die with this process (see
    :func:`die_with_parent`; Linux ties that to the starting thread, hence :func:`prepare`)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            # numpy's BLAS in the workers: one thread, as Ray gives a 1-CPU task (OMP_NUM_THREADS=1),
            # so both executors compute the same floats (summation order) and write the same bytes
            # (set only while the fork server starts: this process's environment is left as it was)
            blas = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
            saved = {v: os.environ.get(v) for v in (*blas, "PYTHONSAFEPATH", _FORKSERVER_ENV)}
            for var in blas:
                os.environ.setdefault(var, "1")
            os.environ.setdefault("PYTHONSAFEPATH", "1")
            if threading.current_thread() is threading.main_thread():
                os.environ[_FORKSERVER_ENV] = str(os.getpid())
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


def prepare() -> None:
    """Start the fork server now, from the calling thread: call it from the main thread before
    starting worker threads, so that the fork server's ``PR_SET_PDEATHSIG`` follows this
    process's lifetime and not that of a pool thread."""
    _context()


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
    # the worker watches this process (parent_pid) and checks that it imported this package
    write_json_atomic(task_file, {**spec, "parent_pid": os.getpid(), "package_dir": str(_PACKAGE_DIR)})
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
    kind, how = classify_exit(proc.exitcode, started=(work / _STARTED).exists(), timeout_s=timeout,
                              memory_limit_mb=limit, log_tail=_tail(Path(spec["log"])))
    return {**base, "kind": kind, "wall_s": wall, "error": how}


_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_STARTED = "started"  # marker file the worker writes first thing in child_main


def classify_exit(code: int | None, *, started: bool, timeout_s: float | None, memory_limit_mb: int | None,
                  log_tail: str = "") -> tuple[str, str]:
    """(kind, message) for a worker that ended without writing a result, by its cause.

    * ``import``: it exited before :func:`child_main` ran (could not import onnxcompress);
    * ``timeout``: it stopped itself at its own time limit (``SIGALRM`` or its watchdog);
    * ``memory``: a memory cap was set and its log shows an allocation failure;
    * ``crash``: anything else -- a signal (named) or an exit code.
    A memory cap alone no longer makes every non-zero exit a "memory limit"."""
    if code is not None and code < 0:
        try:
            what = f"worker process died ({signal.Signals(-code).name})"
        except ValueError:
            what = f"worker process died (signal {-code})"
    else:
        what = f"worker process exited with code {code} without a result"
    tail = f"; log: {log_tail}" if log_tail else ""
    if not started and code is not None and code > 0:
        return "import", (f"{what} before the task started: the worker could not import onnxcompress (a folder "
                          f"named 'onnxcompress' in a folder on its sys.path? a broken install?); its traceback "
                          f"is on the zoo command's stderr{tail}")
    if code == _EXIT_OWN_TIMEOUT or (code is not None and hasattr(signal, "SIGALRM") and code == -signal.SIGALRM):
        limit = f" after {timeout_s + SELF_LIMIT_GRACE_S:g} s" if timeout_s else ""
        return "timeout", f"time limit: the worker stopped itself{limit} (its own limit){tail}"
    if memory_limit_mb and _MEMORY_TEXT.search(log_tail):
        return "memory", f"memory limit: {what} while capped at {memory_limit_mb} MB{tail}"
    if hasattr(signal, "SIGKILL") and code == -signal.SIGKILL:
        what += " -- killed from outside, or by the system's out-of-memory killer"
    return "crash", what + tail


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


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (POSIX; on Windows signal 0 would kill it: assume alive)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _watchdog(parent_pid: int | None, deadline: float | None) -> None:
    """Start a daemon thread that ends this worker when the process that started it is gone
    (this process was re-parented, or ``parent_pid`` no longer exists) or past ``deadline``
    (``time.monotonic()``): the portable backstop of ``PR_SET_PDEATHSIG`` and ``SIGALRM``."""
    ppid = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != ppid or (parent_pid and not _alive(parent_pid)):
                os._exit(_EXIT_ORPHANED)
            if deadline is not None and time.monotonic() > deadline:
                print(f"time limit: the worker stops itself ({SELF_LIMIT_GRACE_S:g} s past its limit)", flush=True)
                os._exit(_EXIT_OWN_TIMEOUT)

    threading.Thread(target=watch, name="zoo-watchdog", daemon=True).start()


def _guard_worker(spec: dict, work: Path) -> None:
    """Make the worker independent of its parent's fate and folder: die with the parent, stop at
    its own time limit (``timeout_s`` + :data:`SELF_LIMIT_GRACE_S`: ``SIGALRM``, which ends the
    process even while C code holds the GIL, plus the watchdog), move into the task folder and
    drop the caller's current folder from ``sys.path`` (lazy imports cannot pick up its files)."""
    die_with_parent()  # the parent is the fork server, which itself dies with the zoo process
    timeout = spec.get("timeout_s")
    own = timeout + SELF_LIMIT_GRACE_S if timeout else None
    if own and hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, own)
    _watchdog(spec.get("parent_pid"), time.monotonic() + own if own else None)
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != cwd]
    os.chdir(work)


def _package_mismatch(spec: dict) -> str | None:
    """A message when this worker imported a different onnxcompress package than the process
    that started it (it would run other code than the cache key's fingerprint covers)."""
    want = spec.get("package_dir")
    if want and Path(want).resolve() != _PACKAGE_DIR:
        return (f"the worker imported onnxcompress from {_PACKAGE_DIR}, not from {want} like the zoo process "
                "(a folder named 'onnxcompress' in the current folder?)")
    return None


def child_main(task_file: str) -> None:
    """Entry point of the worker process: run the task, write ``result.json``."""
    spec = json.loads(Path(task_file).read_text())
    work = Path(task_file).parent
    (work / _STARTED).touch()
    _guard_worker(spec, work)
    log = open(spec["log"], "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    print(f"onnxcompress {__version__} zoo task {spec['model']} / {spec['recipe']} (key {spec['key'][:16]}) "
          f"pid {os.getpid()}", flush=True)
    wrong = _package_mismatch(spec)
    if wrong:
        write_json_atomic(work / "result.json", {"model": spec["model"], "recipe": spec["recipe"],
                                                 "key": spec["key"], "status": "failed", "kind": "import",
                                                 "error": wrong})
        return
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


def _tune(spec: dict, scratch: Path, work: Path, row: dict) -> dict:
    """The model's budget search (``tune`` task): :func:`onnxcompress.tune.tune` with the
    manifest's budget; the row is ok when the budget was met, else it fails (kind ``budget``)
    naming the constraints missed. Returns the tune report."""
    from ..tune import Budget, tune

    t = spec["tune"]
    budget = Budget(**{k: t[k] for k in ("metric", "max_drop", "min_speedup", "max_size_mb") if k in t})
    res = tune(spec["model_path"], scratch, budget, calibration=spec.get("calibration"),
               validation=spec.get("validation"), trials=int(t.get("trials", 10)),
               time_budget_s=t.get("time_budget_s"), state=work / "tune-state",
               progress=lambda s: print(f"  {s}", flush=True))
    rep, c = res.report, res.chosen
    fb, fa = rep.get("fp32_size_bytes"), c.size_bytes if c else None
    if res.met:  # sizes and speed of the model written; a missed budget writes none
        row.update(bytes_before=fb, bytes_after=fa, size_ratio=(fb / fa if fb and fa else None),
                   speedup=c.speedup if c and c.speedup == c.speedup else None)
    row.update(gated="budget",
               tune={"metric": budget.metric, "fp32_metric": rep.get("fp32_metric"), "metric_after": c.metric if c else None,
                     "drop": c.drop if c else None, "held_out": rep.get("held_out"), "trials": len(res.trials),
                     "chosen_options": c.options if c else None, "why": rep.get("why")})
    if res.met:
        row.update(status="ok", kind=None, error=None)
    else:
        row.update(status="failed", kind="budget", error="budget missed: " + "; ".join(rep.get("failed") or []))
    return rep


def _run(spec: dict, work: Path) -> dict:
    _set_threads(spec.get("threads"))
    final = Path(spec["output"])
    scratch = work / final.name
    row: dict[str, Any] = {"model": spec["model"], "recipe": spec["recipe"], "key": spec["key"]}
    report = None
    rec = Recipe.from_dict(spec["recipe_data"], where=f"zoo recipe {spec['recipe']}") if not spec.get("tune") else None
    try:
        if rec is None:
            report = _tune(spec, scratch, work, row)
        else:
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
    if report is not None and rec is not None:
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
