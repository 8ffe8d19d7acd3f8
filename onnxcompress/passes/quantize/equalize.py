"""Cross-layer equalization (CLE) of consecutive Conv / Gemm layers.

Nagel, van Baalen, Blankevoort, Welling 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction" (arXiv:1906.04721), sec. 4.1. For two layers
``y = W2 f(W1 x + b1) + b2`` where ``f`` is positive-scale-equivariant per channel
(``f(s x) = s f(x)`` for ``s > 0``: Relu, LeakyRelu, PRelu, a ``Clip`` with only a lower bound
of 0, MaxPool, AveragePool, GlobalAverage/MaxPool, no activation at all), the intermediate
channel ``i`` may be divided by any ``s_i > 0`` in ``W1``/``b1`` and multiplied back in the
matching input channel of ``W2`` without changing the function. With ``r1_i`` the range
(max |w|) of output channel ``i`` of ``W1`` and ``r2_i`` that of input channel ``i`` of ``W2``,

    s_i = sqrt(r1_i * r2_i) / r2_i

makes both ranges ``sqrt(r1_i r2_i)``: per-tensor int8 weights then lose no channel to a
large neighbour (depthwise convolutions after BatchNorm folding are the classic victims).
Chains (``Conv -> Conv -> Conv``) are equalized pair by pair, a few sweeps until the scales
settle. The rewrite is exact in real arithmetic; in float32 outputs move by rounding only
(the pass is ``checked``: beyond 1e-4 relative the runner reverts it).

Pairs found: ``Conv -> [f] -> Conv`` (any ``group`` in either, so depthwise -> pointwise and
pointwise -> depthwise, channels mapped through the groups), ``Conv -> [f] -> Flatten(axis=1)
-> Gemm`` (each channel maps to a block of ``K / C`` Gemm inputs) and ``Gemm -> [f] -> Gemm``.
Skipped, with the reason and the node names in the report: an intermediate op that is not
scale-equivariant (``Clip`` with an upper bound / ReLU6, HardSwish, HardSigmoid, Sigmoid, SiLU
``x * sigmoid(x)``, BatchNormalization, ...), an intermediate tensor with other consumers or
that is a graph output, weights that are not float32 constant initializers or are graph
inputs, ``Gemm`` with ``transA=1``, nodes excluded by the user. Weights shared with other
nodes are cloned first so no other consumer changes. High-bias absorption (sec. 4.1.2) is
not done.

Decision (``mode="auto"``): the pass computes the equalized weights, then for every pair the
SQNR (dB) of ``W2 W1`` with both weights rounded to int8 as the run will round them
(per-channel or per-tensor, saturation-free scales on x86 without VNNI, :mod:`.policy`), measured in the *original*
coordinates (the equalized int8 weights scaled back, so before and after are the same
function) under a white-input model that weighs each channel's error by its effect on the
output (:meth:`CrossLayerEqualizationPass._pair_sqnr`). It keeps the rewrite only if the mean
over pairs improves by at least ``min_gain_db`` (:data:`MIN_GAIN_DB`: 0.1 dB per-tensor,
1 dB per-channel); otherwise the model is left
untouched and the report says so. With per-channel weights (the default) CLE cannot help the
first layer of a pair and often hurts the second; with per-tensor weights it is the cure.
Activation ranges are not part of the decision (CLE shrinks some intermediate channels;
the fidelity gates still judge the result). ``mode="on"`` keeps every equalization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..base import CompressionPass
from ...irutil import add_initializer, all_value_names, attr as _attr
from . import params
from .config import EqualizeConfig
from .policy import resolve_policy

logger = logging.getLogger("onnxcompress")

LAYERS = ("Conv", "Gemm")
#: estimated gain (dB) ``auto`` needs to keep CLE. With per-channel weights the estimate did
#: not predict the measured output SQNR (EfficientNet-Lite0 +0.47 dB estimated, -0.3 dB
#: measured and 99.0 -> 98.1 % decisive top-1; PP-OCR cls +0.32 estimated, +2.9 measured),
#: so only a clear estimated gain counts there; per-tensor gains were large and predicted.
MIN_GAIN_DB = {"per-channel": 1.0, "per-tensor": 0.1}
#: intermediate ops with f(s x) = s f(x) per channel for s > 0 (checked further in _equivariant)
EQUIVARIANT = ("Relu", "LeakyRelu", "PRelu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
               "GlobalMaxPool", "Flatten")
#: op types named in skip reasons as not scale-equivariant
NOT_EQUIVARIANT = {
    "Clip": "Clip with an upper bound (ReLU6) is not scale-equivariant",
    "HardSwish": "HardSwish is not scale-equivariant", "HardSigmoid": "HardSigmoid is not scale-equivariant",
    "Sigmoid": "Sigmoid is not scale-equivariant", "Tanh": "Tanh is not scale-equivariant",
    "Elu": "Elu is not scale-equivariant", "Selu": "Selu is not scale-equivariant",
    "Gelu": "Gelu is not scale-equivariant", "Softplus": "Softplus is not scale-equivariant",
    "Mish": "Mish is not scale-equivariant", "BatchNormalization":
        "BatchNormalization between the layers (an affine shift; fold it first: fusion does)",
}
MAX_SWEEPS = 20
#: scales are kept within [1/S_LIMIT, S_LIMIT] so float32 weights never approach subnormals
S_LIMIT = 1e6
#: SQNR (dB) reported for exactly representable weights (keeps means finite)
SQNR_CAP = 300.0
#: a channel whose range is below DEAD x the tensor's largest is dead: left alone, not in ratios
DEAD = 1e-6


def _const_f32(v: ir.Value | None) -> bool:
    return (v is not None and v.const_value is not None and v.is_initializer() and not v.is_graph_input()
            and v.dtype == ir.DataType.FLOAT)


@dataclass
class _Pair:
    """Two layers sharing intermediate channels: ``n1`` (producer) and ``n2`` (consumer).

    ``block``: Gemm inputs per intermediate channel (``K / C`` after a Flatten, else 1).
    """

    n1: ir.Node
    n2: ir.Node
    path: list[ir.Node]
    block: int = 1
    scale: np.ndarray | None = None  # accumulated s (float64, [C])
    stats: dict = field(default_factory=dict)


# -- weight layout helpers (numpy, float64) ---------------------------------------------
def out_axis(node: ir.Node) -> int:
    """Output-channel axis of a Conv ([Cout, Cin/g, k...]: 0) or Gemm B (transB=1: 0, else 1)."""
    if node.op_type == "Conv":
        return 0
    return 0 if _attr(node, "transB", 0) else 1


def out_ranges(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """max |w| per output channel, float64 ``[Cout]``."""
    ax = out_axis(node)
    return np.abs(np.moveaxis(w, ax, 0)).reshape(w.shape[ax], -1).max(1)


def out_sumsq(node: ir.Node, a: np.ndarray) -> np.ndarray:
    """sum of ``a**2`` per output channel, float64 ``[Cout]``."""
    ax = out_axis(node)
    return (np.moveaxis(a, ax, 0).reshape(a.shape[ax], -1) ** 2).sum(1)


def scale_out(node: ir.Node, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``w`` with output channel ``i`` multiplied by ``f[i]``."""
    ax = out_axis(node)
    return w * f.reshape([-1 if k == ax else 1 for k in range(w.ndim)])


