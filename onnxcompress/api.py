"""The Python API: ``optimize`` (the main job) and ``inspect``.

Data flows one way: load -> clean-up/fusion (each pass checked against the model before
it) -> pruning -> quantization -> validation by ONNX Runtime -> gates -> atomic write ->
report. Nothing here prints; progress goes through an optional callback.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from . import __version__
from .data import ImageSpec, input_specs, load_image_folder, load_npz, random_samples, split_holdout
from .errors import DataError, GateFailedError, ModelLoadError, ModelWriteError, OnnxCompressError
from .cost import StageMeter
from .inspect import summarize
from .model_io import check_model, check_output_path, external_data_files, load_model, save_model
from .opset import upgrade_opset
from .passes.base import PassContext, PassReport, run_passes, snapshot
from .passes.cleanup import (ConstantFoldingPass, DeadCodePass, IdentityDropoutPass, InitializerInputsPass,
                             LiftConstantsPass)
from .passes.fusion import ConvAffinePass, ConvBiasPass, FoldBatchNormPass, FusePadIntoConvPass, HardSwishPass, MatMulAddToGemmPass
from .passes.transformer import AttentionFusionPass
from .passes.prune import MagnitudePrunePass
from .passes.prune_channels import IMPORTANCE, ChannelPrunePass
from .passes.prune_nm import NMPrunePass, storage_report
from .passes.quantize import DynamicQuantizePass, StaticQuantizePass
from .passes.quantize.gather import GatherQuantizePass
from .passes.quantize.dynamic import AttentionQuantizePass
from .passes.quantize.smooth import SmoothQuantPass
from .passes.quantize.equalize import CrossLayerEqualizationPass
from .passes.quantize.permute import PairPermutePass
from .passes.quantize.weight_only import WeightOnlyQuantizePass
from .passes.quantize.calibrate import METHODS
from .passes.quantize.policy import TARGETS
from .runtime import cpu_features, resolve_providers
from .validate import compare

logger = logging.getLogger("onnxcompress")

QUANTIZE_MODES = ("dynamic", "static", "auto")
#: ``--quantize auto``: a candidate whose worst-output cosine is within this of the best one's
#: counts as keeping the answers; the fastest such candidate is written
AUTO_COSINE_SLACK = 0.01
PRUNE_MODES = ("unstructured", "channel", "nm")
#: the zlib size of input and output (what unstructured zeros save) is measured with pruning, or
#: when both files together are at most this large (zlib costs about 20 s per GB)
ZLIB_MEASURE_BYTES = 64 << 20
#: the quick latency figure of validation needs a second, pre-packed copy of the weights in ORT:
#: skipped (with a note) for models larger than this; ``onnxcompress bench`` measures any size
QUICK_LATENCY_MAX_BYTES = 1 << 30


@dataclass
class OptimizeOptions:
    """What ``optimize`` should do.

    Attributes:
        fuse: clean-up and fusion passes.
        prune: target unstructured sparsity in [0, 1) (``None``: no pruning).
        prune_scope: ``layer`` (each tensor to the target) or ``global`` (one threshold).
        prune_min_size: tensors with fewer elements stay dense.
        prune_skip_first_last: keep the first and last prunable layer dense.
        prune_mode: ``unstructured`` (magnitude zeros, ``prune`` = sparsity), ``channel`` (structured:
            ``prune`` = share of channels removed per dependency group, then least-squares repair) or
            ``nm`` (N:M semi-structured sparsity, pattern ``prune_nm``).
        prune_importance: channel importance: ``l2``, ``l1``, ``bn`` (BatchNorm gamma) or ``activation``.
        prune_channel_scope: ``layer`` (every group loses ``prune`` of its channels) or ``global``.
        prune_round_to: kept channels rounded up to a multiple of this.
        prune_repair: least-squares re-fit of the consumers on calibration data (channel mode).
        prune_protect: node names whose channels are never pruned (channel mode).
        prune_nm: N:M pattern, e.g. ``"2:4"``.
        prune_ratios: channel mode, per-layer ratios ``{node name: ratio}`` overriding ``prune``.
        quantize: ``None``, ``"dynamic"``, ``"static"`` or ``"auto"`` (both, the fastest that keeps
            the answers: :func:`_optimize_auto`).
        calibration / validation: ``.npz`` paths (see :mod:`onnxcompress.data`), or folders
            of images read with ``image`` (an :class:`ImageSpec`: size, mean, std, layout, channels).
        calibration_method: ``minmax``, ``percentile``, ``entropy`` or ``mse``.
        max_calibration_samples: cap on samples used to calibrate.
        target: int8 target (``auto`` = this CPU; see :mod:`.passes.quantize.policy`).
        per_channel: per-channel weight scales.
        min_sqnr_db: per-node fallback threshold (dB); ``None`` disables it.
        exclude_nodes / exclude_op_types: never pruned or quantized.
        providers: execution providers to validate on (``cpu``, ``cuda``, ``tensorrt``).
        max_rel_error / min_cosine / min_top1_agreement: gates (``None`` = off); relative
            error as a fraction, cosine in [-1, 1], agreement in %.
        external_data: write weights to ``<out>.data`` (``None``: only over 2 GB).
        fallback: when a gate is missed after quantization, keep the nodes with the worst
            per-node int8 SQNR in float (1, 2, 4, ... of them, at most ``max_fallback_rounds``
            re-quantizations) until every gate holds; the report lists them.
        bias_correction: static mode: add each quantized node's mean output shift per channel
            (measured on calibration activations) to its bias (empirical bias correction,
            Nagel et al. 2019, "Data-Free Quantization", sec. 4.2).
        bias_correction_mode: ``"node"`` (default: the one-node shift on float inputs) or
            ``"sequential"`` (static mode: then, in graph order, each corrected node's bias also
            absorbs the mean shift the int8 model itself has at its output, its upstream
            already corrected: the shift that accumulates over many int8 layers). Not the
            default: on the zoo it moved task fidelity both ways (PP-OCRv4 rec pipeline
            107 -> 110 of 116 lines with 8 samples, 106 with 24; YOLOv8n 99.2 -> 89.8 % of
            detections with 8 samples, 99.6 % with 16; EfficientNet-Lite0 KL 0.011 -> 0.019).
        equalize: cross-layer equalization before quantization (same paper, sec. 4.1): ``"auto"``
            (static mode only; kept when the estimated int8 error of the affected pairs drops by
            at least 1 dB with per-channel weights, 0.1 dB per-tensor), ``True`` / ``"on"`` (always,
            when quantizing), ``False`` / ``"off"``.
        smooth_quant: SmoothQuant (Xiao et al. 2022) before int8: activation outlier channels read
            by MatMul/Attention are scaled down and their weights up, per tensor only when the
            simulated int8 error drops (``passes/quantize/smooth.py``).
        latency: measure median latency in validation.
    """

    fuse: bool = True
    prune: float | None = None
    prune_scope: str = "global"
    prune_min_size: int = 64
    prune_skip_first_last: bool = False
    prune_mode: str = "unstructured"
    prune_importance: str = "l2"
    prune_channel_scope: str = "layer"
    prune_round_to: int = 1
    prune_repair: bool = True
    prune_protect: tuple[str, ...] = ()
    prune_nm: str = "2:4"
    prune_ratios: dict[str, float] | None = None
    quantize: str | None = None
    calibration: str | Path | None = None
    validation: str | Path | None = None
    calibration_method: str = "auto"
    max_calibration_samples: int = 256
    target: str = "auto"
    per_channel: bool = True
    min_sqnr_db: float | None = 20.0
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    providers: tuple[str, ...] = ("cpu",)
    max_rel_error: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None
    external_data: bool | None = None
    latency: bool = True
    fallback: bool = True
    max_fallback_rounds: int = 6
    bias_correction: bool = True
    bias_correction_mode: str = "node"
    equalize: bool | str = "auto"
    smooth_quant: bool = True
    image: ImageSpec = field(default_factory=ImageSpec)

    def check(self) -> None:
        """Raise :class:`OnnxCompressError` for inconsistent options."""
        if self.quantize not in (None, *QUANTIZE_MODES):
            raise OnnxCompressError(f"--quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.calibration_method not in METHODS:
            raise OnnxCompressError(f"--calibration-method must be one of {METHODS}, got {self.calibration_method!r}")
        if self.target not in TARGETS:
            raise OnnxCompressError(f"--target must be one of {TARGETS}, got {self.target!r}")
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise OnnxCompressError(f"--prune must be a sparsity in [0, 1), got {self.prune}")
        if self.bias_correction_mode not in ("sequential", "node"):
            raise OnnxCompressError(f"--bias-correction-mode must be 'sequential' or 'node', got {self.bias_correction_mode!r}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise OnnxCompressError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")
        if self.max_rel_error is not None and self.max_rel_error < 0:
            raise OnnxCompressError(f"--max-rel-error must be >= 0, got {self.max_rel_error}")
        if self.min_top1_agreement is not None and not 1.0 < self.min_top1_agreement <= 100.0:
            raise OnnxCompressError(f"--min-top1-agreement is a percentage in (1, 100], got {self.min_top1_agreement} "
                                    "(for 99 % write 99)")
        if self.prune_scope not in ("layer", "global"):
            raise OnnxCompressError(f"--prune-scope must be layer or global, got {self.prune_scope!r}")
        if self.prune_mode not in PRUNE_MODES:
            raise OnnxCompressError(f"--prune-mode must be one of {PRUNE_MODES}, got {self.prune_mode!r}")
        if self.prune_importance not in IMPORTANCE:
            raise OnnxCompressError(f"--prune-importance must be one of {IMPORTANCE}, got {self.prune_importance!r}")
        if self.prune_channel_scope not in ("layer", "global"):
            raise OnnxCompressError(f"--prune-channel-scope must be layer or global, got {self.prune_channel_scope!r}")
        if int(self.prune_round_to) < 1:
            raise OnnxCompressError(f"--prune-round-to must be >= 1, got {self.prune_round_to}")
        if self.equalize in ("on", "off"):
            self.equalize = self.equalize == "on"
        if self.equalize not in (True, False, "auto"):
            raise OnnxCompressError(f"--equalize must be auto, on or off, got {self.equalize!r}")
        for node, ratio in (self.prune_ratios or {}).items():
            if not 0.0 <= float(ratio) < 1.0:
                raise OnnxCompressError(f"--prune-ratio {node}={ratio}: the ratio must be in [0, 1)")
        nm = str(self.prune_nm).split(":")
        if len(nm) != 2 or not all(x.isdigit() for x in nm) or not 0 < int(nm[0]) < int(nm[1]):
            raise OnnxCompressError(f"--prune-nm must look like 2:4 (0 < N < M), got {self.prune_nm!r}")


@dataclass
class OptimizeResult:
    """Outcome of :func:`optimize`; ``report`` is JSON-ready."""

    output: Path | None
    report: dict[str, Any] = field(default_factory=dict)
    passed: bool = True


def _load_data(model: ir.Model, opts: OptimizeOptions):
    specs = input_specs(model)
    notes = []
    labels = None
    if opts.calibration and Path(opts.calibration).is_dir():
        calib = load_image_folder(opts.calibration, specs, opts.image, what="calibration")
    elif opts.calibration:
        calib, _ = load_npz(opts.calibration, specs, what="calibration")
    else:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            calib = random_samples(specs, 16)
        for x in w:
            notes.append(str(x.message))
            if opts.quantize == "static":
                logger.warning("%s", x.message)  # calibrating on noise deserves more than a note
    if opts.validation and Path(opts.validation).is_dir():
        val = load_image_folder(opts.validation, specs, opts.image, what="validation")
        notes.append(f"validation on {len(val)} images from {opts.validation}")
    elif opts.validation:
        val, vextras = load_npz(opts.validation, specs, what="validation")
        labels = vextras.get("labels")
        if labels is not None:
            labels = np.asarray(labels)
            rows = sum(int(next(iter(f.values())).shape[0]) if next(iter(f.values())).ndim else 1 for f in val)
            if labels.dtype.kind not in "iu" or labels.ndim != 1:
                raise DataError(f"{opts.validation}: 'labels' must be a 1-D array of integer class indices, "
                                f"got {labels.dtype} {list(labels.shape)}")
            if labels.shape[0] != rows:  # a warning: accuracy needs one label per row of the first *output*
                msg = (f"{opts.validation}: 'labels' has {labels.shape[0]} entries for {rows} rows of the first "
                       "input; accuracy is reported only when they match the first output's rows")
                notes.append(msg)
                logger.warning("%s", msg)
        notes.append(f"validation on {len(val)} held-out samples from {opts.validation}")
    else:
        calib, val = split_holdout(calib)
        if calib is val:
            notes.append("only one sample: validation uses the calibration sample (nothing held out)")
        else:
            used = (f"; calibration uses the other {len(calib)}" if opts.quantize == "static" else
                    f"; the other {len(calib)} serve the per-pass checks")
            given = "the given data" if opts.calibration else "the random inputs (no data given)"
            notes.append(f"validation on {len(val)} samples held out of {given} (never used to calibrate){used}")
    if len(calib) > opts.max_calibration_samples:
        calib = calib[: opts.max_calibration_samples]
    return calib, val, labels, notes


def optimize(
    input_path: str | Path,
    output_path: str | Path,
    options: OptimizeOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> OptimizeResult:
    """Optimize one ONNX model and write the result (the main job).

    Args:
        input_path: the ``.onnx`` model (never modified).
        output_path: where to write; written atomically, only after the model passed
            ``onnx.checker``, loaded in ONNX Runtime and met every gate.
        options: see :class:`OptimizeOptions`.
        progress: callback receiving a short stage description.

    Returns:
        :class:`OptimizeResult` with the report: ``before``/``after`` summaries (size in bytes,
        nodes, op histogram), ``passes`` (one :class:`PassReport` each), ``validation``
        (per-provider, per-output metrics, accuracy when labels exist, latency in ms),
        ``gates`` and ``notes``.

    Raises:
        ModelLoadError, DataError, ModelWriteError, InvalidModelError, ConversionError: bad input or output.
        GateFailedError: a gate was missed; nothing is written (the report is attached as ``.report``).
    """
    opts = options or OptimizeOptions()
    opts.check()
    if opts.quantize == "auto":
        return _optimize_auto(Path(input_path), Path(output_path), opts, progress or (lambda s: None))
    meter = StageMeter()

    def say(msg: str) -> None:  # a stage starts: its time and peak memory go to report["cost"]
        meter.start(msg)
        if progress:
            progress(msg)
    t0 = time.perf_counter()
    inp, out = Path(input_path), Path(output_path)
    if out.exists() and out.resolve() == inp.resolve():
        raise OnnxCompressError(f"{out}: output path is the input model; refusing to overwrite it")
    say("loading model")
    original = load_model(inp)
    try:
        check_model(original, runtime=False)
    except OnnxCompressError as exc:  # found now, not after all the work: outputs must pass it too
        raise ModelLoadError(f"{inp}: the input model fails onnx.checker ({str(exc).split(': ', 1)[-1]}); "
                             "onnxcompress only writes models that pass it") from None
    # the reference (`original`) and the working model share every tensor: passes replace
    # tensors, never edit them (passes/base.py: snapshot), so the weights are held once
    model = snapshot(original)
    # every node needs a unique name: reports, --exclude and the fallback refer to nodes by name
    ir.passes.common.NameFixPass()(model)
    calib, val, labels, notes = _load_data(model, opts)
    runtime_ok, custom = _runtime_loads(original)
    if not runtime_ok:
        if opts.quantize:
            raise OnnxCompressError(
                f"ONNX Runtime cannot load this model ({custom}); quantization needs to run it for "
                "calibration and validation. Register the custom ops with ONNX Runtime or exclude them first.")
        notes.append(f"ONNX Runtime cannot load this model ({custom}); the custom ops are kept as they are. "
                     "Passes are exact rewrites checked by onnx.checker only: no numeric validation was possible.")
        calib, val = [], []
    check_samples = calib[:4]
    names = {n.name for n in ir.traversal.RecursiveGraphIterator(original.graph)}
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(original.graph)}
    for what, given in (("--exclude", (*opts.exclude_nodes, *opts.exclude_op_types)),
                        ("--prune-protect", opts.prune_protect), ("--prune-ratio", tuple(opts.prune_ratios or ()))):
        unknown = [e for e in dict.fromkeys(given) if e not in names and e not in ops]
        if unknown:
            msg = f"{what}: no node or op type named {', '.join(repr(u) for u in unknown)} in the model"
            notes.append(msg)
            logger.warning("%s", msg)
    ignored = [(flag, why) for flag, why, hit in (
        ("--calibration-method", "only static quantization calibrates ranges",
         opts.calibration_method != "auto" and opts.quantize != "static"),
        ("--bias-correction-mode", "only static quantization corrects biases",
         opts.bias_correction_mode != "node" and opts.quantize != "static"),
        ("--prune-nm", "it applies to --prune-mode nm", opts.prune_nm != "2:4" and opts.prune_mode != "nm"),
    ) if hit]
    for flag, why in ignored:
        msg = f"{flag} is ignored here: {why}"
        notes.append(msg)
        logger.warning("%s", msg)
    before = summarize(original, inp)
    report: dict[str, Any] = {
        "tool": {"name": "onnxcompress", "version": __version__},
        "input": str(inp), "output": str(out), "options": _jsonable(asdict(opts)),
        "cpu": {"arch": cpu_features().arch, "int8_target": cpu_features().int8_target,
                "avx2": cpu_features().avx2, "avx512": cpu_features().avx512, "vnni": cpu_features().vnni},
        "before": before, "passes": [], "notes": notes,
    }
    reports: list[PassReport] = []

    ctx = PassContext(calibration=calib, check_samples=check_samples)
    stage = [InitializerInputsPass(ctx), LiftConstantsPass(ctx)]
    if opts.fuse:
        say("clean-up and fusion")
        stage = [InitializerInputsPass(ctx), ConstantFoldingPass(ctx), LiftConstantsPass(ctx),
                 IdentityDropoutPass(ctx), ConvBiasPass(ctx), FoldBatchNormPass(ctx), ConvAffinePass(ctx), FusePadIntoConvPass(ctx),
                 HardSwishPass(ctx), AttentionFusionPass(ctx),
                 MatMulAddToGemmPass(ctx),
                 DeadCodePass(ctx)]
    model, reps = run_passes(model, stage, check_samples)
    reports += reps

    if opts.prune or opts.prune_mode == "nm":
        if opts.prune_mode == "channel":
            say(f"channel pruning {opts.prune:.0%} per group" + (" + least-squares repair" if opts.prune_repair else ""))
            pctx = PassContext(calibration=calib, check_samples=val[:16] or check_samples, options={
                "ratio": opts.prune, "scope": opts.prune_channel_scope, "importance": opts.prune_importance,
                "round_to": opts.prune_round_to, "repair": opts.prune_repair, "ratios": dict(opts.prune_ratios or {}),
                "protect": tuple(opts.prune_protect) + tuple(opts.exclude_nodes),
                "exclude_op_types": opts.exclude_op_types})
            ppass = ChannelPrunePass(pctx)
        elif opts.prune_mode == "nm":
            n_, m_ = (int(x) for x in opts.prune_nm.split(":"))
            if opts.prune and abs(opts.prune - (1 - n_ / m_)) > 1e-9:
                notes.append(f"--prune {opts.prune} ignored: N:M sparsity is set by the pattern "
                             f"--prune-nm {opts.prune_nm} ({1 - n_ / m_:.0%} zeros)")
            say(f"{n_}:{m_} semi-structured pruning")
            pctx = PassContext(calibration=calib, options={
                "n": n_, "m": m_, "min_size": opts.prune_min_size, "exclude_nodes": opts.exclude_nodes,
                "exclude_op_types": opts.exclude_op_types})
            ppass = NMPrunePass(pctx)
            if opts.prune and abs(opts.prune - (1 - n_ / m_)) > 1e-9:
                notes.append(f"--prune {opts.prune} ignored in nm mode: {n_}:{m_} fixes the sparsity at {1 - n_ / m_:.0%}")
        else:
            say(f"magnitude pruning to {opts.prune:.0%}")
            pctx = PassContext(calibration=calib, options={
                "sparsity": opts.prune, "scope": opts.prune_scope, "min_size": opts.prune_min_size,
                "skip_first_last": opts.prune_skip_first_last, "exclude_nodes": opts.exclude_nodes,
                "exclude_op_types": opts.exclude_op_types})
            ppass = MagnitudePrunePass(pctx)
        model, reps = run_passes(model, [ppass], check_samples)
        reports += reps
        if opts.prune_mode == "unstructured" and ppass.report.changed:
            try:
                st = storage_report(model)
                report["pruning_storage"] = st
                notes.append(f"sparse storage measured after pruning (before quantization): dense {st['dense_bytes']} B "
                             f"({st['dense_zlib_bytes']} B zlib), sparse_initializer {st['sparse_initializer_bytes']} B "
                             f"({st['sparse_initializer_zlib_bytes']} B zlib); kept: {st['choice']}")
            except Exception as exc:  # measurement only
                notes.append(f"sparse storage not measured: {exc}")

    if opts.quantize and (opts.equalize is True or (opts.equalize == "auto" and opts.quantize == "static")):
        say("cross-layer equalization")
        model, reps = run_passes(model, [CrossLayerEqualizationPass(PassContext(options={
            "mode": "auto" if opts.equalize == "auto" else "on", "per_channel": opts.per_channel,
            "target": opts.target, "exclude_nodes": tuple(opts.exclude_nodes),
            "exclude_op_types": tuple(opts.exclude_op_types)}))], check_samples)
        reports += reps

    if opts.quantize == "static":  # x86 without VNNI: pair saturation-free int8 weights (no-op elsewhere)
        model, reps = run_passes(model, [PairPermutePass(PassContext(options={
            "target": opts.target, "exclude_nodes": tuple(opts.exclude_nodes)}))], check_samples)
        reports += [r for r in reps if r.changed or r.reverted]

    pre_quant = None
    if opts.quantize:
        opset = model.opset_imports.get("", 1)
        if opset < 13:
            say(f"upgrading opset {opset} -> 13")
            model, info = upgrade_opset(model, 13, check_samples)
            report["opset_upgrade"] = info
        if opts.smooth_quant and not opts.calibration:
            notes.append("SmoothQuant skipped: no --calibration data (smoothing factors chosen on random inputs "
                         "would move real outliers at random)")
        elif opts.smooth_quant:
            # SmoothQuant once, before the fallback's starting point: the fallback's rounds then
            # re-quantize the same (smoothed, fp32-equivalent) model and its calibration cache
            # stays valid (passes/quantize/smooth.py)
            say("SmoothQuant")
            model, sreps = run_passes(model, [SmoothQuantPass(PassContext(calibration=calib, options={
                "target": opts.target, "smooth_mode": opts.quantize,
                "exclude_op_types": tuple(opts.exclude_op_types),
                "exclude_nodes": tuple(opts.exclude_nodes)}))], check_samples)
            reports += sreps
        say(f"{opts.quantize} int8 quantization")
        # the fallback re-quantizes from here: kept only when a gate could send it there (the
        # snapshot keeps the float weights alive, a second copy once int8 replaced them)
        gated = any(g is not None for g in (opts.max_rel_error, opts.min_cosine, opts.min_top1_agreement))
        pre_quant = snapshot(model) if gated and opts.fallback else None
        calib_cache: dict = {}
        model, qreps = _quantize(model, opts, calib, check_samples, (), calib_cache)
        reports += qreps
        if qreps[0].reverted:  # never hand back a float model as if it were the int8 one asked for
            raise OnnxCompressError(f"{opts.quantize} quantization failed on this model ({qreps[0].reverted}); "
                                    f"nothing written (report this model; --debug shows more)")

    say("validating with ONNX Runtime")
    providers, skipped = resolve_providers(list(opts.providers))
    notes.extend(skipped)
    providers = providers if runtime_ok else []
    latency = opts.latency
    if latency and before["size_bytes"] > QUICK_LATENCY_MAX_BYTES:
        latency = False
        notes.append(f"quick latency not measured: the model is over {QUICK_LATENCY_MAX_BYTES >> 30} GB and the "
                     "timing needs another pre-packed copy of its weights; use `onnxcompress bench`")
    validation = _validate(original, model, val, labels, providers, latency)
    gates = _gates(opts, validation)
    index_outs = sorted({o["name"] for v in validation for o in v["outputs"] if o.get("integer")})
    if index_outs and (opts.max_rel_error is not None or opts.min_cosine is not None) and opts.min_top1_agreement is None:
        notes.append(f"index output(s) {', '.join(index_outs)} (int32/int64) are not judged by --max-rel-error / "
                     "--min-cosine: their agreement (% equal) is gated by --min-top1-agreement")
    if not runtime_ok and any(v is not None for v in (opts.max_rel_error, opts.min_cosine, opts.min_top1_agreement)):
        gates.append({"gate": "runtime", "provider": "none", "value": float("nan"), "limit": float("nan"),
                      "passed": False, "why": "ONNX Runtime cannot run this model, so no gate can be checked"})
    passed = all(g["passed"] for g in gates)
    if not passed and pre_quant is not None and opts.fallback and not qreps[0].reverted:
        # sensitive-node fallback: keep the nodes with the worst int8 SQNR in float, doubling
        # their number, until every gate holds
        sqnr = {}  # every int8 node: integer pass, QAttention, weight-only
        for r in qreps:
            sqnr.update(r.counts.get("node_sqnr_db") or {})
        floor = opts.min_sqnr_db if opts.min_sqnr_db is not None else -float("inf")
        order = sorted((n for n in sqnr if sqnr[n] >= floor), key=lambda n: sqnr[n])  # nodes now in int8
        first_sqnr = dict(sqnr)
        most = len(order) - 1  # keeping every node in float is not quantization: then the gate fails
        rounds, k = [], 1
        level = logger.level
        logger.setLevel(logging.ERROR)  # the rounds' skip messages are summarized in the report
        try:
            while not passed and 0 < k <= most and len(rounds) < opts.max_fallback_rounds:
                excluded = tuple(order[:k])
                say(f"fallback: {len(excluded)} node(s) kept in float")
                model, qreps = _quantize(pre_quant.clone(), opts, calib, check_samples, excluded, calib_cache)
                validation = _validate(original, model, val, labels, providers, latency=False)
                gates = _gates(opts, validation)
                passed = all(g["passed"] for g in gates)
                rounds.append({"kept_in_float": list(excluded), "passed": passed,
                               "gates": {g["gate"]: g["value"] for g in gates}})
                if k == most:
                    break
                k = min(2 * k, most)
        finally:
            logger.setLevel(level)
        if not passed:
            notes.append(f"fallback: the gates still fail with {len(rounds[-1]['kept_in_float']) if rounds else 0} "
                         f"of {len(order)} quantized nodes kept in float")
        reports = reports[: len(reports) - len(qreps)] + qreps
        report["fallback"] = {"rounds": rounds, "kept_in_float": rounds[-1]["kept_in_float"] if rounds else [],
                              "passed": passed, "node_sqnr_db": first_sqnr}
        if passed and latency:
            validation = _validate(original, model, val, labels, providers, latency=True)
    for v in validation:
        lr, lc = v.get("latency_ms_reference"), v.get("latency_ms_candidate")
        if opts.quantize and lr and lc and lc > 1.1 * lr:
            other = "dynamic" if opts.quantize == "static" else "static"
            msg = (f"the int8 model is {lc / lr:.2f}x SLOWER than fp32 on {v['provider']} at this input size "
                   f"({lr:.3f} -> {lc:.3f} ms, quick median): check with `onnxcompress bench` (interleaved), "
                   f"try --quantize {other}, a larger batch, or keep fp32")
            notes.append(msg)
            logger.warning("%s", msg)
    report["passes"] = [r.to_dict() for r in reports]
    report["validation"] = validation
    after = summarize(model)
    report["after"] = after
    report["gates"] = gates
    if not passed:
        report["written"] = False
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["cost"] = _cost(meter)
        err = GateFailedError("; ".join(g.get("why") or f"{g['gate']} {g['value']:.6g} misses {g['limit']:g} on {g['provider']}"
                                        for g in gates if not g["passed"]) + f" -- {out} not written")
        err.report = report  # type: ignore[attr-defined]
        raise err
    say(f"writing {out}")
    in_files = [inp, *original.meta.get("onnxcompress.external_files", [])]
    size = save_model(model, out, external_data=opts.external_data, protect=tuple(in_files), runtime_check=runtime_ok)
    after["file_bytes"] = size
    if opts.prune or opts.prune_mode == "nm" or size + before.get("file_bytes", 0) <= ZLIB_MEASURE_BYTES:
        after["compressed_bytes"] = _compressed_size([out, *external_data_files(out)])
        report["before"]["compressed_bytes"] = _compressed_size(in_files)
    else:
        notes.append(f"zlib sizes not measured (about 20 s per GB; done when input and output together are "
                     f"at most {ZLIB_MEASURE_BYTES >> 20} MB, and always with pruning, whose zeros they show)")
    report["written"] = True
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["cost"] = _cost(meter)
    return OptimizeResult(out, report, True)


def _cost(meter: StageMeter) -> dict[str, Any]:
    """The run's own cost: per stage wall seconds and peak RSS (MiB), and the whole run's peak."""
    stages = meter.finish()
    return {"stages": stages, "peak_rss_mb": round(meter.process_peak_mb, 1),
            "peak_per_stage": meter.exact}


_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training")


def _runtime_loads(model: ir.Model) -> tuple[bool, str]:
    """Whether ORT can load the input; if not because of custom-domain ops, name them.

    Raises:
        OnnxCompressError: ORT refuses a model that has no custom ops (its message is given).
    """
    from .runtime import make_session

    try:
        make_session(model, optimize=False)
        return True, ""
    except Exception as exc:
        custom = sorted({f"{n.domain}.{n.op_type} (node '{n.name}')"
                         for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain not in _STANDARD_DOMAINS})
        if not custom:
            raise OnnxCompressError(f"ONNX Runtime cannot load the input model: {str(exc).splitlines()[0]}") from None
        return False, "custom ops: " + ", ".join(custom[:5]) + (" ..." if len(custom) > 5 else "")


def _compressed_size(paths: list[Path]) -> int:
    """zlib (level 6) size in bytes of the files together, streamed in 16 MiB chunks."""
    total = 0
    for p in paths:
        comp = zlib.compressobj(6)
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(16 << 20), b""):
                total += len(comp.compress(chunk))
        total += len(comp.flush())
    return total


def _fidelity(report: dict) -> float:
    """Worst cosine over the float outputs of every validated provider; for a model whose outputs
    are all indices (int32/int64), the worst agreement as a fraction. ``nan`` without validation."""
    outs = [o for v in report.get("validation", []) for o in v["outputs"]]
    cos = [float(o["cosine"]) for o in outs if not o.get("integer")]
    if cos:
        return min(cos)
    agree = [float(o["top1_agreement"]) / 100.0 for o in outs if o.get("top1_agreement") is not None]
    return min(agree) if agree else float("nan")


#: a candidate must be this much faster (median ratio) to win on speed; closer is a tie
AUTO_SPEED_MARGIN = 1.05


def _optimize_auto(inp: Path, out: Path, opts: OptimizeOptions, say: Callable[[str], None]) -> OptimizeResult:
    """``--quantize auto``: quantize with each mode, keep the fastest that keeps the answers.

    Dynamic always, static when calibration data is given (calibrating on random inputs is no
    basis for a choice). Each candidate runs the whole pipeline (gates and fallback included)
    into a temporary folder beside ``out``. Among the candidates that passed the gates, those
    whose fidelity (:func:`_fidelity`: worst-output cosine on the validation data) is within
    :data:`AUTO_COSINE_SLACK` of the best one's are timed together on the validation inputs with
    :func:`onnxcompress.bench.benchmark` (interleaved, the first requested provider; only when
    the target is this machine) and the fastest is written to ``out`` (atomically, after the usual
    checks) — if it is at least :data:`AUTO_SPEED_MARGIN` faster than the next; otherwise the
    more faithful one (then the smaller). On the zoo this picks the mode that meets each model's
    task goal (static: EfficientNet-Lite0, YOLOv8n; dynamic: PP-OCRv4 det/rec, PP-OCR cls, MiniLM;
    ``scripts/auto_zoo.py``).

    Raises:
        GateFailedError: no candidate passed the gates (``.report`` holds one candidate's).
        OnnxCompressError: bad input (the first candidate's error, as ``--quantize dynamic`` would raise it).
    """
    from .bench import benchmark

    t0 = time.perf_counter()
    protect = (inp, *external_data_files(inp))
    folder = check_output_path(out, protect, opts.external_data)  # before two whole runs
    modes = ["dynamic", "static"] if opts.calibration else ["dynamic"]
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".onnxcompress-auto-", dir=folder))
    except OSError as exc:
        raise ModelWriteError(f"{folder}: cannot write there ({exc.strerror or exc})") from None
    cands: dict[str, dict] = {}
    try:
        for mode in modes:
            say(f"auto: trying --quantize {mode}")
            path = tmp / f"{mode}.onnx"
            try:
                static_only = {} if mode == "static" else {"calibration_method": "auto", "bias_correction_mode": "node"}
                res = optimize(inp, path, replace(opts, quantize=mode, external_data=None, **static_only),
                               progress=lambda m, mode=mode: say(f"auto ({mode}): {m}"))
                cands[mode] = {"path": path, "report": res.report, "passed": True}
            except GateFailedError as exc:
                cands[mode] = {"report": getattr(exc, "report", {}), "passed": False,
                               "error": str(exc).replace(str(path), f"the {mode} candidate")}
            except OnnxCompressError as exc:
                if not cands:  # the first mode: bad input or data, which the user must see as such
                    raise
                cands[mode] = {"report": {}, "passed": False, "error": str(exc).replace(str(path), f"the {mode} candidate")}
        ok = {m: c for m, c in cands.items() if c["passed"]}
        summary = {m: {"passed": c["passed"], "fidelity": _fidelity(c["report"]) if c["report"] else None,
                       "file_bytes": c["report"].get("after", {}).get("file_bytes"), "error": c.get("error")}
                   for m, c in cands.items()}
        auto: dict[str, Any] = {"candidates": summary, "chosen": None, "fidelity": "worst-output cosine"}
        if not ok:
            report = next((c["report"] for c in cands.values() if c["report"]), {})
            report = {**report, "output": str(out), "auto": _jsonable(auto), "written": False,
                      "seconds": round(time.perf_counter() - t0, 2)}
            err = GateFailedError("--quantize auto: no mode passed: " + "; ".join(
                f"{m}: {c.get('error', 'failed')}" for m, c in cands.items()) + f" -- {out} not written")
            err.report = report  # type: ignore[attr-defined]
            raise err
        fid = {m: summary[m]["fidelity"] for m in ok}
        best = max((f for f in fid.values() if f == f), default=float("nan"))
        keep = [m for m in ok if not (fid[m] < best - AUTO_COSINE_SLACK)]
        for m in ok:
            if m not in keep:
                summary[m]["left_out"] = (f"fidelity {fid[m]:.5f} is more than {AUTO_COSINE_SLACK:g} below the best "
                                          f"({best:.5f})")
        by_fidelity = sorted(keep, key=lambda m: (-(fid[m] if fid[m] == fid[m] else -1.0),
                                                  summary[m]["file_bytes"] or 0))
        chosen = by_fidelity[0]
        if len(modes) == 1:
            why = "static not tried (no --calibration data to calibrate on)"
        elif len(ok) == 1:
            why = "the only mode that passed"
        elif len(keep) == 1:
            why = "the other lost more fidelity"
        else:
            why = "within the fidelity slack of each other; the more faithful one"
            here = opts.target in ("auto", cpu_features().int8_target)
            prov = opts.providers[0] if opts.providers else "cpu"
            data = tmp / "timing.npz"
            if here:
                try:
                    say("auto: timing the candidates (interleaved)")
                    _, val, _, _ = _load_data(load_model(inp), opts)
                    np.savez(data, **{f"{k}__{n}": a for k, f in enumerate(val[:8]) for n, a in f.items()})
                    bench = benchmark([inp, *(ok[m]["path"] for m in keep)], data=data, duration=6.0, warmup=2,
                                      memory=False, providers=(prov,))
                    lat = {m: mb.latency.p50_ms for m, mb in zip(keep, bench.groups[0].models[1:])}
                    for m in keep:
                        summary[m]["latency_ms"] = float(f"{lat[m]:.4g}")
                    auto["fp32_latency_ms"] = float(f"{bench.groups[0].models[0].latency.p50_ms:.4g}")
                    fastest = sorted(keep, key=lambda m: lat[m])
                    if lat[fastest[1]] >= AUTO_SPEED_MARGIN * lat[fastest[0]]:
                        chosen = fastest[0]
                        why = (f"fastest ({lat[chosen]:.4g} vs {lat[fastest[1]]:.4g} ms median, interleaved on "
                               f"{bench.groups[0].provider.replace('ExecutionProvider', '')}) of the modes within "
                               f"{AUTO_COSINE_SLACK:g} of the best fidelity")
                    else:
                        why = (f"speeds within {AUTO_SPEED_MARGIN - 1:.0%} of each other "
                               f"({', '.join(f'{m} {lat[m]:.4g} ms' for m in keep)}): the more faithful one")
                    if lat[chosen] > 1.1 * auto["fp32_latency_ms"]:
                        summary[chosen]["slower_than_fp32"] = True
                except Exception as exc:  # noqa: BLE001 - timing is a tie-break: fidelity decides then
                    why = f"the more faithful one (timing failed: {exc})"
            else:
                why = f"the more faithful one (target {opts.target} is not this machine: no timing here)"
        auto["chosen"], auto["why"] = chosen, why
        report = dict(cands[chosen]["report"])
        model = load_model(ok[chosen]["path"])
        say(f"writing {out}")
        size = save_model(model, out, external_data=opts.external_data, protect=protect)
        report["after"] = {**report.get("after", {}), "file_bytes": size,
                           "compressed_bytes": _compressed_size([out, *external_data_files(out)])}
        report["output"] = str(out)
        report["options"] = _jsonable(asdict(opts))
        report["auto"] = _jsonable(auto)
        others = [f"{m}: {summary[m].get('left_out') or summary[m].get('error') or ''}".rstrip(": ")
                  for m in cands if m != chosen]
        note = f"--quantize auto chose {chosen}: {why}" + "".join(f"; {o}" for o in others if ":" in o)
        report["notes"] = [*report.get("notes", []), note]
        if summary[chosen].get("slower_than_fp32"):
            report["notes"].append(f"--quantize auto: even the chosen {chosen} model is slower than fp32 here "
                                   f"({summary[chosen]['latency_ms']} vs {auto['fp32_latency_ms']} ms): consider fp32")
        report["written"] = True
        report["seconds"] = round(time.perf_counter() - t0, 2)
        return OptimizeResult(out, report, True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quantize(model: ir.Model, opts: OptimizeOptions, calib, check_samples, extra_exclude: tuple[str, ...],
              calib_cache: dict) -> tuple[ir.Model, list[PassReport]]:
    """Run the quantization pass chosen by ``opts`` (plus dead-code removal)."""
    qctx = PassContext(calibration=calib, options={
        "calibration_method": opts.calibration_method, "target": opts.target,
        "per_channel": opts.per_channel, "min_sqnr_db": opts.min_sqnr_db,
        "exclude_nodes": tuple(opts.exclude_nodes), "fallback_nodes": tuple(extra_exclude),
        "exclude_op_types": opts.exclude_op_types, "calibration_cache": calib_cache,
        "bias_correction": opts.bias_correction,
        "sequential_bias_correction": opts.bias_correction_mode == "sequential", "weight_only_mode": opts.quantize})
    qpass = StaticQuantizePass(qctx) if opts.quantize == "static" else DynamicQuantizePass(qctx)
    # static mode: a fused com.microsoft.Attention becomes QAttention (dynamic int8 input)
    attn = [AttentionQuantizePass(qctx)] if opts.quantize == "static" else []
    # weight-only int8 (float compute) for what the integer pass leaves float: subgraph nodes
    # (static), Conv (dynamic), LSTM/GRU/RNN weights (both); see passes/quantize/weight_only.py
    # no numeric check here: the int8 passes are lossy (validation judges their result) and
    # dead-code removal is exact; a check would run the whole model twice more for nothing
    model, qreps = run_passes(model, [qpass, *attn, WeightOnlyQuantizePass(qctx), GatherQuantizePass(qctx),
                                      DeadCodePass(qctx)], [])
    return model, qreps


def _validate(original: ir.Model, model: ir.Model, val, labels, providers: list[str], latency: bool) -> list[dict]:
    """:func:`compare` on every provider, as JSON-ready dicts."""
    return [_jsonable(asdict(compare(original, model, val, labels=labels, provider=p, latency=latency)))
            for p in providers]


def _gates(opts: OptimizeOptions, validation: list[dict]) -> list[dict]:
    gates = []
    for v in validation:
        outs = v["outputs"]
        # index outputs (int32/int64: class indices) are judged by agreement (--min-top1-agreement)
        floats = [o for o in outs if not o.get("integer")]
        for gate, limit, key, worst_of, ok in (
                ("max-rel-error", opts.max_rel_error, "max_rel_err", max, lambda x, lim: x <= lim),
                ("min-cosine", opts.min_cosine, "cosine", min, lambda x, lim: x >= lim)):
            if limit is None:
                continue
            if not floats:
                gates.append({"gate": gate, "provider": v["provider"], "value": float("nan"), "limit": limit,
                              "passed": False, "why": "no float output; gate index outputs with --min-top1-agreement"})
                continue
            worst = worst_of(float(o[key]) for o in floats)  # reports store inf as a string
            gates.append({"gate": gate, "provider": v["provider"], "value": worst, "limit": limit,
                          "passed": bool(ok(worst, limit))})
        if opts.min_top1_agreement is not None:
            vals = [float(o["top1_agreement"]) for o in outs if o["top1_agreement"] is not None]
            if not vals:
                gates.append({"gate": "min-top1-agreement", "provider": v["provider"], "value": float("nan"),
                              "limit": opts.min_top1_agreement, "passed": False,
                              "why": "no output looks like class scores"})
            else:
                worst = min(vals)
                gates.append({"gate": "min-top1-agreement", "provider": v["provider"], "value": worst,
                              "limit": opts.min_top1_agreement, "passed": worst >= opts.min_top1_agreement})
    return gates


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj
