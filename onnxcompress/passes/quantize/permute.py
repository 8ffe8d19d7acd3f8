"""Channel permutation that makes saturation-free int8 weights as precise as plain 8-bit ones.

On x86 without VNNI the u8 x s8 kernels add two neighbouring products of the K dimension into a
saturating int16; :mod:`.params` keeps every same-sign neighbour pair within ``|q0| + |q1| <= 128``
(``pairs=``), which costs weight precision where two large same-sign weights of one output
channel sit next to each other in K (EfficientNet-Lite0: 39.2 dB weight SQNR against 41.1 dB for
plain 8-bit). Which input channels are neighbours is a choice the graph can make: renumbering the
channels of a tensor — the producing convolution's output rows and bias, every depthwise
convolution and channel-wise op on the way, the consuming convolutions' input columns — computes
exactly the same function (float sums in another order: outputs equal within 1e-4 relative). This
pass picks, per such *channel space*, a pairing of channels in which large same-sign weights of the
consumers rarely meet: a greedy matching on the summed squared excess ``max(|t_i| + |t_j| - 128,
0)^2`` over the consumers' output channels and kernel positions (``t`` = weight / 8-bit scale),
most constrained channel first. Measured on EfficientNet-Lite0's group=1 convolutions, the
pair-safe weight SQNR goes from 39.2 dB to 41.1 dB, i.e. that of unconstrained 8-bit weights.

A channel space is the set of NCHW tensors joined by channel-wise ops (activations, pooling,
depthwise convolutions, elementwise ``Add``/``Mul``/``Sub``/``Div`` of two activations — residual
connections — or with a single-value constant). It is left alone ("frozen") when any of its
tensors is a graph input or output, is read by anything else (``Concat``, ``Reshape``,
``Flatten``, ``Gemm``, a grouped convolution, a per-channel constant, a subgraph), or when a weight
it would permute is shared or not a constant initializer. Runs before static quantization, only
for targets whose policy is ``pair_safe`` (``avx2``, ``avx512``, ``generic``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...irutil import UnionFind
from ..base import CompressionPass
from .config import TargetConfig
from .policy import resolve_policy

#: ops whose output channel c depends only on input channel c (NCHW, channel axis 1)
CHANNELWISE = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Tanh", "Identity", "Elu",
               "Selu", "Softplus", "Softsign", "Mish", "Gelu", "MaxPool", "AveragePool", "GlobalAveragePool",
               "GlobalMaxPool", "LpPool"}
BINARY = {"Add", "Sub", "Mul", "Div"}
#: multiply-adds of :func:`pair_cost` per channel space beyond which the space is left as it is
#: (about 10 s here; EfficientNet-Lite0's largest space: 2e8)
MAX_COST_WORK = 2e9


class _Spaces:
    """Channel spaces: :class:`~onnxcompress.irutil.UnionFind` over value names; a blocked set is frozen."""

    def __init__(self):
        self.uf = UnionFind()
        self.ids: dict[str, int] = {}

    def find(self, a: str) -> int:
        if a not in self.ids:
            self.ids[a] = int(self.uf.new(1)[0])
        return self.uf.find(self.ids[a])

    def union(self, a: str, b: str) -> None:
        self.find(a), self.find(b)
        self.uf.union(self.ids[a], self.ids[b])

    def freeze(self, a: str) -> None:
        self.find(a)
        self.uf.block([self.ids[a]], "frozen")

    def is_frozen(self, root: int) -> bool:
        return self.uf.why(root) is not None


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _private_initializer(v: ir.Value | None) -> bool:
    """A constant initializer read by exactly one node (safe to rewrite in place)."""
    return v is not None and v.const_value is not None and v.is_initializer() and not v.is_graph_input() \
        and not v.is_graph_output() and len({u.node for u in v.uses()}) == 1


def pair_cost(ws: list[np.ndarray]) -> np.ndarray:
    """``[C, C]`` cost of making channels ``i`` and ``j`` K-neighbours in the consumers ``ws``
    (each ``[M, C, k...]``): the summed squared excess of same-sign pairs over 128 at 8-bit scales."""
    c = ws[0].shape[1]
    cost = np.zeros((c, c))
    for w in ws:
        m = w.shape[0]
        s = np.abs(w).reshape(m, -1).max(axis=1) / 127.0
        t = w.reshape(m, c, -1) / np.where(s > 0, s, 1.0)[:, None, None]        # [M, C, P]
        t = np.moveaxis(t, 1, -1).reshape(-1, c)                                  # rows (m, p) x C
        a = np.abs(t)
        for i in range(c):
            same = (t[:, i:i + 1] * t) > 0
            ex = np.maximum(a[:, i:i + 1] + a - 128.0, 0.0) * same
            cost[i] += np.einsum("rc,rc->c", ex, ex)
    return cost


def greedy_pairing(cost: np.ndarray) -> np.ndarray:
    """A channel order ``p`` (new channel ``j`` holds old channel ``p[j]``) whose neighbour
    pairs ``(p[2k], p[2k+1])`` have low ``cost``: most constrained channel first, each paired
    with its cheapest remaining partner."""
    c = cost.shape[0]
    cost = cost.copy()
    np.fill_diagonal(cost, np.inf)
    finite = np.where(np.isfinite(cost), cost, 0.0)
    order = np.argsort(-finite.sum(axis=1), kind="stable")
    left = np.ones(c, bool)
    out = []
    for i in order:
        if not left[i]:
            continue
        left[i] = False
        cands = np.flatnonzero(left)
        if cands.size == 0:
            out.append(int(i))
            break
        j = int(cands[np.argmin(cost[i, cands])])
        left[j] = False
        out += [int(i), j]
    return np.array(out, np.int64)


def _pair_safe_error(ws: list[np.ndarray]) -> float:
    """Squared weight error of the consumers quantized with saturation-free scales."""
    from . import params

    err = 0.0
    for w in ws:
        s = params.weight_params(w, 0, 127, (0, True))
        q = params.quantize_weight(w, s, 0, 127, (0, True))
        err += float(np.sum((q * s.reshape([-1] + [1] * (w.ndim - 1)).astype(np.float64) - w) ** 2))
    return err


class PairPermutePass(CompressionPass):
    """Renumber channels so saturation-free int8 weights lose (almost) nothing (module docstring).

    Parameters: :class:`.config.TargetConfig` (runs only where the target's policy is
    ``pair_safe``); nodes named in ``context.scope`` are left alone. Counts: ``spaces`` found, ``spaces_permuted``, ``consumers``,
    ``weight_sqnr_db_before`` / ``_after`` (pair-safe, over the permuted consumers).
    """

    name = "pair-permute"
    rtol = 1e-4
    Config = TargetConfig

    def apply(self, model: ir.Model) -> bool:
        policy = resolve_policy(self.config.target)
        if not policy.pair_safe:
            return False
        graph = model.graph
        excluded = self.context.scope.nodes
        sp = _Spaces()
        consumers: dict[str, list[ir.Node]] = {}
        producers: dict[str, list[ir.Node]] = {}
        depthwise: dict[str, list[ir.Node]] = {}
        for v in [*graph.inputs, *graph.outputs]:
            sp.freeze(v.name)
        for node in graph:
            ins = [v for v in node.inputs if v is not None and v.const_value is None]
            outs = [v for v in node.outputs if v is not None]
            for v in (*ins, *outs):
                sp.find(v.name)
                if any(u.node.graph is not graph for u in v.uses()):
                    sp.freeze(v.name)  # read inside a subgraph
            op = node.op_type if node.domain in ("", "ai.onnx") else None
            if op == "Conv" and len(node.inputs) > 1:
                w = _const(node.inputs[1])
                group = node.attributes.get_int("group", 1)
                b = node.inputs[2] if len(node.inputs) > 2 else None
                ok = (w is not None and w.ndim >= 3 and _private_initializer(node.inputs[1])
                      and (b is None or _private_initializer(b)) and node.name not in excluded)
                x, y = node.inputs[0], node.outputs[0]
                if ok and group > 1 and w.shape[1] == 1 and w.shape[0] == group:   # depthwise: one space
                    sp.union(x.name, y.name)
                    depthwise.setdefault(x.name, []).append(node)
                elif ok and group == 1:
                    consumers.setdefault(x.name, []).append(node)
                    producers.setdefault(y.name, []).append(node)
                else:  # every activation it touches (a computed weight too) keeps its order
                    for v in (*ins, *outs):
                        sp.freeze(v.name)
            elif op in CHANNELWISE and len(ins) == 1 and len(outs) == 1:
                sp.union(ins[0].name, outs[0].name)
            elif op in BINARY and len(outs) == 1:
                consts = [v for v in node.inputs if v is not None and v.const_value is not None]
                if any(c.const_value.size != 1 for c in consts) or len(ins) + len(consts) != 2:
                    for v in (*ins, *outs):
                        sp.freeze(v.name)
                    continue
                for v in ins:
                    sp.union(v.name, outs[0].name)
            else:
                for v in (*ins, *outs):
                    sp.freeze(v.name)
        # gather per space
        spaces: dict[int, dict[str, list]] = {}
        for kind, table in (("consumers", consumers), ("producers", producers), ("depthwise", depthwise)):
            for name, nodes in table.items():
                spaces.setdefault(sp.find(name), {"consumers": [], "producers": [], "depthwise": []})[kind] += nodes
        permuted = n_cons = too_large = 0
        e_before = e_after = energy = 0.0
        for root, s in spaces.items():
            if sp.is_frozen(root) or not s["consumers"] or not s["producers"]:
                continue
            cons = list(dict.fromkeys(s["consumers"]))
            ws = [_const(n.inputs[1]).astype(np.float64) for n in cons]
            chans = {w.shape[1] for w in ws} | {_const(n.inputs[1]).shape[0] for n in s["producers"]} \
                | {_const(n.inputs[1]).shape[0] for n in s["depthwise"]}
            if len(chans) != 1 or next(iter(chans)) < 4:
                continue
            c = next(iter(chans))
            if c % 2 and any(int(np.prod(w.shape[2:])) > 1 for w in ws):
                continue  # odd channels with kernel positions: the K pairs straddle positions
            work = sum(w.shape[0] * int(np.prod(w.shape[2:])) for w in ws) * c * c
            if work > MAX_COST_WORK:
                too_large += 1
                continue
            p = greedy_pairing(pair_cost(ws))
            before = _pair_safe_error(ws)
            after = _pair_safe_error([w[:, p] for w in ws])
            if not after < before:
                continue
            self._apply(cons, list(dict.fromkeys(s["producers"])), list(dict.fromkeys(s["depthwise"])), p)
            permuted += 1
            n_cons += len(cons)
            e_before += before
            e_after += after
            energy += sum(float(np.sum(w ** 2)) for w in ws)
        self.report.counts.update(spaces=len(spaces), spaces_permuted=permuted, consumers=n_cons)
        if too_large:
            self.report.counts["spaces_too_large"] = too_large
        if permuted:
            self.report.counts["weight_sqnr_db_before"] = round(float(10 * np.log10(energy / max(e_before, 1e-30))), 2)
            self.report.counts["weight_sqnr_db_after"] = round(float(10 * np.log10(energy / max(e_after, 1e-30))), 2)
        return bool(permuted)

    @staticmethod
    def _set(v: ir.Value, arr: np.ndarray) -> None:
        v.const_value = ir.tensor(np.ascontiguousarray(arr).astype(v.const_value.numpy().dtype), name=v.name)

    def _apply(self, cons, prods, dws, p: np.ndarray) -> None:
        for n in cons:
            self._set(n.inputs[1], _const(n.inputs[1])[:, p])
        for n in (*prods, *dws):
            self._set(n.inputs[1], _const(n.inputs[1])[p])
            b = n.inputs[2] if len(n.inputs) > 2 else None
            if b is not None:
                self._set(b, _const(b)[p])
