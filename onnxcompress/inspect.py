"""Describe a model: I/O, opset, op histogram, parameters, size, where weights live, sparsity."""

from __future__ import annotations

import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .irutil import subgraphs
from .model_io import load_model, model_size_bytes


def _shape(v: ir.Value):
    if v.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d.value) if getattr(d, "value", None) else "?") for d in v.shape]


#: exact zeros per tensor object already counted (id -> (weak reference, zeros)): the report's
#: "after" summary shares most tensors with "before" (a 2.4 GB fuse read its weights twice)
_ZEROS: dict[int, tuple[weakref.ref, int]] = {}


def _zeros(t, arr: np.ndarray) -> int:
    """Exact zeros of ``arr`` (the values of tensor ``t``), counted once per tensor object whose
    values cannot change in place (a read-only array: frozen by the pipeline, or mapped)."""
    if arr.flags.writeable:
        return int(arr.size - np.count_nonzero(arr))
    hit = _ZEROS.get(id(t))
    if hit is not None and hit[0]() is t:
        return hit[1]
    z = int(arr.size - np.count_nonzero(arr))  # no temporary boolean array
    try:
        _ZEROS[id(t)] = (weakref.ref(t, lambda _, k=id(t): _ZEROS.pop(k, None)), z)
    except TypeError:  # a tensor type without weak references: not cached
        pass
    return z


def summarize(model: ir.Model, path: str | Path | None = None) -> dict:
    """A JSON-ready summary of ``model``.

    Keys: inputs/outputs (name, dtype, shape), opsets, ir_version, op_histogram (subgraphs
    included), n_nodes, parameters (elements of float, int8/uint8 and int32 initializers and
    float Constant tensors; int64 shape/index tensors excluded),
    size_bytes (serialized, weights inline; plus file size when ``path`` is given),
    weights {initializers: {count, bytes}, constant_nodes: {count, bytes}}, subgraphs
    (nodes carrying graph attributes and their node counts), sparsity (share of exact zeros
    among float weights of >= 64 elements, in %), quantized (int8/uint8 initializers).
    """
    hist: Counter[str] = Counter()
    const_count = const_bytes = 0
    params = zeros = counted = 0
    subgraph_info = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        hist[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
        if node.op_type == "Constant" and "value" in node.attributes:
            t = node.attributes["value"].value
            arr = t.numpy()
            const_count += 1
            const_bytes += arr.nbytes
            if arr.dtype.kind == "f":
                params += arr.size
                if arr.size >= 64:
                    zeros += _zeros(t, arr); counted += arr.size
        for a in node.attributes.values():
            if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                gs = [a.value] if a.type == ir.AttributeType.GRAPH else list(a.value)
                subgraph_info.append({"node": node.name, "op_type": node.op_type, "attribute": a.name,
                                  "nodes": sum(len(list(ir.traversal.RecursiveGraphIterator(g))) for g in gs)})
    init_bytes = 0
    int8 = 0
    inits = list(model.graph.initializers.values())
    for sg in subgraphs(model.graph):
        inits.extend(sg.initializers.values())
    for v in inits:
        if v.const_value is None:
            continue
        arr = v.const_value.numpy()
        init_bytes += arr.nbytes
        if arr.dtype in (np.int8, np.uint8):
            int8 += 1
        if arr.dtype.kind == "f" or arr.dtype in (np.int8, np.uint8, np.int32):
            params += arr.size
            if arr.size >= 64:
                zeros += _zeros(v.const_value, arr); counted += arr.size
    out = {
        "inputs": [{"name": v.name, "dtype": str(v.dtype.name) if v.dtype else None, "shape": _shape(v)}
                   for v in model.graph.inputs if v.name not in model.graph.initializers],
        "outputs": [{"name": v.name, "dtype": str(v.dtype.name) if v.dtype else None, "shape": _shape(v)} for v in model.graph.outputs],
        "opsets": dict(model.opset_imports),
        "ir_version": model.ir_version,
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "n_nodes": sum(hist.values()),
        "op_histogram": dict(hist.most_common()),
        "parameters": int(params),
        "size_bytes": model_size_bytes(model),
        "weights": {"initializers": {"count": len(inits), "bytes": int(init_bytes)},
                    "constant_nodes": {"count": const_count, "bytes": int(const_bytes)}},
        "subgraphs": subgraph_info,
        "sparsity_pct": round(100.0 * zeros / counted, 2) if counted else 0.0,
        "int8_initializers": int8,
    }
    if path is not None:
        p = Path(path)
        out["file_bytes"] = p.stat().st_size + sum(f.stat().st_size for f in p.parent.glob(p.name + ".data"))
    return out


def inspect_model(path: str | Path) -> dict:
    """Load ``path`` and return :func:`summarize` of it.

    Raises:
        ModelLoadError: see :func:`onnxcompress.model_io.load_model`; or a tensor whose data does
            not match its shape and type (named with ``onnx.checker``'s words).
    """
    model = load_model(path)
    try:
        return summarize(model, path)
    except (ValueError, TypeError) as exc:  # a tensor whose bytes do not fit its declaration
        from .errors import ModelLoadError
        from .model_io import check_model

        why = str(exc)
        try:
            check_model(model, runtime=False)
        except Exception as chk:  # noqa: BLE001 - the checker names the tensor
            why = str(chk).split(": ", 1)[-1]
        raise ModelLoadError(f"{path}: cannot read the model's tensors ({why})") from None
