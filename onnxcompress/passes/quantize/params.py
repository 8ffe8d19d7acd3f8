"""Quantization parameters (scale, zero point) and weight quantization.

Conventions follow the ONNX ``QuantizeLinear``/``DequantizeLinear`` spec (opset 13+):
``q = saturate(round(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``, round
half to even. Activations: uint8 asymmetric over ``[min(0, lo), max(0, hi)]``. Weights:
int8 symmetric (zero point 0), per output channel along ``axis``, with ``qmax`` 127 (8-bit)
or 63 (7-bit, avoids int16 saturation in u8*s8 kernels on x86 without VNNI). Bias: int32,
scale = input scale * weight scale, zero point 0 (ONNX Runtime's QLinearConv contract).
"""

from __future__ import annotations

import numpy as np

#: Channels whose largest magnitude is below this are treated as exactly zero.
TINY = 1e-30


def activation_params(lo: float, hi: float, *, dtype=np.uint8) -> tuple[np.float32, np.generic]:
    """Asymmetric scale/zero point covering ``[lo, hi]`` (and 0).

    Returns:
        ``(scale, zero_point)``: scale float32 > 0; zero point of ``dtype``. A constant-zero
        tensor gets scale 1 (never 0, which ``DequantizeLinear`` forbids).
    """
    info = np.iinfo(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"non-finite range [{lo}, {hi}]")
    span = hi - lo
    if span < TINY:
        return np.float32(1.0), dtype(0)
    scale = np.float32(span / (info.max - info.min))
    if scale <= 0 or not np.isfinite(scale):
        scale = np.float32(max(span, 1e-8) / (info.max - info.min))
    zp = int(np.clip(np.round(info.min - lo / float(scale)), info.min, info.max))
    return scale, dtype(zp)


def weight_params(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """Symmetric per-channel (``axis``) or per-tensor (``axis=None``) scales, float32 > 0.

    A channel that is all zero (or only subnormal values) gets scale 1.
    """
    a = np.abs(w.astype(np.float64))
    if axis is None:
        m = np.array(a.max() if a.size else 0.0)
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        m = a.max(axis=red) if red else a
    scale = np.where(m < TINY, 1.0, m / qmax)
    return scale.astype(np.float32)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """int8 weights ``clip(round(w / scale), -qmax, qmax)`` with ``scale`` broadcast on ``axis``."""
    s = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    q = np.clip(np.round(w.astype(np.float64) / s.astype(np.float64)), -qmax, qmax)
    return q.astype(np.int8)


def quantize_bias(b: np.ndarray, in_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale ``in_scale * w_scale`` (per channel), zero point 0.

    Returns:
        ``(q_bias int32, bias_scale float32)``.
    """
    bs = (np.float64(in_scale) * w_scale.astype(np.float64)).astype(np.float32)
    bs = np.where(bs <= 0, np.float32(1e-12), bs)
    q = np.round(b.astype(np.float64) / bs.astype(np.float64))
    q = np.clip(q, -(2**31) + 1, 2**31 - 1)
    return q.astype(np.int32), bs.astype(np.float32)


def fake_quant_activation(x: np.ndarray, scale: float, zp: int, dtype=np.uint8) -> np.ndarray:
    """Quantize-dequantize an activation (numpy simulation of a Q/DQ pair)."""
    info = np.iinfo(dtype)
    q = np.clip(np.round(x / scale) + zp, info.min, info.max)
    return ((q - zp) * scale).astype(np.float32)
