"""Streaming calibration: collect activation ranges with bounded memory.

A calibration method is a statistic plus a reduction (the NNCF way), not a class per tool:

* ``minmax``   - running min / max.
* ``percentile`` - a streaming histogram of the negative and positive parts (2048 bins
  each, re-binned by doubling when a larger value arrives), clipped so that at most
  ``1 - percentile`` of the mass (default 99.99 %) falls outside, split between the tails.
* ``entropy``  - the same histogram; the clip threshold minimises KL(P || Q) between the
  clipped reference distribution and its 128-level quantized version (the TensorRT
  calibrator, Migacz 2017, "8-bit Inference with TensorRT").
* ``mse``      - the threshold minimising the expected squared quantization + clipping
  error over the histogram.
* ``auto``     - per tensor, whichever of the four ranges above has the lowest expected
  squared error (rounding + clipping, 256 levels) over that tensor's own histogram.

Memory is O(number of tensors x bins) whatever the number of samples: unlike ONNX Runtime's
entropy calibrator no activations are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
BINS = 2048
#: below this many observed values a tensor falls back to min/max
MIN_VALUES_FOR_HISTOGRAM = 4 * BINS


@dataclass
class _Hist:
    """Histogram of |x| for one sign, on [0, edge]; doubles its range when needed."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.float64))
    edge: float = 0.0

    def add(self, mag: np.ndarray) -> None:
        if mag.size == 0:
            return
        mx = float(mag.max())
        if self.edge == 0.0:
            self.edge = mx if mx > 0 else 0.0
        while mx > self.edge:
            # merge pairs of bins: the range doubles, resolution halves
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(1), np.zeros(BINS // 2)])
            self.edge *= 2.0
        if self.edge == 0.0:
            self.counts[0] += mag.size
            return
        idx = np.minimum((mag / self.edge * BINS).astype(np.int64), BINS - 1)
        self.counts += np.bincount(idx, minlength=BINS)

    def total(self) -> float:
        return float(self.counts.sum())


@dataclass
class TensorStats:
    """Running statistics of one tensor."""

    lo: float = np.inf
    hi: float = -np.inf
    n: int = 0
    pos: _Hist = field(default_factory=_Hist)
    neg: _Hist = field(default_factory=_Hist)
    with_hist: bool = False

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1)  # 0-d tensors become one value
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.n += x.size
        if self.with_hist:
            self.pos.add(x[x > 0])
            self.neg.add(-x[x < 0])

    def expected_mse(self, lo: float, hi: float) -> float:
        """Mean squared error (rounding + clipping) of uint8 quantization over ``[lo, hi]``,
        estimated from the histograms."""
        return _expected_mse_impl(self, lo, hi)

    def range(self, method: str, percentile: float = 99.99) -> tuple[float, float]:
        """The calibrated ``(lo, hi)`` for ``method`` (see module docstring)."""
        if self.n == 0:
            raise ValueError("tensor never observed during calibration")
        if method == "minmax" or not self.with_hist or self.n < MIN_VALUES_FOR_HISTOGRAM:
            # too few values for a meaningful histogram (e.g. a scalar output): min/max
            return self.lo, self.hi
        if method == "auto":
            cands = [self.range(m, percentile) for m in ("minmax", "percentile", "entropy", "mse")]
            return min(cands, key=lambda r: self.expected_mse(*r))
        tot = self.pos.total() + self.neg.total()
        if method == "percentile":
            tail = tot * (1.0 - percentile / 100.0)
            hi = _tail_threshold(self.pos, tail * self.pos.total() / max(tot, 1)) if self.hi > 0 else self.hi
            lo = -_tail_threshold(self.neg, tail * self.neg.total() / max(tot, 1)) if self.lo < 0 else self.lo
            return max(lo, self.lo), min(hi, self.hi)
        both = self.lo < 0 < self.hi
        levels = 128 if both else 256
        if method == "entropy":
            hi = _kl_threshold(self.pos, levels) if self.hi > 0 else self.hi
            lo = -_kl_threshold(self.neg, levels) if self.lo < 0 else self.lo
        elif method == "mse":
            hi = _mse_threshold(self.pos, levels) if self.hi > 0 else self.hi
            lo = -_mse_threshold(self.neg, levels) if self.lo < 0 else self.lo
        else:
            raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
        return max(lo, self.lo), min(hi, self.hi)


