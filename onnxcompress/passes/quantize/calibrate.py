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
entropy calibrator no activations are kept. min / max are exact; histograms see an evenly
strided subsample of at most 8192 values per tensor and sample, added in batches with one
branch-free ``bincount``, so the histogram methods cost <= 1.25x ``minmax`` and ``auto`` (all four
ranges) 1.29x on EfficientNet-Lite0 (``scripts/bench_calibration.py`` measures it).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
BINS = 2048
#: below this many observed values a tensor falls back to min/max
MIN_VALUES_FOR_HISTOGRAM = 4 * BINS
#: values of one tensor added to its histograms per update (an evenly strided subsample
#: beyond this): keeps histogram calibration within ~1.5x of min/max time; 64 samples x
#: 8192 values estimate a 99.99th percentile from ~50 tail values (2048 bins anyway)
HIST_VALUES_PER_UPDATE = 1 << 13
#: buffered subsample values per tensor before they are added to the histograms at once
HIST_BATCH_VALUES = 1 << 16


@dataclass
class _Hist:
    """Histogram of |x| for one sign, on [0, edge]; doubles its range when needed."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.float64))
    edge: float = 0.0

    def grow_to(self, mx: float) -> None:
        """Make the range cover ``mx`` (> 0), doubling it (and merging bin pairs) as needed."""
        if self.edge == 0.0:
            self.edge = mx
        while mx > self.edge:
            # merge pairs of bins: the range doubles, resolution halves
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(1), np.zeros(BINS // 2)])
            self.edge *= 2.0

    def add(self, mag: np.ndarray) -> None:
        """Add magnitudes ``mag`` (>= 0, any shape)."""
        if mag.size == 0:
            return
        mx = float(mag.max())
        if mx > 0:
            self.grow_to(mx)
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

    updates: int = 0
    seen: int = 0  # every finite value observed (``n`` counts the histogrammed ones)
    _buf: list = field(default_factory=list, repr=False)  # subsamples not yet in the histograms
    _buffered: int = 0

    def update(self, x: np.ndarray) -> None:
        """Add one observed tensor (any shape; non-finite values are ignored).

        min / max are exact over every value; the histograms see at most
        :data:`HIST_VALUES_PER_UPDATE` values of each tensor: every k-th value, from an
        offset that changes with each update (deterministic)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)  # 0-d tensors become one value
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN/inf present: drop them (rare path)
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.updates += 1
        self.seen += x.size
        if self.with_hist:
            if x.size > HIST_VALUES_PER_UPDATE:
                # every k-th value from an offset that moves with each update: a view, no copy
                k = -(-x.size // HIST_VALUES_PER_UPDATE)
                x = x[(self.updates * 7919) % k::k]
            self.n += x.size
            # histogram in batches: per-call overhead (bincount of 4097 bins, range growth)
            # dominated the cost for small subsamples
            self._buf.append(np.array(x, dtype=np.float32, copy=True))
            self._buffered += x.size
            if self._buffered >= HIST_BATCH_VALUES:
                self._flush()
        else:
            self.n += x.size

    def _flush(self) -> None:
        """Move the buffered subsamples into the histograms."""
        if self._buf:
            x = np.concatenate(self._buf)
            self._buf, self._buffered = [], 0
            self._add_signed(x)

    def _add_signed(self, x: np.ndarray) -> None:
        """Add float32 values ``x`` (1-D) to both histograms with one ``bincount``.

        Branch-free: the positive part indexes bins ``[0, BINS)``, the negative part
        ``[BINS, 2 BINS)``, zeros land in bin 0 and are taken back out (they belong to
        neither side). A boolean ``np.where`` over randomly signed values cost 4x this.
        Bin indices are computed in float32 (a value within ~1e-4 of a bin edge may fall in
        the neighbouring bin)."""
        slo, shi = float(x.min()), float(x.max())
        if shi > 0:
            self.pos.grow_to(shi)
        if slo < 0:
            self.neg.grow_to(-slo)
        pe = BINS / self.pos.edge if self.pos.edge > 0 else 0.0
        ne = BINS / self.neg.edge if self.neg.edge > 0 else 0.0
        ft = np.float32
        if max(pe, ne) > float(np.finfo(np.float32).max) / 4:  # a range below ~1e-35 (denormals): float64
            ft, x = np.float64, x.astype(np.float64)
        pe, ne, zero, top = ft(pe), ft(ne), ft(0.0), ft(BINS - 1)
        f = np.maximum(x, zero)
        f *= pe
        np.minimum(f, top, out=f)
        g = np.minimum(x, zero)
        g *= -ne
        np.minimum(g, top, out=g)
        f += g
        f += (x < 0) * ft(BINS)
        counts = np.bincount(f.astype(np.intp), minlength=2 * BINS)
        counts[0] -= x.size - np.count_nonzero(x)
        self.pos.counts += counts[:BINS]
        self.neg.counts += counts[BINS:]

    def expected_mse(self, lo: float, hi: float) -> float:
        """Mean squared error (rounding + clipping) of uint8 quantization over ``[lo, hi]``,
        estimated from the histograms."""
        self._flush()
        return _expected_mse_impl(self, lo, hi)

    def range(self, method: str, percentile: float = 99.99) -> tuple[float, float]:
        """The calibrated ``(lo, hi)`` for ``method`` (see module docstring)."""
        if self.n == 0:
            raise ValueError("tensor never observed during calibration")
        self._flush()
        if method == "minmax" or not self.with_hist or self.seen < MIN_VALUES_FOR_HISTOGRAM:
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
    """The clip threshold minimising KL(P || Q) (TensorRT's entropy calibration search).

    Candidate ``i`` keeps the first ``i`` bins and folds the rest into bin ``i - 1`` (P);
    Q quantizes the first ``i`` bins to ``levels`` levels and spreads each level's mass
    evenly over its non-empty bins. Candidates step from ``levels`` to the last non-empty
    bin (at most ~256). Every candidate's KL is evaluated at once from prefix sums of
    ``p``, ``p log p`` and the non-empty count, so the cost is O(candidates x levels), not
    O(candidates x bins).
    """
    p_all = h.counts
    total = float(p_all.sum())
    if total == 0:
        return 0.0
    nz = np.nonzero(p_all)[0]
    last = int(nz[-1]) + 1 if nz.size else BINS
    cands = np.arange(levels, last + 1, max(1, (last - levels) // 256 or 1))
    if cands.size == 0:
        return h.edge * last / BINS
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p_all > 0, p_all * np.log(np.where(p_all > 0, p_all, 1.0)), 0.0)
    cum_p = np.concatenate([[0.0], np.cumsum(p_all)])
    cum_nz = np.concatenate([[0.0], np.cumsum(p_all > 0)])
    cum_pl = np.concatenate([[0.0], np.cumsum(plogp)])
    i = cands[:, None]                                          # (C, 1)
    bounds = (np.arange(levels + 1)[None, :] * i + levels - 1) // levels   # block starts, (C, L+1)
    qsum = cum_p[bounds[:, 1:]] - cum_p[bounds[:, :-1]]         # (C, L)
    qcnt = cum_nz[bounds[:, 1:]] - cum_nz[bounds[:, :-1]]
    ic = cands
    p_last = p_all[ic - 1]
    kept = cum_p[ic]                                            # sum of p[:i] = sum of Q
    ref_last = p_last + (total - kept)
    with np.errstate(divide="ignore", invalid="ignore"):
        # sum over p>0 of P log P (P normalised by the total mass)
        t1 = (cum_pl[ic - 1] + np.where(ref_last > 0, ref_last * np.log(ref_last), 0.0)) / total - np.log(total)
        # sum of P log Q over bins before the last one (the last block minus bin i - 1)
        mass = qsum.copy()
        mass[:, -1] -= p_last
        logq = np.log(qsum / (np.maximum(qcnt, 1) * kept[:, None]))
        t2 = np.where(mass > 1e-300, mass * logq, 0.0).sum(1) / total
        q_last = np.where(p_last > 0, qsum[:, -1] / np.maximum(qcnt[:, -1], 1), 0.0) / kept
        t2 = t2 + np.where(ref_last > 0, ref_last * np.log(np.maximum(q_last, 1e-12)), 0.0) / total
        kl = t1 - t2
    kl[~(kept > 0)] = np.inf
    if not np.isfinite(kl).any():
        return h.edge * last / BINS
    return h.edge * int(cands[int(np.argmin(kl))]) / BINS


def _mse_threshold(h: _Hist, levels: int) -> float:
    """The clip threshold (96 candidates, 5 %..100 % of the range) minimising the expected
    squared error: rounding ``step**2 / 12`` below it, ``(x - t)**2`` above it. Evaluated
    for every candidate at once from suffix sums of ``w``, ``w x`` and ``w x**2``."""
    if h.total() == 0:
        return 0.0
    centers = (np.arange(BINS) + 0.5) * h.edge / BINS
    w = h.counts
    ts = h.edge * np.linspace(0.05, 1.0, 96)
    k = np.searchsorted(centers, ts, side="right")            # bins with centre <= t
    s0 = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])    # suffix sums from bin k on
    s1 = np.concatenate([np.cumsum((w * centers)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((w * centers ** 2)[::-1])[::-1], [0.0]])
    step = ts / (levels - 1)
    below = (s0[0] - s0[k]) * step * step / 12.0
    above = s2[k] - 2.0 * ts * s1[k] + ts * ts * s0[k]
    return float(ts[int(np.argmin(below + np.maximum(above, 0.0)))])


#: bytes of intermediate values recorded per sample by one ORT session: values declared as graph
#: outputs keep their buffers for the whole run (ORT cannot reuse them), so the values are read
#: in chunks of the graph, one session per chunk — a detector at 992 x 736 (PP-OCRv4 det: 671
#: values, about 1 GB per sample) costs a few chunks instead of all its activations at once.
#: The process peaks at about 3x the budget over the model's own needs (ORT's other buffers,
#: the copies, the statistics): PP-OCRv4 det static, 2-core Xeon, whole run: 256 MB -> 1.27 GB
#: peak, 8.3 s static stage; 128 MB -> 0.85 GB, 10.6 s (chunks cut after their values, :func:`_cut`);
#: later, with less held elsewhere: 128 MB -> 0.95-1.04 GB whole run, 64 MB -> 0.87-0.89 GB at +1.4 s of
#: static stage (6.3 -> 7.7 s), the same bytes written
RECORD_BUDGET_BYTES = 64 << 20
#: a chunk's session keeps ORT's memory arena only when it runs more samples than this
ARENA_MIN_RUNS = 4
#: values per chunk when their sizes cannot be inferred
UNKNOWN_CHUNK = 32


def value_bytes(model, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes of each value of ``model`` for the input shapes of ``feed`` (ONNX shape inference on
    the model's skeleton with those shapes; values whose shape stays unknown are left out)."""
    import onnx

    from ...model_io import skeleton

    proto, _ = skeleton(model)
    for inp in proto.graph.input:
        arr = feed.get(inp.name)
        t = inp.type.tensor_type if inp.type.HasField("tensor_type") else None
        if arr is None or t is None or not t.HasField("shape") or len(t.shape.dim) != np.ndim(arr):
            continue
        for d, n in zip(t.shape.dim, np.shape(arr)):
            d.ClearField("dim_param")
            d.dim_value = int(n)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - sizes are a plan, not a requirement
        return {}
    out = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if any(d is None for d in dims):
            continue
        try:
            item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        except Exception:  # noqa: BLE001
            continue
        out[vi.name] = int(np.prod(dims, dtype=np.int64)) * item
    return out


def plan_chunks(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive groups of ``names`` of at most ``budget`` bytes each by ``sizes`` (a value of
    unknown size counts as the largest known one, or ``budget / UNKNOWN_CHUNK``)."""
    guess = max(sizes.values(), default=budget // UNKNOWN_CHUNK) or 1
    chunks, cur, total = [], [], 0
    for n in names:
        b = sizes.get(n, guess)
        if cur and total + b > budget:
            chunks.append(cur)
            cur, total = [], 0
        cur.append(n)
        total += b
    return chunks + [cur] if cur else chunks


def iter_outputs(model, tensor_names: list[str], samples: list[dict[str, np.ndarray]], *,
                 budget: int = RECORD_BUDGET_BYTES):
    """Run ``samples`` through ``model`` (ORT, optimizations off) with ``tensor_names`` made graph
    outputs; yield ``(sample index, {name: value})`` for the names ONNX Runtime produced. Each
    name's values come in sample order; a name comes once per sample.

    ORT keeps every declared output's buffer for the whole run, so the names (those main-graph
    nodes produce, in graph order) are read in chunks of about ``budget`` bytes per sample,
    planned from the value sizes shape inference gives for the largest sample
    (:func:`value_bytes`). Memory is bounded by the budget (plus one value larger than it), not
    by the size of all activations.

    * One chunk: one session on a copy of the graph cut after the names (:func:`_cut`).
    * Several (a detector at 992 x 736): the graph is split into consecutive *segments*, one
      per chunk, each its own session (:func:`_segments`); a sample runs through them in turn,
      each segment fed the earlier values it reads, so every sample costs one forward pass
      whatever the number of chunks. The values carried to later segments (a U-Net's skip
      connections) are held for the sample besides the budget. Graphs with subgraphs
      (If/Loop/Scan, whose bodies may read any earlier value) or non-tensor values (sequences,
      optionals, ai.onnx.ml maps) take one session per chunk instead, each cut after its chunk.

    Names that are graph inputs come straight from the samples, initializers from their values
    (with the first chunk). Graph order must be topological (as ``onnx.checker`` requires).
    ``model`` is an ``onnx_ir.Model`` and is not modified (the sessions' copies share its
    weights, read in place). With optimizations off, Q/DQ pairs run as separate operators:
    the ONNX semantics of an int8 model (``QuantizeLinear`` / ``DequantizeLinear`` spec), not a
    fused kernel's."""
    names = list(dict.fromkeys(tensor_names))
    if not samples:
        return
    inputs = {v.name for v in model.graph.inputs}
    inits = model.graph.initializers
    direct = [n for n in names if n in inputs or (n in inits and inits[n].const_value is not None)]
    index = {v.name: i for i, node in enumerate(model.graph) for v in node.outputs}
    computed = sorted((n for n in names if n in index and n not in direct), key=index.__getitem__)
    largest = max(samples, key=lambda f: sum(np.asarray(v).size for v in f.values()))
    chunks = plan_chunks(computed, value_bytes(model, largest), budget) if computed else []
    if len(chunks) > 1 and all(_segmentable(node) for node in model.graph):
        yield from _segments(model, chunks, direct, samples, index)
    else:
        yield from _chunk_major(model, chunks or [[]], direct, samples)


#: ops whose outputs are not tensors (sequences, optionals): such values cannot be handed from
#: one segment's session to the next as a typed tensor input
_NON_TENSOR_OPS = {"SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
                   "SplitToSequence", "ConcatFromSequence", "SequenceLength", "SequenceMap", "Optional",
                   "OptionalGetElement", "OptionalHasElement"}


def _segmentable(node) -> bool:
    """Whether the graph may be cut before or after ``node``: no subgraph (a body may read any
    earlier value), no sequence/optional/map value (ai.onnx.ml's maps included)."""
    return (node.domain != "ai.onnx.ml" and node.op_type not in _NON_TENSOR_OPS
            and not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()))


def _direct(model, direct: list[str], feed: dict) -> dict:
    """Graph inputs from the sample, initializers from their values (owned copies)."""
    inits = model.graph.initializers
    return {n: np.array(feed[n] if n in feed else inits[n].const_value.numpy(), copy=True)
            for n in direct if n in feed or n in inits}



def _owned(v):
    # owned copies: ORT's outputs are views of its buffers, and some numpy paths (np.save among
    # them) kept those buffers alive after the views were gone (+250 MB per chunk on PP-OCRv4
    # det, never returned); a copy of one chunk is bounded by the budget
    return np.array(v, copy=True) if isinstance(v, np.ndarray) else v


def _chunk_major(model, chunks: list[list[str]], direct: list[str], samples):
    """:func:`iter_outputs` with one session per chunk (each on the graph cut after it) over
    every sample."""
    from ...progress import tick
    from ...runtime import make_session

    runs = len(chunks) * len(samples)
    for ci, chunk in enumerate(chunks):
        # ORT's arena pays off over many runs; for a few (the per-node checks' two samples) it
        # would only keep a high mark above what a run needs (runtime.make_session)
        sess = make_session(_cut(model, chunk), optimize=False, arena=len(samples) > ARENA_MIN_RUNS) if chunk else None
        produced = {o.name for o in sess.get_outputs()} if sess else set()
        wanted = [c for c in chunk if c in produced]
        feeds_ok = {x.name for x in sess.get_inputs()} if sess else set()
        for k, feed in enumerate(samples):
            vals = sess.run(wanted, {a: b for a, b in feed.items() if a in feeds_ok}) if wanted else []
            got = {}
            for i, n in enumerate(wanted):  # each ORT buffer released once copied (see _segments)
                got[n], vals[i] = _owned(vals[i]), None
            if ci == 0:
                got.update(_direct(model, direct, feed))
            yield k, got
            del vals, got
            tick("recording activations", ci * len(samples) + k + 1, runs, "sample runs")
        del sess


def _segments(model, chunks: list[list[str]], direct: list[str], samples, index: dict[str, int]):
    """:func:`iter_outputs` over consecutive segments of the main graph, sample by sample.

    Segment ``s`` holds the nodes after segment ``s - 1`` up to the last producer of chunk ``s``
    (graph order is topological). Its session's outputs are chunk ``s`` and the values it
    produces that later segments read; its inputs are the graph inputs and the earlier values
    its nodes read, fed from the sample and from what the earlier segments returned for that
    sample (dropped once no later segment reads them). Sessions are built when the first sample
    reaches them (input types from the values) without ORT's memory arena (all stay alive; an
    arena would keep each one's peak). Peak: one segment's run plus the values carried over."""
    from ...progress import tick
    from ...runtime import make_session

    nodes = list(model.graph)
    # segments end at each chunk's last producer; a name belongs to its producer's segment (the
    # outputs of one node, a Split's, can fall in two chunks: one segment records them all)
    ends = sorted({max(index[n] for n in ch) for ch in chunks})
    names = [n for ch in chunks for n in ch]
    chunks = [[] for _ in ends]
    for n in names:
        chunks[bisect.bisect_left(ends, index[n])].append(n)
    starts = [0] + [e + 1 for e in ends[:-1]]
    seg_of = {n: bisect.bisect_left(ends, i) for n, i in index.items() if i <= ends[-1]}  # ends sorted
    reads: list[list[str]] = []  # earlier segments' values each segment reads
    last_read: dict[str, int] = {}
    for s, (a, b) in enumerate(zip(starts, ends)):
        r = list(dict.fromkeys(v.name for node in nodes[a:b + 1] for v in node.inputs
                               if v is not None and seg_of.get(v.name, s) < s))
        reads.append(r)
        for n in r:
            last_read[n] = s
    passes_on = [[n for n in last_read if seg_of[n] == s] for s in range(len(chunks))]
    outs = [list(dict.fromkeys([*chunks[s], *passes_on[s]])) for s in range(len(chunks))]
    sessions: list = [None] * len(chunks)
    graph_inputs = [v.name for v in model.graph.inputs]
    runs = len(chunks) * len(samples)
    for k, feed in enumerate(samples):
        live: dict[str, np.ndarray] = {}
        for s in range(len(chunks)):
            if sessions[s] is None:
                sessions[s] = make_session(_segment(model, reads[s], outs[s], live), optimize=False, arena=False)
            sess = sessions[s]
            want = {x.name for x in sess.get_inputs()}
            fed = {n: feed[n] for n in graph_inputs if n in want and n in feed}
            fed.update((n, live[n]) for n in reads[s])
            vals = sess.run(outs[s], fed)
            del fed
            got, keep, carry = {}, set(chunks[s]), set(passes_on[s])
            for i, n in enumerate(outs[s]):
                # one owned copy per value, ORT's buffer released right after it: the run's outputs
                # and their copies are not all held at once
                v, vals[i] = _owned(vals[i]), None
                if n in keep:
                    got[n] = v
                if n in carry:
                    live[n] = v
                del v
            del vals
            if s == 0:
                got.update(_direct(model, direct, feed))
            for n in reads[s]:
                if last_read[n] == s:
                    del live[n]
            yield k, got
            del got
            tick("recording activations", k * len(chunks) + s + 1, runs, "sample runs")
    del sessions


class NotSegmentable(ValueError):
    """The graph cannot be cut into sessions that hand values on (:func:`sequential_shift`)."""


def sequential_shift(model, targets: dict[str, int], samples: list[dict[str, np.ndarray]], correct) -> None:
    """Run ``samples`` through ``model`` segment by segment so that each target is measured with
    every upstream target already corrected, for the cost of about two forward passes.

    The main graph (graph order, which must be topological) is cut at each target's producer:
    segment ``s`` runs from target ``s - 1``'s producer to target ``s``'s, over every sample
    before the next segment starts (segment-major). After it, ``correct(t, mean)`` gets target
    ``t``'s per-channel mean over every sample and position (float64 ``[C]``, channel axis
    ``targets[t]``) and may change ``t``'s producer (its bias). The next segment's session is
    built after that and runs the producer again with the change, from its inputs as carried
    over, so everything downstream reads what the corrected model computes — exactly, not a
    float shift added to the old value (whose last-bit differences flip int8 roundings
    downstream). This equals correcting the targets one at a time on models run again from the
    start, which cost one cut model per target.
    (Targets that one node produces together are all measured before ``correct`` sees any of
    them; the static pass's targets are each a Conv/ConvTranspose/Gemm's only output.)

    Args:
        model: an ``onnx_ir.Model`` (not modified here; ``correct`` may change its tensors).
        targets: name -> channel axis, names of main-graph node outputs (float tensors).
        samples: feed dicts.

    Memory: the values carried between segments for every sample (a skip connection's
    activation times the number of samples), besides one segment's run.

    Raises:
        NotSegmentable: the graph has subgraphs or non-tensor values, which cannot be handed
            from one session to the next.
    """
    from ...progress import tick
    from ...runtime import make_session

    nodes = list(model.graph)
    if not all(_segmentable(node) for node in nodes):
        raise NotSegmentable("a graph with subgraphs or non-tensor values cannot be run segment by segment")
    index = {v.name: i for i, node in enumerate(nodes) for v in node.outputs}
    order = sorted((t for t in targets if t in index), key=index.__getitem__)
    if not order or not samples:
        return
    ends = list(dict.fromkeys(index[t] for t in order))
    starts = [0] + ends[:-1]  # each segment runs the previous target's producer again
    n_seg = len(ends)

    def owner(i: int) -> int:
        """The segment whose value of node ``i``'s outputs later segments read: the last one
        that runs node ``i`` (a target's producer: the run after its correction)."""
        return min(bisect.bisect_right(ends, i), n_seg - 1)  # the first segment ending after i

    # values computed from constants alone (a bias's DequantizeLinear) are computed again in each
    # segment that reads them, never carried: a carried one would keep the bias before its correction
    const = set()
    for node in nodes:
        if all(v is None or v.const_value is not None or v.name in const for v in node.inputs):
            const.update(v.name for v in node.outputs)
    # only what leads to a target runs (a detector's head outputs between levels are not carried)
    pos = {id(node): i for i, node in enumerate(nodes)}
    needed, stack = set(), [nodes[e] for e in ends]
    while stack:
        node = stack.pop()
        if pos[id(node)] in needed:
            continue
        needed.add(pos[id(node)])
        stack += [v.producer() for v in node.inputs
                  if v is not None and v.producer() is not None and id(v.producer()) in pos]
    seg_of = {n: owner(i) for n, i in index.items() if i <= ends[-1]}
    reads, last_read = [], {}
    for s, (a, b) in enumerate(zip(starts, ends)):
        mine_idx = [i for i in range(a, b + 1) if i in needed]
        r = list(dict.fromkeys(v.name for i in mine_idx for v in nodes[i].inputs
                               if v is not None and v.name in seg_of and v.name not in const and index[v.name] < a))
        reads.append(r)
        for n in r:
            last_read[n] = max(last_read.get(n, s), s)
    graph_inputs = [v.name for v in model.graph.inputs]
    live: list[dict[str, np.ndarray]] = [{} for _ in samples]
    for s in range(n_seg):
        mine = [t for t in order if index[t] == ends[s]]
        carry = [n for n in last_read if seg_of[n] == s and last_read[n] > s]
        outs = list(dict.fromkeys([*mine, *carry]))
        sess = make_session(_segment(model, reads[s], outs, live[0]), optimize=False, arena=len(samples) > ARENA_MIN_RUNS)
        want = {x.name for x in sess.get_inputs()}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for k, feed in enumerate(samples):
            fed = {n: feed[n] for n in graph_inputs if n in want and n in feed}
            fed.update((n, live[k][n]) for n in reads[s] if n in want)
            vals = sess.run(outs, fed)
            del fed
            for i, n in enumerate(outs):
                v, vals[i] = _owned(vals[i]), None
                if n in mine and isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.ndim >= 2:
                    rows = np.moveaxis(v, targets[n], -1).reshape(-1, v.shape[targets[n]]).astype(np.float64)
                    if n not in sums or sums[n].shape == rows.shape[1:]:
                        sums[n] = sums.get(n, 0.0) + rows.sum(0)
                        counts[n] = counts.get(n, 0) + rows.shape[0]
                if n in carry:
                    live[k][n] = v
                del v
            del vals
            for n in reads[s]:
                if last_read[n] == s:
                    live[k].pop(n, None)
            tick("bias correction", s * len(samples) + k + 1, n_seg * len(samples), "segment runs")
        del sess
        for t in mine:
            if counts.get(t):
                correct(t, sums[t] / counts[t])


def _segment(model, reads: list[str], outs: list[str], values: dict[str, np.ndarray]):
    """A copy of ``model`` (tensors shared) computing ``outs`` from the graph inputs and the
    earlier values ``reads`` (new graph inputs, typed from ``values``); the nodes before and
    after are removed."""
    import onnx_ir.convenience as conv
    import onnx_ir.passes.common as common

    from ..base import snapshot

    m = snapshot(model)
    vals = {v.name: v for node in m.graph for v in node.outputs}
    m.graph.outputs.clear()  # outputs of unknown type stay untyped: ONNX Runtime infers them
    m.graph.outputs.extend(vals[n] for n in outs)
    taken = set(vals) | {v.name for v in m.graph.inputs} | set(m.graph.initializers)
    for n in reads:
        old, arr = vals[n], values[n]
        alias = n + "__before_cut"
        while alias in taken:
            alias += "_"
        taken.add(alias)
        old.name = alias
        new = ir.Value(name=n, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                       shape=ir.Shape([None] * arr.ndim))
        conv.replace_all_uses_with(old, new)
        m.graph.inputs.append(new)
    common.RemoveUnusedNodesPass()(m)
    return m


def _cut(model, names: list[str]):
    """A copy of ``model`` (tensors shared, :func:`~onnxcompress.passes.base.snapshot`) whose
    graph outputs are the ``names`` a main-graph node produces, with every node they do not
    depend on removed. Outputs of unknown type stay untyped (ONNX Runtime infers them)."""
    import onnx_ir.passes.common as common

    from ..base import snapshot

    m = snapshot(model)
    produced = {v.name: v for node in m.graph for v in node.outputs}
    outs = [produced[n] for n in names if n in produced]  # untyped ones stay so: ORT infers them
    m.graph.outputs.clear()
    m.graph.outputs.extend(outs)
    common.RemoveUnusedNodesPass()(m)
    return m


class SpilledSamples(Mapping):
    """One sample's recorded values kept on disk (``.npy`` files in a private temporary folder,
    removed with the object or at exit) and read back as read-only memory maps on access:
    per-node checks look at a few tensors at a time, so the activations of whole samples are
    not held in memory. A ``Mapping`` ``name -> np.ndarray``."""

    def __init__(self) -> None:
        import shutil
        import tempfile
        import weakref

        self.folder = tempfile.mkdtemp(prefix="onnxcompress-rec-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self._files: dict[str, str] = {}
        self._small: dict[str, np.ndarray] = {}

    def add(self, name: str, value) -> None:
        import os

        if not isinstance(value, np.ndarray) or value.nbytes < (1 << 16) or value.dtype.kind not in "biuf":
            self._small[name] = value
            return
        path = os.path.join(self.folder, f"{len(self._files)}.npy")
        np.save(path, value, allow_pickle=False)
        self._files[name] = path

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._small:
            return self._small[name]
        return np.load(self._files[name], mmap_mode="r", allow_pickle=False)

    def __contains__(self, name: object) -> bool:
        return name in self._small or name in self._files

    def __iter__(self):
        yield from self._small
        yield from self._files

    def __len__(self) -> int:
        return len(self._small) + len(self._files)


def observe(model, tensor_names: list[str], samples: list[dict[str, np.ndarray]], *, keep: int = 0,
            method: str | None = None, progress=None) -> tuple[dict[str, "TensorStats"], list[Mapping]]:
    """Run ``samples`` through ``model`` (ORT, optimizations off) with ``tensor_names`` made outputs.

    Args:
        model: an ``onnx_ir.Model`` (not modified).
        tensor_names: float tensors to observe.
        samples: feed dicts.
        keep: how many of the first samples' values to return as they are (for per-node checks).
        method: one of :data:`METHODS` to collect statistics over every sample (histograms kept
            unless ``minmax``); ``None`` runs only the first ``keep`` samples.
        progress: optional callable ``(tensors done, total)``, called per chunk.

    Returns:
        ``(stats, kept)``: name -> :class:`TensorStats` (tensors never produced keep ``n == 0``;
        empty without ``method``), and the first ``keep`` samples' values by name
        (:class:`SpilledSamples`: on disk, read back as memory maps).

    Memory: the values of one chunk of one sample (:func:`iter_outputs`), the statistics
    (bounded histograms), whatever the number of samples and the size of the activations.
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    stats = {n: TensorStats(with_hist=method != "minmax") for n in tensor_names} if method else {}
    todo = samples if method else samples[:keep]
    kept = [SpilledSamples() for _ in range(min(keep, len(todo)))]
    seen: set[str] = set()
    for k, outs in iter_outputs(model, tensor_names, todo):
        if k < keep:
            for n, v in outs.items():
                kept[k].add(n, v)
        for n, v in outs.items() if method else ():
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                stats[n].update(v)
        seen.update(outs)
        if progress and k == len(todo) - 1:  # a chunk of the tensors is done over every sample
            progress(len(seen), len(tensor_names))
    return stats, kept


def channel_means(model, names_axes: dict[str, int], samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel mean of float tensors over ``samples`` (ORT, optimizations off).

    Args:
        model: an ``onnx_ir.Model`` (not modified: a serialized copy gets the extra outputs).
            Q/DQ pairs in it run as separate operators, i.e. with the ONNX semantics of the
            int8 model (``QuantizeLinear`` / ``DequantizeLinear`` spec), not a kernel's.
        names_axes: tensor name -> channel axis (1 for Conv outputs ``[N, C, ...]``, -1 for
            MatMul/Gemm outputs ``[..., C]``).
        samples: feed dicts.

    Returns:
        name -> float64 array ``[C]``, the mean over every sample and position; tensors never
        produced (or of another rank) are left out. Memory is O(channels), not O(activations).
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, outs in iter_outputs(model, list(names_axes), samples):
        for n, v in outs.items():
            if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.ndim < 2:
                continue
            rows = np.moveaxis(v, names_axes[n], -1).reshape(-1, v.shape[names_axes[n]]).astype(np.float64)
            if n in sums and sums[n].shape[0] != rows.shape[1]:
                continue
            sums[n] = sums.get(n, 0.0) + rows.sum(0)
            counts[n] = counts.get(n, 0) + rows.shape[0]
    return {n: s / counts[n] for n, s in sums.items() if counts[n]}
