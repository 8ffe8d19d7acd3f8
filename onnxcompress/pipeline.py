"""One run of a recipe: the steps of ``optimize``, each a named function.

Data flows one way::

    load (_load_input) -> plan (_resolve_recipe: flags or a recipe -> stages) ->
    data (_load_data) -> run the stages, exact ones checked (_run_stages) ->
    validate and gate (_validate_and_gate; the sensitive-node fallback: fallback.py) ->
    write (_write) -> report

:func:`run` is the whole of it; ``api.optimize`` resolves the recipe and calls it (``--quantize
auto`` calls it once per candidate, auto.py). Nothing here prints; progress goes through an
optional callback.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

from . import __version__
from .cost import StageMeter
from .data import class_indices, input_specs, shared_samples, load_image_folder, load_npz, random_samples, samples_from_arrays, split_holdout
from .errors import DataError, GateFailedError, ModelLoadError, OnnxCompressError
from .fallback import sensitive_fallback
from .util import compressed_size, jsonable as _jsonable
from .validate import validate_all
from .gates import evaluate as evaluate_gates, floor as floor_rows, label as gate_label
from .inspect import summarize
from .model_io import check_model, check_output_path, external_data_files, load_model, save_model
from .opset import upgrade_opset
from .progress import ProgressEvent, listening
from .passes.base import PassContext, PassReport, Scope, run_passes_ref, snapshot
from .passes.prune_nm import storage_report
from .passes.registry import prepare_passes
from .recipe import Recipe, RecipeError
from .runtime import cpu_features, resolve_providers

logger = logging.getLogger("onnxcompress")

#: the zlib size of input and output (what unstructured zeros save) is measured with pruning, or
#: when both files together are at most this large (zlib costs about 30 s per GB and core: a
#: 50 MB transformer's dynamic int8 run spent 2.1 of its 3.5 s on it at 64 MB)
ZLIB_MEASURE_BYTES = 16 << 20
#: the quick latency figure of validation needs a second, pre-packed copy of the weights in ORT:
#: skipped (with a note) for models larger than this; ``onnxcompress bench`` measures any size
QUICK_LATENCY_MAX_BYTES = 1 << 30
#: a data reader (``get_next()``) is read up to this many samples
MAX_READER_SAMPLES = 100_000


@dataclass
class OptimizeResult:
    """Outcome of :func:`optimize`; ``report`` is JSON-ready.

    Attributes:
        output: the written file (``None`` when no output path was given).
        report: see :func:`optimize`.
        passed: every gate held.
        model: the optimized model (``onnx_ir.Model``; ``onnxcompress.model_io.to_proto(result.model)``
            gives the ``ModelProto`` that would be written, for models under 2 GB).
        recipe: the recipe that ran.
    """

    output: Path | None
    report: dict[str, Any] = field(default_factory=dict)
    passed: bool = True
    model: ir.Model | None = field(default=None, repr=False)
    recipe: Recipe | None = field(default=None, repr=False)


@dataclass
class _Run:
    """State of one run: what the steps share (the report grows as they go)."""

    recipe: Recipe
    inp: Path | None
    out: Path | None
    progress: Callable[[str], None] | None
    stage: str = ""
    listener: Any = None  # progress.Listener of the run
    meter: StageMeter = field(default_factory=StageMeter)
    t0: float = field(default_factory=time.perf_counter)
    notes: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    model_files: list = field(default_factory=list)  # the input model and its external data
    #: files an in-memory input (``onnx_ir.Model`` from ``load_model``) was read from and may still
    #: read (memory-mapped weights): protected like the input files
    source_files: list = field(default_factory=list)
    in_files: list = field(default_factory=list)  # those and the data files: never overwritten
    #: how passes are checked when no inputs run: "runtime" (checker + ORT load) or "checker"
    structural: str | None = None
    #: the input's outputs on the check samples (the probe's), reused by the first pass check
    probe_ref: list | None = None
    #: the input's outputs on the validation samples per provider, reused by every validation
    #: of this run (the fallback's rounds): :func:`onnxcompress.validate.compare`
    ref_cache: dict = field(default_factory=dict)
    #: the unoptimized session that proved ORT loads the input (:func:`_runtime_loads`), run by the
    #: probe and then dropped: one session build of the input instead of two
    input_session: Any = None
    #: the model validation ran in ORT on CPU (the write's ORT load check would repeat it)
    ort_loaded: Any = None
    #: lossy stages (pruning, low-rank, distillation) that changed the model, in order: the default
    #: floor (int8 against the input) does not judge a model they changed
    lossy_changed: list = field(default_factory=list)

    def say(self, msg: str) -> None:
        """A stage starts: its time and peak memory go to ``report["cost"]``; the progress
        callback gets a :class:`~onnxcompress.progress.ProgressEvent` carrying the last one's."""
        if self.listener is not None:
            self.listener.raise_pending()  # the progress callback failed inside a pass
        closed = self.meter.start(msg)
        self.stage = msg
        if self.progress:
            self.progress(ProgressEvent(msg, closed=closed))

    def note(self, msg: str, *, warn: bool = False) -> None:
        self.notes.append(msg)
        if warn:
            logger.warning("%s", msg)


