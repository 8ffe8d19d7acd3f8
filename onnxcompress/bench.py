"""Benchmark and cross-check ONNX models with ONNX Runtime, in a way a user can trust.

Two entry points (the CLI commands ``bench`` and ``validate`` are thin layers over them):

* :func:`benchmark` times several models **interleaved** (A B C A B C ..., each turn a block
  of consecutive runs after one untimed switch run) in one process,
  so that the drift of a shared machine hits every model alike, per execution provider and
  per batch size. Per model: p50/p90/p99/mean latency (ms), throughput (samples/s),
  session creation time (ms), file size (bytes), peak resident memory (bytes, measured in
  a separate short pass with one fresh child process per model), ratios against the first
  model with a bootstrap 95 % confidence interval, and a confidence note when the spread
  is wide. ``profile=True`` adds ONNX Runtime's per-node profile: the top op types by time
  and which nodes ran on which execution provider (how a QLinearConv falling back to CPU
  on the CUDA provider shows up).
* :func:`validate_models` runs a reference and a candidate on the same inputs on every
  chosen provider and compares each output (Polygraphy style): ``allclose`` with
  ``atol``/``rtol``, plus the metrics of :func:`onnxcompress.validate.output_metrics`
  (max abs/rel error, cosine, SQNR, top-1 agreement) gated by ``min_cosine`` and
  ``min_top1``; ``cross_provider=True`` also compares each model on CPU against the same
  model on every other chosen provider.

Units everywhere: latency in milliseconds, sizes and memory in bytes, throughput in
samples per second, durations given by the user in seconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from . import __version__
from .data import InputSpec, input_specs, load_npz, random_samples, save_npz
from .errors import DataError, OnnxCompressError
from .gates import OutputGates, output_failures
from .model_io import load_model
from .runtime import cpu_features, make_session, resolve_providers, run_samples
from .validate import output_metrics

#: Distinct input feeds per model and batch size; run ``i`` uses feed ``i % MAX_FEEDS``.
MAX_FEEDS = 16
#: Relative spread (p90 - p10) / p50 above which a model's latency gets a confidence note.
WIDE_SPREAD = 0.30
#: Relative width of a ratio's 95 % interval above which the ratio gets a confidence note.
WIDE_RATIO_CI = 0.10
#: Untimed runs before the profiled ones (their node events are left out).
PROFILE_WARMUP = 3
#: default interleaving block: about this many ms of the first model's runs per turn ...
BLOCK_MS = 250
#: ... between 2 and this many runs
MAX_BLOCK = 10

Progress = Callable[[str, float, float], None]
"""``progress(phase, done, total)``: phase text, work done and total (runs or seconds)."""


# --------------------------------------------------------------------------- results


@dataclass
class LatencyStats:
    """Latency of ``sess.run`` over the timed runs, in milliseconds."""

    n_runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p10_ms: float

    @classmethod
    def of(cls, ms: np.ndarray) -> "LatencyStats":
        p10, p50, p90, p99 = np.percentile(ms, [10, 50, 90, 99])
        return cls(int(ms.size), float(p50), float(p90), float(p99), float(ms.mean()), float(ms.std()),
                   float(ms.min()), float(ms.max()), float(p10))

    @property
    def spread(self) -> float:
        """(p90 - p10) / p50: the relative width of the bulk of the distribution."""
        return (self.p90_ms - self.p10_ms) / self.p50_ms if self.p50_ms > 0 else 0.0


@dataclass
class ModelBench:
    """One model in one (provider, batch) group.

    Attributes:
        label: short name (file name; parent folder added when two names collide).
        path: the model file.
        provider: the requested execution provider; ``session_providers`` what ORT assigned.
        batch: samples per run.
        file_bytes: model file size plus external data files, bytes.
        session_ms: session creation time, ms.
        latency: :class:`LatencyStats` (ms).
        throughput: samples per second (``batch * 1000 / mean_ms``).
        peak_rss_bytes: peak resident memory of a fresh child process while it creates the
            session and runs the model, minus the same process's peak before loading
            (bytes); ``None`` when not measured.
        latency_ratio / speedup / size_ratio / memory_ratio: against the first model of the
            group (``latency_ratio`` = p50 / first p50; ``speedup`` = its inverse).
        latency_ratio_ci: bootstrap 95 % interval of ``latency_ratio`` over paired rounds.
        latencies_ms: every timed run, in order (ms).
        profile: ``--profile`` result (top ops, node placement), or ``None``.
    """

    label: str
    path: str
    provider: str
    batch: int
    file_bytes: int
    session_ms: float
    session_providers: list[str]
    latency: LatencyStats | None = None
    throughput: float | None = None
    peak_rss_bytes: int | None = None
    baseline_rss_bytes: int | None = None
    latency_ratio: float | None = None
    speedup: float | None = None
    latency_ratio_ci: tuple[float, float] | None = None
    size_ratio: float | None = None
    memory_ratio: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    profile: dict | None = None


@dataclass
class BenchGroup:
    """Models timed together (interleaved) on one provider at one batch size."""

    provider: str
    batch: int
    models: list[ModelBench]
    rounds: int
    order: list[int]
    """Model index of each timed run, in execution order (A A .. B B .. C C .. A A ..)."""
    block: int = 1
    """Timed runs of one model in a row per turn."""
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelFidelity:
    """One model's task fidelity on the samples of ``--data`` (``benchmark(fidelity=True)``),
    as deployed on the CPU provider (``ORT_ENABLE_ALL``).

    Attributes:
        label: the model's label (as in the groups).
        output: the output compared: the first model's first output, or this model's first
            when it has no output of that name (another architecture).
        n_samples: samples run.
        accuracy_pct: top-1 accuracy (%) of that output against the data's ``labels`` (one
            per row of the rank-2 scores), or ``None``.
        top1_agreement_pct: % of rows whose top-1 class equals the first model's (class
            scores), or ``None``.
        mean_cosine: cosine with the first model's output, averaged over samples.
        error: why the model could not be measured (ONNX Runtime refused it), else ``None``.
    """

    label: str
    output: str | None = None
    n_samples: int = 0
    accuracy_pct: float | None = None
    top1_agreement_pct: float | None = None
    mean_cosine: float | None = None
    error: str | None = None


@dataclass
class BenchResult:
    """What :func:`benchmark` returns; :meth:`to_dict` gives the JSON report."""

    groups: list[BenchGroup]
    config: dict
    machine: dict
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: per model, in order: task fidelity on ``--data`` (``fidelity=True``), else empty
    fidelity: list[ModelFidelity] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = _jsonable(asdict(self))
        d["kind"] = "bench"
        for g in d["groups"]:
            g["order"] = g["order"][: 2 * max(1, g.get("block", 1)) * max(1, len(g["models"]))]  # the pattern
        return d


@dataclass
class OutputCheck:
    """One output compared: :class:`onnxcompress.validate.OutputMetrics` fields plus allclose."""

    name: str
    max_abs_err: float
    max_rel_err: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    allclose: bool
    mismatch_pct: float
    """Share of elements outside ``atol + rtol * |ref|`` (%)."""
    passed: bool
    failed: list[str] = field(default_factory=list)
    #: a recognizer's per-position class scores (rank >= 3): % of decoded sequences (text lines)
    #: equal, and how many (:attr:`onnxcompress.validate.OutputMetrics.sequence_agreement`)
    sequence_agreement: float | None = None
    n_sequences: int | None = None


@dataclass
class ValidationCheck:
    """One comparison: ``kind`` ``models`` (reference vs candidate on ``provider``) or
    ``providers`` (``model`` on CPU vs the same model on ``provider``)."""

    kind: str
    reference: str
    candidate: str
    provider: str
    reference_provider: str
    n_samples: int
    outputs: list[OutputCheck]
    passed: bool


@dataclass
class ValidationResult:
    """What :func:`validate_models` returns; ``passed`` is the verdict (CLI exit 0 / 1)."""

    passed: bool
    checks: list[ValidationCheck]
    config: dict
    machine: dict
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: ``--layers``: :class:`onnxcompress.validate.LayerMetrics` per shared intermediate tensor,
    #: in the reference's graph order (empty without it)
    layers: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = _jsonable(asdict(self))
        d["kind"] = "validate"
        return d


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """Machine, OS, CPU model and flags, library versions and ORT providers (for reports)."""
    feats = cpu_features()
    cpu_model = ""
    mem_total = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    versions = {"onnxcompress": __version__, "python": platform.python_version()}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "onnx", "onnx-ir", "numpy", "matplotlib", "jinja2"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "arch": feats.arch,
        "cpu": cpu_model or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": mem_total,
        "int8_target": feats.int8_target,
        "cpu_flags": {"avx2": feats.avx2, "avx512": feats.avx512, "vnni": feats.vnni,
                      "all": sorted(feats.flags)},
        "ort_device": ort.get_device(),
        "ort_providers": ort.get_available_providers(),
        "versions": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------- inputs


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1x3x224x224`` items into ``{name: (1, 3, 224, 224)}``.

    Raises:
        DataError: an item without ``=`` or with a dimension that is not a positive integer.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().replace(",", "x").split("x")) if dims.strip() else ()
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise DataError(f"--shape {item!r}: expected NAME=DIMS with positive integers, e.g. input=1x3x224x224") from None
        shapes[name] = shape
    return shapes


def _model_specs(path: Path) -> list[InputSpec]:
    model = load_model(path)
    return input_specs(model)


def _base_samples(path: Path, specs: list[InputSpec], data: str | Path | None,
                  shapes: dict[str, tuple[int, ...]] | None, notes: list[str]) -> list[dict[str, np.ndarray]]:
    """Batch-1 samples for one model: from the .npz or synthesized from the spec."""
    if data is not None:
        samples, _ = load_npz(data, specs, what=f"benchmark ({path.name})")
        return samples[:MAX_FEEDS * 64]
    shapes = {k: v for k, v in (shapes or {}).items() if k in {s.name for s in specs}}
    for s in specs:
        if (shapes or {}).get(s.name) is None and s.shape is not None:
            sym = [d for d in s.shape[1:] if not (isinstance(d, int) and d > 0)]
            if sym:
                notes.append(f"{path.name}: input '{s.name}' has symbolic dims {list(s.shape)}; set to 1 "
                             f"(give --shape {s.name}=...)")
        if s.shape is None and (shapes or {}).get(s.name) is None:
            notes.append(f"{path.name}: input '{s.name}' has no shape; a scalar is synthesized (give --shape)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return random_samples(specs, n=1, seed=0, shapes=shapes)


def _batched_feeds(path: Path, specs: list[InputSpec], samples: list[dict[str, np.ndarray]], batch: int) -> list[dict[str, np.ndarray]]:
    """Up to :data:`MAX_FEEDS` feeds of ``batch`` samples each (concatenated on axis 0)."""
    if batch == 1:
        return samples[:MAX_FEEDS]
    for s in specs:
        first = s.shape[0] if s.shape else None
        if s.shape is not None and len(s.shape) == 0:
            raise DataError(f"--batch {batch}: input '{s.name}' of {path.name} is a scalar; it has no batch axis")
        if isinstance(first, int) and first > 0:
            raise DataError(f"--batch {batch}: input '{s.name}' of {path.name} has a fixed first dimension {first}")
    feeds = []
    n = len(samples)
    for f in range(min(MAX_FEEDS, max(1, n // batch))):
        group = [samples[(f * batch + j) % n] for j in range(batch)]
        feed = {}
        for name in group[0]:
            parts = [g[name] for g in group]
            if any(p.shape != parts[0].shape for p in parts):
                raise DataError(f"--batch {batch}: samples of input '{name}' of {path.name} differ in shape "
                                f"({parts[0].shape} vs others); batching needs equal shapes")
            feed[name] = np.concatenate(parts, axis=0)
        feeds.append(feed)
    return feeds


def _rows(feed: dict[str, np.ndarray]) -> int:
    """Samples in one feed (first axis of the first input; 1 for scalars)."""
    for v in feed.values():
        return int(v.shape[0]) if v.ndim else 1
    return 1


def _file_bytes(path: Path) -> int:
    """Model file size plus the external data files it names (bytes)."""
    size = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return size
    seen = set()
    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc and loc not in seen:
                seen.add(loc)
                p = path.parent / loc
                if p.is_file():
                    size += p.stat().st_size
    return size


def _labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    out = []
    for i, p in enumerate(paths):
        # a relative path in the current folder has parent name "": no leading slash then
        label = p.name if names.count(p.name) == 1 or not p.parent.name else f"{p.parent.name}/{p.name}"
        if label in out:
            label = f"{label}#{i + 1}"
        out.append(label)
    return out


def _warm_ort() -> None:
    """Create one trivial session so ORT's one-time start-up is not charged to the first model."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    make_session(m.SerializeToString()).run(None, {"x": np.zeros(1, np.float32)})


