"""Quantization parameters (scale, zero point) and weight quantization.

Conventions follow the ONNX ``QuantizeLinear``/``DequantizeLinear`` spec (opset 13+):
``q = saturate(round(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``, round
half to even. Activations: uint8 asymmetric over ``[min(0, lo), max(0, hi)]``. Weights:
int8 symmetric (zero point 0), per output channel along ``axis``, ``qmax`` 127. Bias: int32,
scale = input scale * weight scale, zero point 0 (ONNX Runtime's QLinearConv contract).

Saturation-free 8-bit weights (``pairs=``): x86 CPUs without VNNI (AVX2, AVX-512BW) run u8 x s8
GEMMs with ``vpmaddubsw``, which adds the products of two neighbouring K elements into a
*saturating* int16: ``sat16(a0 w0 + a1 w1)``. With u8 activations up to 255 that overflows only
when ``w0`` and ``w1`` have the same sign and ``|w0| + |w1| > 128`` (255 x 128 = 32640 <= 32767;
pairs of opposite sign stay within 255 x 127). ONNX Runtime's usual answer, 7-bit weights
everywhere (``reduce_range``), halves every weight's precision. Here no pair may exceed
``|q0| + |q1| <= 128``, per output channel at the least squared weight error among nine scales from
``absmax / 127`` (8-bit; the few offending pairs are projected onto ``|q0| + |q1| = 128``) to
``max(absmax, max_pair(|w0| + |w1|)) / 127`` (no pair needs projecting); channels whose large
weights are not neighbours keep full 8-bit precision. The pairs are those of the kernel's
K order: ONNX Runtime's QLinearConv reorders a ``[M, C/g, kh, kw]`` filter to K = (kernel
position, input channel) (``ReorderFilter`` in ``qlinearconv.cc``), MatMulInteger / QGemm /
DynamicQuantizeMatMul take B as ``[K, N]``. For a Conv both pairings — the flattened K and input
channels within one kernel position (indirect convolution) — are kept safe.
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


def _pad_even(rows: np.ndarray) -> np.ndarray:
    """``rows`` [C, K] with a zero column appended when K is odd (the kernels pad K the same way)."""
    if rows.shape[1] % 2:
        return np.concatenate([rows, np.zeros((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows


def _conv_rows(t: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """A Conv filter ``[M, C/g, k...]`` as ``[M, K]`` rows in ONNX Runtime's K = (kernel position,
    input channel) order, with ``M``, ``C/g`` and the number of kernel positions."""
    m, cg = t.shape[0], t.shape[1]
    p = int(np.prod(t.shape[2:], dtype=np.int64))
    return t.reshape(m, cg, p).transpose(0, 2, 1).reshape(m, p * cg), m, cg, p


def _same_sign_pair_max(rows: np.ndarray) -> np.ndarray:
    """Largest ``|r[2j]| + |r[2j+1]|`` over same-sign neighbours of each row of ``rows`` [C, K]
    (K padded with a zero when odd); 0 where no pair has one sign."""
    rows = _pad_even(rows)
    a, b = rows[:, 0::2], rows[:, 1::2]
    same = (a * b) > 0
    return np.where(same, np.abs(a) + np.abs(b), 0.0).max(axis=1) if a.shape[1] else np.zeros(rows.shape[0])


def pair_safe_absmax(w: np.ndarray, ch_axis: int, conv: bool) -> np.ndarray:
    """Per output channel ``max(absmax, largest same-sign pair |w0| + |w1|)`` of ``w`` (float64 [C]).

    Args:
        w: a weight; ``ch_axis`` its output-channel axis.
        conv: ``w`` is a Conv filter ``[M, C/g, k...]`` (``ch_axis`` 0): pairs in ONNX Runtime's
            K = (kernel position, input channel) order and, within each kernel position, over
            input channels. Otherwise the pairs run along the contracted axis: the other axis of
            a rank-2 weight (``[K, N]``, or ``[N, K]`` for Gemm ``transB=1``), the second-last
            for a batched MatMul weight.
    """
    a = w.astype(np.float64)
    absmax = np.abs(np.moveaxis(a, ch_axis, 0)).reshape(a.shape[ch_axis], -1).max(axis=1)
    if conv:
        kmajor, m, cg, _ = _conv_rows(a)                           # K = (position, channel)
        per_pos = kmajor.reshape(-1, cg)                           # channels within a position
        pair = np.maximum(_same_sign_pair_max(kmajor),
                          _same_sign_pair_max(per_pos).reshape(m, -1).max(axis=1))
    elif a.ndim >= 2:
        kn = np.moveaxis(a, ch_axis, -1)                           # [..., K, N]
        kn = np.moveaxis(kn, -2, -1).reshape(-1, kn.shape[-2])      # rows: (batch, column) x K
        pair = _same_sign_pair_max(kn).reshape(-1, a.shape[ch_axis]).max(axis=0)
    else:
        return absmax
    return np.maximum(absmax, pair)


def _safe_round(t: np.ndarray, ch_axis: int, conv: bool, qmax: int) -> np.ndarray | None:
    """Round ``t`` (weight / scale, in the weight's layout) to integers in ``[-qmax, qmax]`` with
    every same-sign neighbour pair of the kernel's K order within ``|q0| + |q1| <= 128``
    (:func:`_round_pairs`); ``None`` for layouts without one K order (batched MatMul weights),
    which keep the widened scale only. A Conv with an odd number of input channels per group
    is made safe in both pairings (the flattened K, then channels within each kernel position:
    projecting only lowers magnitudes, so the first stays safe)."""
    if conv:
        rows, m, cg, p = _conv_rows(t)
        q = _round_pairs(rows, qmax)[:, :p * cg]
        if cg % 2 and p > 1:
            q = _round_pairs(q.reshape(m * p, cg), qmax)[:, :cg].reshape(m, p * cg)
        return q.reshape(m, p, cg).transpose(0, 2, 1).reshape(t.shape)
    if t.ndim != 2:
        return None
    if ch_axis in (1, -1):
        return _round_pairs(t.T, qmax)[:, :t.shape[0]].T
    return _round_pairs(t, qmax)[:, :t.shape[1]]


def _round_pairs(t: np.ndarray, qmax: int) -> np.ndarray:
    """Round rows ``t`` (weights / scale, [C, K]) to integers in ``[-qmax, qmax]`` with every
    same-sign neighbour pair ``|q0| + |q1| <= 128``: an offending pair is projected onto
    ``|q0| + |q1| = 128`` (the nearest point in squared error), keeping its signs."""
    t = _pad_even(t)
    q = np.clip(np.round(t), -qmax, qmax)
    a, b = q[:, 0::2], q[:, 1::2]
    bad = (a * b > 0) & (np.abs(a) + np.abs(b) > 128)
    if bad.any():  # a and b are views of q: assigning into them rewrites q
        ta, tb = np.abs(t[:, 0::2]), np.abs(t[:, 1::2])
        d = (ta + tb - 128.0) / 2.0
        na = np.clip(np.round(ta - d), 128 - qmax, qmax)
        nb = 128.0 - na
        a[bad] = (np.sign(a) * na)[bad]
        b[bad] = (np.sign(b) * nb)[bad]
    return q


def weight_params(w: np.ndarray, axis: int | None, qmax: int,
                  pairs: tuple[int, bool] | None = None) -> np.ndarray:
    """Symmetric per-channel (``axis``) or per-tensor (``axis=None``) scales, float32 > 0.

    Args:
        w: the weight; axis: its output-channel axis, or ``None`` for one scale.
        qmax: 127 (8-bit) or less.
        pairs: ``(output-channel axis, is_conv)`` for saturation-free weights (module
            docstring): the scale per channel (or tensor) with the least squared error among
            nine from ``absmax / qmax`` (offending pairs projected, :func:`quantize_weight`
            with the same ``pairs``) to ``pair_safe_absmax / qmax`` (none to project).

    A channel that is all zero (or only subnormal values) gets scale 1.
    """
    if pairs is None and w.dtype == np.float32:  # abs and max are exact in float32: no float64 copy
        red = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
        absmax = np.asarray(np.abs(w).max(axis=red) if w.size else np.float32(0), np.float64)
        if axis is not None and not red:
            absmax = np.abs(w).astype(np.float64)
        return np.where(absmax < TINY, 1.0, absmax / qmax).astype(np.float32)
    a = np.abs(w.astype(np.float64))
    if axis is None:
        m = np.array(a.max() if a.size else 0.0)
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        m = a.max(axis=red) if red else a
    absmax = m
    if pairs is not None and axis is not None and axis % w.ndim != pairs[0] % w.ndim:
        raise ValueError(f"pairs channel axis {pairs[0]} differs from the scale axis {axis}")
    if pairs is not None and w.ndim >= 1 and w.size:
        ch = pairs[0] % w.ndim
        per_ch = pair_safe_absmax(w, *pairs)
        hi = np.array(per_ch.max()) if axis is None else per_ch
        wf = w.astype(np.float64)
        if not (pairs[1] or w.ndim == 2):  # no single K order (batched MatMul weight): widened scale
            m = hi
        else:
            lo, best, best_err = m, hi, None
            shape = [-1 if i == ch else 1 for i in range(w.ndim)]
            for f in np.linspace(0.0, 1.0, 9):
                cand = np.maximum(lo + f * (hi - lo), TINY)
                sc = (cand / qmax).reshape(shape) if axis is not None else cand / qmax
                q = _safe_round(wf / sc, *pairs, qmax)
                sq = np.moveaxis((q * sc - wf) ** 2, ch, 0).reshape(w.shape[ch], -1).sum(axis=1)
                err = sq if axis is not None else np.array(sq.sum())
                if best_err is None:
                    best, best_err = cand, err
                else:
                    better = err < best_err
                    best, best_err = np.where(better, cand, best), np.where(better, err, best_err)
            m = best
    scale = np.where(absmax < TINY, 1.0, m / qmax)
    return scale.astype(np.float32)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int | None, qmax: int,
                    pairs: tuple[int, bool] | None = None) -> np.ndarray:
    """int8 weights ``clip(round(w / scale), -qmax, qmax)`` with ``scale`` broadcast on ``axis``;
    with ``pairs`` (as given to :func:`weight_params`) same-sign neighbour pairs beyond
    ``|q0| + |q1| = 128`` are projected onto it."""
    s = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    if (pairs is None or not w.size) and w.dtype == np.float32 and np.asarray(scale).dtype == np.float32:
        return _round_float32(w, s, qmax)
    t = w.astype(np.float64) / s.astype(np.float64)
    q = _safe_round(t, *pairs, qmax) if pairs is not None and w.ndim >= 1 and w.size else None
    if q is None:
        q = np.clip(np.round(t), -qmax, qmax)
    return q.astype(np.int8)


#: elements per block of :func:`_round_float32` (bounds its temporaries at 16 MB)
_BLOCK = 1 << 22


def _round_float32(w: np.ndarray, s: np.ndarray, qmax: int) -> np.ndarray:
    """``clip(rint(w / s), -qmax, qmax)`` as int8 in float32 blocks along axis 0 (the quotient is
    correctly rounded in float32; it can differ from a float64 one only within half a float32
    ulp of a half-integer). Temporaries: one block, not float64 copies of the whole weight."""
    q = np.empty(w.shape, np.int8)
    if w.ndim == 0 or w.shape[0] == 0:
        q[...] = np.clip(np.rint(w / s), -qmax, qmax)
        return q
    step = max(1, _BLOCK // max(1, w.size // w.shape[0]))
    per_row = s.ndim == w.ndim and s.shape[0] == w.shape[0] and w.shape[0] > 1
    for i in range(0, w.shape[0], step):
        t = np.divide(w[i:i + step], s[i:i + step] if per_row else s, dtype=np.float32)
        np.rint(t, out=t)
        np.clip(t, -qmax, qmax, out=t)
        q[i:i + step] = t
    return q


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
    """Quantize-dequantize an activation (numpy simulation of a Q/DQ pair): float32
    ``(clip(round(x / scale) + zp, qmin, qmax) - zp) * scale``, in one new array (the same
    operations in the same order, in place)."""
    info = np.iinfo(dtype)
    q = np.divide(x, scale, dtype=np.float32) if np.asarray(x).dtype == np.float32 else np.asarray(x / scale)
    np.round(q, out=q)
    q += zp
    np.clip(q, info.min, info.max, out=q)
    q -= zp
    q *= scale
    return q.astype(np.float32, copy=False)