def run(model, output: str | Path | None, rec: Recipe, progress: Callable[[str], None] | None = None) -> OptimizeResult:
    """Run ``rec`` on ``model`` (see :func:`onnxcompress.api.optimize` for the arguments, result and errors).

    ``progress`` gets a :class:`~onnxcompress.progress.ProgressEvent` (a ``str``) at each stage
    start and, inside a stage, for what it counts (samples, nodes, tensors)."""
    run = _Run(rec, None, Path(output) if output is not None else None, progress)
    with listening(lambda: run.stage, progress) as run.listener:
        return _run(run, model)


def _run(run: _Run, model) -> OptimizeResult:
    rec = run.recipe
    for n in rec.notes:  # the planner's: flags that had no effect, a re-planned recipe
        run.note(n, warn=True)
    original = _load_input(run, model)
    _check_paths(run)
    work = snapshot(original)  # shares every tensor with `original`: passes replace, never edit
    # every node needs a unique name: reports, --exclude and the fallback refer to nodes by name
    ir.passes.common.NameFixPass()(work)
    run.say("reading data")
    calib, val, labels = _load_data(run, work)
    run.say("reference run of the input")
    runtime_ok = _check_runtime(run, original)
    if not runtime_ok:
        calib, val = [], []
    else:
        calib, val = _probe(run, original, calib, val)
    if not calib:  # nothing to run the checks on: structural checks instead
        run.structural = "runtime" if runtime_ok else "checker"
    _note_unknown_names(run, work)  # after NameFix: the names a recipe may give (tune's, a report's) exist
    run.report.update(_report_head(run, original))
    ctx = PassContext(calibration=calib, check_samples=check_samples(calib), holdout=val[:16],
                      scope=Scope.of(rec.scope.exclude_nodes, rec.scope.exclude_op_types),
                      teacher=original if rec.stage("distill") is not None else None)
    work, reports, int8 = _run_stages(run, work, ctx)
    _initializers_as_inputs(work)
    passed, validation, gates, reports, work = _validate_and_gate(run, original, work, reports, int8, val, labels,
                                                                  runtime_ok)
    run.report.update(passes=[r.to_dict() for r in reports], validation=validation, after=summarize(work),
                      gates=gates)
    if run.report.get("fallback"):
        _fallback_cost_note(run, validation)
    if not passed:
        _fail(run, gates)
    if run.out is not None:
        _write(run, work, original, runtime_ok)
    else:  # returned, not written: the same checks as a written model
        check_model(work, runtime=runtime_ok)
    return _finish(run, work, written=run.out is not None)


def _data_files(recipe: Recipe) -> list[Path]:
    """The calibration/validation files the recipe reads (folders of images excluded)."""
    return [Path(v) for v in (recipe.data.calibration, recipe.data.validation)
            if isinstance(v, (str, Path)) and not Path(v).is_dir()]


def _check_paths(run: _Run) -> None:
    """Before any work: data files are regular files, and the output (and its ``.data``) is a
    new path or a regular file in a writable folder that is none of the inputs."""
    from .paths import PathError, check_input_file

    for f in _data_files(run.recipe):
        try:
            check_input_file(f, "data file")
        except PathError as exc:
            raise DataError(str(exc)) from None
    run.in_files = [*run.model_files, *run.source_files, *_data_files(run.recipe)]
    if run.out is not None:
        check_output_path(run.out, tuple(run.in_files), run.recipe.output.external_data)


def _load_input(run: _Run, model) -> ir.Model:
    """Load and check the input model; refuse an output path equal to the input."""
    if isinstance(model, (str, Path)):
        run.inp = Path(model)
        if run.out is not None and run.out.exists() and run.out.resolve() == run.inp.resolve():
            raise OnnxCompressError(f"{run.out}: output path is the input model; refusing to overwrite it")
        run.say("loading model")
        original = load_model(run.inp)
        run.model_files = [run.inp, *original.meta.get("onnxcompress.external_files", [])]
    elif isinstance(model, onnx.ModelProto):
        run.say("loading model")
        try:
            original = ir.from_proto(model)
        except Exception as exc:
            raise ModelLoadError(f"the given ModelProto cannot be read: {exc}") from None
    elif isinstance(model, ir.Model):
        run.say("loading model")
        original = model
        src = model.meta.get("onnxcompress.path")
        run.source_files = [*([src] if src else []), *model.meta.get("onnxcompress.external_files", [])]
    else:
        raise OnnxCompressError(f"model must be a path, an onnx.ModelProto or an onnx_ir.Model, "
                                f"got {type(model).__name__}")
    try:
        check_model(original, runtime=False)
    except OnnxCompressError as exc:  # found now, not after all the work: outputs must pass it too
        raise ModelLoadError(f"{run.inp or 'the input model'}: the input model fails onnx.checker "
                             f"({str(exc).split(': ', 1)[-1]}); onnxcompress only writes models that pass it") from None
    return original


