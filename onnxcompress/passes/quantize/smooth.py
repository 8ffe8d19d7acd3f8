"""SmoothQuant: move activation outliers into the weights before int8 quantization.

Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models" (arXiv:2211.10438), sec. 4: for ``Y = X W`` with X [tokens, D] and W [D, N],
a per-input-channel factor ``s`` [D] gives the same product ``Y = (X diag(1/s)) (diag(s) W)``;
with ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` the activation's outlier channels shrink
(so the per-tensor activation scale resolves the other channels better) while the weight rows
grow (they are quantized per output column, which absorbs it). Transformer LayerNorm outputs
and GELU outputs have such outlier channels (MiniLM: a few of 384 LayerNorm channels are
10-50x the median).

Here ``1/s`` is an explicit ``Mul`` on the activation (one per tensor, shared by all the
quantized nodes that read it; other consumers, e.g. a residual ``Add``, keep reading the
original tensor, so nothing is folded into LayerNorm). ``alpha`` is chosen per tensor on
calibration activations from :data:`ALPHAS`: the one with the lowest simulated int8 output
error of its consumers (activation quantized as ONNX Runtime will: per sample for dynamic
mode, one range over the calibration set for static mode; weights per column, symmetric, the
target's bits). A tensor is smoothed only when that error drops by at least
:data:`MIN_GAIN_DB`. Consumers: ``MatMul`` with a constant rank-2 weight and
``com.microsoft.Attention`` (weight [D, 3*hidden]). The rewrite is exact in real arithmetic;
the pass is ``checked`` (outputs within 1e-4 relative).

Calibration data is often narrower than what the model meets later. Every factor is therefore
at least the median factor (:data:`S_FLOOR_QUANTILE`): a channel that was quiet in calibration
is not amplified beyond the typical channel, so deployment data louder there keeps headroom
under the activation's range instead of clipping.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...irutil import add_initializer, all_value_names, unique_name
from ..base import CompressionPass
from . import params
from .calibrate import iter_outputs
from .config import SmoothQuantConfig
from .policy import resolve_policy
from .static import FLOAT, _is_const

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: smooth a tensor only when the simulated int8 error of its consumers drops by this much
MIN_GAIN_DB = 0.5
#: calibration samples seen: channel maxima over all of them (a channel that is quiet in a few
#: samples and loud in another must not get a small factor), streamed (O(channels) memory)
SAMPLES = 64
#: samples whose rows are kept for the simulated error, at most SIM_ROWS evenly strided rows
#: (tokens) each, plus each sample's exact per-channel min / max (so the simulated activation
#: range, per sample or over the set, is exact for every smoothing factor): memory is bounded
#: by SIM_SAMPLES x SIM_ROWS x D floats per tensor whatever the sequence length
SIM_SAMPLES = 16
#: at most this many rows per sample: SIM_TOTAL_ROWS spread over the SIM_SAMPLES samples (64 each),
#: so the rows kept for every tensor of a deep model stay bounded (an 800 MB, 21-layer stack at
#: seq 128 kept 1 GB of them); MiniLM's sentences (< 64 tokens) keep every row
SIM_TOTAL_ROWS = 1024
SIM_ROWS = SIM_TOTAL_ROWS // SIM_SAMPLES
#: output columns of each consumer weight the simulated error sees (weights are quantized per
#: column, so each kept column's error is exact): half of them the columns with the most output
#: energy on the recorded rows (a transformer's few outlier hidden dimensions dominate the
#: relative error: a plain stride missed them on MiniLM, 33.6 dB read as 14.4), the rest an
#: even stride over the others, weighted by that stride so the sums stay unbiased. The cost of
#: choosing alpha is then bounded by rows x D x SIM_COLS per consumer whatever the layer width
#: (an FFN's 4*D columns made this the slowest step of dynamic int8 on large transformers)
SIM_COLS = 256
S_MIN, S_MAX = 1e-4, 1e4
#: every factor is at least this quantile of the channels' factors (the median): a channel that
#: is quiet on the calibration data is never amplified beyond the typical channel. Smoothing
#: lifts quiet channels up to the top of the activation's int8 range; where deployment data is
#: louder there than calibration was, an amplified channel clips. Measured (all-MiniLM-L6-v2,
#: static, validated on the zoo's sentences): calibrated on Python documentation text, mean /
#: worst sentence-embedding cosine 0.99705 / 0.987 without the floor, 0.99833 / 0.996 with it;
#: on news text 0.99813 / 0.995 -> 0.99831 / 0.996; on the zoo's own sentences unchanged
#: (0.99842 -> 0.99847). A synthetic probe whose validation rows are loud in channels the
#: calibration rows left quiet lost 40 % of its answers without it. Limit: the median is the
#: typical channel only while quiet channels are fewer than half; where most channels were quiet
#: in calibration and are loud in deployment the floor is itself a quiet channel's factor and
#: does not help (the probe with 75 % of the channels quiet: 13.1 dB without it, 13.4 with it,
#: 21.6 without SmoothQuant). A higher quantile protects more but costs fidelity where the data
#: matches (MiniLM, 0.75: mean cosine 0.99808 against the median's 0.99847 on its own sentences).
S_FLOOR_QUANTILE = 0.5


def _consumers(model: ir.Model, excl_nodes: set, excl_ops: set) -> dict[str, list[ir.Node]]:
    """Activation name -> the main-graph nodes that would read it in int8 with a constant weight."""
    groups: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if node.name in excl_nodes or node.op_type in excl_ops:
            continue
        ok = (node.domain in ("", "ai.onnx") and node.op_type == "MatMul") or (
            node.domain == "com.microsoft" and node.op_type == "Attention")
        if not ok or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or x.dtype not in (None, FLOAT) or not _is_const(w) or w.dtype != FLOAT:
            continue
        if w.const_value.numpy().ndim != 2:
            continue
        groups.setdefault(x.name, []).append(node)
    return groups


def _fake_weight(w: np.ndarray, qmax: int, pairs: tuple[int, bool] | None = None) -> np.ndarray:
    scale = params.weight_params(w, 1, qmax, pairs)
    return params.quantize_weight(w, scale, 1, qmax, pairs).astype(np.float32) * scale[None, :]


def _fake_act(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale, zp = params.activation_params(lo, hi)
    return params.fake_quant_activation(x, float(scale), int(zp))


def simulated_error(xs: list[np.ndarray], ws: list[np.ndarray], s: np.ndarray | None, qmax: int,
                    dynamic: bool, refs: list[np.ndarray] | None = None,
                    chan_ranges: list[tuple[np.ndarray, np.ndarray]] | None = None,
                    pairs: tuple[int, bool] | None = None,
                    col_weights: list[np.ndarray] | None = None,
                    ref_energy: list[float] | None = None) -> float:
    """Sum over consumers of the relative squared int8 error ``|XW - Q(X/s) Q(sW)|^2 / |XW|^2``.

    Args:
        xs: recorded activations, each [..., D] float32 (one per calibration sample; may be a
            row subsample of it).
        ws: the consumers' weights, each [D, N] float32.
        s: smoothing factors [D] (``None``: no smoothing).
        qmax: weight range (127 for 8-bit).
        dynamic: activation range per sample (``DynamicQuantizeLinear``) or one over all samples.
        refs: ``X @ W`` per consumer (all samples' rows stacked), to skip recomputing it.
        chan_ranges: per sample, the per-channel (min [D], max [D]) of the whole sample: the
            activation range then comes from them (exact when ``xs`` are subsamples); default:
            the range of ``xs`` themselves.
        pairs: saturation-free weight scales (``params.weight_params``), as the target uses.
        col_weights: per consumer, a weight [N] per column of ``ws`` (columns sampled with a
            stride count that many times: :func:`sample_columns`); default 1.
        ref_energy: :func:`reference_energy` of ``refs`` and ``col_weights``, when known.
    """
    x2 = [x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False) for x in xs]
    xsm = [x / s[None, :] for x in x2] if s is not None else x2
    if chan_ranges is not None:
        inv = 1.0 / s if s is not None else 1.0
        rng = [(float(np.min(lo * inv)), float(np.max(hi * inv))) for lo, hi in chan_ranges]  # s > 0
    else:
        rng = [(float(x.min()), float(x.max())) for x in xsm]
    if dynamic:
        xq = np.concatenate([_fake_act(x, lo, hi) for x, (lo, hi) in zip(xsm, rng)])
    else:
        lo = min(r[0] for r in rng)
        hi = max(r[1] for r in rng)
        xq = _fake_act(np.concatenate(xsm), lo, hi)  # one range for every sample: one pass
    if refs is None:
        xall = np.concatenate(x2)
        refs = [xall @ w for w in ws]
    if ref_energy is None:  # the reference's part: the same for every smoothing factor
        ref_energy = reference_energy(refs, col_weights)
    err = 0.0
    for i, w in enumerate(ws):
        got = xq @ _fake_weight(w * s[:, None] if s is not None else w, qmax, pairs)
        e_col = np.sum((refs[i] - got).astype(np.float64) ** 2, axis=0)
        if col_weights is not None:
            e_col = e_col * col_weights[i]
        err += float(e_col.sum()) / max(ref_energy[i], 1e-30)
    return err


def reference_energy(refs: list[np.ndarray], col_weights: list[np.ndarray] | None = None) -> list[float]:
    """Per consumer, the (column-weighted) energy ``sum(ref^2)`` of :func:`simulated_error`'s
    denominator: computed once for a tensor's alpha search instead of once per alpha."""
    out = []
    for i, ref in enumerate(refs):
        r_col = np.sum(ref.astype(np.float64) ** 2, axis=0)
        cw = col_weights[i] if col_weights is not None else None
        out.append(float((r_col * cw).sum() if cw is not None else r_col.sum()))
    return out


def sample_columns(x: np.ndarray, w: np.ndarray, n: int = SIM_COLS) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``w`` [D, N] for the simulated error and their weights (see :data:`SIM_COLS`):
    all of them (weight 1) when ``N <= n``; else the ``n // 2`` with the most output energy on
    rows ``x`` [r, D] (weight 1) and an even stride over the others (weight = the stride).
    Returns ``(column indices, float64 weights)``."""
    N = w.shape[1]
    if N <= n:
        return np.arange(N), np.ones(N)
    energy = np.einsum("ij,ij->j", y := x @ w, y)
    order = np.argsort(-energy, kind="stable")
    top, rest = order[: n // 2], np.sort(order[n // 2:])
    stride = -(-rest.size // (n - top.size))
    picked = rest[::stride]
    return np.concatenate([top, picked]), np.concatenate([np.ones(top.size), np.full(picked.size, float(stride))])


def smoothing_factors(xs: list[np.ndarray], ws: list[np.ndarray], alpha: float,
                      absmax: np.ndarray | None = None, absmax_w: np.ndarray | None = None) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (SmoothQuant eq. 4), clipped to [1e-4, 1e4];
    channels that are all zero in X or W get 1; then every factor is raised to at least the
    median factor (:data:`S_FLOOR_QUANTILE`: quiet channels are not amplified beyond the typical
    channel, so louder deployment data keeps headroom). ``absmax`` [D]: ``max|X_j|`` when already
    known (streamed over more samples than ``xs``); ``absmax_w`` [D]: ``max|W_j|`` over every
    column of every consumer when ``ws`` are column subsamples. Returns float32 [D]."""
    if absmax is None:
        absmax = np.max([np.abs(x.reshape(-1, x.shape[-1])).max(0) for x in xs], axis=0)
    ax = np.asarray(absmax, np.float64)
    aw = np.asarray(absmax_w if absmax_w is not None else np.max([np.abs(w).max(1) for w in ws], axis=0), np.float64)
    ok = (ax > 0) & (aw > 0) & np.isfinite(ax) & np.isfinite(aw)
    s = np.ones_like(ax)
    s[ok] = ax[ok] ** alpha / aw[ok] ** (1.0 - alpha)
    if ok.any():
        s = np.maximum(s, np.quantile(np.clip(s[ok], S_MIN, S_MAX), S_FLOOR_QUANTILE))
    return np.clip(s, S_MIN, S_MAX).astype(np.float32)


def record(model: ir.Model, names: list[str], samples: list[dict[str, np.ndarray]]) -> dict[str, dict]:
    """Stream ``samples[:SAMPLES]`` through ``model`` and keep, per tensor ``[..., D]``: the
    per-channel ``absmax`` [D] over all of them, and for the first :data:`SIM_SAMPLES` a row
    subsample ``rows`` (at most :data:`SIM_ROWS` rows [r, D] each) with that sample's exact
    per-channel ``ranges`` (min [D], max [D]). Tensors whose last dimension changes between
    samples are dropped."""
    out: dict[str, dict] = {}
    bad: set[str] = set()
    for k, outs in iter_outputs(model, names, samples[:SAMPLES]):
        for n, v in outs.items():
            if n in bad or not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.ndim < 1 or v.size == 0:
                continue
            x = v.reshape(-1, v.shape[-1]).astype(np.float32)
            r = out.setdefault(n, {"absmax": np.zeros(x.shape[1], np.float32), "rows": [], "ranges": []})
            if r["absmax"].shape[0] != x.shape[1]:
                bad.add(n)
                continue
            lo, hi = x.min(0), x.max(0)
            np.maximum(r["absmax"], np.maximum(-lo, hi), out=r["absmax"])
            if k < SIM_SAMPLES:
                step = -(-x.shape[0] // SIM_ROWS)
                r["rows"].append(np.ascontiguousarray(x[::step]))
                r["ranges"].append((lo, hi))
    return {n: r for n, r in out.items() if n not in bad and r["rows"]}


class SmoothQuantPass(CompressionPass):
    """Per-tensor SmoothQuant with alpha chosen on calibration data (see module docstring).

    Parameters: :class:`.config.SmoothQuantConfig` (``target``: weight bits via :mod:`.policy`;
    ``mode``: how activations will be quantized); ``context.scope`` is left alone. Report counts: ``smoothed`` (tensor -> alpha, error dB before ->
    after), ``tensors_considered``.
    """

    name = "smooth-quant"
    checked = True
    Config = SmoothQuantConfig
    #: fold ``1/s`` into a producing Attention's V projection instead of a ``Mul``
    fold_attention = True

    def apply(self, model: ir.Model) -> bool:
        if not self.context.calibration:
            return False
        policy = resolve_policy(self.config.target)
        qmax = policy.weight_qmax("MatMul", False)
        pairs = policy.weight_pairs("MatMul", False, 1)  # consumers' weights are [D, N]
        dynamic = self.config.mode == "dynamic"
        groups = _consumers(model, self.context.scope.nodes, self.context.scope.op_types)
        if not groups:
            return False
        rec = record(model, sorted(groups), self.context.calibration)
        if not rec:
            return False
        taken = all_value_names(model)
        done: dict[str, dict] = {}
        for name, nodes in groups.items():
            r = rec.get(name)
            if r is None or r["absmax"].shape[0] != nodes[0].inputs[1].const_value.numpy().shape[0]:
                continue
            full = [n.inputs[1].const_value.numpy().astype(np.float32, copy=False) for n in nodes]
            absmax_w = np.max([np.abs(w).max(1) for w in full], axis=0)
            sim, ranges = r["rows"], r["ranges"]
            xall = np.concatenate(sim)
            picks = [sample_columns(xall, w) for w in full]
            ws = [np.ascontiguousarray(w[:, cols]) for w, (cols, _) in zip(full, picks)]
            cws = [cw for _, cw in picks]
            del full
            refs = [xall @ w for w in ws]
            energy = reference_energy(refs, cws)
            base = simulated_error(sim, ws, None, qmax, dynamic, refs, ranges, pairs, cws, energy)
            best = (base, None, None)
            for a in ALPHAS:
                s = smoothing_factors(sim, ws, a, r["absmax"], absmax_w)
                e = simulated_error(sim, ws, s, qmax, dynamic, refs, ranges, pairs, cws, energy)
                if e < best[0]:
                    best = (e, a, s)
            err, alpha, s = best
            if s is None or base <= 0 or 10 * np.log10(base / max(err, 1e-30)) < MIN_GAIN_DB:
                continue
            how = self._rewrite(model, nodes, s, taken)
            done[name] = {"alpha": alpha, "how": how, "nodes": [n.name for n in nodes],
                          "error_db_before": round(float(-10 * np.log10(base / len(ws))), 1),
                          "error_db_after": round(float(-10 * np.log10(err / len(ws))), 1)}
        self.report.counts.update(smoothed=done, tensors_considered=len(groups))
        if done:
            model.graph.sort()
        return bool(done)

    def _rewrite(self, model: ir.Model, nodes: list[ir.Node], s: np.ndarray, taken: set[str]) -> str:
        """Apply ``s``: fold ``1/s`` into a producing ``Attention``'s V columns when only these
        nodes read its output (returns ``"folded"``), else insert ``Mul(x, 1/s)`` with ``1/s``
        stored as float16 + ``Cast`` (ONNX Runtime folds the Cast at load; ``s`` is rounded so
        that the rewrite stays exact) (returns ``"mul"``). Weights rows are scaled by ``s``."""
        graph = model.graph
        x = nodes[0].inputs[0]
        att = x.producer()
        users = {u.node for u in x.uses()}
        foldable = (self.fold_attention and att is not None and att.domain == "com.microsoft" and att.op_type == "Attention"
                    and len(att.outputs) == 1 and users <= set(nodes) and not x.is_graph_output()
                    and len(att.inputs) > 2 and _is_const(att.inputs[1]) and _is_const(att.inputs[2])
                    and att.inputs[1].const_value.numpy().shape[1] == 3 * s.size)
        if foldable:
            how = "folded"
            h = s.size
            w = att.inputs[1].const_value.numpy().astype(np.float32).copy()
            b = att.inputs[2].const_value.numpy().astype(np.float32).copy()
            w[:, 2 * h:] /= s[None, :]
            b[2 * h:] /= s
            att.replace_input_with(1, add_initializer(graph, w, f"{att.inputs[1].name}_smoothed", taken))
            att.replace_input_with(2, add_initializer(graph, b, f"{att.inputs[2].name}_smoothed", taken))
            y = x
        else:
            how = "mul"
            inv16 = np.clip(1.0 / s, 1.0 / S_MAX, 1.0 / S_MIN).astype(np.float16)
            s = (1.0 / inv16.astype(np.float32)).astype(np.float32)
            inv = add_initializer(graph, inv16, f"{x.name}_smooth_inv16", taken)
            inv32 = ir.Value(name=unique_name(f"{x.name}_smooth_inv", taken))
            y = ir.Value(name=unique_name(f"{x.name}_smoothed", taken), type=x.type, shape=x.shape)
            graph.append(ir.Node("", "Cast", [inv], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT.value)],
                                 outputs=[inv32], name=unique_name(f"{x.name}_smooth_Cast", taken)))
            graph.append(ir.Node("", "Mul", [x, inv32], outputs=[y], name=unique_name(f"{x.name}_SmoothQuant_Mul", taken)))
        for n in nodes:
            w = n.inputs[1]
            ws = (w.const_value.numpy().astype(np.float32) * s[:, None]).astype(np.float32)
            if y is not x:
                n.replace_input_with(0, y)
            n.replace_input_with(1, add_initializer(graph, ws, f"{w.name}_smoothed", taken))
        return how
