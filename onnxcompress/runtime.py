"""ONNX Runtime sessions, execution providers and CPU features.

ONNX Runtime is the judge of every model onnxcompress writes. The input's outputs that a
result is validated against run as the fp32 model is deployed (``ORT_ENABLE_ALL``, without
pre-packed weights or the arena: :func:`reference_session`); the per-pass checks of exact
rewrites run with all graph optimizations off on both sides (so ORT's own fusions cannot hide or
cause a difference); candidates run with all optimizations on, the way they will be deployed
(Q/DQ pairs fused into integer kernels such as QLinearConv).
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class CpuFeatures:
    """What the host CPU offers to int8 kernels.

    Attributes:
        arch: ``x86_64``, ``aarch64``, ...
        avx2, avx512, vnni: x86 ISA extensions (``vnni`` is AVX512-VNNI or AVX-VNNI).
        flags: every flag reported by the OS.
    """

    arch: str
    avx2: bool
    avx512: bool
    vnni: bool
    flags: frozenset[str]

    @property
    def int8_target(self) -> str:
        """The quantization target this CPU implies: ``vnni``, ``avx512``, ``avx2``, ``arm64`` or ``generic``."""
        if self.arch in ("aarch64", "arm64"):
            return "arm64"
        if self.vnni:
            return "vnni"
        if self.avx512:
            return "avx512"
        if self.avx2:
            return "avx2"
        return "generic"


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """Read the CPU's ISA flags from ``/proc/cpuinfo`` (Linux); other systems report none."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return CpuFeatures(
        arch=platform.machine().lower(),
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags),
        flags=frozenset(flags),
    )


def resolve_providers(names: list[str] | None) -> tuple[list[str], list[str]]:
    """Map user names (``cpu,cuda,tensorrt``) to available ORT providers.

    Returns:
        ``(available, skipped_messages)``; CPU is always available and always included.
    """
    available = set(ort.get_available_providers())
    out, skipped = ["CPUExecutionProvider"], []
    for name in names or ["cpu"]:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            from .errors import OnnxCompressError

            raise OnnxCompressError(f"unknown execution provider {name!r}: use cpu, cuda, tensorrt "
                                    "or a full ONNX Runtime name such as OpenVINOExecutionProvider")
        if full == "CPUExecutionProvider":
            continue
        if full in available:
            out.append(full)
        else:
            hint = (" (install onnxruntime-gpu, the [gpu] extra of onnxruntime, instead of onnxruntime, "
                    "on a machine with a GPU)" if full in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "")
            skipped.append(f"{name}: {full} is not available in this onnxruntime build; skipped{hint}")
    return out, skipped


