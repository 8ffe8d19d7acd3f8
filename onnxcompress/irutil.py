"""Small onnx-ir helpers shared by the passes: subgraph walking, unique names, initializers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir


def attr(node: ir.Node, name: str, default=None):
    """The value of ``node``'s attribute ``name``, or ``default`` when it is not set."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def const_array(v: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value that is not also a graph input (an overridable
    initializer is not a constant), else None."""
    if v is None or v.const_value is None or v.is_graph_input():
        return None
    return v.const_value.numpy()


def subgraphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """Every graph nested in ``graph``'s nodes (``If`` branches, ``Loop``/``Scan`` bodies), recursively."""
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for a in node.attributes.values():
            if a.type == ir.AttributeType.GRAPH:
                yield a.value
            elif a.type == ir.AttributeType.GRAPHS:
                yield from a.value


def all_value_names(model: ir.Model) -> set[str]:
    """Names of every value and initializer of the model, subgraphs included."""
    names: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        names.update(v.name for v in node.inputs if v is not None and v.name)
        names.update(v.name for v in node.outputs if v.name)
    names.update(v.name for v in model.graph.inputs if v.name)
    names.update(model.graph.initializers)
    for g in subgraphs(model.graph):
        names.update(g.initializers)
    return names


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not in ``taken`` (which is updated)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def add_initializer(graph: ir.Graph, arr: np.ndarray, base: str, taken: set[str]) -> ir.Value:
    """Register ``arr`` as a new initializer under a unique name and return its value."""
    name = unique_name(base, taken)
    v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                 const_value=ir.tensor(arr, name=name))
    graph.register_initializer(v)
    return v


def clone_initializer(graph: ir.Graph, value: ir.Value, taken: set[str]) -> ir.Value:
    """Register a copy of an initializer under a fresh name and return its value."""
    return add_initializer(graph, value.const_value.numpy().copy(), f"{value.name}_clone", taken)


def replace_node(graph: ir.Graph, node: ir.Node, new_out: ir.Value) -> None:
    """Make ``new_out`` take the place of ``node``'s (single) output, then remove ``node``.

    The new value inherits the old one's type, shape and *name*: graph outputs and
    outer-scope references in subgraphs keep working.
    """
    out = node.outputs[0]
    new_out.type, new_out.shape = out.type, out.shape
    name = out.name
    out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    new_out.name = name


class UnionFind:
    """Union-find over integer ids (path compression) with a reason per set that blocks it:
    a set joined with a blocked one is blocked too. Channel dependency groups (pruning) and
    channel spaces (pair-permute) use it."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: list[str | None] = []

    def new(self, n: int, blocked: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.blocked.extend([blocked] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[rb] = ra
            self.blocked[ra] = self.blocked[ra] or self.blocked[rb]

    def block(self, ids, reason: str) -> None:
        for i in np.asarray(ids).ravel():
            r = self.find(int(i))
            if self.blocked[r] is None:
                self.blocked[r] = reason

    def why(self, a: int) -> str | None:
        return self.blocked[self.find(int(a))]


def set_input_array(graph: ir.Graph, node: ir.Node, idx: int, arr: np.ndarray, taken: set[str]) -> None:
    """Give input ``idx`` of ``node`` the constant ``arr``: in place when only this node uses it."""
    v = node.inputs[idx]
    arr = np.ascontiguousarray(arr)
    if v is not None and v.const_value is not None and len(v.uses()) == 1 and not v.is_graph_output() and v.is_initializer():
        v.const_value = ir.tensor(arr, name=v.name)
        v.shape = ir.Shape(arr.shape)
        return
    name = unique_name(f"{v.name if v is not None else node.name}_pruned", taken)
    nv = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                  const_value=ir.tensor(arr, name=name))
    graph.register_initializer(nv)
    node.replace_input_with(idx, nv)