# --------------------------------------------------------------------------- memory probe

_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_onnxcompress_runtime", sys.argv[1])
rt = sys.modules[spec.name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
import numpy as np
def hwm():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024
    except Exception:
        return None
a = json.loads(sys.argv[2])
with np.load(a["feed"]) as z:
    feed = {k: z[k] for k in z.files}
base = hwm()
sess = rt.make_session(a["model"], optimize=True, provider=a["provider"], threads=a["threads"])
wanted = {i.name for i in sess.get_inputs()}
feed = {k: v for k, v in feed.items() if k in wanted}
for _ in range(a["runs"]):
    sess.run(None, feed)
peak = hwm()
print(json.dumps({"baseline": base, "peak": peak}))
"""


def peak_memory(model: str | Path, feed: dict[str, np.ndarray], *, provider: str = "CPUExecutionProvider",
                threads: int | None = None, runs: int = 3, timeout_s: float = 600.0) -> tuple[int | None, int | None]:
    """Peak resident memory of ``model`` in a fresh child process (bytes).

    The child imports ONNX Runtime and loads ``feed``, records its peak RSS (``VmHWM``, or
    ``ru_maxrss`` where ``/proc`` is absent), creates the session, runs ``runs`` times and
    records the peak again.

    Returns:
        ``(peak_minus_baseline, baseline)`` in bytes; ``(None, None)`` where the OS reports
        neither figure.

    Raises:
        OnnxCompressError: the child failed (its last error line is given) or timed out.
    """
    runtime_py = Path(__file__).with_name("runtime.py")
    with tempfile.TemporaryDirectory(prefix="onnxcompress-mem-") as tmp:
        feed_path = os.path.join(tmp, "feed.npz")
        save_npz(feed_path, feed)  # any input name (np.savez(**feed) fails on one named "file")
        args = json.dumps({"model": str(model), "feed": feed_path, "provider": provider, "threads": threads,
                           "runs": runs})
        try:
            proc = subprocess.run([sys.executable, "-c", _PROBE, str(runtime_py), args],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise OnnxCompressError(f"memory pass for {Path(model).name} timed out after {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OnnxCompressError(f"memory pass for {Path(model).name} failed: {last}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["baseline"] is None or r["peak"] is None:
        return None, None
    return max(0, r["peak"] - r["baseline"]), r["baseline"]


# --------------------------------------------------------------------------- profile


def _profile(path: Path, feeds: list[dict[str, np.ndarray]], provider: str, threads: int | None,
             runs: int, top: int) -> dict:
    """Run ``path`` under ORT's profiler; aggregate node events by op type and provider."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-prof-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        if threads:
            so.intra_op_num_threads = threads
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        sess = ort.InferenceSession(str(path), so, providers=providers)
        wanted = {i.name for i in sess.get_inputs()}
        for i in range(PROFILE_WARMUP + runs):
            sess.run(None, {k: v for k, v in feeds[i % len(feeds)].items() if k in wanted})
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
    # only the runs after the warm-up ones (first runs pay for allocations and caches)
    run_ends = sorted(e["ts"] + e.get("dur", 0) for e in events if e.get("name") == "model_run")
    cutoff = run_ends[PROFILE_WARMUP - 1] if len(run_ends) >= PROFILE_WARMUP + runs else -1
    by_op: dict[str, dict[str, Any]] = {}
    nodes: dict[str, dict[str, Any]] = {}
    total_us = 0.0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e.get("ts", 0) < cutoff:
            continue
        args = e.get("args", {})
        op, prov, dur = args.get("op_name", "?"), args.get("provider", "?"), float(e.get("dur", 0))
        node = e["name"][: -len("_kernel_time")]
        total_us += dur
        o = by_op.setdefault(op, {"op_type": op, "total_us": 0.0, "calls": 0, "providers": set()})
        o["total_us"] += dur
        o["calls"] += 1
        o["providers"].add(prov)
        nodes.setdefault(node, {"node": node, "op_type": op, "provider": prov})
    ops = sorted(by_op.values(), key=lambda o: -o["total_us"])
    top_ops = [{"op_type": o["op_type"], "ms_per_run": o["total_us"] / 1e3 / max(runs, 1),
                "share_pct": 100.0 * o["total_us"] / total_us if total_us else 0.0,
                "calls_per_run": o["calls"] / max(runs, 1), "providers": sorted(o["providers"])} for o in ops[:top]]
    placement: dict[str, int] = {}
    for n in nodes.values():
        placement[n["provider"]] = placement.get(n["provider"], 0) + 1
    fallback = [n for n in nodes.values() if n["provider"] != provider]
    return {"runs": runs, "kernel_ms_per_run": total_us / 1e3 / max(runs, 1), "top_ops": top_ops,
            "nodes_per_provider": placement, "fallback_nodes": fallback[:200], "n_fallback": len(fallback)}


# --------------------------------------------------------------------------- benchmark


def interleave_block(one_ms: float) -> int:
    """Runs of one model per interleaving turn when one run takes ``one_ms`` ms: about
    :data:`BLOCK_MS` ms of runs, between 2 and :data:`MAX_BLOCK`."""
    return int(max(2, min(MAX_BLOCK, BLOCK_MS // max(one_ms, 1e-3))))


def _bootstrap_ratio_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 400, seed: int = 0,
                        block: int = 1) -> tuple[float, float]:
    """95 % interval of median(b) / median(a), resampling whole turns: the runs of one turn
    (``block`` in a row per model) share the machine's state, so they are resampled together,
    and turn ``t`` of ``a`` with turn ``t`` of ``b`` (paired in time)."""
    n = min(a.size, b.size)
    block = max(1, int(block))
    turns = -(-n // block)
    if turns < 3:
        r = float(np.median(b) / np.median(a))
        return r, r
    rng = np.random.default_rng(seed)
    starts = np.arange(turns) * block
    a, b = a[:n], b[:n]
    ratios = np.empty(n_boot)
    for k in range(n_boot):
        pick = np.concatenate([np.arange(s, min(s + block, n)) for s in starts[rng.integers(0, turns, size=turns)]])
        ratios[k] = np.median(b[pick]) / np.median(a[pick])
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def benchmark(
    models: Sequence[str | Path],
    *,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    batches: Sequence[int] = (1,),
    warmup: int = 5,
    runs: int | None = None,
    duration: float | None = None,
    data: str | Path | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    memory: bool = True,
    memory_repeats: int = 1,
    profile: bool = False,
    profile_runs: int = 10,
    top: int = 10,
    progress: Progress | None = None,
    block: int | None = None,
    fidelity: bool = False,
) -> BenchResult:
    """Time ``models`` interleaved with ONNX Runtime and measure their memory.

    Args:
        models: ``.onnx`` paths; the first is the baseline of every ratio.
        providers: ``cpu``, ``cuda``, ``tensorrt`` (or full ORT names). CPU is always
            benchmarked; an unavailable GPU provider is skipped with a one-line message in
            ``result.skipped``.
        threads: ORT intra-op threads (``None``: ORT's default).
        batches: batch sizes; several values give a sweep (one interleaved group each).
        warmup: untimed runs per model before timing (interleaved too).
        runs: timed runs per model; or
        duration: seconds of timed runs per (provider, batch) group (at least 5 rounds).
            Neither given: 10 seconds.
        data: ``.npz`` inputs (README format), checked against every model's inputs;
            without it inputs are synthesized from the input spec.
        shapes: ``{input name: shape}`` for synthesized inputs (symbolic dims); batch 1.
        memory: measure peak resident memory on the CPU provider, one child process per model
            and batch size.
        memory_repeats: child processes per model and batch size; the median peak is reported.
        profile: run each model under ORT's profiler (first batch size, every provider).
        profile_runs / top: profiled runs per model; op types listed.
        progress: ``progress(phase, done, total)`` callback.
        block: timed runs of one model in a row per turn (turns go A B C A B C ...), each turn
            after one untimed switch run; ``None``: about :data:`BLOCK_MS` ms of the first
            model's runs, 2 to :data:`MAX_BLOCK` (a slow model alternates every few runs so drift
            over seconds hits all alike). ``1`` times A B C A B C run by run, which on a small
            machine measures the previous session's spinning worker threads and cold caches
            more than the model (MiniLM fp32, 2 threads on 2 cores, 6 sessions: 17.9 ms run by
            run, 7.1 ms in blocks of 10; int8 10.2 vs 2.0 ms).

    Returns:
        A :class:`BenchResult`; latency in ms, sizes and memory in bytes, throughput in
        samples/s.

    Raises:
        ModelLoadError: a model is missing or not ONNX.
        DataError: the data does not fit a model, a bad ``--shape``/``--batch``.
        OnnxCompressError: bad arguments, or ONNX Runtime refused a model or its inputs
            (the message names the model).
    """
    paths = [Path(m) for m in models]
    if not paths:
        raise OnnxCompressError("bench needs at least one model")
    if runs is not None and duration is not None:
        raise OnnxCompressError("give --runs or --duration, not both")
    if runs is not None and runs < 1:
        raise OnnxCompressError(f"--runs must be >= 1 (got {runs})")
    if duration is not None and duration <= 0:
        raise OnnxCompressError(f"--duration must be > 0 seconds (got {duration})")
    if runs is None and duration is None:
        duration = 10.0
    batches = list(dict.fromkeys(int(b) for b in batches)) or [1]
    if any(b < 1 for b in batches):
        raise OnnxCompressError(f"--batch values must be >= 1 (got {batches})")
    if warmup < 0:
        raise OnnxCompressError(f"--warmup must be >= 0 (got {warmup})")
    if block is not None and block < 1:
        raise OnnxCompressError(f"--block must be >= 1 (got {block})")
    if fidelity and data is None:
        raise DataError("--fidelity needs --data: the samples (and labels) to measure each model on")
    prog = progress or (lambda *a: None)
    provs, skipped = resolve_providers(list(providers))
    labels = _labels(paths)
    notes: list[str] = []
    specs = [_model_specs(p) for p in paths]
    unknown = set(shapes or {}) - {s.name for sp in specs for s in sp}
    if unknown:
        raise DataError(f"--shape names {sorted(unknown)} are not inputs of any model "
                        f"(inputs: {sorted({s.name for sp in specs for s in sp})})")
    if shapes and data is not None:
        notes.append("--shape is ignored with --data (the data fixes the shapes)")
    base = [_base_samples(p, s, data, shapes, notes) for p, s in zip(paths, specs)]
    feeds = {b: [_batched_feeds(p, s, smp, b) for p, s, smp in zip(paths, specs, base)] for b in batches}
    sizes = [_file_bytes(p) for p in paths]
    _warm_ort()

    groups: list[BenchGroup] = []
    for prov in provs:
        for b in batches:
            groups.append(_time_group(paths, labels, sizes, feeds[b], prov, b, threads, warmup, runs, duration, prog,
                                          block))
    if memory:  # peak RSS per model and batch on the CPU provider (always first), a child process each
        mem_groups = [g for g in groups if g.provider == groups[0].provider]
        todo = len(paths) * len(mem_groups)
        for k, g in enumerate(mem_groups):
            for i, (p, mb) in enumerate(zip(paths, g.models)):
                prog(f"memory {labels[i]}" + (f" (batch {g.batch})" if len(mem_groups) > 1 else ""),
                     k * len(paths) + i, todo)
                probes = [peak_memory(p, feeds[g.batch][i][0], threads=threads) for _ in range(max(1, memory_repeats))]
                peaks = [pk for pk, _ in probes if pk is not None]
                if peaks:  # the median child: multi-threaded runs vary by a few MB (allocator arenas)
                    mb.peak_rss_bytes = int(np.median(peaks))
                    mb.baseline_rss_bytes = int(np.median([b for pk, b in probes if pk is not None]))
        prog("memory", todo, todo)
    if profile:
        for g in groups:
            if g.batch != batches[0]:
                continue
            for i, (p, mb) in enumerate(zip(paths, g.models)):
                prog(f"profile {labels[i]} ({_short(g.provider)})", i, len(paths))
                try:
                    mb.profile = _profile(p, feeds[g.batch][i], g.provider, threads, profile_runs, top)
                except Exception as exc:
                    raise OnnxCompressError(f"profiling {labels[i]} on {g.provider} failed: {exc}") from None
    for g in groups:
        _ratios(g)
    fid = _fidelity(paths, labels, specs, data, threads, prog, notes) if fidelity else []
    config = {"models": [str(p) for p in paths], "labels": labels, "providers_requested": list(providers),
              "providers": provs, "threads": threads, "batches": batches, "warmup": warmup, "runs": runs,
              "duration_s": duration, "data": str(data) if data else None,
              "inputs": "data" if data else "synthesized", "shapes": {k: list(v) for k, v in (shapes or {}).items()},
              "memory": memory, "memory_repeats": memory_repeats, "profile": profile, "timing": "interleaved in blocks of " + (
                  str(block) if block is not None else ", ".join(str(g.block) for g in groups) + " (auto)")}
    config["fidelity"] = fidelity
    return BenchResult(groups=groups, config=config, machine=machine_info(), skipped=skipped,
                       notes=list(dict.fromkeys(notes)), fidelity=fid)


#: at most this many samples of ``--data`` are run for ``--fidelity``; and the first model's
#: outputs kept for the comparison stay under FIDELITY_MAX_BYTES (fewer samples otherwise, noted)
FIDELITY_MAX_SAMPLES = 1000
FIDELITY_MAX_BYTES = 256 << 20


def _fidelity(paths: list[Path], labels: list[str], specs: list, data, threads, prog, notes: list[str]) -> list[ModelFidelity]:
    """Each model's task fidelity on the samples of ``data`` (:class:`ModelFidelity`): the
    architectures-side-by-side figure (original, pruned, low-rank, distilled, int8) that
    latency alone does not give. Runs on the CPU provider as deployed, outside the timing; every
    model sees the same samples (at most :data:`FIDELITY_MAX_SAMPLES`, fewer when the first
    model's outputs, kept for the comparison, would pass :data:`FIDELITY_MAX_BYTES`)."""
    from .data import load_npz
    from .validate import _first_line, output_metrics

    out: list[ModelFidelity] = []
    ref: list | None = None
    ref_name = None
    n_max = None
    truth, truth_why = None, None
    for i, (p, sp) in enumerate(zip(paths, specs)):
        prog(f"fidelity {labels[i]}", i, len(paths))
        samples, extras = load_npz(data, sp, what=f"--fidelity ({p.name})")
        if i == 0:
            n_all = len(samples)
            n_max = min(n_all, FIDELITY_MAX_SAMPLES)
            truth, truth_why = _fidelity_labels(extras.get("labels"))
            # rows per sample (axis 0 of its first input): the labels of the samples run
            firsts = [np.asarray(next(iter(x.values()))) for x in samples]
            per = [int(a.shape[0]) if a.ndim else 1 for a in firsts]
        f = ModelFidelity(label=labels[i])
        outs: list = []
        try:
            sess = make_session(str(p), optimize=True, threads=threads)
            names = [o.name for o in sess.get_outputs()]
            name = ref_name if ref_name in names else names[0]
            for k, feed in enumerate(samples[:n_max]):
                if k >= n_max:
                    break
                try:
                    outs.append(sess.run([name], feed)[0])
                except Exception as exc:  # ORT's refusal: name the sample
                    raise RuntimeError(f"sample {k}: {_first_line(exc)}") from None
                if i == 0 and k == 0:  # the first model's outputs are kept: bound their bytes
                    size = _value_bytes(outs[0])
                    cap = max(1, FIDELITY_MAX_BYTES // max(1, size))
                    if cap < n_max:
                        n_max = cap
                        notes.append(f"--fidelity: {n_max} of {n_all} samples (the first model's outputs are "
                                     f"kept for the comparison, at most {FIDELITY_MAX_BYTES >> 20} MiB)")
            del sess
        except Exception as exc:  # ORT's refusal, whatever its type: this model's row says so
            f.error = _first_line(exc)
            out.append(f)
            continue
        f.output, f.n_samples = name, len(outs)
        if i == 0:  # the first model: the reference of the comparisons
            ref, ref_name = outs, name
        tensors = all(isinstance(o, np.ndarray) for o in outs)
        if tensors and outs and all(o.ndim == 2 for o in outs) and outs[0].shape[1] > 1 and truth is not None:
            rows = np.concatenate(outs)
            if not np.isfinite(rows).all():
                notes.append(f"--fidelity: {labels[i]}'s '{name}' has NaN or Inf values: no accuracy")
            elif len(truth) != sum(per) or rows.shape[0] != sum(per[: len(outs)]):
                notes.append(f"--fidelity: 'labels' has {len(truth)} entries for {sum(per)} rows of the data "
                             f"({rows.shape[0]} rows of {labels[i]}'s '{name}'): no accuracy (one label per row)")
            else:
                f.accuracy_pct = float(100.0 * np.mean(rows.argmax(-1) == truth[: rows.shape[0]]))
        if ref is None:
            pass  # the first model did not run: nothing to compare with (its row says why)
        elif ref is not outs and len(ref) >= len(outs):
            same = all(isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                       for a, b in zip(ref, outs))
            if not same:
                notes.append(f"--fidelity: {labels[i]}'s '{name}' does not have the first model's output shapes: "
                             "not compared with it")
            else:
                try:
                    m = output_metrics(name, ref[: len(outs)], outs)
                    f.top1_agreement_pct, f.mean_cosine = m.top1_agreement, m.mean_cosine
                except Exception as exc:  # noqa: BLE001 - values that do not compare: said, left empty
                    notes.append(f"--fidelity: {labels[i]} not compared with the first model ({_first_line(exc)})")
        elif ref is outs:
            f.top1_agreement_pct = 100.0 if tensors and outs and outs[0].ndim == 2 and outs[0].shape[1] > 1 else None
            f.mean_cosine = 1.0 if tensors else None
        out.append(f)
    if truth_why:
        notes.append(f"--fidelity: {truth_why}")
    prog("fidelity", len(paths), len(paths))
    return out


def _fidelity_labels(labels) -> tuple[np.ndarray | None, str | None]:
    """The data's ``labels`` as 1-D integer class indices, or ``(None, why not)``."""
    if labels is None:
        return None, None
    a = np.asarray(labels)
    if a.ndim != 1 or a.dtype.kind not in "iu" or a.size == 0:
        return None, (f"'labels' must be a non-empty 1-D array of integer class indices (got {a.dtype} "
                      f"{list(a.shape)}): no accuracy")
    return a, None


def _value_bytes(v) -> int:
    """Bytes of an output value (a tensor, or the tensors of a sequence)."""
    if isinstance(v, np.ndarray):
        return v.nbytes
    if isinstance(v, (list, tuple)):
        return sum(_value_bytes(x) for x in v)
    return 64



def _short(provider: str) -> str:
    return provider.replace("ExecutionProvider", "")


def _time_group(paths, labels, sizes, feeds, provider, batch, threads, warmup, runs, duration, prog,
                block: int | None = None) -> BenchGroup:
    n = len(paths)
    sessions = []
    models = []
    for i, p in enumerate(paths):
        prog(f"session {labels[i]} ({_short(provider)})", i, n)
        t0 = time.perf_counter()
        try:
            sess = make_session(str(p), optimize=True, provider=provider, threads=threads)
        except Exception as exc:
            raise OnnxCompressError(f"ONNX Runtime refused {labels[i]} on {provider}: {exc}") from None
        sms = (time.perf_counter() - t0) * 1e3
        wanted = {x.name for x in sess.get_inputs()}
        fs = [{k: v for k, v in f.items() if k in wanted} for f in feeds[i]]
        sessions.append((sess, fs))
        models.append(ModelBench(label=labels[i], path=str(p), provider=provider, batch=_rows(feeds[i][0]),
                                 file_bytes=sizes[i], session_ms=sms, session_providers=sess.get_providers()))
    phase = f"{_short(provider)} batch {batch}"
    cur = 0
    try:
        for w in range(warmup):
            for i, (sess, fs) in enumerate(sessions):
                cur = i
                sess.run(None, fs[w % len(fs)])
            prog(f"warm-up {phase}", w + 1, warmup)
        if block is None:
            sess0, fs0 = sessions[0]
            cur = 0
            t0 = time.perf_counter()
            sess0.run(None, fs0[0])
            one_ms = (time.perf_counter() - t0) * 1e3
            block = interleave_block(one_ms)
        times: list[list[float]] = [[] for _ in range(n)]
        order: list[int] = []
        t_start = time.perf_counter()
        r = 0
        while True:
            if runs is not None and r >= runs:
                break
            elapsed = time.perf_counter() - t_start
            if duration is not None and elapsed >= duration and r >= 5:
                break
            take = block if runs is None else min(block, runs - r)
            for i, (sess, fs) in enumerate(sessions):
                cur = i
                if block > 1:  # the switch run: another session's worker threads may still spin
                    sess.run(None, fs[r % len(fs)])
                for j in range(take):
                    feed = fs[(r + j) % len(fs)]
                    t0 = time.perf_counter_ns()
                    sess.run(None, feed)
                    times[i].append((time.perf_counter_ns() - t0) / 1e6)
                    order.append(i)
            r += take
            if runs is not None:
                prog(f"timing {phase}", r, runs)
            else:  # every turn (a turn is a block of runs per model)
                prog(f"timing {phase}", min(time.perf_counter() - t_start, duration), duration)
    except OnnxCompressError:
        raise
    except Exception as exc:
        raise OnnxCompressError(f"ONNX Runtime failed to run {labels[cur]} on {provider}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    prog(f"timing {phase}", 1, 1)
    for m, t in zip(models, times):
        ms = np.asarray(t)
        m.latencies_ms = [float(v) for v in ms]
        m.latency = LatencyStats.of(ms)
        m.throughput = m.batch * 1e3 / m.latency.mean_ms if m.latency.mean_ms > 0 else None
    return BenchGroup(provider=provider, batch=batch, models=models, rounds=r, order=order, block=block)


def _ratios(g: BenchGroup) -> None:
    first = g.models[0]
    a = np.asarray(first.latencies_ms)
    for m in g.models:
        b = np.asarray(m.latencies_ms)
        m.latency_ratio = m.latency.p50_ms / first.latency.p50_ms if first.latency.p50_ms > 0 else None
        m.speedup = 1 / m.latency_ratio if m.latency_ratio else None
        m.latency_ratio_ci = _bootstrap_ratio_ci(a, b, block=g.block) if m is not first else (1.0, 1.0)
        m.size_ratio = m.file_bytes / first.file_bytes if first.file_bytes else None
        if m.peak_rss_bytes is not None and first.peak_rss_bytes:
            m.memory_ratio = m.peak_rss_bytes / first.peak_rss_bytes
        where = f"{m.label} ({_short(g.provider)}, batch {g.batch})"
        if m.latency.spread > WIDE_SPREAD:
            g.notes.append(f"{where}: wide latency spread, p10-p90 = {m.latency.p10_ms:.3g}-{m.latency.p90_ms:.3g} ms "
                           f"around p50 {m.latency.p50_ms:.3g} ms; the machine is noisy: give a longer --duration "
                           "or quiet it, and trust ratios more than absolute figures")
        if m is not first and m.latency_ratio:
            lo, hi = m.latency_ratio_ci
            if (hi - lo) / m.latency_ratio > WIDE_RATIO_CI:
                g.notes.append(f"{where}: latency ratio {m.latency_ratio:.3f} vs {first.label} is uncertain "
                               f"(95 % interval {lo:.3f}-{hi:.3f}); give more --runs or a longer --duration")
    if g.rounds < 20:
        g.notes.append(f"{_short(g.provider)} batch {g.batch}: only {g.rounds} timed runs; percentiles (p99 above all) "
                       "are rough")


# --------------------------------------------------------------------------- validate


def validate_models(
    reference: str | Path,
    candidate: str | Path | None = None,
    *,
    data: str | Path | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    n_samples: int = 8,
    providers: Sequence[str] = ("cpu",),
    atol: float | None = None,
    rtol: float | None = None,
    min_cosine: float | None = None,
    min_top1: float | None = None,
    cross_provider: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    layers: bool = False,
) -> ValidationResult:
    """Compare ``candidate`` with ``reference`` on the same inputs, per provider and output.

    Both run as deployed (ORT graph optimizations on), so an identical copy matches
    exactly. Per output: ``allclose`` (every element within ``atol + rtol * |ref|``, over
    all samples) and :func:`onnxcompress.validate.output_metrics`. A check passes when
    every output passes its gates:

    * ``allclose``, with ``atol``/``rtol`` (defaults 1e-5 and 1e-5, Polygraphy's). When
      neither is given but ``min_cosine`` or ``min_top1`` is, allclose is reported, not
      gated (the usual case for an int8 candidate);
    * ``cosine >= min_cosine`` and ``top1_agreement >= min_top1`` (%) when given.

    Args:
        reference, candidate: ``.onnx`` paths. ``candidate`` may be ``None`` with
            ``cross_provider=True`` (only the provider comparison of ``reference``).
        data: ``.npz`` inputs; otherwise ``n_samples`` synthesized ones (``shapes`` for
            symbolic dims).
        providers: ``cpu,cuda,tensorrt``; unavailable GPU providers are skipped with a
            message in ``result.skipped``.
        cross_provider: also compare each model on CPU with itself on every other
            chosen provider (skipped with a message when there is none).
        layers: also compare every intermediate tensor both models compute under one name, on
            the CPU (:func:`onnxcompress.validate.layerwise`: at most its ``LAYERWISE_SAMPLES``
            samples, optimizations off), in ``result.layers``; it does not change the verdict.

    Returns:
        A :class:`ValidationResult` whose ``passed`` is the verdict.

    Raises:
        ModelLoadError: a model is missing or not ONNX.
        DataError: the data does not fit the models, or their inputs differ.
        OnnxCompressError: nothing to compare, a gate out of range (``min_top1`` not in
            (1, 100], ``min_cosine`` not in [-1, 1]), or ONNX Runtime refused a model.
    """
    prog = progress or (lambda *a: None)
    ref_p = Path(reference)
    cand_p = Path(candidate) if candidate is not None else None
    if cand_p is None and not cross_provider:
        raise OnnxCompressError("validate needs a CANDIDATE model (or --cross-provider to compare providers)")
    if min_top1 is not None and not 1.0 < min_top1 <= 100.0:
        raise OnnxCompressError(f"--min-top1 is a percentage in (1, 100], got {min_top1} (for 99 % write 99)")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise OnnxCompressError(f"--min-cosine must be in [-1, 1], got {min_cosine}")
    gate_allclose = not (atol is None and rtol is None and (min_cosine is not None or min_top1 is not None))
    atol = 1e-5 if atol is None else atol
    rtol = 1e-5 if rtol is None else rtol
    provs, skipped = resolve_providers(list(providers))
    notes: list[str] = []
    ref_specs = _model_specs(ref_p)
    if cand_p is not None:
        cand_specs = _model_specs(cand_p)
        rn, cn = {s.name for s in ref_specs}, {s.name for s in cand_specs}
        if rn != cn:
            raise DataError(f"the models' inputs differ: reference {sorted(rn)}, candidate {sorted(cn)}")
    if data is not None:
        samples, _ = load_npz(data, ref_specs, what="validation")
    else:
        samples = []
        for i in range(n_samples):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                samples += random_samples(ref_specs, n=1, seed=i, shapes=shapes)
        notes.append(f"no --data: {n_samples} random inputs; give real inputs for a meaningful verdict")
    outputs_cache: dict[tuple[str, str, str], tuple[list[str], list[dict], tuple[str, ...] | None]] = {}
    # the one ORT level every model runs at on every provider: ORT_ENABLE_ALL (as deployed), lowered
    # only where ONNX Runtime's own optimizer breaks the REFERENCE there (then everything runs lower)
    state = {"level": "all"}

    def outputs(path: Path, prov: str, level: str):
        from .validate import session_charset

        sess = make_session(str(path), optimize=level, provider=prov, threads=threads, quiet=True)
        return [o.name for o in sess.get_outputs()], run_samples(sess, samples), session_charset(sess)

    def run(path: Path, prov: str):
        level = state["level"]
        key = (str(path), prov, level)
        if key not in outputs_cache:
            prog(f"running {path.name} ({_short(prov)})", 0, 1)
            try:
                outputs_cache[key] = outputs(path, prov, level)
            except Exception as exc:
                from .validate import _first_line, fusion_named

                why = _first_line(exc)
                # a candidate that fails where the reference runs is the candidate's failure
                lower = _lower_level(path, prov, level, outputs, exc) if path == ref_p else None
                if lower is None:
                    raise OnnxCompressError(f"ONNX Runtime failed on {path.name} ({prov}"
                                            + (f", ORT_ENABLE_{level.upper()}" if level != "all" else "")
                                            + f"): {why}") from None
                state["level"] = lower[0]
                outputs_cache[(str(path), prov, lower[0])] = lower[1]
                fusion = fusion_named(why)
                notes.append(f"ONNX Runtime's own graph optimizer breaks the reference {path.name} at "
                             f"ORT_ENABLE_{level.upper()} on {prov}" + (f" ({fusion})" if fusion else "")
                             + f": {why}. Every model was compared at ORT_ENABLE_{lower[0].upper()} on every "
                             "provider (deploy with that SessionOptions.graph_optimization_level)")
                return outputs_cache[(str(path), prov, lower[0])]
        return outputs_cache[key]

    def run_pair(a: Path, a_prov: str, b: Path, b_prov: str):
        """Both sides at the same level: run again when the second lowered it."""
        while True:
            level = state["level"]
            ra, rb = run(a, a_prov), run(b, b_prov)
            if state["level"] == level:
                return ra, rb

    others = [p for p in provs if p != "CPUExecutionProvider"]
    if cross_provider and not others:
        skipped.append("--cross-provider: no GPU provider available; only CPU was run")
    while True:  # again from the start when a later check lowered the level: every check at one level
        level = state["level"]
        checks: list[ValidationCheck] = []
        if cand_p is not None:
            for prov in provs:
                checks.append(_check("models", ref_p, cand_p, prov, prov, run_pair, atol, rtol, gate_allclose,
                                     min_cosine, min_top1, len(samples)))
        if cross_provider:
            for path in [ref_p] + ([cand_p] if cand_p is not None else []):
                for prov in others:
                    checks.append(_check("providers", path, path, prov, "CPUExecutionProvider", run_pair, atol,
                                         rtol, gate_allclose, min_cosine, min_top1, len(samples)))
        if state["level"] == level:
            break
    if not checks:
        raise OnnxCompressError("nothing was compared: no GPU provider is available for --cross-provider "
                                "and no CANDIDATE was given")
    if not gate_allclose:
        notes.append("allclose reported, not gated (no --atol/--rtol given, a cosine/top-1 gate was)")
    config = {"reference": str(ref_p), "candidate": str(cand_p) if cand_p else None, "providers": provs,
              "providers_requested": list(providers), "atol": atol, "rtol": rtol, "allclose_gated": gate_allclose,
              "min_cosine": min_cosine, "min_top1": min_top1, "cross_provider": cross_provider,
              "data": str(data) if data else None, "n_samples": len(samples), "ort_level": state["level"]}
    found: list = []
    if layers and cand_p is not None:
        from .model_io import load_model
        from .validate import LAYERWISE_SAMPLES, layerwise

        prog(f"comparing layers ({min(len(samples), LAYERWISE_SAMPLES)} samples)", 0, 1)
        try:
            found = layerwise(load_model(ref_p), load_model(cand_p), samples)
        except Exception as exc:  # noqa: BLE001 - ORT refusing the unoptimized graphs: said, not fatal
            from .runtime import is_ort_error
            from .validate import _first_line

            if not is_ort_error(exc):
                raise
            notes.append(f"--layers: ONNX Runtime could not run the models with their intermediate tensors as "
                         f"outputs ({_first_line(exc)}); no layer comparison")
        if not found and not any(n.startswith("--layers") for n in notes):
            notes.append("--layers: the models share no float32 intermediate tensor (same name, computed by a node "
                         "in both; float16 ones are not compared): nothing to compare layer by layer")
        config["layers_samples"] = min(len(samples), LAYERWISE_SAMPLES)
    return ValidationResult(passed=all(c.passed for c in checks), checks=checks, config=config,
                            machine=machine_info(), skipped=skipped, notes=notes, layers=found)


def _lower_level(path: Path, prov: str, level: str, outputs, exc: BaseException):
    """``(level, outputs)`` at the highest ORT level below ``level`` at which ``path`` runs, or
    ``None`` (also for an error that is not ONNX Runtime's: a bug of ours is not hidden)."""
    from .runtime import LEVELS, is_ort_error

    if not is_ort_error(exc):
        return None
    names = list(LEVELS)
    for name in names[names.index(level) + 1:]:
        try:
            return name, outputs(path, prov, name)
        except Exception as e:  # noqa: BLE001 - the next level down
            if not is_ort_error(e):
                raise
    return None


def _check(kind, ref_p, cand_p, prov, ref_prov, run_pair, atol, rtol, gate_allclose, min_cosine, min_top1,
           n) -> ValidationCheck:
    (ref_names, refs, charset), (_, cands, _) = run_pair(ref_p, ref_prov, cand_p, prov)
    outs = []
    for name in ref_names:
        if name not in cands[0]:
            outs.append(OutputCheck(name, float("inf"), float("inf"), -1.0, -float("inf"), None, False, 100.0,
                                    False, ["missing from the candidate"]))
            continue
        r = [x[name] for x in refs]
        c = [x[name] for x in cands]
        m = output_metrics(name, r, c, charset=charset)
        close, bad, total = True, 0, 0
        for rv, cv in zip(r, c):
            rv64, cv64 = np.asarray(rv), np.asarray(cv)
            if rv64.shape != cv64.shape:
                close, bad, total = False, bad + rv64.size, total + rv64.size
                continue
            if rv64.dtype.kind in "fc" or cv64.dtype.kind in "fc":
                ok = np.isclose(cv64.astype(np.float64), rv64.astype(np.float64), atol=atol, rtol=rtol, equal_nan=True)
            else:
                ok = rv64 == cv64
            bad += int(ok.size - np.count_nonzero(ok))
            total += int(ok.size)
            close = close and bool(ok.all())
        failed = []
        if gate_allclose and not close:
            failed.append(f"allclose(atol={atol:g}, rtol={rtol:g})")
        # index outputs: equality (--min-top1); the verdict is the gate engine's (gates.py)
        failed += output_failures(OutputGates(min_cosine=min_cosine, min_top1_agreement=min_top1), m)
        outs.append(OutputCheck(m.name, m.max_abs_err, m.max_rel_err, m.cosine, m.sqnr_db, m.top1_agreement,
                                close, 100.0 * bad / total if total else 0.0, not failed, failed,
                                m.sequence_agreement, m.n_sequences))
    return ValidationCheck(kind=kind, reference=str(ref_p), candidate=str(cand_p), provider=prov,
                           reference_provider=ref_prov, n_samples=n, outputs=outs, passed=all(o.passed for o in outs))


# --------------------------------------------------------------------------- json


def _jsonable(obj):
    """Make a dict JSON-safe: inf/nan as strings, tuples/sets as lists, numpy scalars as Python."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else str(f)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, report: dict) -> None:
    """Write ``report`` as JSON atomically (temporary file, then rename).

    Raises:
        OnnxCompressError: the file cannot be written.
    """
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxCompressError(f"{path}: cannot write report ({exc.strerror or exc})") from None