def make_session(
    model: "bytes | str | ir.Model",
    *,
    optimize: bool = True,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    extra_config: dict[str, str] | None = None,
    extra_outputs: tuple[str, ...] | list[str] = (),
    prepack: bool | None = None,
    arena: bool | None = None,
    inject: bool | int = True,
    quiet: bool = False,
) -> ort.InferenceSession:
    """Create an ORT session.

    Args:
        model: serialized model bytes, a file path, or an ``onnx_ir.Model``. An ``ir.Model``
            is not serialized with its weights (so it works over 2 GB): ORT loads its skeleton
            (:func:`onnxcompress.model_io.skeleton`, from a private temporary file) and gets the
            large initializers as user buffers (``SessionOptions.add_initializer``) read in
            place — memory maps stay maps, no copy. The stand-in file is empty, so a graph
            transformer that wants a weight's values (Q/DQ fusion, constant folding) fails
            loudly instead of reading wrong data; the session is then rebuilt with the values
            injected into ORT's graph (``add_external_initializers``, which ORT copies). The
            buffers are kept alive by the session (``session.onnxcompress_weights``).
        optimize: ``True`` = ``ORT_ENABLE_ALL`` (deployment, weights pre-packed for the
            kernels: a copy of the GEMM weights); ``False`` = ``ORT_DISABLE_ALL`` and no
            pre-packing (references and checks: no copy of the weights).
        provider: one execution provider; CPU is appended as fallback.
        threads: intra-op threads (``None``: ORT's default).
        extra_config: session config entries, e.g. ``{"session.disable_quant_qdq": "1"}``.
        extra_outputs: (``ir.Model`` only) value names made graph outputs, to read
            intermediate values.
        prepack: let kernels pre-pack constant weights (default: ``optimize``); off when the
            session is not timed, it saves a copy of the GEMM weights (results are the same
            kernels' up to summation order).
        arena: ORT's CPU memory arena (``SessionOptions.enable_cpu_mem_arena``). Default: on
            for optimized sessions (as deployed, timed), off for ``optimize=False`` (references
            and checks): the arena grows by powers of two and keeps its high mark, and on
            PP-OCRv4 det (736x992 images) the memory of a reference session with it stayed
            held after the session was gone: static int8 peaked at 1.15 GB with it, 0.98-1.0 GB
            without, the same bytes written, for about 0.1 s more per sample of that size (none
            measurable on 224x224 crops). ``True`` where many samples run and memory is not
            the concern.
        inject: (``ir.Model`` with large weights, ``optimize``) when a graph transformer wants a
            weight's values, rebuild with the values copied into ORT's graph; ``False``: raise
            instead (a caller that has a copy-free alternative, :func:`reference_session`); an
            ``int``: only when the weights to copy total at most that many bytes, else raise.
        quiet: ORT's own error log off (a failure is raised all the same): for a caller that
            handles ORT's refusal itself (tries a lower optimization level) and says so in one line.
    """
    optimized = graph_level(optimize) != LEVELS["disable"]  # True, or a level name other than "disable"
    prepack = optimized if prepack is None else prepack
    arena = optimized if arena is None else arena
    so = _options(optimize, threads, extra_config, prepack, arena)
    if quiet:
        so.log_severity_level = 4
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    if isinstance(model, (bytes, str)):
        if extra_outputs:
            raise TypeError("extra_outputs needs an onnx_ir.Model")
        sess = ort.InferenceSession(model, so, providers=providers)
        sess.onnxcompress_weights = ()
        return sess
    from .skeleton import skeleton_file, weight_buffer

    with skeleton_file(model, extra_outputs=extra_outputs, used_only=True) as (path, weights):
        keep = [ort.OrtValue.ortvalue_from_numpy(weight_buffer(t)) for _, t in weights]
        names = [n for n, _ in weights]
        try:
            sess = _with_buffers(path, so, providers, names, keep, inject=False)
        except Exception as exc:
            if not (optimize and keep and inject) or not is_ort_error(exc):
                raise
            if inject is not True and sum(int(t.nbytes) for _, t in weights) > inject:
                raise
            # a graph transformer wanted a weight's values (Q/DQ fusion, constant folding): it
            # read the empty stand-in and failed; ORT then gets the values in its graph (a copy)
            so = _options(optimize, threads, extra_config, prepack, arena)
            if quiet:
                so.log_severity_level = 4
            sess = _with_buffers(path, so, providers, names, keep, inject=True)
    sess.onnxcompress_weights = (so, keep)  # ORT reads these buffers for the session's lifetime
    return sess


#: the most weight bytes :func:`reference_session` lets ONNX Runtime copy into its graph to run
#: optimized. ORT then holds the copy and its NCHWc reordering: a conv net with 113 MB of weights
#: peaked 322 MB higher at ORT_ENABLE_ALL than unoptimized, about 3x the weights; at 64 MB that
#: is under 0.2 GB (EfficientNet-Lite0: 18 MB). Larger ones run unoptimized, without a copy.
REFERENCE_COPY_BYTES = 64 << 20


