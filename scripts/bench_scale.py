"""Scale benchmark: onnxcompress vs ONNX Runtime's own tools on synthetic transformers, 50 MB to 6 GB.

For each ``--sizes`` entry a synthetic pre-LN transformer stack is built with
:func:`onnxcompress.synthetic.transformer_stack` (hidden 512 below 150 MB, 1024 up to 4 GB, and an
LLM-shaped hidden 2048 from 4 GB on: ``6G`` is 40 layers, 1.51 B parameters; ffn = 4 * hidden;
external data from 1.5 GiB on) into ``--out``/models, and reused on later runs when its
parameters (recorded in ``<model>.params.json``) are the same. Sizes are decimal bytes
(``800M`` = 800e6, ``2.4G`` = 2.4e9); the layer count is the one that comes closest.

Then, one after the other, each tool runs as a **separate child process**; its wall seconds and
its peak RSS (``ru_maxrss`` of that child and its reaped descendants, from ``os.wait4``) are
measured, so every row starts from an empty process. The measuring ``os.wait4`` runs in a
~10 MB launcher process that forks the child: a child forked by this (larger) process would
report this process's RSS as its own floor, since Linux adds the pre-``exec`` address space's
high-water mark to ``ru_maxrss`` (see ``_LAUNCHER``):

=====================  ===================================================================
fuse                   ``onnxcompress optimize MODEL -o OUT --validation VAL``  vs  ORT's
                       offline optimizer (``SessionOptions.optimized_model_filepath``,
                       ``--ort-level`` extended by default; external initializers over 2 GB)
fuse-nodata            ``onnxcompress optimize MODEL -o OUT``, the command as typed: validated
                       on the few small random check samples optimize generates; beside the
                       same ORT optimizer run (one run serves both fuse rows). ``fuse`` with
                       VAL adds 2 x ``--val-samples`` forward passes of the whole model (the
                       input's and the result's), which ORT's optimizer never runs
dynamic                ``... --quantize dynamic``  vs  ``quantize_dynamic`` (s8 weights,
                       ``use_external_data_format`` over 2 GB)
static (<= --static-max) ``... --quantize static --calibration CALIB``  vs  ``quantize_static``
                       (QDQ, per-channel s8 weights, u8 activations, MinMax, the same CALIB
                       samples through a CalibrationDataReader)
=====================  ===================================================================

CALIB holds ``--samples`` inputs of :func:`~onnxcompress.synthetic.real_input` (seq 128, seed 1;
``hidden_states`` -> ``[N, 1, 128, hidden]``, one sample per leading index, see
``onnxcompress/data.py``); VAL the same number from seed 2 (``--val-samples`` to change it).
onnxcompress runs through its CLI when the CLI has ``--no-latency``; otherwise (``--ox-runner
auto``, as of this writing) through a worker of this script that calls ``onnxcompress.api.optimize``
with the CLI's defaults and ``latency=False``, so its time does not include latency timing
that ORT's tools do not do (``--ox-runner cli`` forces the CLI, latency included). ORT's
quantizers run without ``quant_pre_process``. Every child's cwd is its own scratch folder
(ORT's quantizer leaves ``<uuid>.data`` files in the working folder).

After each run a checker child loads the written model in ONNX Runtime (CPU, default
optimizations) and runs one ``real_input`` (seq 128, seed 3): ``cosine`` is that of
``last_hidden_state`` against the fp32 input model's (computed once per model, cached in a
``.ref.npy``). A tool that exits non-zero, times out (``--timeout``) or writes no file is
recorded with the last line of its stderr, and the benchmark goes on. Logs stay in the run
folder (``<out>/runs/<time>/<size>/<tool>/``); written models are deleted once checked unless
``--keep``.

"Done when" targets (the ``targets`` column, onnxcompress rows; GB = 1e9 bytes, model = the
input's file bytes, ``.onnx`` plus ``.data``):

* peak RSS: fuse and dynamic <= 1.5 x model + 0.5 GB; static <= 2 x model + 1 GB;
* time: fuse <= 1.5 x ORT's optimizer; dynamic <= 2 x ``quantize_dynamic``; static <= 2 x
  ``quantize_static`` (the ``xORT`` column: onnxcompress seconds / its ORT counterpart's;
  ``xORT w/o val`` leaves out the seconds of the stages in which onnxcompress runs the input and
  the result for validation, which ORT's tools do not do: :data:`VALIDATION_STAGES` of its
  ``--report``; those stages also summarize the model before and after, so it is a lower bound);
* a failed run fails both.

Run::

    python scripts/bench_scale.py [--sizes 50M 200M 800M 2.4G 6G] [--modes fuse dynamic static]
        [--static-max 800M] [--samples 16] [--out DIR] [--json FILE] [--keep]

Disk: the models are kept (about 9.5 GB for the default sizes) plus, while it is checked, one
output. Memory: this parent process stays small (it never loads a model); each child gets the
machine to itself. Timings on a shared machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

GB = 1e9
EXTERNAL_OVER = 1.9e9  # ORT tools get external-data options from here (protobuf limit: 2 GiB)
CHECK_SEED, CALIB_SEED, VAL_SEED, SEQ = 3, 1, 2, 128
GENERATOR = "onnxcompress.synthetic/1"

# (mode, onnxcompress tool, ORT tool, peak = a * model + b (GB), time <= t * ORT)
MODES = {
    "fuse": ("onnxcompress fuse", "ORT optimizer", 1.5, 0.5, 1.5),
    # the command as typed, no data: its validation runs the check samples that optimize generates
    # (random, the smallest shapes), as ORT's optimizer runs none
    "fuse-nodata": ("onnxcompress fuse (no data)", "ORT optimizer", 1.5, 0.5, 1.5),
    "dynamic": ("onnxcompress dynamic", "ORT quantize_dynamic", 1.5, 0.5, 2.0),
    "static": ("onnxcompress static", "ORT quantize_static", 2.0, 1.0, 2.0),
}


# ----------------------------------------------------------------------------- helpers


def parse_size(text: str) -> float:
    """``"50M"`` -> 50e6, ``"2.4G"`` -> 2.4e9, ``"1.5e9"`` -> 1.5e9 (decimal units, optional B)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 50M, 2.4G)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]


