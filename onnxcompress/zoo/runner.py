"""Plan, cache, run and report a zoo batch (the ``onnxcompress zoo`` command).

Output folder layout (``--out DIR``)::

    DIR/zoo_state.json            finished tasks by "model/recipe" (key + result row); atomic, after each task
    DIR/zoo_report.{json,md,html} the consolidated report
    DIR/models/<model>/<recipe>.onnx
    DIR/reports/<model>/<recipe>.json   the full optimize report of each task
    DIR/logs/<model>.<recipe>.log       each worker's stdout/stderr (and fetch logs)
    DIR/.work/                          scratch of running tasks (safe to delete)

A task's key is the sha256 of: the input model's bytes, its external data files, the merged
the recipe (data paths replaced by the data's content hash), the calibration and
validation data, the onnxcompress version and a fingerprint of its conversion code. A task is skipped when the state file holds
the same key with ``ok`` and the output file still exists with the recorded size, or with a
failure that the same inputs would reproduce (bad input, missed gate); timeouts, memory
limits, crashes and unexpected errors are retried on the next run (``--retry-failed``
retries every failure, ``--force`` reruns everything).

Guards: every task has a time limit (:data:`DEFAULT_TIMEOUT_S` unless the command line or the
manifest's ``[run] timeout_s`` says otherwise); inputs that are not regular files (a FIFO, a
device) are refused per task before anything reads them (:func:`check_input`, the hasher); a
manifest's ``fetch`` commands -- code that runs as the current user -- are refused when the
manifest file is owned by someone else or writable by group/others, unless ``allow_fetch``
(:func:`fetch_refusal`), and never run with ``no_fetch``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import OnnxCompressError
from ..paths import file_kind
from .manifest import TUNE_TASK, Manifest, load_manifest
from .worker import CACHEABLE_FAILURES, execute_task, kill_all, prepare, write_json_atomic

STATE_NAME = "zoo_state.json"
STATE_SCHEMA = 1
KEY_SCHEMA = 2  # 2: the key hashes the recipe object (stages and configs), not flat options
#: Per-task time limit when neither the command line nor the manifest's ``[run] timeout_s`` gives
#: one (``timeout_s = false`` in ``[run]``, or ``--timeout-s 0``, turns the limit off).
DEFAULT_TIMEOUT_S = 3600.0


class ZooRunError(OnnxCompressError):
    """The batch cannot run at all (output folder locked or unwritable, executor unavailable,
    fetch commands refused)."""


class TaskInputError(OnnxCompressError):
    """One task's input cannot be hashed safely (not a regular file, unreadable): that task fails."""