def _samples(src, specs, image, what: str):
    """Feed dicts from one data source: ``.npz`` path, image folder, dict of arrays, list of
    feed dicts or a reader with ``get_next()``. Returns ``(samples, extras)``."""
    if isinstance(src, (str, Path)):
        if Path(src).is_dir():
            return load_image_folder(src, specs, image, what=what), {}
        return load_npz(src, specs, what=what)
    if isinstance(src, dict):
        return samples_from_arrays(dict(src), specs, source=f"{what} dict", what=what)
    if hasattr(src, "get_next"):
        feeds = []
        for _ in range(MAX_READER_SAMPLES):
            f = src.get_next()
            if f is None:
                break
            if not isinstance(f, dict):
                raise DataError(f"{what} data: get_next() returned {type(f).__name__}, expected a feed dict or None")
            feeds.append(f)
        src = feeds
    arrays = {f"{i}__{k}": np.asarray(v) for i, f in enumerate(src) for k, v in f.items()}
    if not arrays:
        raise DataError(f"{what} data: no samples given")
    return samples_from_arrays(arrays, specs, source=f"{what} feeds", what=what)


def _load_data(run: _Run, model: ir.Model):
    """Calibration samples, validation samples and labels (validation held out of calibration when
    no validation data is given; random inputs, with a note, when no data at all)."""
    d, quantizing = run.recipe.data, any(s.spec.int8 for s in run.recipe.stages)
    static = any(s.name in ("quantize-static", "quantize-auto") for s in run.recipe.stages)
    specs = input_specs(model)
    labels = None
    if d.calibration is not None:
        calib, _ = _samples(d.calibration, specs, d.image, "calibration")
    else:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            calib = random_samples(specs, 16)
        for x in w:
            run.note(str(x.message), warn=static)  # calibrating on noise deserves more than a note
        free = [(sp.name, ["?" if dim is None else dim for dim in sp.shape], list(calib[0][sp.name].shape))
                for sp in specs if calib and sp.name in calib[0]
                and any(not isinstance(dim, int) or dim < 0 for dim in (sp.shape or ()))]
        if free and d.validation is None:  # with --validation the figures come from that data
            run.note("random inputs at the smallest shape: " + "; ".join(
                f"'{n}' {shape} -> {used}" for n, shape, used in free) + " (every free dimension 1): the latency "
                "and fidelity figures describe that shape; give --calibration or --validation data of the real "
                "shape", warn=True)
    if d.validation is not None:
        val, vextras = _samples(d.validation, specs, d.image, "validation")
        labels = _labels(run, vextras.get("labels"), val, d.validation)
        where = d.validation if isinstance(d.validation, (str, Path)) else "the given data"
        fits = any(not st.spec.checked or st.spec.needs_data for st in run.recipe.stages)  # a stage fitted to data
        shared = (shared_samples(d.calibration, d.validation, calib[: d.max_calibration_samples], val)
                  if d.calibration is not None and fits else 0)
        if shared:
            if shared == len(val) == len(calib):
                what = "--validation is the same data as --calibration"
            elif shared == len(val):
                what = f"every one of the {len(val)} --validation samples is also a --calibration sample"
            else:
                what = f"{shared} of the {len(val)} --validation samples are also --calibration samples"
            run.note(what + ": their figures are measured on rows that calibration, pruning's repair and distillation "
                     "were fitted to, not on held-out data; give other data, or leave --validation out to hold "
                     "out part of --calibration", warn=True)
        kind = "images" if isinstance(d.validation, (str, Path)) and Path(d.validation).is_dir() else "samples"
        run.note(f"validation on {len(val)} {kind} from {where}" + (" (not all held out)" if shared else ""))
    else:
        calib, val = split_holdout(calib)
        if calib is val:
            run.note("only one sample: validation uses the calibration sample (nothing held out)")
        else:
            used = (f"; calibration uses the other {len(calib)}" if static and quantizing else
                    f"; the other {len(calib)} serve the per-pass checks")
            given = "the given data" if d.calibration is not None else "the random inputs (no data given)"
            run.note(f"validation on {len(val)} samples held out of {given} (never used to calibrate){used}")
    return calib[: d.max_calibration_samples], val, labels


def _labels(run: _Run, labels, val, source):
    """Check the validation labels (1-D integer class indices, one per row of the first input)."""
    if labels is None:
        return None
    labels = class_indices(labels, str(source))
    rows = sum(int(next(iter(f.values())).shape[0]) if next(iter(f.values())).ndim else 1 for f in val)
    if labels.shape[0] != rows:  # a warning: accuracy needs one label per row of the first *output*
        run.note(f"{source}: 'labels' has {labels.shape[0]} entries for {rows} rows of the first "
                 "input; accuracy is reported only when they match the first output's rows", warn=True)
    return labels


_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training")


#: the per-pass checks run at most this many calibration samples ...
CHECK_SAMPLES = 4
#: ... and, past the first, only while their inputs total at most this many bytes: each checked
#: pass runs them unoptimized, and PP-OCRv4 det's 736 x 992 pages (8.8 MB each) made a check
#: 0.4 s per sample; one sample already runs every node of the model
CHECK_BYTES = 16 << 20


