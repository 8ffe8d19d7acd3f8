"""Low-rank factorization of constant weights: one product through a narrow rank.

A node ``Y = X W`` with a constant weight ``W [K, N]`` becomes two products through rank
``r``: ``Y ~ (X A) B`` with ``A [K, r]``, ``B [r, N]``; the pair costs ``r (K + N)``
multiply-adds per row instead of ``K N``. Rewrites:

* ``MatMul(X, W)`` -> ``MatMul(MatMul(X, A), B)``;
* ``Gemm(X, W [, C])`` (``transA = 0``, either ``transB``; ``alpha`` folded into the factors)
  -> ``Gemm(MatMul(X, A), B, C, beta)``: the bias stays the second node's ``C``;
* 1x1 ``Conv`` (``group = 1``) -> ``Conv(Conv(X, A [r, C_in, 1, 1]), B [C_out, r, 1, 1], bias)``,
  strides / pads / dilations on the first; k x k Conv is left alone;
* ``com.microsoft.Attention(X, W_qkv [D, 3H], ...)`` (the fused transformer block) ->
  ``Attention(MatMul(X, A), B, ...)``: Q, K and V share one input factor ``A [D, r]`` (the
  op takes an input width other than its hidden size), so the projections of a fused block
  are factorized jointly.

**Data-aware (whitened) truncation.** Truncating the SVD of ``W`` itself minimises
``||W - A B||`` (Eckart-Young), not the error where the inputs live. As in ASVD (Yuan et al.
2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language
Models", arXiv:2312.05821) and SVD-LLM (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular
Value Decomposition for Large Language Model Compression", arXiv:2403.07378), the layer's
inputs ``X`` on the calibration samples whiten the problem first: with the Gram matrix
``G = X^T X`` (accumulated in float64 sample by sample: ``[K, K]`` memory per input tensor,
never the activations) and ``G + damp I = L L^T`` (Cholesky; ``damp`` is a share of the mean
diagonal, as GPTQ damps its Hessian), ``||X (W - A B)||_F = ||L^T (W - A B)||_F``; so the SVD
of ``M = L^T W = U S V^T`` truncated to rank ``r`` gives the best rank-``r`` pair in the
output space (SVD-LLM, theorem 3.2): ``A = L^-T U_r S_r^1/2``, ``B = S_r^1/2 V_r^T`` (the
singular values split evenly between the factors, as SVD-LLM's code does, so neither factor
nor the intermediate activation has a range far wider than the other for int8). The relative
output error of rank ``r`` on the calibration inputs is then ``sqrt(sum_{i>r} s_i^2 /
sum_i s_i^2)``; the report gives it measured with the undamped ``G``. Without calibration data
(the pipeline's random inputs, or ``whiten = "off"``) the plain SVD of ``W`` is used and noted.

**Rank choice.** ``energy``: per layer, the least rank whose squared singular values keep that
share of the (whitened) spectrum. ``target_ratio``: a global budget, the share of the
factorizable MACs to remove, allocated greedily over the layers by the least added relative
squared output error per saved MAC (each layer's first step goes from dense to its largest
rank worth factorizing, later steps lower the rank by ``round_to``). ``rank``: one fixed rank
(tests, experiments). Ranks are rounded up to a multiple of ``round_to`` (GEMM kernels like
multiples of 8/16); a layer is factorized only when ``r (K + N) < K N (1 - min_saving)``.
Nodes in ``context.scope`` and weights under ``min_size`` elements are left alone.

The pass is lossy (``checked = False``): validation and the gates judge it. The report gives
per layer the rank, params and MACs before -> after and the relative output error, and the
totals. Both factors are plain MatMul / Gemm / Conv weights, so int8 quantization (dynamic or
static) treats them like any other.
"""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..irutil import add_initializer, all_value_names, attr as _attr, const_array as _const, replace_node, unique_name
from ..params import Param
from .base import CompressionPass

ENERGY = Param("energy", 0.95, "Per-layer rank: the least rank keeping this share of the (whitened) squared "
               "singular values (used when neither target_ratio nor rank is set).", kind="float", low=0.0, high=1.0,
               low_open=True, search=(0.9, 0.999))
TARGET_RATIO = Param("target_ratio", None, "Low-rank factorization with a global budget: the share of the MACs of "
                     "factorizable MatMul/Gemm/1x1 Conv/Attention weights to remove, allocated over layers by least "
                     "output error per saved MAC.", kind="float", low=0.0, high=1.0, low_open=True, high_open=True,
                     optional=True, flag="--low-rank", search=(0.1, 0.5))