def check_input(path: Path, what: str, *, folder_ok: bool = False) -> str | None:
    """A one-line error when ``path`` exists but is not a regular file (or a folder, when
    ``folder_ok``): reading a FIFO or a device would block or never end, before any task limit
    applies. ``None`` for regular files, allowed folders and missing paths (reported elsewhere)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{what} cannot be read: {path} ({exc.strerror or exc})"
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return None
    return (f"{what} is not a regular file{' or folder' if folder_ok else ''} "
            f"({file_kind(mode)}): {path}")


@dataclass
class ZooResult:
    """Outcome of :func:`run_zoo`."""

    rows: list[dict]
    report: dict
    paths: dict[str, Path]
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# ----------------------------------------------------------------------------- hashing


class _Hasher:
    """sha256 of files and folders, memoized for one run; notes external data locations."""

    def __init__(self):
        self._memo: dict[Path, tuple[str, bool]] = {}

    def file(self, path: Path) -> tuple[str, bool]:
        """(hex digest, whether the bytes mention ``location`` -- a hint of external data).

        Raises:
            TaskInputError: ``path`` (or a file in the folder) is not a regular file or folder,
                or cannot be read. Files are opened non-blocking and checked with ``fstat``
                before reading, so a FIFO or a device fails at once instead of hanging."""
        path = Path(path)
        if path not in self._memo:
            if path.is_dir():
                h = hashlib.sha256(b"dir\0")
                for p in sorted(path.rglob("*")):
                    if p.is_dir() or not p.exists():  # sub-folders; dangling links (nothing to read)
                        continue
                    h.update(str(p.relative_to(path)).encode() + b"\0" + self.file(p)[0].encode())
                self._memo[path] = (h.hexdigest(), False)
            else:
                h, hint, prev = hashlib.sha256(), False, b""
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
                except OSError as exc:
                    raise TaskInputError(f"cannot read {path} to hash it: {exc.strerror or exc}") from None
                with open(fd, "rb") as f:
                    mode = os.fstat(fd).st_mode
                    if not stat.S_ISREG(mode):
                        raise TaskInputError(f"not a regular file ({file_kind(mode)})"
                                             f": {path}")
                    try:
                        for block in iter(lambda: f.read(1 << 22), b""):
                            h.update(block)
                            hint = hint or b"location" in prev[-8:] + block
                            prev = block
                    except OSError as exc:
                        raise TaskInputError(f"cannot read {path} to hash it: {exc.strerror or exc}") from None
                self._memo[path] = (h.hexdigest(), hint)
        return self._memo[path]

    def external(self, model: Path) -> dict[str, str]:
        """Digests of the external data files a model names (empty for inline weights; a missing
        file is recorded as ``"missing"``, which the worker then reports).

        Raises:
            TaskInputError: an external data file exists but cannot be hashed (not a regular
                file, unreadable): the key must not silently leave it out."""
        if not self.file(model)[1]:
            return {}
        try:
            import onnx

            proto = onnx.load(str(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - unparsable: no tensor can use external data; the worker reports it
            return {}
        locs = set()

        def graph(g):
            for t in g.initializer:
                yield t
            for n in g.node:
                for a in n.attribute:
                    if a.HasField("t"):
                        yield a.t
                    yield from a.tensors
                    if a.HasField("g"):
                        yield from graph(a.g)
                    for sg in a.graphs:
                        yield from graph(sg)

        for t in graph(proto.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                locs.update(e.value for e in t.external_data if e.key == "location")
        out = {}
        for loc in sorted(locs):
            p = model.parent / loc
            if not os.path.lexists(p):
                out[loc] = "missing"
                continue
            try:
                out[loc] = self.file(p)[0]
            except TaskInputError as exc:
                raise TaskInputError(f"external data '{loc}' of {model}: {exc}") from None
        return out


_code_fp: str | None = None


def code_fingerprint() -> str:
    """sha256 over the source of the conversion code (the package minus the zoo, CLI and
    report modules). ``__version__`` alone misses edits made without a version bump (an
    editable install while developing): a changed pass must not be served from the cache."""
    global _code_fp
    if _code_fp is None:
        pkg = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for p in sorted(pkg.rglob("*.py")):
            rel = p.relative_to(pkg).as_posix()
            if rel.startswith("zoo/") or rel.startswith("cli") or rel in ("bench.py", "report_html.py"):
                continue
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
        _code_fp = h.hexdigest()
    return _code_fp


def task_key(mf: Manifest, model: str, recipe: str, hasher: _Hasher) -> str:
    """The content key of one task (see the module docstring)."""
    m = mf.models[model]
    if recipe == TUNE_TASK:  # the budget search: its budget and the data it reads
        rec = {"tune": m.tune, "data": {k: str(getattr(m, k)) if getattr(m, k) else None
                                        for k in ("calibration", "validation")}}
    else:
        rec = mf.recipe_for(model, recipe).to_dict()
    for k in ("calibration", "validation"):
        if rec["data"].get(k):
            rec["data"][k] = hasher.file(Path(rec["data"][k]))[0]
    payload = {"schema": KEY_SCHEMA, "tool": __version__, "code": code_fingerprint(), "model": hasher.file(m.path)[0],
               "external_data": hasher.external(m.path), "recipe": rec}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- state


def load_state(path: Path) -> tuple[dict, str | None]:
    """Read the state file; a missing or unreadable one gives an empty state (and a note)."""
    if not path.exists():
        return {"schema": STATE_SCHEMA, "tasks": {}}, None
    try:
        st = json.loads(path.read_text())
        if not isinstance(st, dict) or not isinstance(st.get("tasks"), dict):
            raise ValueError("no 'tasks' table")
        return st, None
    except (OSError, ValueError) as exc:
        bad = path.with_name(path.name + ".unreadable")
        with contextlib.suppress(OSError):
            os.replace(path, bad)
        return {"schema": STATE_SCHEMA, "tasks": {}}, f"state file {path} unreadable ({exc}); moved to {bad}, starting afresh"


def _finished(entry: dict | None, key: str, retry_failed: bool) -> bool:
    if not entry or entry.get("key") != key:
        return False
    if entry.get("status") == "ok":
        out = entry.get("output")
        return bool(out) and Path(out).is_file() and Path(out).stat().st_size == entry.get("output_bytes")
    return entry.get("kind") in CACHEABLE_FAILURES and not retry_failed


@contextlib.contextmanager
def _lock(out: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    f = open(out / ".zoo.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ZooRunError(f"{out}: another `onnxcompress zoo` run is using this output folder") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# ----------------------------------------------------------------------------- fetching


def fetch_refusal(manifest: Path) -> str | None:
    """Why the manifest's ``fetch`` commands must not run without ``--allow-fetch``: a manifest is
    code (each command runs as the current user), so it must be owned by the current user and
    not writable by group or others. ``None`` when it is (or the platform has no owners)."""
    if not hasattr(os, "getuid"):
        return None
    st = os.stat(manifest)
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by {'group' if st.st_mode & stat.S_IWGRP else 'others'} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def failure_cause(log: Path) -> str:
    """The line of a failed command's log that says why: the last exception or error line (not
    the last line, which is often a "done in 0.6 s"), with the fix when it is known."""
    import re

    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    pat = re.compile(r"(^\w*(Error|Exception|Exit)\b|Error:|error:|^E\s)")
    cause = next((ln for ln in reversed(lines) if pat.search(ln)), lines[-1] if lines else "")
    m = re.search(r"No module named '([\w.]+)'", cause)
    if m:
        cause += (f" (install what the zoo needs: pip install -e '.[zoo]' torch=={_TORCH}; "
                  f"'{m.group(1).split('.')[0]}' is missing)")
    return cause[-300:]


#: the CPU build of torch the zoo's fetch scripts use (README: pip install torch==...)
_TORCH = "2.13.0"


def _missing(m) -> list[Path]:
    """The model's files that do not exist yet: the model, its calibration and validation data
    (a fetch interrupted after the model was written leaves the data missing)."""
    return [p for p in (m.path, m.calibration, m.validation) if p is not None and not p.exists()]


def _fetch(mf: Manifest, name: str, logs: Path, no_fetch: bool = False) -> str | None:
    """Run a model's fetch commands when its model file or its data is missing (so a rerun
    repairs an interrupted fetch); return an error or ``None``."""
    m = mf.models[name]
    missing = _missing(m)
    if not missing:
        return None
    what = ("model file" if missing[0] == m.path else "calibration data" if missing[0] == m.calibration
            else "validation data")
    if not m.fetch:
        return f"{what} not found: {missing[0]} (and the manifest gives no 'fetch' command for it)"
    if no_fetch:
        return f"{what} not found: {missing[0]} (its 'fetch' commands were not run: --no-fetch)"
    log = logs / f"{name}.fetch.log"
    with open(log, "w") as f:
        for cmd in m.fetch:
            argv = [a.replace("{python}", sys.executable).replace("{manifest_dir}", str(mf.base)) for a in cmd]
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            try:
                rc = subprocess.run(argv, cwd=mf.base, stdout=f, stderr=subprocess.STDOUT, timeout=3600).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"fetch failed: {' '.join(cmd)}: {exc} (log: {log})"
            if rc != 0:
                return f"fetch failed (exit {rc}): {' '.join(cmd)}: {failure_cause(log)} (log: {log})"
    still = _missing(m)
    if still:
        return f"fetch ran but {still[0]} still does not exist (log: {log})"
    return None


# ----------------------------------------------------------------------------- executors


Event = Callable[[str, dict], None]


def _run_local(specs: list[dict], jobs: int, on_start: Event, on_done: Event) -> None:
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        prepare()  # the fork server dies with this process, not with a pool thread

    def one(spec):
        if stop.is_set():
            return {**_failed(spec, "error", "not run: the batch was interrupted")}
        on_start("start", spec)
        return execute_task(spec)

    pool = cf.ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="zoo")
    futs = {pool.submit(one, s): s for s in specs}
    try:
        for fut in cf.as_completed(futs):
            spec = futs[fut]
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - a bug in the harness: still one row
                row = _failed(spec, "error", f"{type(exc).__name__}: {exc}")
            on_done("done", row)
    except BaseException:
        stop.set()
        kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(specs: list[dict], jobs: int | None, address: str | None, on_start: Event, on_done: Event) -> None:
    """Run :func:`execute_task` as Ray tasks (1 CPU each; the same worker process, limits and
    result rows as locally). Paths are passed as they are: on a multi-node cluster the
    manifest's files and the output folder must be on a filesystem every node mounts at the
    same path, and onnxcompress must be installed in the nodes' Python."""
    try:
        import ray
    except ImportError:
        raise ZooRunError("--executor ray needs Ray, which is not installed: pip install 'onnxcompress[ray]' "
                          "(or pip install ray)") from None
    import logging

    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            else:
                ray.init(num_cpus=jobs or os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR,
                         log_to_driver=False)
        except Exception as exc:  # noqa: BLE001
            raise ZooRunError(f"cannot start/connect Ray ({'address ' + address if address else 'local'}): "
                              f"{type(exc).__name__}: {exc}") from None
    try:
        limit = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=0)(execute_task)
        pending = list(specs)
        inflight: dict = {}
        while pending or inflight:
            while pending and len(inflight) < limit:
                spec = pending.pop(0)
                inflight[remote.remote(spec)] = spec
                on_start("start", spec)
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in done:
                spec = inflight.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - worker node lost, Ray-level crash
                    row = _failed(spec, "crash", f"Ray task failed: {type(exc).__name__}: {str(exc)[:300]}")
                on_done("done", row)
    finally:
        if started_here:
            ray.shutdown()