def check_samples(calib: list[dict]) -> list[dict]:
    """The calibration samples the per-pass checks run (:data:`CHECK_SAMPLES`, :data:`CHECK_BYTES`;
    at least one when there is one)."""
    out, total = [], 0
    for sample in calib[:CHECK_SAMPLES]:
        total += sum(getattr(v, "nbytes", 0) for v in sample.values())
        if out and total > CHECK_BYTES:
            break
        out.append(sample)
    return out


def _check_runtime(run: _Run, original: ir.Model) -> bool:
    """Whether ORT loads the input. A model with custom ops it cannot load is still fused (checked
    by onnx.checker only), never quantized.

    Raises:
        OnnxCompressError: ORT refuses a model without custom ops, or quantization was asked for one.
    """
    ok, custom, run.input_session = _runtime_loads(original)
    if ok:
        return True
    if any(s.spec.int8 for s in run.recipe.stages):
        raise OnnxCompressError(
            f"ONNX Runtime cannot load this model ({custom}); quantization needs to run it for "
            "calibration and validation. Register the custom ops with ONNX Runtime or exclude them first.")
    run.note(f"ONNX Runtime cannot load this model ({custom}): the result is written but NOT validated "
             "(no numeric validation: the passes were checked by onnx.checker only); register the custom ops "
             "with ONNX Runtime to validate it", warn=True)
    return False


def _probe(run: _Run, original: ir.Model, calib, val):
    """Run the input model on the samples the checks will use, before any pass.

    Generated inputs can break an operator's preconditions (a zero divisor, an out-of-range
    index, axes given as inputs) or miss what an input is (a sequence, an optional): then the
    passes run with structural checks only (onnx.checker), which the report says, and int8
    (which needs the model to run) asks for data. Data the user gave must run: else a one-line
    :class:`DataError` naming ONNX Runtime's complaint.

    The probe runs the check samples (:func:`check_samples`) and the first validation sample; the check
    samples' outputs become the first per-pass check's reference (``run.probe_ref``). When CPU
    validates and the validation outputs total at most
    :data:`onnxcompress.validate.REF_CACHE_BYTES` (estimated from the first sample's), the
    other validation samples run too and their outputs become the CPU validation's reference
    (``run.ref_cache``): the input model is not run again there.

    Returns:
        ``(calib, val)``: as given, or both empty when generated inputs do not run.
    """
    from .runtime import make_session, run_samples

    d = run.recipe.data
    given = d.calibration is not None or d.validation is not None
    check = check_samples(calib)
    loaded, run.input_session = run.input_session, None
    try:
        run.probe_ref = None
        if check:
            # the per-pass checks' reference (as passes.base.reference_outputs: optimizations off);
            # without ORT's arena (runtime.make_session): with it, PP-OCRv4 det's probe left ~200 MB
            # held through every later stage
            sess = loaded if loaded is not None else make_session(original, optimize=False)
            run.probe_ref = run_samples(sess, check)
            del sess
        loaded = None
        if val:
            cpu = "CPUExecutionProvider" in resolve_providers(list(run.recipe.output.providers))[0]
            _validation_reference(run, original, val, cpu)
        return calib, val
    except Exception as exc:  # ORT's refusal, whatever its type
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if given:
        raise DataError(f"ONNX Runtime cannot run the input model on the given data: {why}") from None
    if any(s.spec.int8 for s in run.recipe.stages):
        raise DataError("ONNX Runtime cannot run this model on generated inputs (" + why + "); int8 needs "
                        "inputs the model runs on: give --calibration data") from None
    run.note("ONNX Runtime cannot run this model on generated inputs (" + why + "): the passes were checked "
             "structurally only (onnx.checker), with no numeric comparison; give --validation data to check "
             "them numerically", warn=True)
    return [], []


def _validation_reference(run: _Run, original: ir.Model, val: list[dict], cpu: bool) -> None:
    """Run the input on the first validation sample (it must run: else ORT's error is raised) and,
    when CPU validates and the outputs of all samples fit :data:`onnxcompress.validate.REF_CACHE_BYTES`
    (estimated from the first sample's), on the others: their outputs become the CPU validation's
    reference (``run.ref_cache``), made as :func:`onnxcompress.validate.compare` makes them
    (``runtime.run_reference``: ORT_ENABLE_ALL, no pre-packing, no arena; unoptimized where ORT's
    optimizer breaks the input at run time), so the input is not run again there."""
    from .runtime import run_reference, run_samples
    from .validate import REF_CACHE_BYTES, session_charset

    sess, first = run_reference(original, val[:1])
    sizes = [_nbytes(v) for o in first for v in o.values()]
    per = None if None in sizes else sum(sizes)
    if cpu and per is not None and per * len(val) <= REF_CACHE_BYTES:
        outs = first + run_samples(sess, val[1:])
        run.ref_cache["CPUExecutionProvider"] = ([o.name for o in sess.get_outputs()], outs, sess.onnxcompress_level,
                                                 session_charset(sess))