RANK = Param("rank", None, "One fixed rank for every layer (capped at min(K, N); overrides energy and "
             "target_ratio).", kind="int", low=1, optional=True)
LR_ROUND_TO = Param("round_to", 16, "Ranks rounded up to a multiple of this (8/16 suit the GEMM kernels).",
                    kind="int", low=1, search=(1, 8, 16, 32))
MIN_SAVING = Param("min_saving", 0.1, "Factorize a layer only when the pair costs less than (1 - this) of the "
                   "original, r*(K+N) < K*N*(1 - min_saving); negative values allow a dearer pair (experiments).",
                   kind="float", low=-1.0, high=1.0, high_open=True)
LR_MIN_SIZE = Param("min_size", 4096, "Weights with fewer elements are left alone.", kind="int", low=1)
WHITEN = Param("whiten", "auto", "Whiten by the calibration activations before the SVD (ASVD / SVD-LLM): auto "
               "(when real calibration data is given), on, or off (plain SVD of the weight).", kind="str",
               choices=("auto", "on", "off"))
DAMP = Param("damp", 0.01, "Added to the Gram matrix's diagonal before the Cholesky factor, as a share of its "
             "mean diagonal (keeps directions the calibration data never excites).", kind="float", low=0.0,
             high=1.0, low_open=True)
LR_SAMPLES = Param("samples", 128, "Calibration samples whose activations form the Gram matrices.", kind="int", low=1)


@dataclass
class LowRankConfig:
    energy: float = ENERGY.field()
    target_ratio: float | None = TARGET_RATIO.field()
    rank: int | None = RANK.field()
    round_to: int = LR_ROUND_TO.field()
    min_saving: float = MIN_SAVING.field()
    min_size: int = LR_MIN_SIZE.field()
    whiten: str = WHITEN.field()
    damp: float = DAMP.field()
    samples: int = LR_SAMPLES.field()


_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


@dataclass
class Layer:
    """One factorizable node."""

    node: ir.Node
    kind: str                     # matmul | gemm | conv | attention
    x: ir.Value
    w: np.ndarray                 # effective weight [K, N], float64
    dtype: np.dtype               # the stored weight's dtype (factors are stored in it)
    key: tuple = ()               # its Gram matrix's key: (input name, layout)
    positions: float = 1.0        # rows of X per sample (MACs = params x positions)
    sv: np.ndarray | None = None  # singular values of the (whitened) weight
    U: np.ndarray | None = None
    Vt: np.ndarray | None = None
    L: np.ndarray | None = None   # Cholesky factor of the damped Gram matrix (None: plain SVD)
    rank: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return self.w.shape[0]

    @property
    def N(self) -> int:
        return self.w.shape[1]

    def ranks(self, round_to: int, min_saving: float) -> list[int]:
        """Ranks worth factorizing, ascending: multiples of ``round_to`` (and ``min(K, N)``)."""
        top = min(self.K, self.N)
        cands = sorted({min(top, r) for r in range(round_to, top + round_to, round_to)})
        return [r for r in cands if r * (self.K + self.N) < self.K * self.N * (1 - min_saving)]

    def tail(self, r: int) -> float:
        """Relative squared error of rank ``r`` (the share of the spectrum's energy dropped)."""
        e = self.sv ** 2
        return float(e[r:].sum() / max(e.sum(), 1e-300))


def _round_up(r: int, m: int, top: int) -> int:
    return min(top, int(math.ceil(r / m) * m))