def reference_session(model: "bytes | str | ir.Model", *, level: str = "all",
                      provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """A session whose outputs are a reference (the input model's answers that results are
    compared with): ONNX Runtime's graph optimizations at ``level`` (``all``: the fp32 model as it
    is deployed) but without pre-packed weights or the memory arena, so it holds no copy of the
    weights (:func:`make_session`).

    At ``ORT_ENABLE_ALL`` a CNN runs its NCHWc kernels: EfficientNet-Lite0's 240 validation crops
    take 1.2 s instead of 5.9 s at ``ORT_DISABLE_ALL``, with outputs within 1.4e-5 of the
    unoptimized ones and the same top-1 on every crop (this 2-core Xeon, ORT 1.32).

    Where ORT's optimizer wants the values of weights that are read in place (NCHWc reorders every
    Conv weight), they are copied into its graph up to :data:`REFERENCE_COPY_BYTES` in all (a
    bounded cost: the copy lives as long as the session); beyond that, or where the optimizer fails
    on the model, the session runs at ``ORT_DISABLE_ALL`` without a copy: the same outputs up to
    summation order. The choice depends only on the model, so every reference of one model is made
    the same way; the level used is ``session.onnxcompress_level``.

    Raises:
        whatever ONNX Runtime raises for a model it cannot load at ``ORT_DISABLE_ALL`` either.
    """
    if level != "disable":
        try:
            sess = make_session(model, optimize=level, provider=provider, prepack=False, arena=False,
                                inject=REFERENCE_COPY_BYTES)
            sess.onnxcompress_level = level
            return sess
        except Exception as exc:  # noqa: BLE001 - ORT's refusal: the unoptimized graph; our own bug: raised
            if not is_ort_error(exc):
                raise
    sess = make_session(model, optimize=False, provider=provider)
    sess.onnxcompress_level = "disable"
    return sess


def run_reference(model: "bytes | str | ir.Model", samples: list[dict[str, np.ndarray]], *, level: str = "all",
                  provider: str = "CPUExecutionProvider", step: str = ""):
    """Run ``samples`` in a :func:`reference_session`; where ORT's optimizer breaks the model at run
    time (the session built, a sample fails), run them unoptimized instead. Returns ``(session,
    outputs per sample)``: the session goes on serving more samples the same way, its level in
    ``session.onnxcompress_level``.

    Raises:
        whatever ONNX Runtime raises for a model it cannot run at ``ORT_DISABLE_ALL`` either, and
        any error that is not ONNX Runtime's.
    """
    sess = reference_session(model, level=level, provider=provider)
    try:
        return sess, run_samples(sess, samples, step)
    except Exception as exc:  # noqa: BLE001 - ORT's optimizer broke the model at run time: unoptimized
        if sess.onnxcompress_level == "disable" or not is_ort_error(exc):
            raise
    del sess
    sess = make_session(model, optimize=False, provider=provider)
    sess.onnxcompress_level = "disable"
    return sess, run_samples(sess, samples, step)


def is_ort_error(exc: BaseException) -> bool:
    """An exception raised by ONNX Runtime (its pybind classes: ``Fail``, ``InvalidArgument``,
    ``RuntimeException``, ...), as opposed to a bug of ours that a fallback must not hide."""
    return type(exc).__module__.startswith("onnxruntime")


def _with_buffers(path: str, so: ort.SessionOptions, providers: list[str], names: list[str],
                  values: list, *, inject: bool) -> ort.InferenceSession:
    """A session whose large initializers come from ``values``: as user buffers read in place
    (``add_initializer``), or injected into the graph before optimization (``inject``: ORT
    copies them)."""
    if inject and values:
        so.add_external_initializers(names, values)
    else:
        so.log_severity_level = 4  # a refusal here is expected (see make_session): not ORT's error log
        for name, v in zip(names, values):
            so.add_initializer(name, v)
    return ort.InferenceSession(path, so, providers=providers)


def _options(optimize: bool, threads: int | None, extra_config: dict[str, str] | None,
             prepack: bool, arena: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = graph_level(optimize)
    so.log_severity_level = 3
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    for k, v in (extra_config or {}).items():
        so.add_session_config_entry(k, v)
    return so


#: ONNX Runtime's graph optimization levels by name, highest first
LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def graph_level(optimize: "bool | str") -> ort.GraphOptimizationLevel:
    """``True`` -> ``ORT_ENABLE_ALL``, ``False`` -> ``ORT_DISABLE_ALL``, or a :data:`LEVELS` name."""
    if isinstance(optimize, str):
        return LEVELS[optimize]
    return LEVELS["all"] if optimize else LEVELS["disable"]


def run_samples(sess: ort.InferenceSession, samples: list[dict[str, np.ndarray]], step: str = "") -> list[dict[str, np.ndarray]]:
    """Run every sample (a feed dict) and return the outputs by name, one dict per sample
    (counted as ``step`` for the progress listener, :mod:`onnxcompress.progress`, when given)."""
    from .progress import tick

    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    results = []
    for i, feed in enumerate(samples):
        outs = sess.run(None, {k: v for k, v in feed.items() if k in wanted})
        results.append(dict(zip(names, outs)))
        if step:
            tick(step, i + 1, len(samples), "samples")
    return results


def median_latency_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], *, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``sess.run`` on one feed, in ms (a quick figure; ``bench`` is the careful one)."""
    wanted = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in wanted}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def run_with_outputs(model: ir.Model, names: list[str], samples: list[dict[str, np.ndarray]], *, optimize: bool = False):
    """Run ``model`` (a copy with ``names`` added as outputs) on each sample; yields dicts name -> array."""
    copy = model.clone()  # new values and nodes, the same tensors: outputs are added to the copy only
    by_name = {}
    for v in copy.graph.inputs:
        by_name[v.name] = v
    for node in copy.graph:
        for o in node.outputs:
            by_name[o.name] = o
    existing = {v.name for v in copy.graph.outputs}
    for n in dict.fromkeys(names):
        if n in by_name and n not in existing and not by_name[n].is_graph_input():
            by_name[n].shape = None
            copy.graph.outputs.append(by_name[n])
            existing.add(n)
    sess = make_session(copy, optimize=optimize, arena=True)  # every sample
    out_names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    for feed in samples:
        res = dict(zip(out_names, sess.run(None, {k: v for k, v in feed.items() if k in wanted})))
        for k, v in feed.items():
            res.setdefault(k, v)
        yield res
