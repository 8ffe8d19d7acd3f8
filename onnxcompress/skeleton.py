"""Skeletons: a model's protobuf without the data of its large initializers.

A check (``onnx.checker``) or an ONNX Runtime session sees the skeleton while the weights stay
where they are (arrays, memory maps): :func:`onnxcompress.runtime.make_session` hands them to
ORT as buffers. Used by :mod:`onnxcompress.model_io` (checks, writing) and
:mod:`onnxcompress.runtime` (sessions); imports neither.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir

#: main-graph initializers of at least this many bytes travel outside the protobuf: to ORT as
#: buffers, to ``<name>.data`` when written with external data (the threshold of onnx's writer)
BIG_TENSOR_BYTES = 1024
#: dtypes ORT takes as numpy buffers (``OrtValue.ortvalue_from_numpy``); others stay inline
_BUFFER_DTYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL})
#: dtypes written as raw bytes, one element per numpy item (ml_dtypes): stored outside the protobuf
#: like the above, but kept inline in what ORT sessions get (no numpy buffer type there)
_RAW_DTYPES = _BUFFER_DTYPES | frozenset({
    ir.DataType.BFLOAT16, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2,
    ir.DataType.FLOAT8E5M2FNUZ})
#: the stand-in location of detached weights in a skeleton (never a real file of the user's)
PLACEHOLDER = "__onnxcompress_weights__"


def _detachable(model: ir.Model, dtypes: frozenset = _RAW_DTYPES) -> list[ir.Value]:
    """Main-graph initializers worth keeping out of a protobuf: at least :data:`BIG_TENSOR_BYTES`,
    of one of ``dtypes`` (default: any written as raw bytes; sessions: those ORT takes as
    buffers), not also a graph input (an overridable default)."""
    inputs = {v.name for v in model.graph.inputs}
    out = []
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None and v.name not in inputs and t.dtype in dtypes and t.nbytes >= BIG_TENSOR_BYTES:
            out.append(v)
    return out


def _unused(v: ir.Value) -> bool:
    return not v.uses() and not v.is_graph_output()


def skeleton(model: ir.Model, *, location: str = PLACEHOLDER, offsets: dict[str, int] | None = None,
             extra_outputs: tuple[str, ...] | list[str] = (),
             used_only: bool = False) -> tuple[onnx.ModelProto, list[tuple[str, ir.TensorProtocol]]]:
    """The model's protobuf without the data of its large main-graph initializers.

    Each detachable initializer (:func:`_detachable`) is serialized as external data at
    ``location`` (``offsets[name]``, else 0) without reading it; ``model`` is unchanged.

    Args:
        extra_outputs: value names to add as graph outputs (float, shape unknown) — for reading
            intermediate values in ORT.
        used_only: for an ORT session: large initializers no node reads (a pass's replaced
            weights before dead-code removal) are left out altogether — ORT would drop them,
            and they must not travel inline — and are not among the returned weights.

    Returns:
        ``(proto, weights)``: the small protobuf (no ``value_info``) and the detached
        ``(name, tensor)`` pairs in the order they were detached.
    """
    vals = _detachable(model, _BUFFER_DTYPES if used_only else _RAW_DTYPES)
    saved = [(v, v.const_value) for v in vals]
    try:
        for v, t in saved:
            v.const_value = ir.ExternalTensor(location, (offsets or {}).get(v.name, 0), t.nbytes, t.dtype,
                                              shape=t.shape, name=v.name)
        proto = ir.to_proto(model)
    finally:
        for v, t in saved:
            v.const_value = t
    del proto.graph.value_info[:]
    if used_only:
        unused = {v.name for v, _ in saved if _unused(v)}
        if unused:
            keep = [t for t in proto.graph.initializer if t.name not in unused]
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(keep)
            saved = [(v, t) for v, t in saved if v.name not in unused]
    if extra_outputs:
        existing = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in extra_outputs if n not in existing)
    return proto, [(v.name, t) for v, t in saved]


@contextlib.contextmanager
def skeleton_file(model: ir.Model, **kwargs):
    """The model's :func:`skeleton` (``kwargs`` passed on) written to a private temporary folder
    beside the empty stand-in file its external-data entries name — the checker and ORT check
    that it exists; neither reads it — removed on exit (so a process that exits without atexit
    leaves nothing). Yields ``(model path, detached (name, tensor) pairs)``."""
    proto, weights = skeleton(model, **kwargs)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-skeleton-") as folder:
        open(os.path.join(folder, PLACEHOLDER), "wb").close()
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
        del proto
        yield path, weights


def weight_buffer(tensor: ir.TensorProtocol) -> np.ndarray:
    """A C-contiguous numpy view of a tensor's data (a memory map for external data; no copy
    where the data already is one)."""
    return np.ascontiguousarray(tensor.numpy())