def in_channels(node: ir.Node, w: np.ndarray, block: int) -> int:
    """Number of intermediate channels the layer reads (Conv: ``group * Cin/g``; Gemm: ``K / block``)."""
    if node.op_type == "Conv":
        return int(_attr(node, "group", 1)) * w.shape[1]
    k = w.shape[1] if _attr(node, "transB", 0) else w.shape[0]
    return k // block


def in_ranges(node: ir.Node, w: np.ndarray, block: int, reduce=np.max, a: np.ndarray | None = None) -> np.ndarray:
    """max |w| (or ``reduce`` of ``a``, default |w|) over everything input channel ``c``
    multiplies, float64 ``[C]``.

    Conv with ``group`` g: input channel ``c`` is column ``c % (Cin/g)`` of the ``Cout/g`` rows
    of group ``c // (Cin/g)``. Gemm: column block ``c*block:(c+1)*block`` of the K axis.
    """
    a = np.abs(w) if a is None else a
    if node.op_type == "Conv":
        g = int(_attr(node, "group", 1))
        cout, cpg = w.shape[0], w.shape[1]
        per = reduce(a.reshape(cout, cpg, -1), axis=2)  # [Cout, Cin/g]
        return reduce(per.reshape(g, cout // g, cpg), axis=1).reshape(-1)
    per_k = reduce(a, axis=0) if _attr(node, "transB", 0) else reduce(a, axis=1)  # [K]
    return reduce(per_k.reshape(-1, block), axis=1)


def scale_in(node: ir.Node, w: np.ndarray, f: np.ndarray, block: int) -> np.ndarray:
    """``w`` with every weight reading input channel ``c`` multiplied by ``f[c]``."""
    if node.op_type == "Conv":
        g = int(_attr(node, "group", 1))
        cout, cpg = w.shape[0], w.shape[1]
        full = np.broadcast_to(f.reshape(g, 1, cpg), (g, cout // g, cpg)).reshape(cout, cpg)
        return w * full.reshape(cout, cpg, *([1] * (w.ndim - 2)))
    fk = np.repeat(f, block)
    return w * (fk.reshape(1, -1) if _attr(node, "transB", 0) else fk.reshape(-1, 1))


def _ratio(r: np.ndarray) -> float:
    """max / min of the live channel ranges (see ``DEAD``; 1 when fewer than two)."""
    nz = r[r > max(params.TINY, DEAD * float(r.max(initial=0.0)))]
    return float(nz.max() / nz.min()) if nz.size > 1 else 1.0


class CrossLayerEqualizationPass(CompressionPass):
    """Cross-layer equalization (see module docstring; Nagel et al. 2019, sec. 4.1).

    Parameters: :class:`.config.EqualizeConfig` (``mode``: ``"auto"`` keep only if the weight SQNR
    improves, ``"on"`` always; ``per_channel`` and ``target`` describe the quantization the
    decision assumes; ``min_gain_db``, default :data:`MIN_GAIN_DB`). ``context.scope`` is left alone.

    Report counts: ``pairs_equalized`` (int), ``pairs`` (``[{"first", "second", "via",
    "w1_range_ratio": [before, after], "w2_range_ratio": [before, after]}]``, ratios = max/min
    of per-channel max |w|; ``"sqnr_db": [before, after]``), ``pair_sqnr_db_before`` / ``_after``
    (mean over pairs, dB, see :meth:`_pair_sqnr`), ``decision`` (a sentence), ``sweeps``,
    ``shared_weights_cloned``.
    """

    name = "cross-layer-equalization"
    checked = True
    Config = EqualizeConfig

    def apply(self, model: ir.Model) -> bool:
        c = self.config
        mode = c.mode
        graph = model.graph
        pairs = self._find_pairs(graph, self.context.scope.nodes, self.context.scope.op_types)
        self.report.counts["pairs_found"] = len(pairs)
        if not pairs:
            self.report.counts["decision"] = "no equalizable Conv/Gemm pairs: nothing to do"
            return False

        # current (float64) weights and biases of every node involved
        nodes = {id(n): n for p in pairs for n in (p.n1, p.n2)}
        w = {k: n.inputs[1].const_value.numpy().astype(np.float64) for k, n in nodes.items()}
        w0 = {k: v.copy() for k, v in w.items()}
        b = {}
        for p in pairs:
            bv = p.n1.inputs[2] if len(p.n1.inputs) > 2 else None
            if bv is not None:
                b[id(p.n1)] = bv.const_value.numpy().astype(np.float64)
        for p in pairs:
            p.scale = np.ones(in_channels(p.n2, w[id(p.n2)], p.block))
            p.stats["w1_range_ratio"] = [_ratio(out_ranges(p.n1, w[id(p.n1)]))]
            p.stats["w2_range_ratio"] = [_ratio(in_ranges(p.n2, w[id(p.n2)], p.block))]

        sweeps = 0
        for sweeps in range(1, MAX_SWEEPS + 1):
            worst = 0.0
            for p in pairs:
                k1, k2 = id(p.n1), id(p.n2)
                r1 = out_ranges(p.n1, w[k1])
                r2 = in_ranges(p.n2, w[k2], p.block)
                ok = (r1 > DEAD * r1.max()) & (r2 > DEAD * r2.max())  # dead channels keep s = 1
                s = np.ones_like(r1)
                s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
                s = np.clip(s, 1.0 / S_LIMIT, S_LIMIT)
                w[k1] = scale_out(p.n1, w[k1], 1.0 / s)
                if k1 in b:
                    b[k1] = self._scale_bias(p.n1, b[k1], 1.0 / s)
                w[k2] = scale_in(p.n2, w[k2], s, p.block)
                p.scale = p.scale * s
                worst = max(worst, float(np.max(np.abs(np.log(s)))))
            if worst < 1e-4:
                break
        self.report.counts["sweeps"] = sweeps
        for p in pairs:
            p.stats["w1_range_ratio"].append(_ratio(out_ranges(p.n1, w[id(p.n1)])))
            p.stats["w2_range_ratio"].append(_ratio(in_ranges(p.n2, w[id(p.n2)], p.block)))

        # decision: output-referred int8 weight noise of every pair, in original coordinates
        before, after = self._pair_sqnr(pairs, nodes, w0, w)
        mb, ma = float(np.mean(before)), float(np.mean(after))
        self.report.counts.update(
            pairs_equalized=0,
            pairs=[{"first": p.n1.name, "second": p.n2.name, "via": [n.op_type for n in p.path],
                    "w1_range_ratio": [round(x, 3) for x in p.stats["w1_range_ratio"]],
                    "w2_range_ratio": [round(x, 3) for x in p.stats["w2_range_ratio"]],
                    "sqnr_db": [round(x0, 2), round(x1, 2)]} for p, x0, x1 in zip(pairs, before, after)],
            pair_sqnr_db_before=round(mb, 2), pair_sqnr_db_after=round(ma, 2))
        gain = ma - mb
        quant = "per-channel" if c.per_channel else "per-tensor"
        min_gain = MIN_GAIN_DB[quant] if c.min_gain_db is None else c.min_gain_db
        if mode == "auto" and gain < min_gain:
            self.report.counts["decision"] = (
                f"reverted: mean {quant} int8 weight SQNR of {len(pairs)} pair(s) "
                f"{mb:.2f} -> {ma:.2f} dB (gain {gain:+.2f} dB < {min_gain:g} dB)")
            logger.info("%s: %s", self.name, self.report.counts["decision"])
            return False
        self.report.counts["decision"] = (
            f"{'kept' if mode == 'auto' else 'forced on'}: mean {quant} int8 weight SQNR of {len(pairs)} "
            f"pair(s) {mb:.2f} -> {ma:.2f} dB ({gain:+.2f} dB)")
        self._write(graph, model, pairs, nodes, w, b)
        self.report.counts["pairs_equalized"] = len(pairs)
        return True

    # -- search ------------------------------------------------------------------------
    def _skip(self, node: str, reason: str) -> None:
        # a CLE skip is informational (most graphs have many): no warning on the console
        self.report.skipped.append({"node": node, "reason": reason})
        logger.debug("%s: skipped '%s': %s", self.name, node, reason)

    def _find_pairs(self, graph: ir.Graph, excl_nodes: set, excl_ops: set) -> list[_Pair]:
        pairs = []
        for n1 in graph:
            if n1.op_type not in LAYERS or n1.domain not in ("", "ai.onnx"):
                continue
            found = self._follow(n1)
            if found is None:
                continue
            n2, path, why = found
            label = f"{n1.name} -> {n2.name}" if n2 is not None else n1.name
            if why:
                self._skip(label, why)
                continue
            why = self._check_pair(n1, n2, path, excl_nodes, excl_ops)
            if isinstance(why, str):
                self._skip(label, why)
                continue
            pairs.append(_Pair(n1, n2, path, block=why))
        return pairs

    def _follow(self, n1: ir.Node):
        """Walk from ``n1``'s output through single-consumer ops to the next Conv/Gemm.

        Returns ``None`` when no Conv/Gemm follows (nothing to report), else ``(n2, path,
        reason)`` where ``reason`` is ``""`` for a candidate pair.
        """
        path: list[ir.Node] = []
        v = n1.outputs[0]
        for _ in range(8):
            uses = v.uses()
            consumers = {u.node for u in uses}
            if v.is_graph_output():
                return (None, path, f"'{v.name}' is a graph output") if self._conv_after(consumers) else None
            if not uses:
                return None
            if len(consumers) > 1 or len(uses) > 1:
                ops = sorted(u.node.op_type for u in uses)
                if ops == ["Mul", "Sigmoid"]:
                    return None, path, f"SiLU/Swish (x * sigmoid(x)) after '{(path[-1] if path else n1).name}' is not scale-equivariant"
                if not self._conv_after(consumers):
                    return None
                return None, path, (f"'{v.name}' has {len(uses)} consumers ({', '.join(ops)}); equalizing would "
                                    "change the others")
            nxt = uses[0].node
            if uses[0].idx != 0:
                return None
            if nxt.op_type in LAYERS and nxt.domain in ("", "ai.onnx"):
                return nxt, path, ""
            reason = self._equivariant(nxt)
            if reason:
                return (None, path, f"'{nxt.name}': {reason}") if self._conv_after({nxt}) else None
            if any(o.uses() for o in nxt.outputs[1:]):
                return None
            path.append(nxt)
            v = nxt.outputs[0]
        return None

    @staticmethod
    def _conv_after(consumers, depth: int = 3) -> bool:
        """Whether a Conv/Gemm is reached from ``consumers`` within ``depth`` single steps (to
        report only skips that concern a real layer pair)."""
        frontier = set(consumers)
        for _ in range(depth):
            if any(n.op_type in LAYERS for n in frontier):
                return True
            frontier = {u.node for n in frontier for o in n.outputs for u in o.uses()}
        return any(n.op_type in LAYERS for n in frontier)

    @staticmethod
    def _equivariant(node: ir.Node) -> str:
        """``""`` when ``node`` commutes with a positive per-channel scale, else the reason."""
        if node.domain not in ("", "ai.onnx"):
            return f"custom op {node.domain}.{node.op_type} is not known to be scale-equivariant"
        op = node.op_type
        if op == "Clip":
            lo = hi = None
            if "min" in node.attributes:
                lo = float(node.attributes["min"].value)
            if "max" in node.attributes:
                hi = float(node.attributes["max"].value)
            for idx in (1, 2):
                if len(node.inputs) > idx and node.inputs[idx] is not None:
                    c = node.inputs[idx].const_value
                    if c is None:
                        return "Clip with a non-constant bound is not scale-equivariant"
                    val = float(c.numpy())
                    lo, hi = (val, hi) if idx == 1 else (lo, val)
            if hi is not None and np.isfinite(hi):
                return NOT_EQUIVARIANT["Clip"] + f" (max {hi:g})"
            if lo is not None and lo != 0.0 and np.isfinite(lo):
                return f"Clip with a non-zero lower bound ({lo:g}) is not scale-equivariant"
            return ""  # Clip(min=0) is a Relu, Clip() is the identity
        if op == "Flatten":
            return "" if int(_attr(node, "axis", 1)) == 1 else "Flatten with axis != 1 mixes channels"
        if op in EQUIVARIANT:
            return ""
        if op in ("Add", "Sub", "Mul", "Div", "Concat", "Sum", "Max", "Min") and sum(
                1 for v in node.inputs if v is not None and v.const_value is None) > 1:
            return f"{op} joins another branch (residual/concat): scaling one side changes the result"
        return NOT_EQUIVARIANT.get(op, f"{op} is not known to be scale-equivariant")

    def _check_pair(self, n1, n2, path, excl_nodes, excl_ops):
        """The Gemm block size (int) for a valid pair, or the reason (str) it is not one."""
        for n in (n1, n2):
            if n.name in excl_nodes or n.op_type in excl_ops:
                return f"'{n.name}' excluded by the user"
            if not _const_f32(n.inputs[1] if len(n.inputs) > 1 else None):
                return f"weight of '{n.name}' is not a float32 constant initializer (or is a graph input)"
            if n.op_type == "Gemm" and _attr(n, "transA", 0):
                return f"Gemm '{n.name}' has transA=1"
        bv = n1.inputs[2] if len(n1.inputs) > 2 else None
        if bv is not None and not _const_f32(bv):
            return f"bias of '{n1.name}' is not a float32 constant initializer"
        w1 = n1.inputs[1].const_value.numpy()
        w2 = n2.inputs[1].const_value.numpy()
        if n1.inputs[1] is n2.inputs[1]:
            return f"'{n1.name}' and '{n2.name}' use the same weight tensor"
        c = w1.shape[out_axis(n1)]
        flat = [n for n in path if n.op_type == "Flatten"]
        if n1.op_type == "Gemm" and n2.op_type != "Gemm":
            return "Gemm followed by Conv"
        if n2.op_type == "Conv":
            if flat:
                return "Flatten between two Conv layers"
            if in_channels(n2, w2, 1) != c:
                return f"channel count mismatch ({c} vs {in_channels(n2, w2, 1)})"
            return 1
        k = w2.shape[1] if _attr(n2, "transB", 0) else w2.shape[0]
        if n1.op_type == "Conv" and not flat:
            return "Conv output reaches Gemm without a Flatten"
        if k % c:
            return f"Gemm K={k} is not a multiple of the {c} channels of '{n1.name}'"
        if n1.op_type == "Gemm" and k != c:
            return f"channel count mismatch ({c} vs {k})"
        if bv is not None and n1.op_type == "Gemm":
            cb = bv.const_value.numpy()
            if cb.ndim > 2 or (cb.ndim >= 1 and cb.shape[-1] not in (1, c)):
                return f"Gemm C of '{n1.name}' with shape {list(cb.shape)} is not per-column"
        return k // c

    # -- rewriting ---------------------------------------------------------------------
    @staticmethod
    def _scale_bias(node: ir.Node, bias: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Bias (Conv B [C]; Gemm C broadcast to its last axis) times ``f`` per channel."""
        if node.op_type == "Gemm" and (bias.ndim == 0 or bias.shape[-1] == 1):
            bias = np.broadcast_to(bias, (*bias.shape[:-1], f.size) if bias.ndim else (f.size,))
        return bias * f

    def _pair_sqnr(self, pairs, nodes, w0, w):
        """Per pair: SQNR (dB) of ``W2 W1`` when both weights are int8, before / after CLE.

        Data-free, white-input model of the pair ``y = W2 f(W1 x)`` in the *original*
        coordinates (the equalized int8 weights scaled back, so before and after describe the
        same function): with ``a_i = ||W1 row i||^2`` (the energy of channel ``i``),
        ``b_i = ||W2 weights reading i||^2`` and ``e1_i``, ``e2_i`` the same sums over the
        rounding errors, ``SQNR = 10 log10(sum a_i b_i / sum (e1_i b_i + a_i e2_i))``. The error
        of a small channel counts as much as its effect on the output (unlike a whole-tensor
        weight SQNR, which a large channel dominates). Quantization as the run will do it:
        per-channel or per-tensor, saturation-free scales by target (:mod:`.policy`).
        """
        policy = resolve_policy(self.config.target)
        per_channel = self.config.per_channel
        out_s = {k: np.ones(w0[k].shape[out_axis(n)]) for k, n in nodes.items()}  # eq = orig / out_s (rows)
        in_s = {}  # eq = orig * in_s (input channels), with the pair's block
        for p in pairs:
            out_s[id(p.n1)] = p.scale
            in_s[id(p.n2)] = (p.scale, p.block)
        err0, err1 = {}, {}
        for k, n in nodes.items():
            g = int(_attr(n, "group", 1)) if n.op_type == "Conv" else 1
            depthwise = n.op_type == "Conv" and g > 1 and w0[k].shape[1] == 1 and w0[k].shape[0] == g
            qmax = policy.weight_qmax(n.op_type, depthwise)
            axis = out_axis(n) if per_channel else None
            wpairs = policy.weight_pairs(n.op_type, depthwise, out_axis(n))  # int8 neighbour pairs

            def fq(a):
                a = a.astype(np.float32).astype(np.float64)
                s = params.weight_params(a, axis, qmax, wpairs).astype(np.float64)
                sb = s if axis is None else s.reshape([-1 if i == axis else 1 for i in range(a.ndim)])
                return params.quantize_weight(a, s, axis, qmax, wpairs).astype(np.float64) * sb

            err0[k] = w0[k] - fq(w0[k])
            back = scale_out(n, fq(w[k]), out_s[k])
            if k in in_s:
                back = scale_in(n, back, 1.0 / in_s[k][0], in_s[k][1])
            err1[k] = w0[k] - back
        before, after = [], []
        for p in pairs:
            k1, k2 = id(p.n1), id(p.n2)
            a = out_sumsq(p.n1, w0[k1])
            bb = in_ranges(p.n2, w0[k2], p.block, np.sum, w0[k2] ** 2)
            sig = float(np.sum(a * bb))
            for err, into in ((err0, before), (err1, after)):
                e1 = out_sumsq(p.n1, err[k1])
                e2 = in_ranges(p.n2, w0[k2], p.block, np.sum, err[k2] ** 2)
                noise = float(np.sum(e1 * bb + a * e2))
                into.append(min(10 * np.log10(sig / noise), SQNR_CAP) if noise > 0 else SQNR_CAP)
        return before, after

    def _write(self, graph, model, pairs, nodes, w, b) -> None:
        taken = all_value_names(model)
        cloned = 0

        def put(node: ir.Node, idx: int, arr: np.ndarray) -> None:
            nonlocal cloned
            v = node.inputs[idx]
            arr = arr.astype(np.float32)
            shared = len(v.uses()) > 1 or v.is_graph_output()
            if shared or tuple(arr.shape) != tuple(v.const_value.shape):
                cloned += int(shared)
                node.replace_input_with(idx, add_initializer(graph, arr, f"{v.name}_cle", taken))
            else:
                v.const_value = ir.tensor(arr, name=v.name)

        for k, n in nodes.items():
            put(n, 1, w[k])
        for p in pairs:
            if id(p.n1) in b:
                put(p.n1, 2, b[id(p.n1)])
        self.report.counts["shared_weights_cloned"] = cloned
