"""Structured (channel) pruning on the ONNX graph, with dependency groups.

The idea is Torch-Pruning's DepGraph (Fang et al. 2023), built on onnx-ir def-use edges
instead of PyTorch modules. Every output channel of a prunable layer (Conv / ConvTranspose
with ``group=1``, Gemm, MatMul with a constant 2-D weight) gets a *channel id*. Ids are
propagated forward through the graph: each tracked value carries one id per position of its
channel axis. Ops that keep channels (BatchNormalization, elementwise activations, pools,
Resize, depthwise Conv, constant per-channel Add/Mul/Sub/Div) pass them on; ``Concat`` on the
channel axis concatenates them (offset mapping); ``Split`` / ``Slice`` select them;
Flatten / Reshape ``[N,C,H,W] -> [N,C*H*W]`` repeat each id over its feature block; ``Add`` /
``Mul`` of two tracked values (residual branches, x*sigmoid(x), squeeze-excitation) *unite*
the ids position by position (union-find). A consumer (Conv/Gemm/MatMul) only slices its
input channels.

A *group* is a set of layers whose channels are united; removing channel class k removes the
matching slice from every member: weights, biases, BN statistics, per-channel constants, the
consumers' input channels. A channel id that reaches a graph output, an op that is not
understood, an outer-scope use in a subgraph or a protected node is *blocked*, and its whole
group stays untouched and is named in the report (never mangled).

Removing a channel is exactly equivalent to forcing that channel's activation to zero where it
enters its consumers (tests check this within 1e-5). Accuracy is then repaired without training
by :mod:`.prune_repair` (least-squares re-fit of the consumers on calibration activations).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..irutil import UnionFind as _UF, all_value_names, attr as _attr, const_array as _const, set_input_array as _set_input_array, subgraphs, unique_name
from ..runtime import run_with_outputs  # noqa: F401 - re-exported (prune_repair, tests)
from ..params import Param
from .base import CompressionPass, snapshot

logger = logging.getLogger("onnxcompress")

UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Elu", "Selu", "Softplus",
         "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Identity", "Dropout",
         "Celu", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sin", "Cos", "Not", "Sign", "Cast", "Swish"}
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize",
           "Upsample", "SpaceToDepth_never"}
BINARY = {"Add", "Mul", "Sub", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
ROOT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
IMPORTANCE = ("l2", "l1", "bn", "activation")

RATIO = Param("ratio", 0.3, "Share of channels removed per dependency group.", kind="float", low=0.0, high=1.0,
              high_open=True, search=(0.1, 0.6))
RATIOS = Param("ratios", {}, "Per-layer ratios NODE = RATIO overriding ratio (the node's dependency group).",
               kind="ratios", flag="--prune-ratio")
CHANNEL_SCOPE = Param("scope", "layer", "layer (each group loses ratio of its channels) or global (one normalised "
                      "ranking).", kind="str", choices=("layer", "global"), flag="--prune-channel-scope",
                      search=("layer", "global"))
IMPORTANCE_P = Param("importance", "l2", "Channel importance: l2, l1, bn (BatchNorm gamma) or activation "
                     "(calibration data).", kind="str", choices=IMPORTANCE, flag="--prune-importance",
                     search=IMPORTANCE)
ROUND_TO = Param("round_to", 1, "Kept channels rounded up to a multiple of this (4/8/16 keep kernels fast).",
                 kind="int", low=1, flag="--prune-round-to", search=(1, 4, 8, 16))
REPAIR = Param("repair", True, "Least-squares re-fit of the next layers on calibration data.", kind="bool",
               flag="--prune-repair/--no-prune-repair")
PROTECT = Param("protect", (), "Nodes whose channels are never pruned.", kind="strlist", flag="--prune-protect")
REPAIR_SAMPLES = Param("repair_samples", 64, "Calibration samples used for activation importance and repair.",
                       kind="int", low=1)
MAX_RATIO = Param("max_ratio", 0.9, "Cap on the share removed from any one group.", kind="float", low=0.0,
                  high=1.0, high_open=True)


@dataclass
class ChannelPruneConfig:
    ratio: float = RATIO.field()
    ratios: dict = RATIOS.field()
    scope: str = CHANNEL_SCOPE.field()
    importance: str = IMPORTANCE_P.field()
    round_to: int = ROUND_TO.field()
    repair: bool = REPAIR.field()
    protect: tuple = PROTECT.field()
    repair_samples: int = REPAIR_SAMPLES.field()
    max_ratio: float = MAX_RATIO.field()


@dataclass
class Tracked:
    """Channel ids of a value: ``ids[i]`` labels position ``i`` of axis ``axis`` (negative: from the end)."""

    ids: np.ndarray
    axis: int  # negative axis
    rank: int


@dataclass
class Action:
    """One edit to apply once the kept channels are known."""

    kind: str  # root | sink | depthwise | bn | const | split | slice | reshape
    node: ir.Node
    ids: np.ndarray  # the ids whose keep mask drives the edit
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    roots: list[ir.Node]
    classes: list[int]  # union-find roots, in the order of the first root's channels
    blocked: str | None = None


def value_shapes(model: ir.Model) -> dict[str, tuple]:
    """Static shape knowledge per value name (ints, or None for unknown dims), via onnx shape inference."""
    import onnx

    from ..model_io import skeleton

    proto, _ = skeleton(model)  # shapes need no weight values: the large ones stay where they are
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        pass
    out: dict[str, tuple] = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in proto.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


class DependencyGraph:
    """Channel ids propagated over the main graph; see the module docstring.

    Args:
        model: the model (not modified).
        concrete_shapes: value name -> actual shape on one sample (for Flatten/Reshape blocks
            and ranks where shape inference does not know them).
        protected: node names whose channels must not change.
    """

    def __init__(self, model: ir.Model, concrete_shapes: dict[str, tuple] | None = None,
                 protected: set[str] | frozenset = frozenset(), min_channels: int = 1) -> None:
        self.model = model
        self.uf = _UF()
        self.tracked: dict[int, Tracked] = {}  # id(value) -> Tracked
        self.values: dict[int, ir.Value] = {}
        self.actions: list[Action] = []
        self.roots: dict[str, tuple[ir.Node, np.ndarray]] = {}
        self.sinks: list[tuple[ir.Node, ir.Value, Tracked]] = []
        self.shapes = value_shapes(model)
        self.concrete = concrete_shapes or {}
        self.protected = set(protected)
        self.min_channels = min_channels
        self._build()

    # -- helpers -------------------------------------------------------------------------
    def _rank(self, v: ir.Value) -> int | None:
        for src in (self.concrete, self.shapes):
            if v.name in src and src[v.name] is not None:
                return len(src[v.name])
        if v.shape is not None:
            return len(v.shape)
        return None

    def _dims(self, v: ir.Value) -> tuple | None:
        s = self.concrete.get(v.name)
        if s is not None:
            return tuple(s)
        s = self.shapes.get(v.name)
        if s is not None and all(d is not None for d in s):
            return s
        return None

    def get(self, v: ir.Value | None) -> Tracked | None:
        return None if v is None else self.tracked.get(id(v))

    def _set(self, v: ir.Value, t: Tracked) -> None:
        self.tracked[id(v)] = t
        self.values[id(v)] = v

    def _block(self, t: Tracked | None, reason: str) -> None:
        if t is not None:
            self.uf.block(t.ids, reason)

    def _block_inputs(self, node: ir.Node, reason: str) -> None:
        for v in node.inputs:
            self._block(self.get(v), reason)

    # -- propagation ---------------------------------------------------------------------
    def _build(self) -> None:
        graph = self.model.graph
        for node in graph:
            try:
                self._visit(node)
            except Exception as exc:  # anything unexpected: block, never mangle
                self._block_inputs(node, f"{node.op_type} '{node.name}' could not be followed ({exc})")
                for o in node.outputs:
                    self.tracked.pop(id(o), None)
        outs = {id(v) for v in graph.outputs}
        for key, t in list(self.tracked.items()):
            v = self.values[key]
            if key in outs:
                self.uf.block(t.ids, f"channels reach graph output '{v.name}'")
            for use in v.uses():
                if use.node.graph is not graph:
                    self.uf.block(t.ids, f"used inside the subgraph of node '{use.node.name}'")
        # a value of the main graph used by a subgraph node (outer scope) is handled above

    def _new_root(self, node: ir.Node, n: int, out: ir.Value, axis: int, rank: int) -> None:
        ids = self.uf.new(n)
        if node.name in self.protected:
            self.uf.block(ids, f"node '{node.name}' is protected")
        if n <= self.min_channels:
            self.uf.block(ids, f"node '{node.name}' has only {n} output channel(s)")
        self.roots[node.name] = (node, ids)
        self.actions.append(Action("root", node, ids))
        self._set(out, Tracked(ids, axis, rank))

    def _visit(self, node: ir.Node) -> None:
        op = node.op_type
        ins = list(node.inputs)
        tin = [self.get(v) for v in ins]
        any_tracked = any(t is not None for t in tin)
        if node.domain not in ("", "ai.onnx"):
            if any_tracked:
                self._block_inputs(node, f"custom op {node.domain}.{op} '{node.name}'")
            return
        if op in ("Conv", "ConvTranspose"):
            return self._conv(node, tin)
        if op in ("Gemm", "MatMul"):
            return self._gemm(node, tin)
        if not any_tracked:
            return
        t = tin[0]
        out = node.outputs[0] if node.outputs else None
        if op in UNARY or (op in SPATIAL and t is not None and all(x is None for x in tin[1:])):
            if t is None:
                return self._block_inputs(node, f"{op} '{node.name}' with a tracked non-data input")
            if op in ("Clip",) and any(x is not None for x in tin[1:]):
                return self._block_inputs(node, f"Clip '{node.name}' with tracked bounds")
            if op == "Resize" or op == "Upsample":
                scales = _const(ins[2]) if len(ins) > 2 and ins[2] is not None else None
                if op == "Resize" and scales is not None and scales.size and t.rank + t.axis >= 0:
                    if scales.size == t.rank and scales[t.rank + t.axis] != 1:
                        return self._block_inputs(node, f"Resize '{node.name}' scales the channel axis")
                if len(ins) > 3 and ins[3] is not None:
                    sizes = _const(ins[3])
                    if sizes is None:
                        return self._block_inputs(node, f"Resize '{node.name}' with computed sizes")
                    self.actions.append(Action("resize_sizes", node, t.ids, {"axis": t.axis}))
            if op.startswith("Global") or op in ("MaxPool", "AveragePool", "LpPool"):
                if t.rank + t.axis != 1:
                    return self._block_inputs(node, f"{op} '{node.name}' on a non-channel axis")
            self._set(out, Tracked(t.ids, t.axis, t.rank))
            if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
                self._block(t, f"Dropout mask of '{node.name}' is used")
            return
        if op == "BatchNormalization":
            if t is None or t.rank + t.axis != 1 or len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
                return self._block_inputs(node, f"BatchNormalization '{node.name}' not in inference form")
            if any(_const(v) is None for v in ins[1:5]):
                return self._block_inputs(node, f"BatchNormalization '{node.name}' with non-constant parameters")
            self.actions.append(Action("bn", node, t.ids))
            self._set(out, Tracked(t.ids, t.axis, t.rank))
            return
        if op in BINARY:
            return self._binary(node, tin)
        if op == "Concat":
            return self._concat(node, tin)
        if op == "Split":
            return self._split(node, t)
        if op == "Slice":
            return self._slice(node, tin)
        if op in ("Flatten", "Reshape"):
            return self._flatten(node, tin)
        if op in ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL2", "ReduceL1") and t is not None:
            axes = _attr(node, "axes")
            if axes is None and len(ins) > 1 and ins[1] is not None:
                a = _const(ins[1])
                axes = None if a is None else a.tolist()
            keep = _attr(node, "keepdims", 1)
            if axes is None or not keep:
                return self._block_inputs(node, f"{op} '{node.name}' may reduce the channel axis")
            axes = [a if a < 0 else a - t.rank for a in axes]
            if t.axis in axes:
                return self._block_inputs(node, f"{op} '{node.name}' reduces the channel axis")
            self._set(out, Tracked(t.ids, t.axis, t.rank))
            return
        if op == "Pad" and t is not None and all(x is None for x in tin[1:]):
            pads = _const(ins[1]) if len(ins) > 1 else None
            axes = _const(ins[3]) if len(ins) > 3 and ins[3] is not None else None
            if pads is None or axes is not None:
                return self._block_inputs(node, f"Pad '{node.name}' with unknown pads")
            p = pads.reshape(2, -1)
            if p.shape[1] != t.rank or p[:, t.rank + t.axis].any():
                return self._block_inputs(node, f"Pad '{node.name}' pads the channel axis")
            self._set(out, Tracked(t.ids, t.axis, t.rank))
            return
        self._block_inputs(node, f"channels flow into {op} '{node.name}', which is not followed")

    def _conv(self, node: ir.Node, tin: list[Tracked | None]) -> None:
        x, w = node.inputs[0], node.inputs[1]
        warr = _const(w)
        t = tin[0]
        if warr is None or any(tt is not None for tt in tin[1:]):
            return self._block_inputs(node, f"{node.op_type} '{node.name}' has a non-constant weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None and _const(node.inputs[2]) is None:
            return self._block_inputs(node, f"{node.op_type} '{node.name}' has a non-constant bias")
        g = int(_attr(node, "group", 1))
        out = node.outputs[0]
        rank = warr.ndim
        transpose = node.op_type == "ConvTranspose"
        c_in = warr.shape[0] if transpose else warr.shape[1] * g
        c_out = warr.shape[1] * g if transpose else warr.shape[0]
        if t is not None and (t.rank + t.axis != 1 or len(t.ids) != c_in):
            return self._block_inputs(node, f"{node.op_type} '{node.name}': input channels do not match its weight")
        if g == 1:
            if t is not None:
                self.actions.append(Action("sink", node, t.ids))
                self.sinks.append((node, x, t))
            if transpose and (_attr(node, "output_shape") is not None):
                return
            self._new_root(node, c_out, out, -(rank - 1), rank)
            return
        if (not transpose and t is not None and g == c_in and warr.shape[1] == 1 and c_out == c_in):
            self.actions.append(Action("depthwise", node, t.ids))
            self._set(out, Tracked(t.ids, t.axis, t.rank))
            return
        if t is not None:
            self._block(t, f"grouped {node.op_type} '{node.name}' (group={g}) ties channels in groups")

    def _gemm(self, node: ir.Node, tin: list[Tracked | None]) -> None:
        a_t = tin[0]
        b = node.inputs[1]
        barr = _const(b)
        op = node.op_type
        if barr is None or barr.ndim != 2 or any(tt is not None for tt in tin[1:]):
            return self._block_inputs(node, f"{op} '{node.name}' has no constant 2-D weight")
        if op == "Gemm" and int(_attr(node, "transA", 0)):
            return self._block_inputs(node, f"Gemm '{node.name}' with transA=1")
        trans_b = op == "Gemm" and int(_attr(node, "transB", 0))
        k, n = (barr.shape[1], barr.shape[0]) if trans_b else barr.shape
        if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _const(node.inputs[2])
            if c is None or (c.ndim >= 1 and c.shape[-1] not in (1, n)) or (c.ndim == 2 and c.shape[0] != 1):
                return self._block_inputs(node, f"Gemm '{node.name}' has a non-constant or per-row C")
        rank = self._rank(node.inputs[0]) or 2
        if a_t is not None:
            if a_t.axis != -1 or len(a_t.ids) != k:
                return self._block_inputs(node, f"{op} '{node.name}': tracked input not on its K axis")
            self.actions.append(Action("sink", node, a_t.ids))
            self.sinks.append((node, node.inputs[0], a_t))
        self._new_root(node, n, node.outputs[0], -1, rank)

    def _binary(self, node: ir.Node, tin: list[Tracked | None]) -> None:
        tracked = [t for t in tin if t is not None]
        ref = tracked[0]
        out_rank = max(t.rank for t in tracked)
        pos = out_rank + ref.axis
        for t in tracked[1:]:
            if t.axis != ref.axis or len(t.ids) != len(ref.ids):
                return self._block_inputs(node, f"{node.op_type} '{node.name}' joins channels that do not line up")
        if node.op_type == "PRelu" and tin[0] is None:
            return self._block_inputs(node, f"PRelu '{node.name}' with a tracked slope")
        for i, (v, t) in enumerate(zip(node.inputs, tin)):
            if t is not None or v is None:
                continue
            arr = _const(v)
            rank = arr.ndim if arr is not None else self._rank(v)
            dims = arr.shape if arr is not None else (self._dims(v) or self.shapes.get(v.name))
            if rank is None or dims is None:
                return self._block_inputs(node, f"{node.op_type} '{node.name}': operand '{v.name}' has an unknown shape")
            ax = rank - (out_rank - pos)
            if ax < 0 or dims[ax] == 1:
                continue
            if arr is not None and dims[ax] == len(ref.ids):
                self.actions.append(Action("const", node, ref.ids, {"input": i, "axis": ax}))
                continue
            return self._block_inputs(node, f"{node.op_type} '{node.name}': operand '{v.name}' is per-channel but not prunable")
        for t in tracked[1:]:
            for a, b in zip(ref.ids, t.ids):
                self.uf.union(a, b)
        self._set(node.outputs[0], Tracked(ref.ids, ref.axis, out_rank))

    def _concat(self, node: ir.Node, tin: list[Tracked | None]) -> None:
        tracked = [t for t in tin if t is not None]
        rank = tracked[0].rank
        axis = int(_attr(node, "axis", 0))
        axis = axis - rank if axis >= 0 else axis
        if all(t.axis == axis for t in tracked):
            parts = []
            for v, t in zip(node.inputs, tin):
                if t is not None:
                    parts.append(t.ids)
                    continue
                dims = self._dims(v)
                if dims is None:
                    return self._block_inputs(node, f"Concat '{node.name}': input '{v.name}' has unknown channels")
                parts.append(self.uf.new(int(dims[axis]), blocked=f"Concat '{node.name}' input '{v.name}' is not prunable"))
            self._set(node.outputs[0], Tracked(np.concatenate(parts), axis, rank))
            return
        if len(tracked) == len(tin) and all(t.axis == tracked[0].axis and len(t.ids) == len(tracked[0].ids) for t in tracked):
            for t in tracked[1:]:
                for a, b in zip(tracked[0].ids, t.ids):
                    self.uf.union(a, b)
            self._set(node.outputs[0], Tracked(tracked[0].ids, tracked[0].axis, rank))
            return
        self._block_inputs(node, f"Concat '{node.name}' mixes channel layouts")

    def _split(self, node: ir.Node, t: Tracked | None) -> None:
        if t is None:
            return self._block_inputs(node, f"Split '{node.name}' with a tracked split input")
        axis = int(_attr(node, "axis", 0))
        axis = axis - t.rank if axis >= 0 else axis
        if axis != t.axis:
            for o in node.outputs:
                self._set(o, Tracked(t.ids, t.axis, t.rank))
            return
        sizes = _attr(node, "split")
        if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            s = _const(node.inputs[1])
            if s is None:
                return self._block_inputs(node, f"Split '{node.name}' with computed sizes")
            sizes = s.tolist()
        n = len(node.outputs)
        if sizes is None:
            if len(t.ids) % n:
                return self._block_inputs(node, f"Split '{node.name}' uneven")
            sizes = [len(t.ids) // n] * n
        offs = np.cumsum([0, *sizes])
        for i, o in enumerate(node.outputs):
            self._set(o, Tracked(t.ids[offs[i]:offs[i + 1]], t.axis, t.rank))
        self.actions.append(Action("split", node, t.ids, {"sizes": list(sizes)}))

    def _slice(self, node: ir.Node, tin: list[Tracked | None]) -> None:
        t = tin[0]
        if t is None or any(x is not None for x in tin[1:]):
            return self._block_inputs(node, f"Slice '{node.name}' with tracked bounds")
        vals = [(_const(v) if v is not None else None) for v in node.inputs[1:]]
        if len(vals) < 2 or vals[0] is None or vals[1] is None or any(
                node.inputs[i + 1] is not None and vals[i] is None for i in range(len(vals))):
            return self._block_inputs(node, f"Slice '{node.name}' with computed bounds")
        starts, ends = vals[0].tolist(), vals[1].tolist()
        axes = vals[2].tolist() if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
        steps = vals[3].tolist() if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
        axes = [a - t.rank if a >= 0 else a for a in axes]
        if t.axis not in axes:
            self._set(node.outputs[0], Tracked(t.ids, t.axis, t.rank))
            return
        j = axes.index(t.axis)
        if steps[j] != 1:
            return self._block_inputs(node, f"Slice '{node.name}' with a step on the channel axis")
        c = len(t.ids)
        s, e = starts[j], ends[j]
        s = max(0, min(c, s + c if s < 0 else s))
        e = max(0, min(c, e + c if e < 0 else e))
        self._set(node.outputs[0], Tracked(t.ids[s:e], t.axis, t.rank))
        self.actions.append(Action("slice", node, t.ids, {"index": j, "start": s, "end": e}))

    def _flatten(self, node: ir.Node, tin: list[Tracked | None]) -> None:
        t = tin[0]
        if t is None or any(x is not None for x in tin[1:]):
            return self._block_inputs(node, f"{node.op_type} '{node.name}' with a tracked shape")
        dims = self._dims(node.inputs[0])
        pos = t.rank + t.axis
        if dims is None:
            return self._block_inputs(node, f"{node.op_type} '{node.name}': input shape unknown")
        if node.op_type == "Flatten":
            ax = int(_attr(node, "axis", 1))
            ax = ax + t.rank if ax < 0 else ax
            if ax != pos:
                return self._block_inputs(node, f"Flatten '{node.name}' does not start at the channel axis")
        else:
            shape = _const(node.inputs[1])
            odims = self._dims(node.outputs[0])
            if shape is None or odims is None or len(odims) != pos + 1 or tuple(odims[:pos]) != tuple(dims[:pos]):
                return self._block_inputs(node, f"Reshape '{node.name}' is not a flatten from the channel axis")
        block = int(np.prod(dims[pos + 1:])) if pos + 1 < len(dims) else 1
        ids = np.repeat(t.ids, block)
        self._set(node.outputs[0], Tracked(ids, -1, pos + 1))
        if node.op_type == "Reshape":
            self.actions.append(Action("reshape", node, t.ids, {"block": block, "pos": pos}))

    # -- groups --------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        uf = self.uf
        owner: dict[int, list[str]] = defaultdict(list)
        for name, (_, ids) in self.roots.items():
            for i in ids:
                owner[uf.find(int(i))].append(name)
        parent = {n: n for n in self.roots}

        def f(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for names in owner.values():
            for other in names[1:]:
                ra, rb = f(names[0]), f(other)
                if ra != rb:
                    parent[rb] = ra
        members: dict[str, list[str]] = defaultdict(list)
        for n in self.roots:
            members[f(n)].append(n)
        out = []
        for names in members.values():
            classes: list[int] = []
            seen = set()
            blocked = None
            for n in names:
                for i in self.roots[n][1]:
                    r = uf.find(int(i))
                    if r not in seen:
                        seen.add(r)
                        classes.append(r)
                    blocked = blocked or uf.blocked[r]
            out.append(Group([self.roots[n][0] for n in names], classes, blocked))
        return out


# ---------------------------------------------------------------------------------------
# Applying a removal

def _set_attr_int(node: ir.Node, name: str, value: int) -> None:
    node.attributes[name] = ir.AttrInt64(name, int(value))


def _set_attr_ints(node: ir.Node, name: str, value) -> None:
    node.attributes[name] = ir.AttrInt64s(name, [int(x) for x in value])


def apply_removal(model: ir.Model, dep: DependencyGraph, removed: set[int]) -> dict[str, Any]:
    """Slice every tensor touched by the removed channel classes (union-find roots in ``removed``).

    Returns counts (``nodes_edited``). Shapes of intermediate values are cleared (re-inferred later).
    """
    graph = model.graph
    taken = all_value_names(model)
    uf = dep.uf

    def keep_of(ids: np.ndarray) -> np.ndarray:
        return np.array([uf.find(int(i)) not in removed for i in ids], bool)

    edited = set()
    for act in dep.actions:
        keep = keep_of(act.ids)
        if keep.all():
            continue
        node = act.node
        edited.add(node.name)
        idx = np.flatnonzero(keep)
        op = node.op_type
        if act.kind == "root":
            w = _const(node.inputs[1])
            if op == "Conv":
                _set_input_array(graph, node, 1, w[idx], taken)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    _set_input_array(graph, node, 2, _const(node.inputs[2])[idx], taken)
            elif op == "ConvTranspose":
                _set_input_array(graph, node, 1, w[:, idx], taken)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    _set_input_array(graph, node, 2, _const(node.inputs[2])[idx], taken)
            elif op == "Gemm":
                tb = int(_attr(node, "transB", 0))
                _set_input_array(graph, node, 1, w[idx] if tb else w[:, idx], taken)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    c = _const(node.inputs[2])
                    if c.ndim >= 1 and c.shape[-1] == len(keep) and len(keep) > 1:
                        _set_input_array(graph, node, 2, c[..., idx], taken)
            else:  # MatMul
                _set_input_array(graph, node, 1, w[:, idx], taken)
        elif act.kind == "sink":
            w = _const(node.inputs[1])
            if op == "Conv":
                _set_input_array(graph, node, 1, w[:, idx], taken)
            elif op == "ConvTranspose":
                _set_input_array(graph, node, 1, w[idx], taken)
            elif op == "Gemm" and int(_attr(node, "transB", 0)):
                _set_input_array(graph, node, 1, w[:, idx], taken)
            else:
                _set_input_array(graph, node, 1, w[idx], taken)
        elif act.kind == "depthwise":
            _set_input_array(graph, node, 1, _const(node.inputs[1])[idx], taken)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                _set_input_array(graph, node, 2, _const(node.inputs[2])[idx], taken)
            _set_attr_int(node, "group", len(idx))
        elif act.kind == "bn":
            for i in range(1, 5):
                _set_input_array(graph, node, i, _const(node.inputs[i])[idx], taken)
        elif act.kind == "const":
            i, ax = act.extra["input"], act.extra["axis"]
            _set_input_array(graph, node, i, np.take(_const(node.inputs[i]), idx, axis=ax), taken)
        elif act.kind == "split":
            sizes = act.extra["sizes"]
            offs = np.cumsum([0, *sizes])
            new = [int(keep[offs[j]:offs[j + 1]].sum()) for j in range(len(sizes))]
            if "split" in node.attributes:
                _set_attr_ints(node, "split", new)
            elif len(node.inputs) > 1 and node.inputs[1] is not None:
                _set_input_array(graph, node, 1, np.array(new, np.int64), taken)
            else:
                opset = model.opset_imports.get("", 13)
                if opset >= 13:
                    name = unique_name(f"{node.name}_split", taken)
                    arr = np.array(new, np.int64)
                    v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.INT64),
                                 const_value=ir.tensor(arr, name=name))
                    graph.register_initializer(v)
                    if len(node.inputs) < 2:
                        node.resize_inputs(2)
                    node.replace_input_with(1, v)
                else:
                    _set_attr_ints(node, "split", new)
        elif act.kind == "slice":
            j, s, e = act.extra["index"], act.extra["start"], act.extra["end"]
            ns, ne = int(keep[:s].sum()), int(keep[:e].sum())
            st = _const(node.inputs[1]).copy()
            en = _const(node.inputs[2]).copy()
            st[j], en[j] = ns, ne
            _set_input_array(graph, node, 1, st, taken)
            _set_input_array(graph, node, 2, en, taken)
        elif act.kind == "reshape":
            shape = _const(node.inputs[1]).copy()
            pos = act.extra["pos"]
            if shape[pos] != -1:
                shape[pos] = int(keep.sum()) * act.extra["block"]
                _set_input_array(graph, node, 1, shape, taken)
        elif act.kind == "resize_sizes":
            sizes = _const(node.inputs[3]).copy()
            sizes[sizes.size + act.extra["axis"]] = int(keep.sum())
            _set_input_array(graph, node, 3, sizes, taken)
    # stale intermediate shapes: cleared, then re-inferred where ONNX shape inference can
    outs = {id(v) for v in graph.outputs}
    for node in graph:
        for o in node.outputs:
            if id(o) not in outs:
                o.shape = None
                o.type = None
    graph.sort()
    try:
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    except Exception:
        pass
    return {"nodes_edited": len(edited)}


# ---------------------------------------------------------------------------------------
# Costs

def node_macs(node: ir.Node, shapes: dict[str, tuple]) -> int:
    """Multiply-accumulates per sample of one Conv/ConvTranspose/Gemm/MatMul at the actual shapes
    (0 for other ops or unknown shapes)."""
    if node.op_type not in ROOT_OPS or len(node.inputs) < 2:
        return 0
    w = node.inputs[1]
    wshape = tuple(w.const_value.shape) if w is not None and w.const_value is not None else shapes.get(w.name if w else "")
    oshape = shapes.get(node.outputs[0].name)
    if wshape is None or oshape is None or any(d is None for d in oshape) or any(d is None for d in wshape):
        return 0
    oshape = [int(d) for d in oshape]
    if node.op_type == "Conv":
        return int(np.prod(oshape)) * int(np.prod(wshape[1:]))
    if node.op_type == "ConvTranspose":
        ishape = shapes.get(node.inputs[0].name)
        if ishape and all(d is not None for d in ishape):
            return int(np.prod(ishape)) * int(np.prod(wshape[1:]))
        return 0
    k = wshape[1] if node.op_type == "Gemm" and int(_attr(node, "transB", 0)) else wshape[0]
    return int(np.prod(oshape)) * int(k)


def count_costs(model: ir.Model, shapes: dict[str, tuple]) -> dict[str, int]:
    """Parameters (float initializers) and MACs of Conv/ConvTranspose/Gemm/MatMul (per sample, actual shapes)."""
    params = sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values()
                 if v.const_value is not None and v.const_value.dtype.is_floating_point())
    macs = sum(node_macs(node, shapes) for node in ir.traversal.RecursiveGraphIterator(model.graph))
    return {"params": int(params), "macs": int(macs)}


def concrete_shapes(model: ir.Model, sample: dict[str, np.ndarray] | None) -> dict[str, tuple]:
    """Actual shapes of the outputs of every node on one sample (empty without a sample)."""
    if sample is None:
        return {}
    names = [o.name for node in model.graph for o in node.outputs if o.name]
    try:
        res = next(run_with_outputs(model, names, [sample]))
    except Exception:
        return {}
    return {k: tuple(np.shape(v)) for k, v in res.items()}


# ---------------------------------------------------------------------------------------
# Importance and selection

def class_importance(dep: DependencyGraph, groups: list[Group], method: str,
                     act_stats: dict[str, np.ndarray] | None = None) -> tuple[dict[int, float], list[str]]:
    """Importance of every channel class. Returns ``(scores, notes)``."""
    uf = dep.uf
    score: dict[int, float] = defaultdict(float)
    notes = []
    if method in ("l1", "l2", "bn") or not act_stats:
        if method == "activation":
            notes.append("activation importance needs calibration data; used L2 magnitude")
        p = 1 if method == "l1" else 2
        for g in groups:
            for node in g.roots:
                w = _const(node.inputs[1])
                ids = dep.roots[node.name][1]
                if node.op_type == "Conv":
                    rows = w.reshape(w.shape[0], -1)
                elif node.op_type == "ConvTranspose":
                    rows = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
                elif node.op_type == "Gemm" and int(_attr(node, "transB", 0)):
                    rows = w
                else:
                    rows = w.T
                norms = np.linalg.norm(rows.astype(np.float64), ord=p, axis=1)
                for i, s in zip(ids, norms):
                    score[uf.find(int(i))] += float(s)
        if method == "bn":
            bn_score: dict[int, float] = defaultdict(float)
            for act in dep.actions:
                if act.kind == "bn":
                    gamma = np.abs(_const(act.node.inputs[1]).astype(np.float64))
                    for i, s in zip(act.ids, gamma):
                        bn_score[uf.find(int(i))] += float(s)
            if not bn_score:
                notes.append("no BatchNormalization left (folded into Conv by fusion): BN-gamma importance fell back to L2")
            else:
                for c in list(score):
                    if c in bn_score:
                        score[c] = bn_score[c]
        return dict(score), notes
    # activation based: mean |x_c| * ||W[:, c]|| summed over the consumers of the channel
    for node, x, t in dep.sinks:
        stat = act_stats.get(x.name)
        if stat is None:
            continue
        w = _const(node.inputs[1]).astype(np.float64)
        if node.op_type == "Conv":
            cols = np.linalg.norm(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1), axis=1)
        elif node.op_type == "ConvTranspose":
            cols = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
        elif node.op_type == "Gemm" and int(_attr(node, "transB", 0)):
            cols = np.linalg.norm(w, axis=0)
        else:
            cols = np.linalg.norm(w, axis=1)
        for i, s in zip(t.ids, stat * cols):
            score[uf.find(int(i))] += float(s)
    for g in groups:  # classes with no consumer (dead ends) get their magnitude
        for c in g.classes:
            score.setdefault(c, 0.0)
    return dict(score), notes


def activation_stats(model: ir.Model, dep: DependencyGraph, samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean |activation| per position of the channel axis of every consumer input, over ``samples``."""
    names = list(dict.fromkeys(x.name for _, x, _ in dep.sinks))
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = defaultdict(int)
    axes = {x.name: t.axis for _, x, t in dep.sinks}
    for res in run_with_outputs(model, names, samples):
        for n in names:
            a = np.abs(np.asarray(res[n], np.float64))
            a = np.moveaxis(a, axes[n], -1).reshape(-1, a.shape[axes[n]])
            sums[n] = sums.get(n, 0) + a.sum(0)
            count[n] += a.shape[0]
    return {n: sums[n] / max(count[n], 1) for n in sums}