def _nbytes(v) -> int | None:
    """Bytes of one output value (``None`` for what is not a tensor: a sequence, a map)."""
    return v.nbytes if isinstance(v, np.ndarray) else None


def _runtime_loads(model: ir.Model) -> tuple[bool, str, Any]:
    """Whether ORT can load the input; if not because of custom-domain ops, name them. Returns
    ``(loads, custom ops, the session)`` (unoptimized, weights read in place; ``None`` when it
    does not load), which the probe runs.

    Raises:
        OnnxCompressError: ORT refuses a model that has no custom ops (its message is given).
    """
    from .runtime import make_session

    try:
        return True, "", make_session(model, optimize=False)
    except Exception as exc:
        custom = sorted({f"{n.domain}.{n.op_type} (node '{n.name}')"
                         for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain not in _STANDARD_DOMAINS})
        if not custom:
            raise OnnxCompressError(f"ONNX Runtime cannot load the input model: {str(exc).splitlines()[0]}") from None
        return False, "custom ops: " + ", ".join(custom[:5]) + (" ..." if len(custom) > 5 else ""), None


def _note_unknown_names(run: _Run, original: ir.Model) -> None:
    """A warning for every node name or op type the recipe names that the model does not have.

    Raises:
        RecipeError: a per-output gate names an output the model does not have (a gate that
            would silently judge nothing).
    """
    r = run.recipe
    outputs = [v.name for v in original.graph.outputs]
    unknown = [n for n in r.gates.outputs if n not in outputs]
    if unknown:
        raise RecipeError(f"[gates.outputs.{unknown[0]}]: the model has no output named '{unknown[0]}' "
                          f"(outputs: {', '.join(outputs)})")
    names = {n.name for n in ir.traversal.RecursiveGraphIterator(original.graph)}
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(original.graph)}
    protect, ratios = (), ()
    for st in r.stages:
        if st.name == "prune-channels":
            protect, ratios = protect + tuple(st.config.protect), ratios + tuple(st.config.ratios)
    for what, given in (("--exclude", (*r.scope.exclude_nodes, *r.scope.exclude_op_types)),
                        ("--prune-protect", protect), ("--prune-ratio", ratios)):
        unknown = [e for e in dict.fromkeys(given) if e not in names and e not in ops]
        if unknown:
            run.note(f"{what}: no node or op type named {', '.join(repr(u) for u in unknown)} in the model", warn=True)


def _report_head(run: _Run, original: ir.Model) -> dict[str, Any]:
    cpu = cpu_features()
    recipe = run.recipe.report_dict()
    return {"tool": {"name": "onnxcompress", "version": __version__},
            "input": str(run.inp) if run.inp else "<in-memory model>",
            "output": str(run.out) if run.out else None, "recipe": _jsonable(recipe),
            "cpu": {"arch": cpu.arch, "int8_target": cpu.int8_target, "avx2": cpu.avx2, "avx512": cpu.avx512,
                    "vnni": cpu.vnni},
            "before": summarize(original, run.inp), "passes": [], "notes": run.notes}


@dataclass
class _Int8:
    """What the fallback needs from the int8 stage: where to re-quantize from and how."""

    start: ir.Model | None
    stage: Any
    ctx: PassContext
    reports: list[PassReport]


def _run_stages(run: _Run, model: ir.Model, ctx: PassContext):
    """Run the recipe's stages in order (exact ones checked pass by pass on ``ctx.check_samples``).

    Returns ``(model, reports, int8)``; ``int8`` is ``None`` when no int8 stage ran.

    Raises:
        OnnxCompressError: an int8 stage failed (never hand back a float model as the int8 one).
    """
    r = run.recipe
    reports: list[PassReport] = []
    int8 = None
    ref0, run.probe_ref = run.probe_ref, None  # the input's outputs: valid until the model changes
    if r.stage("fuse") is None:  # what every later pass expects, fused or not
        model, reps, ref0 = run_passes_ref(model, prepare_passes(ctx), ctx.check_samples, structural=run.structural,
                                           ref=ref0)
        reports += reps
    for st in r.stages:
        spec = st.spec
        if spec.needs_data and r.data.calibration is None:
            run.note(spec.needs_data)
            continue
        opset = model.opset_imports.get("", 1)
        if spec.min_opset and opset < spec.min_opset:
            run.say(f"upgrading opset {opset} -> {spec.min_opset}")
            model, info = upgrade_opset(model, spec.min_opset, ctx.check_samples, ref=ref0)
            ref0 = None
            run.report["opset_upgrade"] = info
        run.say(spec.describe(st.config) if spec.describe else st.name)
        start = None
        if spec.int8:
            # the fallback re-quantizes from here: kept only when a gate could send it there (the
            # snapshot keeps the float weights alive, a second copy once int8 replaced them)
            floor_fb = _floor_applies(run, True) is None and not r.gates.accept_degraded
            start = snapshot(model) if r.gates.fallback and (r.gates.any or floor_fb) else None
            ctx.cache = {}
        passes = spec.passes(st.config, ctx)
        # the outputs of the model as it stands carry over from one checked stage to the next;
        # an unchecked stage (int8, pruning) changes the model: they are dropped before it runs
        if not spec.checked:
            ref0 = None
        model, reps, ref0 = run_passes_ref(model, passes, ctx.check_samples if spec.checked else [],
                                           structural=run.structural if spec.checked else None,
                                           ref=ref0)
        if not spec.checked:
            ref0 = None
        reports += [x for x in reps if not spec.quiet or x.changed or x.reverted]
        if reps and all(x.reverted for x in reps):
            run.meter.mark("reverted")
        if spec.lossy and any(x.changed and not x.reverted for x in reps):
            run.lossy_changed.append(st.name)
        for x in reps:  # what a pass says about its own choices (a fallback it took, a budget it overshot)
            if x.reverted:
                continue
            for n in x.counts.get("notes") or []:
                if isinstance(n, str):
                    run.note(f"{x.name}: {n}")
        if spec.int8:
            if reps[0].reverted:
                raise OnnxCompressError(f"{st.name} failed on this model ({reps[0].reverted}); nothing written "
                                        "(report this model; --debug shows more)")
            int8 = _Int8(start, st, ctx, reps)
        if st.name == "prune-magnitude" and reps[0].changed:
            _storage_note(run, model)
    return model, reports, int8