def _repair_hint(mf: Manifest, row: dict) -> None:
    """A task that failed on a file its model's ``fetch`` commands make (a truncated download, a
    corrupt data file): say how to have it rebuilt — fetch runs only for missing files."""
    m = mf.models.get(row.get("model"))
    err = row.get("error") or ""
    if row.get("status") == "ok" or row.get("kind") != "input" or m is None or not m.fetch:
        return
    if any(p is not None and str(p) in err for p in (m.path, m.calibration, m.validation)):
        row["error"] = err + " (delete that file and rerun: the manifest's fetch commands rebuild missing files)"


def _failed(spec: dict, kind: str, msg: str) -> dict:
    return {"model": spec["model"], "recipe": spec["recipe"], "key": spec.get("key"), "status": "failed",
            "kind": kind, "error": msg, "wall_s": 0.0}


# ----------------------------------------------------------------------------- the batch


def run_zoo(
    manifest: str | Path,
    out: str | Path,
    *,
    jobs: int | None = None,
    recipes: list[str] | None = None,
    only: list[str] | None = None,
    executor: str = "local",
    address: str | None = None,
    memory_limit_mb: int | None = None,
    timeout_s: float | None = None,
    threads: int | None = None,
    retry_failed: bool = False,
    force: bool = False,
    allow_fetch: bool = False,
    no_fetch: bool = False,
    progress: Event | None = None,
) -> ZooResult:
    """Convert every (model, recipe) of a manifest; see the module docstring.

    Args mirror the command line; ``None`` takes the manifest's ``[run]`` value, then the
    built-in default (jobs = CPU count, no memory limit, a :data:`DEFAULT_TIMEOUT_S` time limit,
    threads = CPUs // jobs); a time limit of 0 means none. ``allow_fetch`` runs the manifest's
    ``fetch`` commands even when :func:`fetch_refusal` objects; ``no_fetch`` never runs them
    (models without their file then fail). ``progress`` receives events ``("plan", {...})``,
    ``("start", spec)``, ``("done", row)``.

    Raises:
        ManifestError: bad manifest or ``--only``/``--recipe`` names.
        ZooRunError: the output folder is locked or unwritable, the executor is unavailable, or
            fetch commands would run from a manifest that :func:`fetch_refusal` objects to.
    """
    t_start = time.time()
    say = progress or (lambda ev, d: None)
    mf = load_manifest(manifest)
    if executor not in ("local", "ray"):
        raise ZooRunError(f"--executor must be local or ray, got {executor!r}")
    tasks = mf.tasks(only, recipes)
    run = mf.run
    cpus = os.cpu_count() or 1
    jobs = jobs or run.get("jobs") or (None if executor == "ray" else cpus)
    memory_limit_mb = memory_limit_mb if memory_limit_mb is not None else run.get("memory_limit_mb")
    if timeout_s is None:  # [run] timeout_s = false is kept as None: no limit
        timeout_s = run["timeout_s"] if "timeout_s" in run else DEFAULT_TIMEOUT_S
    timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
    if allow_fetch and no_fetch:
        raise ZooRunError("--allow-fetch and --no-fetch exclude each other")
    if not no_fetch and not allow_fetch and any(
            _missing(mf.models[n]) and mf.models[n].fetch for n in dict.fromkeys(m for m, _ in tasks)):
        why = fetch_refusal(mf.path)
        if why:
            raise ZooRunError(f"{mf.path}: refusing to run its 'fetch' commands: {why} (a manifest is code: "
                              f"its commands run as you); check it, then pass --allow-fetch, or --no-fetch to skip them")
    threads = threads if threads is not None else run.get("threads")
    if threads is None and executor == "local":
        threads = max(1, cpus // max(1, jobs))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("models", "reports", "logs", ".work"):
            (out / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise ZooRunError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    out = out.resolve()
    state_path = out / STATE_NAME
    notes: list[str] = []
    with _lock(out):
        state, note = load_state(state_path)
        if note:
            notes.append(note)
        state.setdefault("tasks", {})
        shutil.rmtree(out / ".work", ignore_errors=True)  # scratch of a killed run
        (out / ".work").mkdir(exist_ok=True)

        hasher = _Hasher()
        model_errors: dict[str, tuple[str, str]] = {}  # model -> (kind, one-line error)
        for name in dict.fromkeys(m for m, _ in tasks):
            m = mf.models[name]
            # a FIFO or a device would hang the hashing below (no task limit applies yet): refuse it
            bad = check_input(m.path, "model path") or next(
                (e for what, p in (("calibration", m.calibration), ("validation", m.validation))
                 if p is not None and (e := check_input(p, f"{what} data", folder_ok=True))), None)
            if bad:
                model_errors[name] = ("input", bad)
                continue
            err = _fetch(mf, name, out / "logs", no_fetch)
            for what, p in (("calibration", m.calibration), ("validation", m.validation)):
                if not err and p is not None and not p.exists():
                    err = f"{what} data not found: {p}"
            if err:
                model_errors[name] = ("missing", err)

        rows: dict[str, dict] = {}
        to_run: list[dict] = []
        cached: list[str] = []
        for name, recipe in tasks:
            tid = f"{name}/{recipe}"
            if name in model_errors:
                kind, err = model_errors[name]
                rows[tid] = {"model": name, "recipe": recipe, "key": None, "status": "failed",
                             "kind": kind, "error": err, "wall_s": 0.0}
                continue
            try:
                key = task_key(mf, name, recipe, hasher)
            except TaskInputError as exc:  # a FIFO/device/unreadable file: this task fails, the others run
                rows[tid] = {"model": name, "recipe": recipe, "key": None, "status": "failed",
                             "kind": "input", "error": f"cannot compute the cache key: {exc}", "wall_s": 0.0}
                continue
            entry = state["tasks"].get(tid)
            if not force and _finished(entry, key, retry_failed):
                rows[tid] = dict(entry)
                cached.append(tid)
                continue
            to_run.append(_spec(mf, out, name, recipe, key, memory_limit_mb, timeout_s, threads))
        # keep the report complete: finished tasks of the manifest outside this selection
        selected = set(rows) | {f"{s['model']}/{s['recipe']}" for s in to_run}
        extra = {tid: e for tid, e in state["tasks"].items() if tid not in selected
                 and e.get("model") in mf.models and e.get("recipe") in mf.recipes}

        say("plan", {"total": len(tasks), "to_run": len(to_run), "cached": len(cached),
                     "failed_before_run": sum(1 for r in rows.values() if r["status"] != "ok"),
                     "jobs": jobs, "executor": executor})
        executed: list[str] = []
        state_lock = threading.Lock()

        def done(ev: str, row: dict) -> None:
            tid = f"{row['model']}/{row['recipe']}"
            _repair_hint(mf, row)
            row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            rows[tid] = row
            executed.append(tid)
            with state_lock:
                if row["status"] == "ok" or row.get("kind") in CACHEABLE_FAILURES:
                    state["tasks"][tid] = row
                else:
                    state["tasks"].pop(tid, None)  # timeouts, limits, crashes: retried next time
                state.update(schema=STATE_SCHEMA, tool=__version__, manifest=str(mf.path),
                             updated=row["finished_at"])
                write_json_atomic(state_path, state)
            say(ev, row)

        if to_run:
            if executor == "ray":
                _run_ray(to_run, jobs, address, say, done)
            else:
                _run_local(to_run, jobs, say, done)
        shutil.rmtree(out / ".work", ignore_errors=True)

        ordered = [rows[f"{m}/{r}"] for m, r in tasks]
        for r in ordered:
            r["ran"] = f"{r['model']}/{r['recipe']}" in executed
        from .report import write_reports

        rep = {
            "tool": {"name": "onnxcompress", "version": __version__},
            "manifest": str(mf.path), "out": str(out), "executor": executor, "address": address,
            "jobs": jobs, "threads_per_task": threads, "memory_limit_mb": memory_limit_mb, "timeout_s": timeout_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
            "wall_s": round(time.time() - t_start, 2),
            "counts": {"tasks": len(ordered), "ok": sum(r["status"] == "ok" for r in ordered),
                       "failed": sum(r["status"] != "ok" for r in ordered), "ran": len(executed),
                       "cached": len(cached)},
            "notes": notes + ([f"latency measured with {jobs} tasks in parallel on {cpus} CPUs, "
                               f"{threads} ORT thread(s) per task"] if jobs and jobs > 1 and to_run else [])
            + ([f"this report covers the selected tasks only: {len(extra)} other finished task(s) of the manifest "
                "are listed under other_finished in zoo_report.json; a run without --only/--recipe reports every "
                "task (finished ones from the cache)"] if extra else []),
            "rows": ordered,
            "other_finished": sorted(extra.values(), key=lambda e: (e["model"], e["recipe"])),
        }
        paths = write_reports(rep, out, mf)
        rep["wall_s"] = round(time.time() - t_start, 2)
        write_json_atomic(paths["json"], rep)
    return ZooResult(ordered, rep, paths, executed, cached)


def _spec(mf: Manifest, out: Path, model: str, recipe: str, key: str, memory_limit_mb, timeout_s, threads) -> dict:
    m = mf.models[model]
    timeout_s = m.timeout_s if m.timeout_s is not None else timeout_s
    return {
        "model": model, "recipe": recipe, "key": key, "model_path": str(m.path),
        "recipe_data": mf.recipe_for(model, recipe).to_dict() if recipe != TUNE_TASK else None,
        "tune": m.tune if recipe == TUNE_TASK else None,
        "calibration": str(m.calibration) if m.calibration else None,
        "validation": str(m.validation) if m.validation else None,
        "output": str(out / "models" / model / f"{recipe}.onnx"),
        "report": str(out / "reports" / model / f"{recipe}.json"),
        "log": str(out / "logs" / f"{model}.{recipe}.log"),
        "work_dir": str(out / ".work" / f"{model}.{recipe}"),
        "timeout_s": timeout_s if timeout_s and timeout_s > 0 else None,  # 0: no limit
        "memory_limit_mb": m.memory_limit_mb if m.memory_limit_mb is not None else memory_limit_mb,
        "threads": threads,
    }