def select_removed(groups: list[Group], scores: dict[int, float], *, ratio: float, ratios: dict[str, float] | None = None,
                   scope: str = "layer", round_to: int = 1, max_ratio: float = 0.9) -> tuple[set[int], list[dict]]:
    """Pick the channel classes to remove. Returns ``(removed classes, per-group details)``.

    ``scope="layer"``: each group loses ``ratio`` of its channels (``ratios[node]`` overrides per
    layer). ``scope="global"``: importance normalised by the group's mean, one threshold over all
    groups, capped at ``max_ratio`` per group. Kept counts are rounded up to multiples of ``round_to``.
    """
    ratios = ratios or {}
    removed: set[int] = set()
    details = []
    live = [g for g in groups if not g.blocked and len(g.classes) > 1]

    def kept_count(n: int, r: float) -> int:
        kept = n - int(math.floor(r * n + 1e-9))
        if round_to > 1:
            kept = int(math.ceil(kept / round_to) * round_to)
        return max(1, min(n, kept))

    targets: dict[int, float] = {}
    for gi, g in enumerate(live):
        r = max([ratios[n.name] for n in g.roots if n.name in ratios], default=ratio)
        targets[gi] = min(r, max_ratio)
    if scope == "global" and not ratios:
        allnorm = []
        for gi, g in enumerate(live):
            s = np.array([scores.get(c, 0.0) for c in g.classes])
            s = s / (s.mean() + 1e-12)
            allnorm.extend((v, gi) for v in s)
        total = len(allnorm)
        k = int(math.floor(ratio * total))
        thr = sorted(v for v, _ in allnorm)[k - 1] if k > 0 else -np.inf
        for gi, g in enumerate(live):
            s = np.array([scores.get(c, 0.0) for c in g.classes])
            s = s / (s.mean() + 1e-12)
            targets[gi] = min(max_ratio, float(np.mean(s <= thr)))
    for gi, g in enumerate(live):
        n = len(g.classes)
        kept = kept_count(n, targets[gi])
        order = sorted(g.classes, key=lambda c: scores.get(c, 0.0))
        drop = order[: n - kept]
        removed.update(drop)
        details.append({"roots": [x.name for x in g.roots], "channels": n, "kept": kept})
    return removed, details