def _initializers_as_inputs(model: ir.Model) -> None:
    """IR version < 4: every initializer must also be a graph input (the rule of those versions);
    passes add initializers without listing them, so list them here."""
    if model.ir_version is None or model.ir_version >= 4:
        return
    listed = {id(v) for v in model.graph.inputs}
    for v in model.graph.initializers.values():
        if id(v) not in listed:
            model.graph.inputs.append(v)


def _storage_note(run: _Run, model: ir.Model) -> None:
    """What the zeros of unstructured pruning save in a file (measurement only)."""
    try:
        st = storage_report(model)
        run.report["pruning_storage"] = st
        run.note(f"sparse storage measured after pruning (before quantization): dense {st['dense_bytes']} B "
                 f"({st['dense_zlib_bytes']} B zlib), sparse_initializer {st['sparse_initializer_bytes']} B "
                 f"({st['sparse_initializer_zlib_bytes']} B zlib); kept: {st['choice']}")
    except Exception as exc:  # measurement only
        run.note(f"sparse storage not measured: {exc}")


def _floor_applies(run: _Run, int8) -> str | None:
    """Why the default floor (:func:`onnxcompress.gates.floor`) does not judge this run, or
    ``None`` when it does: a quantized model, no gate of the user's, real data."""
    r = run.recipe
    if int8 is None:
        return "no int8 stage"
    if r.gates.any:
        return "your gates judge the model"
    lossy = run.lossy_changed  # a lossy stage that left the model as it was changes no answer
    if lossy:
        return (f"{lossy[0]} changes the answers by design (the floor judges int8 against the input); "
                "set a gate to judge the result")
    if r.data.calibration is None and r.data.validation is None:
        return "no real data (random inputs cannot tell a kept answer from a lost one)"
    return None


def _judge(run: _Run, validation, floor_on: bool):
    """The gate rows for ``validation``: the user's gates, plus the default floor's rows when it
    applies. Returns ``(rows, passed)``; floor rows decide ``passed`` unless the recipe accepts
    degraded models."""
    r = run.recipe
    rows = evaluate_gates(r.gates, validation)
    if floor_on:
        rows += floor_rows(r.gates, validation)
    blocking = [g for g in rows if not (g.get("floor") and r.gates.accept_degraded)]
    return rows, all(g["passed"] for g in blocking)


