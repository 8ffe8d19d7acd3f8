"""The flat option set of ``optimize`` (the command line's shape) and the recipe-level parameters.

:class:`OptimizeOptions` is the command line as a dataclass: one field per flag, and every
field is a declared :class:`~onnxcompress.params.Param` — the same object a pass's config or a
recipe section declares (``OptimizeOptions.calibration_method`` *is*
``StaticQuantizeConfig.calibration_method``'s declaration). The planner
(:func:`onnxcompress.recipe.from_options`) turns it into a :class:`~onnxcompress.recipe.Recipe`;
nothing runs from the flat form directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import params as P
from .data import ImageSpec
from .errors import OnnxCompressError
from .gates import (ACCEPT_DEGRADED, FALLBACK, FLOOR_MEAN_COSINE, FLOOR_TOP1, MAX_FALLBACK_ROUNDS, MAX_REL_ERROR,
                    MIN_COSINE, MIN_MEAN_COSINE, MIN_TOP1)
from .params import Param
from .distill_params import DISTILL
from .passes.lowrank import TARGET_RATIO as LOW_RANK
from .passes.prune import MIN_SIZE, SCOPE as PRUNE_SCOPE, SKIP_FIRST_LAST
from .passes.prune_channels import CHANNEL_SCOPE, IMPORTANCE_P, PROTECT, RATIOS, REPAIR, ROUND_TO
from .passes.prune_nm import PATTERN
from .passes.quantize.config import (BIAS_CORRECTION, BIAS_CORRECTION_MODE, CALIBRATION_METHOD, MIN_NODE_SQNR,
                                     PER_CHANNEL, TARGET, StaticQuantizeConfig)
from .passes.registry import STAGES, StageSpec, register

QUANTIZE_MODES = ("dynamic", "static", "auto")
PRUNE_MODES = ("unstructured", "channel", "nm")

# -- what the planner builds -------------------------------------------------------------
FUSE = Param("fuse", True, "Clean-up and fusion passes (--no-fuse skips them).", kind="bool", flag="--no-fuse")
QUANTIZE = Param("quantize", None, "Int8 quantization: dynamic, static, or auto (tries both — static only with "
                 "calibration data — and writes the fastest that keeps the task's answers: your gates, else the "
                 "default floor).", kind="str", choices=QUANTIZE_MODES, optional=True,
                 flag="--quantize", search=(None, "dynamic", "static"))
PRUNE = Param("prune", None, "Pruning amount: sparsity for --prune-mode unstructured (default), share of channels "
              "removed per dependency group for channel.", kind="float", low=0.0, high=1.0, high_open=True,
              optional=True, flag="--prune", search=(0.0, 0.7))
PRUNE_MODE = Param("prune_mode", "unstructured", "unstructured (zeros; --prune = sparsity), channel (remove "
                   "channels; --prune = share per dependency group, then least-squares repair) or nm (N:M "
                   "sparsity, see --prune-nm).", kind="str", choices=PRUNE_MODES, flag="--prune-mode",
                   search=PRUNE_MODES)


def _equalize_error(v) -> str | None:
    return None if v == "auto" and isinstance(v, str) or v is True or v is False else "must be auto, on or off"


EQUALIZE = Param("equalize", "auto", "Cross-layer equalization before int8: auto (static mode; kept only if the "
                 "estimated weight quantization error drops by >= 1 dB per-channel, 0.1 dB per-tensor), on or off.",
                 kind="any", flag="--equalize", validator=_equalize_error, search=("auto", True, False),
                 aliases={"on": True, "off": False, "true": True, "false": False, "auto": "auto"})
SMOOTH_QUANT = Param("smooth_quant", True, "SmoothQuant: move activation outlier channels of MatMul/Attention "
                     "inputs into the weights, where it lowers the int8 error.", kind="bool",
                     flag="--smooth-quant/--no-smooth-quant", search=(True, False))

# -- recipe sections ------------------------------------------------------------------------
CALIBRATION = Param("calibration", None, "Calibration data: an .npz file or an image folder (Python: also a dict "
                    "of arrays, a list of feed dicts or a CalibrationDataReader).", kind="any", optional=True,
                    flag="--calibration")
VALIDATION = Param("validation", None, "Held-out validation data (same forms). Default: a held-out split of the "
                   "calibration data.", kind="any", optional=True, flag="--validation")
MAX_CALIBRATION_SAMPLES = Param("max_calibration_samples", 256, "Cap on samples used to calibrate.", kind="int",
                                low=1)
EXCLUDE_NODES = Param("exclude_nodes", (), "Node names (or op types) never pruned or quantized.", kind="strlist",
                      flag="--exclude")
EXCLUDE_OP_TYPES = Param("exclude_op_types", (), "Op types never pruned or quantized.", kind="strlist")
PROVIDERS = Param("providers", ("cpu",), "Execution providers to validate on: cpu, cuda, tensorrt.", kind="strlist",
                  flag="--providers")
LATENCY = Param("latency", True, "Quick median latency of both models in validation (skipped over 1 GB; "
                "`onnxcompress bench` is the careful measure).", kind="bool", flag="--latency/--no-latency")
EXTERNAL_DATA = Param("external_data", None, "Store weights in OUT.data (off: only over 2 GB).", kind="bool",
                      optional=True, flag="--external-data/--inline-data")


@dataclass
class OptimizeOptions:
    """What ``optimize`` should do, as flags (every field a declared parameter; see its ``help``
    with ``onnxcompress optimize --help`` or ``params.params_of(OptimizeOptions)``).

    The planner (:func:`onnxcompress.recipe.from_options`) turns these into recipe stages:
    ``fuse`` -> ``fuse``; ``prune``/``prune_mode`` -> ``prune-magnitude`` | ``prune-channels`` |
    ``prune-nm``; ``low_rank`` -> ``low-rank`` (its ``target_ratio``); ``distill`` -> ``distill``
    (its ``epochs``; the input model is the teacher, the calibration rows the data); ``quantize`` -> ``equalize``
    (static, or ``equalize`` on), ``pair-permute`` (static), ``smooth-quant`` (``smooth_quant``),
    ``quantize-dynamic`` | ``quantize-static`` (``auto``: one ``quantize-auto`` stage, both tried). ``calibration`` / ``validation``: an
    ``.npz`` path, an image folder (read with ``image``), a dict of arrays (the ``.npz`` layout),
    a list of feed dicts or an object with ``get_next()`` (ONNX Runtime's ``CalibrationDataReader``).
    """

    fuse: bool = FUSE.field()
    prune: float | None = PRUNE.field()
    prune_scope: str = PRUNE_SCOPE.field()
    prune_min_size: int = MIN_SIZE.field()
    prune_skip_first_last: bool = SKIP_FIRST_LAST.field()
    prune_mode: str = PRUNE_MODE.field()
    prune_importance: str = IMPORTANCE_P.field()
    prune_channel_scope: str = CHANNEL_SCOPE.field()
    prune_round_to: int = ROUND_TO.field()
    prune_repair: bool = REPAIR.field()
    prune_protect: tuple[str, ...] = PROTECT.field()
    prune_nm: str = PATTERN.field()
    prune_ratios: dict[str, float] | None = RATIOS.field()
    low_rank: float | None = LOW_RANK.field()
    distill: int | None = DISTILL.field()
    quantize: str | None = QUANTIZE.field()
    calibration: Any = CALIBRATION.field()
    validation: Any = VALIDATION.field()
    calibration_method: str = CALIBRATION_METHOD.field()
    max_calibration_samples: int = MAX_CALIBRATION_SAMPLES.field()
    target: str = TARGET.field()
    per_channel: bool = PER_CHANNEL.field()
    min_sqnr_db: float | None = MIN_NODE_SQNR.field()
    exclude_nodes: tuple[str, ...] = EXCLUDE_NODES.field()
    exclude_op_types: tuple[str, ...] = EXCLUDE_OP_TYPES.field()
    providers: tuple[str, ...] = PROVIDERS.field()
    max_rel_error: float | None = MAX_REL_ERROR.field()
    min_cosine: float | None = MIN_COSINE.field()
    min_top1_agreement: float | None = MIN_TOP1.field()
    min_mean_cosine: float | None = MIN_MEAN_COSINE.field()
    accept_degraded: bool = ACCEPT_DEGRADED.field()
    floor_top1_agreement: float = FLOOR_TOP1.field()
    floor_mean_cosine: float = FLOOR_MEAN_COSINE.field()
    external_data: bool | None = EXTERNAL_DATA.field()
    latency: bool = LATENCY.field()
    fallback: bool = FALLBACK.field()
    max_fallback_rounds: int = MAX_FALLBACK_ROUNDS.field()
    bias_correction: bool = BIAS_CORRECTION.field()
    bias_correction_mode: str = BIAS_CORRECTION_MODE.field()
    equalize: bool | str = EQUALIZE.field()
    smooth_quant: bool = SMOOTH_QUANT.field()
    image: ImageSpec = field(default_factory=ImageSpec)

    def check(self) -> None:
        """Check (and normalise) every field against its declaration.

        Raises:
            OnnxCompressError: a value its parameter does not take (named by its flag), or data
                of a type ``optimize`` cannot read.
        """
        if self.prune_ratios is None:
            self.prune_ratios = {}
        P.check(self)
        if not isinstance(self.image, ImageSpec):
            raise OnnxCompressError(f"image must be an onnxcompress.data.ImageSpec, got {type(self.image).__name__}")
        P.check(self.image)
        for what in ("calibration", "validation"):
            check_data_source(getattr(self, what), what)


def check_data_source(src: Any, what: str) -> None:
    """Refuse data of a type ``optimize`` cannot read, now (not after loading the model).

    Raises:
        OnnxCompressError: naming the accepted forms.
    """
    if isinstance(src, (str, Path)) and not str(src).strip():
        raise OnnxCompressError(f"{what} data: an empty path")
    if src is None or isinstance(src, (str, Path)) or hasattr(src, "get_next"):
        return
    if isinstance(src, dict):
        if not all(isinstance(k, str) for k in src):
            raise OnnxCompressError(f"{what} data: a dict must map input names (str) to arrays")
        return
    if isinstance(src, (list, tuple)) and all(isinstance(f, dict) for f in src):
        return
    raise OnnxCompressError(
        f"{what} data: expected a path (.npz or image folder), a dict of arrays, a list of feed dicts or a "
        f"CalibrationDataReader (get_next()), got {type(src).__name__}")


@dataclass
class AutoQuantizeConfig(StaticQuantizeConfig):
    """``quantize-auto``: the int8 settings both candidates share, and how to plan them."""

    equalize: Any = EQUALIZE.field()
    smooth_quant: bool = SMOOTH_QUANT.field()


def _no_passes(config, ctx):
    raise OnnxCompressError("quantize-auto is planned into candidate recipes (onnxcompress.auto), never run as passes")


if "quantize-auto" not in STAGES:
    register(StageSpec("quantize-auto", AutoQuantizeConfig, _no_passes,
                       "both int8 modes (static only with calibration data), the fastest that keeps the answers",
                       checked=False, int8=True, describe=lambda c: "int8 auto"))