# ---------------------------------------------------------------------------------------

class ChannelPrunePass(CompressionPass):
    """Structured channel pruning with dependency groups, then least-squares repair.

    Parameters: :class:`ChannelPruneConfig`; nodes and op types in ``context.scope`` are
    protected like ``protect``. Calibration feeds come from ``context.calibration``; fidelity
    is measured on ``context.holdout`` (else ``context.check_samples``, else the calibration data).
    """

    name = "prune-channels"
    checked = False
    Config = ChannelPruneConfig

    def apply(self, model: ir.Model) -> bool:
        from .prune_repair import fidelity, repair

        c, scope = self.config, self.context.scope
        ratio, importance = c.ratio, c.importance
        calib = list(self.context.calibration)
        checks = list(self.context.holdout) or list(self.context.check_samples) or calib[:4]
        protect = set(c.protect) | set(scope.nodes)
        protect |= {n.name for n in model.graph if n.op_type in scope.op_types}
        sample = calib[0] if calib else (checks[0] if checks else None)
        if sample is None:  # shapes only (the pipeline has said that no data was given)
            import warnings

            from ..data import input_specs, random_samples
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sample = random_samples(input_specs(model), 1)[0]
        shapes0 = concrete_shapes(model, sample)
        dep = DependencyGraph(model, shapes0, protected=protect)
        groups = dep.groups()
        rep = self.report
        for g in groups:
            if g.blocked:
                rep.skip(", ".join(n.name for n in g.roots), f"group left untouched: {g.blocked}")
        act = activation_stats(model, dep, calib[: c.repair_samples]) if importance == "activation" and calib else None
        scores, notes = class_importance(dep, groups, importance, act)
        removed, details = select_removed(groups, scores, ratio=ratio, ratios=c.ratios or None, scope=c.scope,
                                          round_to=c.round_to, max_ratio=c.max_ratio)
        before = count_costs(model, shapes0)
        root_macs = {n.name: node_macs(n, shapes0) for n in model.graph if n.op_type in ROOT_OPS}
        for d in details:  # each group's own layers' MACs (what pruning it saves, before its consumers')
            d["macs"] = int(sum(root_macs.get(r, 0) for r in d["roots"]))
        rep.counts.update(groups=len(groups), groups_blocked=sum(1 for g in groups if g.blocked),
                          groups_pruned=sum(1 for d in details if d["kept"] < d["channels"]),
                          channels_total=sum(d["channels"] for d in details),
                          channels_removed=sum(d["channels"] - d["kept"] for d in details),
                          importance=importance, ratio=ratio, scope=c.scope, round_to=c.round_to)
        if not removed:
            rounded = [d for d in details if d["channels"] > 1 and c.round_to > 1 and c.ratio > 0]
            if rounded:  # say why nothing was pruned: the rounding kept every channel
                d = max(rounded, key=lambda x: x["channels"])
                rep.skip("", f"--prune-round-to {c.round_to} keeps every channel at ratio {c.ratio:g} (e.g. "
                         f"'{d['roots'][0]}': {d['channels']} channels, {c.ratio:.0%} removed then rounded back to "
                         f"{d['kept']}); nothing was pruned: raise --prune or lower --prune-round-to")
            return False
        original = snapshot(model)
        stats = apply_removal(model, dep, removed)
        rep.counts.update(stats)
        do_repair = c.repair and calib
        ref_fid = fidelity(original, model, checks) if checks else None
        if ref_fid is not None:
            rep.counts["fidelity_before_repair"] = ref_fid
        if do_repair:
            info = repair(original, model, dep, removed, calib[: c.repair_samples])
            rep.counts["repair"] = info["summary"]
            for name, why in info["skipped"]:
                rep.skip(name, f"not repaired: {why}")
            if checks:
                after = fidelity(original, model, checks)
                rep.counts["fidelity_after_repair"] = after
        elif not calib:
            notes.append("no calibration data: no least-squares repair")
        shapes1 = concrete_shapes(model, sample)
        after_costs = count_costs(model, shapes1)
        op_of = {n.name: n.op_type for n in model.graph}
        unaligned = [d for d in details if d["kept"] < d["channels"] and d["channels"] % 8 == 0 and d["kept"] % 8
                     and any(op_of.get(r) in ("Conv", "ConvTranspose") for r in d["roots"])]
        if unaligned:
            d = unaligned[0]
            rep.counts["conv_groups_not_multiple_of_8"] = len(unaligned)
            logger.warning("prune-channels: %d convolution group(s) keep a channel count that is not a multiple of 8 "
                           "(e.g. '%s': %d -> %d); ONNX Runtime's blocked (NCHWc) convolution kernels want "
                           "multiples of 8 (AVX2) or 16 (AVX-512), and without them the pruned model can run slower "
                           "than the original (EfficientNet-Lite0 at --prune 0.4: 0.97x of fp32; with "
                           "--prune-round-to 8: 1.23x): use --prune-round-to 8",
                           len(unaligned), d["roots"][0], d["channels"], d["kept"])
        rep.counts.update(params_before=before["params"], params_after=after_costs["params"],
                          macs_before=before["macs"], macs_after=after_costs["macs"],
                          macs_removed_pct=round(100.0 * (1 - after_costs["macs"] / max(before["macs"], 1)), 2),
                          groups_detail=details, notes=notes)
        return True