def _side_mse(h: _Hist, clip: float, step: float) -> float:
    if h.total() == 0:
        return 0.0
    centers = (np.arange(BINS) + 0.5) * h.edge / BINS
    err = np.where(centers <= clip, step * step / 12.0, (centers - clip) ** 2)
    return float(np.sum(h.counts * err))


def _expected_mse_impl(st: "TensorStats", lo: float, hi: float) -> float:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = max(hi - lo, 1e-12) / 255.0
    return (_side_mse(st.pos, hi, step) + _side_mse(st.neg, -lo, step)) / max(st.n, 1)


def _tail_threshold(h: _Hist, tail_mass: float) -> float:
    if h.total() == 0:
        return 0.0
    c = np.cumsum(h.counts[::-1])  # mass above each bin, from the top
    k = int(np.searchsorted(c, tail_mass, side="right"))  # bins that may be clipped
    return h.edge * (BINS - k) / BINS


def _kl_threshold(h: _Hist, levels: int) -> float:
    p_all = h.counts
    if h.total() == 0:
        return 0.0
    nz = np.nonzero(p_all)[0]
    last = int(nz[-1]) + 1 if nz.size else BINS
    best_kl, best_i = np.inf, last
    for i in range(levels, last + 1, max(1, (last - levels) // 256 or 1)):
        ref = p_all[:i].copy()
        ref[i - 1] += p_all[i:].sum()
        # quantize ref to `levels` bins, then expand back over non-empty source bins
        idx = (np.arange(i) * levels) // i
        qsum = np.bincount(idx, weights=p_all[:i], minlength=levels)
        nonzero = (p_all[:i] > 0).astype(np.float64)
        qcnt = np.bincount(idx, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, qsum[idx] / np.maximum(qcnt[idx], 1), 0.0)
        p = ref / ref.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q = q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return h.edge * best_i / BINS


def _mse_threshold(h: _Hist, levels: int) -> float:
    if h.total() == 0:
        return 0.0
    centers = (np.arange(BINS) + 0.5) * h.edge / BINS
    w = h.counts
    best, best_t = np.inf, h.edge
    for frac in np.linspace(0.05, 1.0, 96):
        t = h.edge * frac
        step = t / (levels - 1)
        clipped = np.minimum(centers, t)
        err = (centers - clipped) ** 2 + np.where(centers <= t, step * step / 12.0, 0.0)
        e = float(np.sum(w * err))
        if e < best:
            best, best_t = e, t
    return best_t


def observe(model, tensor_names: list[str], samples: list[dict[str, np.ndarray]], *, keep: int = 0,
            method: str | None = None, progress=None) -> tuple[dict[str, "TensorStats"], list[dict[str, np.ndarray]]]:
    """Run ``samples`` through ``model`` (ORT, optimizations off) with ``tensor_names`` made outputs.

    Args:
        model: an ``onnx_ir.Model`` (not modified: a serialized copy is augmented).
        tensor_names: float tensors to observe.
        samples: feed dicts.
        keep: how many of the first samples' values to return as they are (for per-node checks).
        method: one of :data:`METHODS` to collect statistics over every sample (histograms kept
            unless ``minmax``); ``None`` runs only the first ``keep`` samples.
        progress: optional callable ``(done, total)``.

    Returns:
        ``(stats, kept)``: name -> :class:`TensorStats` (tensors never produced keep ``n == 0``;
        empty without ``method``), and the first ``keep`` samples' values by name.
    """
    import onnx
    import onnx_ir as ir

    from ...model_io import to_bytes
    from ...runtime import make_session

    if method is not None and method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    proto = ir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    for n in tensor_names:
        if n not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = make_session(to_bytes(proto), optimize=False)
    produced = {o.name for o in sess.get_outputs()}
    wanted = [n for n in tensor_names if n in produced]
    feeds_ok = {i.name for i in sess.get_inputs()}
    stats = {n: TensorStats(with_hist=method != "minmax") for n in tensor_names} if method else {}
    kept = []
    todo = samples if method else samples[:keep]
    for k, feed in enumerate(todo):
        outs = dict(zip(wanted, sess.run(wanted, {a: b for a, b in feed.items() if a in feeds_ok})))
        if k < keep:
            kept.append(outs)
        for n, v in outs.items() if method else ():
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                stats[n].update(v)
        if progress:
            progress(k + 1, len(todo))
    return stats, kept