def _validate_and_gate(run: _Run, original, model, reports, int8, val, labels, runtime_ok):
    """Validate on every provider, evaluate the gates (and the default floor), run the fallback
    when one is missed.

    Returns ``(passed, validation, gates, reports, model)``."""
    r = run.recipe
    run.say("validating with ONNX Runtime")
    providers, skipped = resolve_providers(list(r.output.providers))
    run.notes.extend(skipped)
    providers = providers if runtime_ok else []
    latency = r.output.latency
    if latency and run.report["before"]["size_bytes"] > QUICK_LATENCY_MAX_BYTES:
        latency = False
        run.note(f"quick latency not measured: the model is over {QUICK_LATENCY_MAX_BYTES >> 30} GB and the "
                 "timing needs another pre-packed copy of its weights; use `onnxcompress bench`")
    validation = validate_all(original, model, val, labels, providers, latency, cache=run.ref_cache)
    for v in validation:
        if v.get("note"):
            run.note(v["note"], warn=True)
    bad = next((v for v in validation if v.get("nonfinite_reference")), None)
    if bad is not None:
        names = ", ".join(f"'{k}' on {n} of {bad['n_samples']}" for k, n in bad["nonfinite_reference"].items())
        run.note(f"the input model's outputs are not finite (NaN or inf) on some validation samples ({names}, "
                 f"{bad['provider'].replace('ExecutionProvider', '')}): there the figures compare only where both "
                 "models are finite, and equal NaNs count as agreement", warn=True)
    no_floor = _floor_applies(run, int8) if providers else "nothing was validated"
    if int8 is not None and not providers and runtime_ok:
        run.note("the quantized model was not validated (no requested provider is available): no gate and no "
                 "fidelity floor judged it", warn=True)
    if r.gates.accept_degraded and no_floor is not None:
        run.note(f"--accept-degraded has no effect here: the default floor does not apply ({no_floor})")
    gates, passed = _judge(run, validation, no_floor is None)
    index_outs = sorted({o["name"] for v in validation for o in v["outputs"] if o.get("integer")})
    if index_outs and (r.gates.max_rel_error is not None or r.gates.min_cosine is not None) \
            and r.gates.min_top1_agreement is None:
        run.note(f"index output(s) {', '.join(index_outs)} (int32/int64) are not judged by --max-rel-error / "
                 "--min-cosine: their agreement (% equal) is gated by --min-top1-agreement")
    if not runtime_ok and r.gates.any:
        gates.append({"gate": "runtime", "provider": "none", "value": float("nan"), "limit": float("nan"),
                      "passed": False, "why": "ONNX Runtime cannot run this model, so no gate can be checked"})
        passed = False
    if not passed and int8 is not None and int8.start is not None:
        fb = sensitive_fallback(run, original, int8, val, labels, providers,
                                judge=lambda v: _judge(run, v, no_floor is None))
        if fb is not None:
            model, qreps, validation, gates, passed = fb
            reports = reports[: len(reports) - len(int8.reports)] + qreps
            if passed and latency:
                validation = validate_all(original, model, val, labels, providers, latency=True,
                                          cache=run.ref_cache)
    _floor_report(run, gates, no_floor, validation)
    _slow_int8_notes(run, validation, int8)
    if any(v.get("provider") == "CPUExecutionProvider" for v in validation):
        run.ort_loaded = model  # validation built an ORT session of this very model on CPU
    return passed, validation, gates, reports, model


def _floor_report(run: _Run, gates, no_floor: str | None, validation=()) -> None:
    """``report["floor"]``: whether the default floor judged the model, and its verdict; a loud
    note when a degraded model is written on request."""
    r = run.recipe.gates
    if no_floor is not None:
        run.report["floor"] = {"applied": False, "why": no_floor}
        _unjudged_loss_note(run, validation)
        return
    rows = [g for g in gates if g.get("floor")]
    ok = all(g["passed"] for g in rows)
    run.report["floor"] = {"applied": True, "passed": ok, "top1_agreement": r.floor_top1_agreement,
                           "mean_cosine": r.floor_mean_cosine, "accepted_degraded": not ok and r.accept_degraded}
    if not ok and r.accept_degraded:
        missed = "; ".join(f"{g['gate']} {g['value']:.5g} < {g['limit']:g} ({', '.join(g['outputs'])})"
                           for g in rows if not g["passed"])
        run.note(f"DEGRADED: the quantized model misses the default fidelity floor ({missed}); written as "
                 "quantized (no fallback for the floor) because --accept-degraded was given", warn=True)


def _unjudged_loss_note(run: _Run, validation) -> None:
    """Warn when no gate and no floor judged a model that changes the answers by design (pruning,
    low-rank, distillation) and it misses what the default floor asks of int8 on the validation
    data: it is still written (the user asked for a lossy rewrite), but not silently.
    ``report["floor"]["would_miss"]`` lists the figures."""
    r = run.recipe
    if r.gates.any or not validation or not run.lossy_changed:
        return
    if r.data.calibration is None and r.data.validation is None:
        return  # random inputs cannot tell a kept answer from a lost one (as for the floor itself)
    missed = [g for g in floor_rows(r.gates, validation) if not g["passed"]]
    if not missed:
        return
    run.report["floor"]["would_miss"] = missed
    lossy = ", ".join(run.lossy_changed)

    def fig(g):
        pct = g["gate"] == "floor-top1-agreement"
        unit = " %" if pct else ""
        # -1 is validation's mark for an output it could not compare (non-finite or missing values)
        value = (f"{g['value']:.4g}{unit}" if pct or g["value"] >= -1 + 1e-9
                 else "not comparable (non-finite or missing values on one side)")
        return (f"{'top-1 agreement' if pct else 'mean cosine'} {value} on "
                f"{', '.join(g.get('outputs') or ['?'])} (the floor asks {g['limit']:.4g}{unit})")

    figs = "; ".join(fig(g) for g in missed)
    run.note(f"no gate judged this model ({lossy} changes the answers by design) and it keeps less than the "
             f"default floor asks of int8: {figs}; it is written as asked; set a gate (--min-top1-agreement, "
             "--min-mean-cosine) to refuse such a model", warn=True)


