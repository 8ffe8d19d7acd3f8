"""Declared parameters of the int8 stages (:mod:`onnxcompress.params`).

One ``Param`` per knob, shared by every config that reads it: ``TARGET`` is read by
equalization, pair renumbering, SmoothQuant and both quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...params import Param
from .calibrate import METHODS
from .policy import TARGETS

TARGET = Param("target", "auto", "Int8 target: auto (this CPU), avx2, avx512, vnni, arm64, cuda, tensorrt, generic "
               "(an unknown CPU: avx2's saturation-free weight scales).", kind="str", choices=TARGETS,
               flag="--target", search=TARGETS)
PER_CHANNEL = Param("per_channel", True, "Per-channel weight scales (else one scale per tensor).", kind="bool",
                    flag="--per-channel/--per-tensor", search=(True, False))
MIN_NODE_SQNR = Param("min_sqnr_db", 20.0, "Keep a node in float when its int8 output SQNR is below this (dB); "
                      "off (0 on the command line) disables the check.", kind="float", optional=True,
                      flag="--min-node-sqnr", search=(10.0, 30.0))
BIAS_CORRECTION = Param("bias_correction", True, "Correct each quantized node's mean output shift in its bias "
                        "(Nagel et al. 2019, sec. 4.2).", kind="bool",
                        flag="--bias-correction/--no-bias-correction", search=(True, False))
MIN_WEIGHT_SQNR = Param("min_weight_sqnr_db", 30.0, "Gather tables: keep float when the per-row int8 table's SQNR "
                        "is below this (dB).", kind="float")
MIN_WEIGHT_ONLY_SQNR = Param("min_weight_only_sqnr_db", 25.0, "Weight-only int8: keep float when the weight's "
                             "SQNR is below this (dB).", kind="float")
WEIGHT_ONLY_MAIN_CONV = Param("weight_only_main_conv", True, "Dynamic mode: main-graph Conv weights stored as int8 "
                              "(float compute).", kind="bool")
CALIBRATION_METHOD = Param("calibration_method", "auto", "Activation range per tensor: auto (the lowest expected "
                           "error of the others), minmax, percentile, entropy or mse.", kind="str",
                           choices=METHODS, flag="--calibration-method", search=METHODS)
PERCENTILE = Param("percentile", 99.99, "The percentile method's clipping point (%).", kind="float", low=50.0,
                   high=100.0)
BIAS_CORRECTION_MODE = Param("bias_correction_mode", "node", "node (one-node shift on float inputs) or sequential "
                             "(also absorb the shift accumulated through upstream int8 layers; slower).",
                             kind="str", choices=("node", "sequential"), flag="--bias-correction-mode",
                             search=("node", "sequential"))
EQUALIZE_MODE = Param("mode", "auto", "auto (kept only when the estimated int8 weight error of the pairs drops "
                      "by min_gain_db) or on (always).", kind="str", choices=("auto", "on"))
MIN_GAIN = Param("min_gain_db", None, "Equalization's least gain to keep it (dB; off: 1 dB per-channel, 0.1 dB "
                 "per-tensor).", kind="float", optional=True)
SMOOTH_MODE = Param("mode", "dynamic", "How the activations will be quantized: dynamic (per run) or static "
                    "(calibrated ranges).", kind="str", choices=("dynamic", "static"))


@dataclass
class TargetConfig:
    """Parameters of a stage that only needs to know the int8 target."""

    target: str = TARGET.field()


@dataclass
class EqualizeConfig:
    mode: str = EQUALIZE_MODE.field()
    target: str = TARGET.field()
    per_channel: bool = PER_CHANNEL.field()
    min_gain_db: float | None = MIN_GAIN.field()


@dataclass
class SmoothQuantConfig:
    mode: str = SMOOTH_MODE.field()
    target: str = TARGET.field()


@dataclass
class QuantizeConfig:
    """Dynamic int8 (and what every int8 stage shares)."""

    target: str = TARGET.field()
    per_channel: bool = PER_CHANNEL.field()
    min_sqnr_db: float | None = MIN_NODE_SQNR.field()
    bias_correction: bool = BIAS_CORRECTION.field()
    min_weight_sqnr_db: float = MIN_WEIGHT_SQNR.field()
    min_weight_only_sqnr_db: float = MIN_WEIGHT_ONLY_SQNR.field()
    weight_only_main_conv: bool = WEIGHT_ONLY_MAIN_CONV.field()


@dataclass
class StaticQuantizeConfig(QuantizeConfig):
    """Static (calibrated) int8."""

    calibration_method: str = CALIBRATION_METHOD.field()
    percentile: float = PERCENTILE.field()
    bias_correction_mode: str = BIAS_CORRECTION_MODE.field()