def shape_for(size: float) -> tuple[int, int]:
    """(hidden, ffn) for a target size: small models narrow, 6 GB LLM-shaped."""
    hidden = 2048 if size >= 4e9 else 1024 if size >= 150e6 else 512
    return hidden, 4 * hidden


def model_files_bytes(path: Path) -> int:
    """The ``.onnx`` plus the external data files it names (parsed without loading weights)."""
    import onnx

    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:  # Constant nodes' tensors too (ORT writes few)
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc and loc not in seen and (path.parent / loc).is_file():
                seen.add(loc)
                total += (path.parent / loc).stat().st_size
    return total


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def tail(path: Path, n_chars: int = 3000) -> tuple[str, str]:
    """(last non-empty line, last ``n_chars``) of a log file, ANSI colours removed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = _ANSI.sub("", f.read().decode("utf-8", "replace"))
    except OSError:
        return "", ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else ""), text[-n_chars:]


# A child's ru_maxrss is not only its own: at exec() Linux records the *old* address space's
# high-water RSS in the process's maxrss, and a child forked or vforked by this process (which
# holds numpy, onnx, rich: ~150 MB) execs out of this process's address space, so every
# child would report at least this process's peak. A tiny launcher is started instead; it
# forks the measured command (the fork copies only the launcher's ~10 MB) and measures it with
# os.wait4, killing the command's process group at the timeout; SIGTERM kills it too.
_LAUNCHER = r"""
import json, os, signal, sys, time
report, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.setpgid(0, 0)
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        os.write(2, f"cannot run {cmd[0]}: {exc}\n".encode())
    finally:
        os._exit(127)