def _fallback_cost_note(run: _Run, validation) -> None:
    """Say what the fallback gave up: the share of int8 weights kept in float, and the measured
    speed and size of the result beside fp32's (the report's "after", already summarized)."""
    fb = run.report["fallback"]
    share = fb.get("float_weight_share")
    if share is None or share < 0.5:
        return
    speed = ""
    for v in validation:
        lr, lc = v.get("latency_ms_reference"), v.get("latency_ms_candidate")
        if lr and lc:
            speed = f"; quick median latency {lc / lr:.2f}x of fp32's on {v['provider']}"
            break
    before, after = run.report["before"].get("size_bytes"), run.report["after"].get("size_bytes")
    if before and after:
        speed += f"; size {after / before:.2f}x of fp32's"
    static = any(s.name == "quantize-static" for s in run.recipe.stages)
    # --accept-degraded answers the default floor only: with gates of the user's it has no effect
    looser = "a looser gate" if run.recipe.gates.any else "a looser gate (or --accept-degraded with the figures above)"
    n = fb.get("int8_nodes", len(fb["node_sqnr_db"]))
    run.note(f"the fallback kept {len(fb['kept_in_float'])} of {n} quantized nodes in float, "
             f"holding {share:.0%} of their weights: most of int8's speed and size gain is given up{speed}. "
             f"Consider {'--quantize dynamic, ' if static else ''}{looser}, or keeping fp32", warn=True)


def _slow_int8_notes(run: _Run, validation, int8) -> None:
    if int8 is None:
        return
    mode = int8.stage.name.split("-", 1)[1]
    for v in validation:
        lr, lc = v.get("latency_ms_reference"), v.get("latency_ms_candidate")
        if lr and lc and lc > 1.1 * lr:
            other = "dynamic" if mode == "static" else "static"
            run.note(f"the int8 model is {lc / lr:.2f}x SLOWER than fp32 on {v['provider']} at this input size "
                     f"({lr:.3f} -> {lc:.3f} ms, quick median): check with `onnxcompress bench` (interleaved), "
                     f"try --quantize {other}, a larger batch, or keep fp32", warn=True)


def _fail(run: _Run, gates) -> None:
    """Raise :class:`GateFailedError` naming the missed gates, the report attached."""
    run.report["written"] = False
    run.report["seconds"] = round(time.perf_counter() - run.t0, 2)
    run.report["cost"] = _cost(run.meter)
    if run.progress and run.report["cost"]["stages"]:  # the last stage ends with its outcome, not "stopped"
        run.progress(ProgressEvent("done", closed=run.report["cost"]["stages"][-1], final=True))
    where = f"{run.out} not written" if run.out is not None else "no model returned"
    missed = [g for g in gates if not g["passed"]]
    msg = "; ".join(g.get("why") or f"{gate_label(g)} {g['value']:.6g} misses {g['limit']:.10g} on {g['provider']}"
                    for g in missed)
    if any(g.get("floor") for g in missed):
        msg = (f"the quantized model misses the default fidelity floor: {msg}. New in 0.2: a quantized model "
               "below the floor is not written; --accept-degraded writes it anyway, your own gate "
               "(--min-top1-agreement, --min-mean-cosine, ...) replaces the floor")
    err = GateFailedError(msg + f" -- {where}")
    err.report = run.report  # type: ignore[attr-defined]
    raise err


def _write(run: _Run, model: ir.Model, original: ir.Model, runtime_ok: bool) -> None:
    """Write atomically (checked by onnx.checker and ORT first: the ORT load is validation's when
    it ran this model on CPU); zlib sizes when cheap or pruned."""
    run.say(f"writing {run.out}")
    after, before = run.report["after"], run.report["before"]
    size = save_model(model, run.out, external_data=run.recipe.output.external_data, protect=tuple(run.in_files),
                      runtime_check=runtime_ok and run.ort_loaded is not model)
    after["file_bytes"] = size
    pruned = any(s.name.startswith("prune-") for s in run.recipe.stages)
    if run.model_files and (pruned or size + before.get("file_bytes", 0) <= ZLIB_MEASURE_BYTES):
        after["compressed_bytes"] = compressed_size([run.out, *external_data_files(run.out)])
        before["compressed_bytes"] = compressed_size(run.model_files)
    elif run.model_files:
        run.note(f"zlib sizes not measured (about 20 s per GB; done when input and output together are "
                 f"at most {ZLIB_MEASURE_BYTES >> 20} MB, and always with pruning, whose zeros they show)")


def _finish(run: _Run, model: ir.Model, *, written: bool) -> OptimizeResult:
    run.report["written"] = written
    run.report["seconds"] = round(time.perf_counter() - run.t0, 2)
    run.report["cost"] = _cost(run.meter)
    if run.progress and run.report["cost"]["stages"]:
        run.progress(ProgressEvent("done", closed=run.report["cost"]["stages"][-1], final=True))
    return OptimizeResult(run.out, run.report, True, model=model, recipe=run.recipe)


def _cost(meter: StageMeter) -> dict[str, Any]:
    """The run's own cost: per stage wall seconds and peak RSS (MiB), and the whole run's peak."""
    stages = meter.finish()
    return {"stages": stages, "peak_rss_mb": round(meter.process_peak_mb, 1),
            "peak_per_stage": meter.exact}