def is_synthetic(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> bool:
    """Whether ``samples`` are the pipeline's random stand-in inputs (``data.random_samples``,
    seed 0), i.e. no calibration data was given: statistics of them describe noise."""
    if not samples:
        return True
    from ..data import input_specs, random_samples

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = random_samples(input_specs(model), 1)[0]
    except Exception:  # noqa: BLE001 - a model whose inputs cannot be synthesized: the data is real
        return False
    s = samples[0]
    return bool(ref) and all(k in s and np.shape(s[k]) == np.shape(v) and np.array_equal(s[k], v) for k, v in ref.items())


def candidates(model: ir.Model, config: LowRankConfig, scope, report) -> list[Layer]:
    """The main-graph nodes the pass may factorize; the others are named in ``report``."""
    out = []
    for node in model.graph:
        op, dom = node.op_type, node.domain
        ms = dom == "com.microsoft" and op == "Attention"
        if not (ms or (dom in ("", "ai.onnx") and op in ("MatMul", "Gemm", "Conv"))) or len(node.inputs) < 2:
            continue
        x, wv = node.inputs[0], node.inputs[1]
        w = _const(wv)
        if x is None or w is None:
            continue
        if scope.excludes(node):
            report.skip(node.name, "excluded by the user (scope)", grouped=True)
            continue
        if wv.dtype not in _FLOATS or w.dtype.kind != "f":
            report.skip(node.name, f"weight of type {wv.dtype} (only float weights are factorized)", grouped=True)
            continue
        if w.size < config.min_size:
            report.skip(node.name, f"weight under min_size ({config.min_size} elements)", grouped=True)
            continue
        w64 = w.astype(np.float64)
        if op == "MatMul" and not ms:
            if w.ndim != 2:
                report.skip(node.name, f"weight of rank {w.ndim} (a batched MatMul)", grouped=True)
                continue
            out.append(Layer(node, "matmul", x, w64, w.dtype, (x.name, "last")))
        elif op == "Gemm":
            if int(_attr(node, "transA", 0)):
                report.skip(node.name, "Gemm with transA=1", grouped=True)
                continue
            weff = (w64.T if int(_attr(node, "transB", 0)) else w64) * float(_attr(node, "alpha", 1.0))
            out.append(Layer(node, "gemm", x, weff, w.dtype, (x.name, "last")))
        elif op == "Conv":
            if int(_attr(node, "group", 1)) != 1:
                report.skip(node.name, "grouped Conv (only group=1 is factorized)", grouped=True)
                continue
            if w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
                report.skip(node.name, "k x k Conv (only 1x1 Conv is factorized)", grouped=True)
                continue
            wmat = w64.reshape(w.shape[0], w.shape[1]).T  # [C_in, C_out]
            strides = tuple(_attr(node, "strides", None) or ())
            out.append(Layer(node, "conv", x, wmat, w.dtype, (x.name, "channel", strides)))
        else:  # com.microsoft.Attention
            if w.ndim != 2 or len(node.inputs) < 3 or node.attributes.get("qkv_hidden_sizes") is not None:
                report.skip(node.name, "Attention without a packed [D, 3H] weight and bias", grouped=True)
                continue
            out.append(Layer(node, "attention", x, w64, w.dtype, (x.name, "last")))
    return out


def _rows(v: np.ndarray, key: tuple) -> np.ndarray | None:
    """The rows ``X`` [rows, K] a layer multiplies, from its recorded input."""
    if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.ndim < 1:
        return None
    if key[1] == "channel":
        if v.ndim < 3:
            return None
        strides = key[2]
        if strides and len(strides) == v.ndim - 2:
            v = v[(slice(None), slice(None), *(slice(None, None, int(s)) for s in strides))]
        v = np.moveaxis(v, 1, -1)
    return v.reshape(-1, v.shape[-1])


def gram_matrices(model: ir.Model, layers: list[Layer], samples: list[dict[str, np.ndarray]]):
    """``{key: (X^T X float64 [K, K], rows per sample)}`` over ``samples``, streamed (one sample's
    values of one chunk at a time: :func:`..quantize.calibrate.iter_outputs`)."""
    from .quantize.calibrate import iter_outputs

    keys = {ly.key: ly.K for ly in layers}
    grams: dict[tuple, np.ndarray] = {}
    rows: dict[tuple, int] = {}
    seen: dict[tuple, set] = {}
    inputs = {v.name for v in model.graph.inputs}
    by_name: dict[str, list[tuple]] = {}
    for k in keys:
        by_name.setdefault(k[0], []).append(k)

    def add(name: str, k: int, v) -> None:
        for key in by_name.get(name, ()):
            x = _rows(v, key)
            if x is None or x.shape[1] != keys[key]:
                continue
            x = x.astype(np.float64)
            grams[key] = grams.get(key, 0.0) + x.T @ x
            rows[key] = rows.get(key, 0) + x.shape[0]
            seen.setdefault(key, set()).add(k)

    for k, feed in enumerate(samples):
        for name in by_name:
            if name in inputs and name in feed:
                add(name, k, feed[name])
    inner = [n for n in by_name if n not in inputs]
    if inner:
        for k, outs in iter_outputs(model, inner, samples):
            for name, v in outs.items():
                add(name, k, v)
    return {key: (g, rows[key] / max(len(seen[key]), 1)) for key, g in grams.items()}


def decompose(layer: Layer, gram: np.ndarray | None, damp: float) -> str | None:
    """Fill ``layer.sv/U/Vt/L`` (whitened by ``gram`` when given). Returns a note when the
    whitening had to be dropped."""
    w = layer.w
    note = None
    layer.L = None
    m = w
    if gram is not None:
        mean = float(np.trace(gram)) / gram.shape[0]
        if mean > 0 and np.all(np.isfinite(gram)):
            d = damp
            for _ in range(4):
                try:
                    L = np.linalg.cholesky(gram + d * mean * np.eye(gram.shape[0]))
                    layer.L = L
                    m = L.T @ w
                    break
                except np.linalg.LinAlgError:
                    d *= 10
            else:
                note = "Gram matrix not positive definite: plain SVD"
        else:
            note = "inputs all zero or not finite on the calibration data: plain SVD"
    try:
        U, s, Vt = np.linalg.svd(m, full_matrices=False)
    except np.linalg.LinAlgError:
        return "the SVD did not converge"
    layer.U, layer.sv, layer.Vt = U, s, Vt
    return note


def factors(layer: Layer, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A [K, r], B [r, N])`` float64 with ``A B`` the best rank-``r`` approximation."""
    h = np.sqrt(layer.sv[:r])
    a = layer.U[:, :r] * h[None, :]
    if layer.L is not None:
        a = np.linalg.solve(layer.L.T, a)  # L^-T U_r S_r^1/2
    return a, h[:, None] * layer.Vt[:r]


def output_error(w: np.ndarray, a: np.ndarray, b: np.ndarray, gram: np.ndarray | None) -> float:
    """``||X W - X A B|| / ||X W||`` from the Gram matrix (``||W - A B|| / ||W||`` without one)."""
    e = w - a @ b
    if gram is None:
        return float(np.linalg.norm(e) / max(np.linalg.norm(w), 1e-300))
    num = float(np.einsum("ij,ij->", e, gram @ e))
    den = float(np.einsum("ij,ij->", w, gram @ w))
    return math.sqrt(max(num, 0.0) / max(den, 1e-300))


def allocate(layers: list[Layer], target: float, round_to: int, min_saving: float) -> tuple[dict[int, int], float]:
    """Greedy global rank allocation: ``{layer index: rank}`` removing at least ``target`` of the
    layers' MACs where possible, each step the one adding the least relative squared error per
    saved MAC. Returns the ranks and the share removed."""
    total = sum(ly.K * ly.N * ly.positions for ly in layers)
    need = target * total
    heap: list = []
    opts = [ly.ranks(round_to, min_saving) for ly in layers]
    for i, (ly, rs) in enumerate(zip(layers, opts)):
        if rs:  # first step: dense -> the largest rank worth factorizing
            save = (ly.K * ly.N - rs[-1] * (ly.K + ly.N)) * ly.positions
            heapq.heappush(heap, (ly.tail(rs[-1]) / max(save, 1e-300), i, len(rs) - 1, save))
    chosen: dict[int, int] = {}
    saved = 0.0
    while heap and saved < need:
        _, i, j, save = heapq.heappop(heap)
        ly, rs = layers[i], opts[i]
        chosen[i] = rs[j]
        saved += save
        if j > 0:
            nxt = (rs[j] - rs[j - 1]) * (ly.K + ly.N) * ly.positions
            derr = ly.tail(rs[j - 1]) - ly.tail(rs[j])
            heapq.heappush(heap, (derr / max(nxt, 1e-300), i, j - 1, nxt))
    return chosen, saved / max(total, 1e-300)


class LowRankPass(CompressionPass):
    """Low-rank factorization (see the module docstring). Parameters: :class:`LowRankConfig`;
    nodes in ``context.scope`` are left alone; calibration feeds come from ``context.calibration``.

    Report counts: ``mode``, ``whitened``, ``layers`` (per factorized node: K, N, rank,
    params and MACs before/after, relative output error on the calibration inputs, energy
    kept), and the totals over the factorizable layers (``macs_removed_pct`` among them)."""

    name = "low-rank"
    checked = False
    Config = LowRankConfig

    def apply(self, model: ir.Model) -> bool:
        c, rep = self.config, self.report
        layers = candidates(model, c, self.context.scope, rep)
        rep.flush()
        notes: list[str] = []
        mode = "rank" if c.rank is not None else "target_ratio" if c.target_ratio is not None else "energy"
        if c.rank is not None and c.target_ratio is not None:
            notes.append("rank given: target_ratio ignored")
        rep.counts.update(mode=mode, candidates=len(layers))
        if not layers:
            rep.counts["notes"] = notes
            return False
        calib = list(self.context.calibration)[: c.samples]
        synthetic = is_synthetic(model, calib)
        whiten = c.whiten == "on" or (c.whiten == "auto" and not synthetic)
        if whiten and not calib:
            whiten = False
        if not whiten:
            notes.append("plain SVD of the weights (no whitening): " + (
                "whiten = off" if c.whiten == "off" else "no calibration data given (random inputs describe noise)"))
        grams: dict = {}
        if calib:
            try:
                grams = gram_matrices(model, layers, calib if whiten else calib[:1])
            except Exception as exc:  # noqa: BLE001 - statistics only: plain SVD, said so
                notes.append(f"calibration activations not recorded ({type(exc).__name__}: {exc}); plain SVD")
                whiten, grams = False, {}
        for ly in layers:
            g = grams.get(ly.key)
            if g is not None:
                ly.positions = max(float(g[1]), 1.0)
            why = decompose(ly, g[0] if (whiten and g is not None) else None, c.damp)
            if why:
                notes.append(f"{ly.node.name}: {why}")
        layers = [ly for ly in layers if ly.sv is not None]
        ranks = self._choose(layers, c, rep, notes)
        taken = all_value_names(model)
        details = []
        tot = {"params_before": 0, "params_after": 0, "macs_before": 0, "macs_after": 0}
        for ly in layers:
            tot["params_before"] += ly.K * ly.N
            tot["macs_before"] += int(ly.K * ly.N * ly.positions)
        replaced: list[ir.Value] = []
        for i, ly in enumerate(layers):
            r = ranks.get(i)
            if r is None:
                tot["params_after"] += ly.K * ly.N
                tot["macs_after"] += int(ly.K * ly.N * ly.positions)
                continue
            a, b = factors(ly, r)
            g = grams.get(ly.key)
            err = output_error(ly.w, a, b, g[0] if g is not None and whiten else None)
            name = ly.node.name
            replaced.append(ly.node.inputs[1])
            _rewrite(model, ly, a, b, taken)
            p0, p1 = ly.K * ly.N, r * (ly.K + ly.N)
            tot["params_after"] += p1
            tot["macs_after"] += int(p1 * ly.positions)
            details.append({"node": name, "op": ly.node.op_type, "K": ly.K, "N": ly.N, "rank": r,
                            "params_before": p0, "params_after": p1, "macs_before": int(p0 * ly.positions),
                            "macs_after": int(p1 * ly.positions),
                            "rel_err" if whiten else "weight_rel_err": round(err, 5),
                            "energy_kept": round(1.0 - ly.tail(r), 5)})
        _drop_unused(model, replaced)  # the replaced weights, when nothing else reads them
        rep.counts.update(
            whitened=whiten, samples=len(calib) if whiten else 0, layers_factorized=len(details), layers=details,
            **tot, params_removed_pct=round(100.0 * (1 - tot["params_after"] / max(tot["params_before"], 1)), 2),
            macs_removed_pct=round(100.0 * (1 - tot["macs_after"] / max(tot["macs_before"], 1)), 2),
            mean_rel_err=round(float(np.mean([d.get("rel_err", d.get("weight_rel_err")) for d in details])), 5)
            if details else None,
            notes=notes)
        if details:
            model.graph.sort()
        return bool(details)

    def _choose(self, layers: list[Layer], c: LowRankConfig, rep, notes: list[str]) -> dict[int, int]:
        """``{layer index: rank}`` of the layers to factorize; the others are named in ``rep``."""
        out: dict[int, int] = {}
        if c.target_ratio is not None and c.rank is None:
            out, share = allocate(layers, c.target_ratio, c.round_to, c.min_saving)
            rep.counts["target_ratio"] = c.target_ratio
            if share + 1e-9 < c.target_ratio:
                notes.append(f"budget not reachable: at most {share:.1%} of the factorizable MACs can be removed "
                             f"with min_saving={c.min_saving:g} (asked {c.target_ratio:.0%})")
            elif share > max(c.target_ratio + 0.02, 1.5 * c.target_ratio):
                notes.append(f"removed {share:.1%} of the factorizable MACs, more than the {c.target_ratio:.0%} asked: "
                             "a layer's first step goes from dense to its largest rank that saves at least "
                             f"min_saving={c.min_saving:g} of it (round_to={c.round_to}), and these layers are few")
            for i, ly in enumerate(layers):
                if i not in out:
                    rep.skip(ly.node.name, "not needed for the budget (kept dense)", grouped=True)
            rep.flush()
            return out
        for i, ly in enumerate(layers):
            top = min(ly.K, ly.N)
            if c.rank is not None:
                r = _round_up(c.rank, c.round_to, top)
            else:
                e = np.cumsum(ly.sv ** 2)
                r0 = int(np.searchsorted(e / max(e[-1], 1e-300), c.energy - 1e-12) + 1)
                r = _round_up(min(r0, top), c.round_to, top)
            if r * (ly.K + ly.N) < ly.K * ly.N * (1 - c.min_saving):
                out[i] = r
            else:
                rep.skip(ly.node.name, f"rank {r} would not save min_saving={c.min_saving:g} of its {ly.K}x{ly.N} "
                         "weight", grouped=True)
        rep.flush()
        return out


def _rewrite(model: ir.Model, ly: Layer, a: np.ndarray, b: np.ndarray, taken: set[str]) -> None:
    """Replace ``ly.node`` by its factorized pair (see the module docstring)."""
    graph, node = model.graph, ly.node
    name, wname = node.name, node.inputs[1].name
    dt = ly.dtype
    mid = ir.Value(name=unique_name(f"{name}_lowrank", taken), type=ly.x.type)
    r = a.shape[1]
    if ly.kind == "conv":
        nd = node.inputs[1].const_value.numpy().ndim
        av = add_initializer(graph, a.T.reshape(r, ly.K, *([1] * (nd - 2))).astype(dt), f"{wname}_lowrank_a", taken)
        bv = add_initializer(graph, b.T.reshape(ly.N, r, *([1] * (nd - 2))).astype(dt), f"{wname}_lowrank_b", taken)
        keep = [at for k, at in node.attributes.items() if k in ("strides", "pads", "dilations", "auto_pad")]
        ks = [ir.AttrInt64s("kernel_shape", [1] * (nd - 2))]
        first = ir.Node("", "Conv", [ly.x, av], attributes=[*keep, *ks], outputs=[mid],
                        name=unique_name(f"{name}_lowrank_a", taken))
        out = ir.Value(name=unique_name(f"{name}_lowrank_out", taken))
        bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        second = ir.Node("", "Conv", [mid, bv, *bias], attributes=list(ks), outputs=[out],
                         name=unique_name(f"{name}_lowrank_b", taken))
    else:
        av = add_initializer(graph, np.ascontiguousarray(a.astype(dt)), f"{wname}_lowrank_a", taken)
        bv = add_initializer(graph, np.ascontiguousarray(b.astype(dt)), f"{wname}_lowrank_b", taken)
        first = ir.Node("", "MatMul", [ly.x, av], outputs=[mid], name=unique_name(f"{name}_lowrank_a", taken))
        if ly.kind == "attention":
            graph.insert_before(node, [first])
            node.replace_input_with(0, mid)
            node.replace_input_with(1, bv)
            return
        out = ir.Value(name=unique_name(f"{name}_lowrank_out", taken))
        if ly.kind == "matmul":
            second = ir.Node("", "MatMul", [mid, bv], outputs=[out], name=unique_name(f"{name}_lowrank_b", taken))
        else:  # gemm: alpha is in the factors; C and beta stay
            attrs = [ir.AttrFloat32("beta", float(_attr(node, "beta", 1.0)))]
            c_in = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
            second = ir.Node("", "Gemm", [mid, bv, *c_in], attributes=attrs, outputs=[out],
                             name=unique_name(f"{name}_lowrank_b", taken))
    graph.insert_before(node, [first, second])
    replace_node(graph, node, out)


def _drop_unused(model: ir.Model, values: list[ir.Value]) -> None:
    """Remove the replaced weights from the main graph's initializers when nothing reads them."""
    graph = model.graph
    keep = {id(v) for v in (*graph.outputs, *graph.inputs)}
    for v in values:
        if not v.uses() and id(v) not in keep and graph.initializers.get(v.name) is v:
            del graph.initializers[v.name]