state = {"timed_out": False}
def kill(signum, frame):
    state["timed_out"] = signum == signal.SIGALRM
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGALRM, kill)
signal.signal(signal.SIGTERM, kill)
signal.signal(signal.SIGINT, kill)
signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
signal.setitimer(signal.ITIMER_REAL, 0)
try:
    os.killpg(pid, signal.SIGKILL)  # grandchildren it left behind
except (ProcessLookupError, PermissionError):
    pass
with open(report, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "seconds": round(wall, 3),
               "peak_rss_bytes": ru.ru_maxrss * 1024, "user_s": round(ru.ru_utime, 2),
               "sys_s": round(ru.ru_stime, 2), "timed_out": state["timed_out"]}, f)
"""


def run_child(cmd: list[str], folder: Path, name: str, timeout: float) -> dict:
    """Run ``cmd`` in ``folder`` (stdout/stderr to ``name.out``/``name.err`` there) through the
    launcher: its wall seconds and peak RSS (``ru_maxrss`` from ``os.wait4``, KiB on Linux, of
    the command and its reaped descendants), exit code, and whether it was killed at ``timeout``."""
    folder = folder.resolve()
    out_p, err_p, rep_p = folder / f"{name}.out", folder / f"{name}.err", folder / f"{name}.rusage.json"
    rep_p.unlink(missing_ok=True)
    with open(out_p, "wb") as fo, open(err_p, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(rep_p), str(timeout), *cmd],
                                cwd=folder, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout + 120)
        except BaseException:  # Ctrl-C here, or a launcher that hangs: it kills the command
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
            raise
        wall = time.perf_counter() - t0
    try:
        r = json.loads(rep_p.read_text())
        rep_p.unlink()
    except (OSError, ValueError):  # the launcher itself failed (exec error...): its own view
        r = {"rc": proc.returncode if proc.returncode else 127, "seconds": round(wall, 3), "peak_rss_bytes": None,
             "timed_out": False}
    last, text = tail(err_p)
    return {**r, "stderr_last": last, "stderr_tail": text, "stdout_last": tail(out_p)[0]}


def cpu_summary() -> dict:
    name, flags = platform.processor() or "?", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("?", "", "x86_64", "aarch64"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = {"avx2": "avx2" in flags, "avx512": "avx512f" in flags,
           "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx": "amx_int8" in flags}
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    versions = {}
    import importlib.metadata as md

    for pkg in ("onnxcompress", "onnxruntime", "onnx", "onnx-ir", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    info = {"cpu": name, "isa": isa, "isa_flags": sorted(f for f in flags if f.startswith(("avx", "amx"))),
            "cpus": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(), "versions": versions}
    with contextlib.suppress(OSError):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def onnxcompress_cli() -> list[str]:
    """The CLI's command line, its package byte-compiled first (:func:`precompile`)."""
    precompile()
    exe = Path(sys.executable).with_name("onnxcompress")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "onnxcompress.cli"]


@functools.lru_cache(maxsize=None)
def precompile() -> None:
    """Byte-compile the onnxcompress package (``__pycache__``), as installing a wheel does.

    An editable install has no ``.pyc`` files until an import writes them, and an environment
    with ``PYTHONDONTWRITEBYTECODE`` (this project's sandbox) never writes them: every run would
    compile the package's ~65 modules from source, 0.2-0.3 s that a user's install does not pay
    (2-core Xeon: ``import onnxcompress.pipeline`` 1.32 -> 1.00 s). ORT's tools are installed
    wheels, byte-compiled by pip."""
    import compileall

    import onnxcompress

    compileall.compile_dir(str(Path(onnxcompress.__file__).parent), quiet=1)


@functools.lru_cache(maxsize=None)
def cli_has(flag: str) -> bool:
    env = dict(os.environ, COLUMNS="300", TERMINAL_WIDTH="300", NO_COLOR="1")
    try:
        r = subprocess.run(onnxcompress_cli() + ["optimize", "--help"], capture_output=True, text=True,
                           timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(re.escape(flag) + r"\b", r.stdout + r.stderr) is not None


# ----------------------------------------------------------------------------- inputs


def build_model(models: Path, label: str, size: float, sparse: bool, log) -> tuple[Path, dict]:
    from onnxcompress.synthetic import layers_for_size, transformer_stack, weight_bytes

    hidden, ffn = shape_for(size)
    layers = layers_for_size(size, hidden, ffn)
    params = {"generator": GENERATOR, "hidden": hidden, "ffn": ffn, "layers": layers, "seed": 0,
              "sparse": sparse, "external_data": None, "opset": 17}
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    path = models / f"stack-{label}-h{hidden}-l{layers}{'-sparse' if sparse else ''}.onnx"
    meta = path.with_name(path.name + ".params.json")
    try:
        ok = meta.is_file() and path.is_file() and json.loads(meta.read_text()).get("params") == params
    except (OSError, ValueError):
        ok = False
    if ok:
        log(f"{label}: reusing {path}")
    else:
        meta.unlink(missing_ok=True)
        for stale in path.parent.glob(path.name + ".ref*.npy"):
            stale.unlink()
        log(f"{label}: building {path.name} (hidden {hidden}, {layers} layers, "
            f"{weight_bytes(hidden, layers, ffn) / GB:.2f} GB of weights)")
        t0 = time.perf_counter()
        transformer_stack(path, hidden=hidden, layers=layers, ffn=ffn, seed=0, sparse=sparse)
        meta.write_text(json.dumps({"params": params, "tag": tag, "build_seconds": round(time.perf_counter() - t0, 2)}))
    data = path.with_name(path.name + ".data")  # transformer_stack's layout: no need to parse the model here
    info = dict(params, path=str(path), params_count=weight_bytes(hidden, layers, ffn) // 4, tag=tag,
                file_bytes=path.stat().st_size + (data.stat().st_size if data.is_file() else 0))
    return path, info


def data_npz(folder: Path, hidden: int, n: int, seed: int) -> Path:
    """``hidden_states`` -> ``[n, 1, SEQ, hidden]`` (one more axis than the input: axis 0 = samples)."""
    import numpy as np

    from onnxcompress.synthetic import real_input

    p = folder / f"real_h{hidden}_s{SEQ}_n{n}_seed{seed}.npz"
    if not p.is_file():
        x = real_input(hidden, seq=SEQ, batch=n, seed=seed)[:, None]
        tmp = p.with_name("." + p.name + ".tmp.npz")
        np.savez(tmp, hidden_states=x)
        os.replace(tmp, p)
    return p


# ----------------------------------------------------------------------------- workers (children)


#: onnxcompress's stages that run models for validation, which ORT's tools do not do: the input
#: on the check and validation samples, the result on the validation samples, fallback rounds.
#: An approximation: the first two also hold the report's before/after summaries (one read of
#: the weights) and a fallback round also re-quantizes; ``--report``'s ``cost`` lists every stage
VALIDATION_STAGES = ("reference run of the input", "validating with ONNX Runtime", "fallback:")


def validation_seconds(report: Path) -> float | None:
    """Seconds of :data:`VALIDATION_STAGES` in an onnxcompress ``--report`` (``report["cost"]``),
    or ``None`` without a readable report."""
    try:
        stages = json.loads(report.read_text())["cost"]["stages"]
        return sum(st["seconds"] for st in stages if st["stage"].startswith(VALIDATION_STAGES))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _worker(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "ort-opt":  # MODEL OUT LEVEL EXTERNAL
        import onnxruntime as ort

        model, out, level, ext = rest[0], rest[1], rest[2], rest[3] == "1"
        so = ort.SessionOptions()
        so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        so.optimized_model_filepath = out
        if ext:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        Path(out).name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return 0
    if kind == "ort-dynamic":  # MODEL OUT EXTERNAL
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(rest[0], rest[1], weight_type=QuantType.QInt8, use_external_data_format=rest[2] == "1")
        return 0
    if kind == "ort-static":  # MODEL OUT CALIB EXTERNAL
        import numpy as np
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        class Reader(CalibrationDataReader):
            def __init__(self, npz):
                with np.load(npz) as z:
                    self.x = z["hidden_states"]
                self.i = 0

            def get_next(self):
                if self.i >= len(self.x):
                    return None
                self.i += 1
                return {"hidden_states": self.x[self.i - 1]}

            def rewind(self):
                self.i = 0

        quantize_static(rest[0], rest[1], Reader(rest[2]), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=rest[3] == "1")
        return 0
    if kind == "ox-api":  # MODE MODEL OUT CALIB|- VAL
        from onnxcompress.api import OptimizeOptions, optimize
        from onnxcompress.errors import OnnxCompressError

        mode, model, out, calib, val = rest
        opts = OptimizeOptions(quantize=None if mode.startswith("fuse") else mode,
                               calibration=None if calib == "-" else calib,
                               validation=None if mode == "fuse-nodata" else val, latency=False,
                               accept_degraded=True)
        try:
            optimize(model, out, opts)
        except OnnxCompressError as exc:  # as the CLI: one line, its exit code
            print(f"error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        return 0
    if kind in ("ref", "check"):  # ref MODEL NPY HIDDEN  |  check CAND REF_NPY HIDDEN
        import numpy as np
        import onnxruntime as ort

        from onnxcompress.synthetic import real_input

        model, npy, hidden = rest[0], rest[1], int(rest[2])
        res = {"loaded": False, "cosine": None, "out_bytes": None, "error": None}
        with contextlib.suppress(Exception):
            res["out_bytes"] = model_files_bytes(Path(model))
        try:
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            res["loaded"] = True
            y = sess.run(["last_hidden_state"], {"hidden_states": real_input(hidden, seq=SEQ, seed=CHECK_SEED)})[0]
            if kind == "ref":
                np.save(npy, y)
            else:
                r = np.load(npy).astype(np.float64).ravel()
                c = y.astype(np.float64).ravel()
                if r.shape != c.shape:
                    raise ValueError(f"output shape {list(y.shape)} != reference {list(np.load(npy).shape)}")
                den = float(np.linalg.norm(r) * np.linalg.norm(c))
                res["cosine"] = float(r @ c / den) if den else float("nan")
                res["finite"] = bool(np.isfinite(c).all())
        except Exception as exc:
            res["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        print(json.dumps(res))
        return 0
    raise SystemExit(f"unknown worker {kind!r}")


# ----------------------------------------------------------------------------- parent


def fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class Bench:
    def __init__(self, args):
        from rich.console import Console

        self.args = args
        self.console = Console(width=None if sys.stdout.isatty() else 170, highlight=False)
        self.out = Path(args.out).resolve()
        self.models = self.out / "models"
        self.data = self.out / "data"
        for d in (self.models, self.data, self.out / "runs"):
            d.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=self.out / "runs"))
        self.me = [sys.executable, str(Path(__file__).resolve())]
        runner = args.ox_runner
        if runner == "auto":
            runner = "cli" if cli_has("--no-latency") else "api"
        self.runner = runner
        self.rows: list[dict] = []
        self.machine = cpu_summary()

    def log(self, msg: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")

    def ox_cmd(self, mode: str, model: Path, out: Path, calib: Path, val: Path) -> list[str]:
        precompile()  # both runners import the package byte-compiled
        if self.runner == "api":
            return self.me + ["--worker", "ox-api", mode, str(model), str(out),
                              str(calib) if mode == "static" else "-", str(val)]
        cmd = onnxcompress_cli() + ["optimize", str(model), "-o", str(out)]
        if mode != "fuse-nodata":
            cmd += ["--validation", str(val)]
        if not mode.startswith("fuse"):
            cmd += ["--quantize", mode]
        if mode == "static":
            cmd += ["--calibration", str(calib)]
        if cli_has("--no-latency"):
            cmd.append("--no-latency")
        if not mode.startswith("fuse") and cli_has("--accept-degraded"):  # the bench measures fidelity itself
            cmd.append("--accept-degraded")
        return cmd + (["--report", str(out.with_name("report.json"))] if cli_has("--report") else [])

    def ort_cmd(self, mode: str, model: Path, out: Path, calib: Path, ext: bool) -> list[str]:
        e = "1" if ext else "0"
        if mode.startswith("fuse"):
            return self.me + ["--worker", "ort-opt", str(model), str(out), self.args.ort_level, e]
        if mode == "dynamic":
            return self.me + ["--worker", "ort-dynamic", str(model), str(out), e]
        return self.me + ["--worker", "ort-static", str(model), str(out), str(calib), e]

    def one(self, label: str, info: dict, mode: str, tool: str, cmd: list[str], folder: Path, out: Path,
            ref: Path | None) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"{label}: {tool} ...")
        env_cmd = " ".join(cmd)
        try:
            r = run_child(cmd, folder, "run", self.args.timeout)
        except OSError as exc:  # cannot even start it
            r = {"rc": None, "seconds": None, "peak_rss_bytes": None, "timed_out": False,
                 "stderr_last": f"cannot start: {exc}", "stderr_tail": ""}
        row = {"size": label, "mode": mode, "tool": tool, "command": env_cmd, "folder": str(folder),
               "model_bytes": info["file_bytes"], "hidden": info["hidden"], "layers": info["layers"], **r,
               "ok": False, "loaded": None, "cosine": None, "out_bytes": None, "error": None}
        if r["rc"] != 0 or not out.is_file():
            why = ("timed out" if r.get("timed_out") else f"exit {r['rc']}" if r["rc"] != 0 else "no output file")
            row["error"] = f"{why}: {r.get('stderr_last') or '(no stderr)'}"
        if out.is_file() and ref is not None:
            c = run_child(self.me + ["--worker", "check", str(out), str(ref), str(info["hidden"])], folder, "check",
                          self.args.timeout)
            try:
                res = json.loads(c["stdout_last"])
            except ValueError:
                res = {"loaded": False, "error": f"checker failed (exit {c['rc']}): {c['stderr_last']}"}
            row.update(loaded=res.get("loaded"), cosine=res.get("cosine"), out_bytes=res.get("out_bytes"),
                       check_peak_rss_bytes=c["peak_rss_bytes"], check_seconds=c["seconds"])
            if res.get("error"):
                row["check_error"] = res["error"]
        row["ok"] = row["error"] is None and bool(row["loaded"])
        row["validation_seconds"] = validation_seconds(folder / "report.json")
        if not self.args.keep:  # written models are big: keep only the logs
            for f in folder.iterdir():
                if f.suffix not in (".out", ".err"):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
        mark = "[green]ok[/]" if row["ok"] else f"[red]FAILED[/] {row.get('error') or row.get('check_error')}"
        self.log(f"{label}: {tool}: {fmt(row['seconds'], '.1f')} s, peak {fmt(row['peak_rss_bytes'] and row['peak_rss_bytes'] / GB, '.2f')} GB, "
                 f"cos {fmt(row['cosine'], '.5f')} {mark}")
        return row

    def size(self, text: str) -> None:
        label = text.strip()
        size = parse_size(label)
        try:
            model, info = build_model(self.models, label, size, self.args.sparse, self.log)
        except Exception as exc:
            self.log(f"[red]{label}: cannot build the model[/]: {type(exc).__name__}: {exc}")
            self.rows.append({"size": label, "tool": "build", "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        hidden = info["hidden"]
        ext = info["file_bytes"] >= EXTERNAL_OVER
        calib = data_npz(self.data, hidden, self.args.samples, CALIB_SEED)
        val = data_npz(self.data, hidden, self.args.val_samples or self.args.samples, VAL_SEED)
        ref = model.with_name(model.name + f".ref_s{SEQ}_seed{CHECK_SEED}.npy")
        sdir = self.run_dir / label
        sdir.mkdir(parents=True, exist_ok=True)
        if not ref.is_file():
            self.log(f"{label}: fp32 reference output ...")
            c = run_child(self.me + ["--worker", "ref", str(model), str(ref), str(hidden)], sdir, "ref", self.args.timeout)
            if not ref.is_file():
                self.log(f"[red]{label}: the fp32 model does not run in ORT[/]: {c['stdout_last']} {c['stderr_last']}")
                ref = None
        rows = []
        for mode in self.args.modes:
            if mode == "static" and size > self.args.static_max:
                self.log(f"{label}: static skipped (> --static-max)")
                continue
            ox_tool, ort_tool = MODES[mode][:2]
            for tool, cmd_of in ((ort_tool, lambda o: self.ort_cmd(mode, model, o, calib, ext)),
                                 (ox_tool, lambda o: self.ox_cmd(mode, model, o, calib, val))):
                if any(r["tool"] == tool for r in rows):  # ORT's optimizer: one run serves both fuse rows
                    continue
                folder = sdir / tool.replace(" ", "_")
                out = folder / "out.onnx"
                rows.append(self.one(label, info, mode, tool, cmd_of(out), folder, out, ref))
        self.judge(rows)
        self.rows += rows
        self.table(label, info, rows)
        self.write_json()

    @staticmethod
    def judge(rows: list[dict]) -> None:
        by = {r["tool"]: r for r in rows}
        for r in rows:
            r["x_ort"] = r["time_target"] = r["mem_target"] = None
            mode = r["mode"]
            ox_tool, ort_tool, a, b, t = MODES[mode]
            if r["peak_rss_bytes"] and r["model_bytes"]:
                r["peak_over_model"] = r["peak_rss_bytes"] / r["model_bytes"]
            if r["tool"] != ox_tool:
                continue
            o = by.get(ort_tool)
            if o and o.get("ok") and r["seconds"] and o["seconds"]:
                r["x_ort"] = r["seconds"] / o["seconds"]
                if r.get("validation_seconds") is not None:
                    r["x_ort_without_validation"] = (r["seconds"] - r["validation_seconds"]) / o["seconds"]
            r["mem_limit_bytes"] = a * r["model_bytes"] + b * GB
            r["mem_target"] = bool(r["ok"] and r["peak_rss_bytes"] is not None and r["peak_rss_bytes"] <= r["mem_limit_bytes"])
            r["time_target"] = (bool(r["ok"] and r["x_ort"] <= t) if r["x_ort"] is not None
                                else (False if not r["ok"] else None))
            r["targets"] = {"peak_rss": f"<= {a:g} x model + {b:g} GB", "time": f"<= {t:g} x {ort_tool}"}

    def table(self, label: str, info: dict, rows: list[dict]) -> None:
        from rich.table import Table

        title = (f"{label}: hidden {info['hidden']}, ffn {info['ffn']}, {info['layers']} layers, "
                 f"{info['params_count'] / 1e6:,.0f} M params, model {info['file_bytes'] / GB:.3f} GB"
                 f"{' (sparse values)' if info['sparse'] else ''}")
        t = Table(title=title, title_justify="left")
        for c, j in (("tool", "left"), ("s", "right"), ("peak RSS GB", "right"), ("peak/model", "right"),
                     ("xORT", "right"), ("xORT w/o val", "right"), ("cosine", "right"), ("loaded", "center"), ("out GB", "right"),
                     ("targets", "left"), ("note", "left")):
            t.add_column(c, justify=j, overflow="fold")
        tick = lambda v: "?" if v is None else ("[green]✔[/]" if v else "[red]✘[/]")  # noqa: E731
        for r in rows:
            tgt = ""
            if r["tool"].startswith("onnxcompress"):
                lim = r.get("mem_limit_bytes")
                tgt = f"mem {tick(r['mem_target'])} (≤{fmt(lim and lim / GB, '.2f')})  time {tick(r['time_target'])}"
            note = r.get("error") or r.get("check_error") or ""
            t.add_row(r["tool"], fmt(r["seconds"], ".1f"), fmt(r["peak_rss_bytes"] and r["peak_rss_bytes"] / GB, ".2f"),
                      fmt(r.get("peak_over_model"), ".2f"), fmt(r.get("x_ort"), ".2f"),
                      fmt(r.get("x_ort_without_validation"), ".2f"), fmt(r["cosine"], ".5f"), {True: "yes", False: "[red]no[/]", None: "-"}[r["loaded"]],
                      fmt(r["out_bytes"] and r["out_bytes"] / GB, ".3f"), tgt, note[:160])
        self.console.print(t)

    def header(self) -> None:
        m = self.machine
        isa = ", ".join(f"{k} {'✔' if v else '✘'}" for k, v in m["isa"].items())
        self.console.print(f"[bold]CPU[/] {m['cpu']}  ({m['cpus']} logical CPUs, "
                           f"{fmt(m['memory_bytes'] and m['memory_bytes'] / GB, '.1f')} GB RAM)  {isa}")
        self.console.print(f"ISA flags: {' '.join(m['isa_flags']) or '-'}")
        self.console.print(f"versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}; "
                           f"load avg {m.get('load_avg')}; onnxcompress via "
                           f"{'CLI' if self.runner == 'cli' else 'api.optimize(latency=False) worker (the CLI has no --no-latency)'}")
        self.console.print(f"run folder: {self.run_dir}")

    def write_json(self) -> None:
        if not self.args.json:
            return
        p = Path(self.args.json)
        doc = {"machine": self.machine, "onnxcompress_runner": self.runner, "run_dir": str(self.run_dir),
               "args": {k: v for k, v in vars(self.args).items() if k != "worker"}, "rows": self.rows}
        tmp = p.with_name("." + p.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        os.replace(tmp, p)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["50M", "200M", "800M", "2.4G", "6G"],
                    help="model sizes, decimal bytes (50M, 2.4G)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--static-max", type=parse_size, default=parse_size("800M"),
                    help="run static quantization only up to this size (default 800M)")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (seq 128)")
    ap.add_argument("--val-samples", type=int, default=None, help="validation samples (default: --samples)")
    ap.add_argument("--out", default=str(Path.cwd() / "out" / "bench_scale"),
                    help="models (reused), data and run folders (default ./out/bench_scale)")
    ap.add_argument("--json", default=None, help="write every row here (rewritten after each size)")
    ap.add_argument("--keep", action="store_true", help="keep the written models (default: logs only)")
    ap.add_argument("--sparse", action="store_true",
                    help="build sparse-valued models (file holes: fast to write, real shapes; for quick scale checks)")
    ap.add_argument("--ort-level", choices=["basic", "extended", "all"], default="extended",
                    help="ORT offline optimizer level (extended: the portable one)")
    ap.add_argument("--ox-runner", choices=["auto", "cli", "api"], default="auto",
                    help="onnxcompress through its CLI or api.optimize(latency=False) (auto: the CLI if it has --no-latency)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child before it is killed")
    args = ap.parse_args(argv)
    if args.samples < 1 or (args.val_samples is not None and args.val_samples < 1):
        ap.error("--samples and --val-samples must be >= 1")
    for s in args.sizes:
        parse_size(s)
    bench = Bench(args)
    bench.header()
    try:
        for s in args.sizes:
            bench.size(s)
    except KeyboardInterrupt:
        bench.log("[red]interrupted[/]: rows so far are in the JSON (if --json)")
        bench.write_json()
        return 130
    if args.json:
        bench.log(f"wrote {args.json}")
    all_ox = [r for r in bench.rows if r.get("tool", "").startswith("onnxcompress")]
    met = sum(1 for r in all_ox if r.get("mem_target") and r.get("time_target"))
    bench.log(f"onnxcompress rows meeting both targets: {met}/{len(all_ox)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
