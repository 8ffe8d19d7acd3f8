"""Per-node fidelity check: does one node survive int8 on its own?

For a node chosen for quantization, a one-node model is run in ONNX Runtime twice on the
node's real input activations (recorded during calibration): once in float, once with the
activation(s) quantize-dequantized as the deployed model will see them and the weight
replaced by its int8 dequantized value. The signal-to-quantization-noise ratio of the
node's output, ``SQNR = 10 log10(sum ref^2 / sum (ref - q)^2)`` in dB, decides: below the
threshold the node stays in float and the report names it (sensitive-layer fallback).
This catches outlier activation channels (shared/cases case21) that a per-tensor range
cannot represent.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...runtime import make_session


#: elements per block of :func:`sqnr_db` (float64 temporaries of 32 MB: a whole-array float64
#: square of a PP-OCRv4 det activation was the static stage's memory peak)
SQNR_BLOCK = 1 << 22


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """``10 log10(sum ref^2 / sum (ref - got)^2)`` in dB (``inf`` when equal), summed in float64
    over blocks of :data:`SQNR_BLOCK` elements."""
    r, g = np.asarray(ref).reshape(-1), np.asarray(got).reshape(-1)
    noise = signal = 0.0
    for i in range(0, max(r.size, 1), SQNR_BLOCK):
        a = r[i:i + SQNR_BLOCK].astype(np.float64)
        d = a - g[i:i + SQNR_BLOCK]
        noise += float(np.sum(d * d))
        signal += float(np.sum(a * a))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return -float("inf")
    return 10.0 * np.log10(signal / noise)


def add_channel_rows(acc: np.ndarray | None, ref: np.ndarray, got: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """``acc`` plus the column sums of ``ref - got`` laid out as rows [positions, channels] (channel
    ``axis`` last), added row by row after ``acc`` in the order ``np.mean(axis=0)`` of every
    sample's concatenated rows adds them, so a mean built sample by sample is the same float32
    value without holding every sample's difference (empirical bias correction). Returns
    ``(new sum, rows added)``."""
    d = ref - got
    rows = np.moveaxis(d, axis, -1).reshape(-1, d.shape[axis])
    del d
    return np.add.reduce(rows if acc is None else np.concatenate([acc[None], rows]), axis=0), rows.shape[0]


def node_sqnr(op_type, attributes, float_inputs, quant_inputs, const_mask, opset) -> float:
    """SQNR in dB of one node's output, quantized inputs vs float inputs (see :func:`node_outputs`)."""
    ref, got = node_outputs(op_type, attributes, float_inputs, quant_inputs, const_mask, opset)
    return sqnr_db(ref, got)


def node_outputs(
    op_type: str,
    attributes: dict,
    float_inputs: list[np.ndarray | None],
    quant_inputs: list[np.ndarray | None],
    const_mask: list[bool],
    opset: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One node's output (float64) with float inputs and with quantized inputs.

    Args:
        op_type: ONNX op type (default domain).
        attributes: the node's attributes as Python values.
        float_inputs / quant_inputs: the node's inputs (``None`` for absent optional ones).
        const_mask: which inputs are weights (stored as initializers in the probe model).
        opset: opset of the probe model.

    Returns:
        ``(reference output, output with quantized inputs)``.

    A plain ``MatMul`` (no attributes, two inputs) is computed with numpy's float32 ``matmul``
    (the same product ORT's CPU kernel computes, up to summation order) instead of two
    one-node ORT sessions: no session, no copy of the weight into a probe model.
    """
    if op_type == "MatMul" and not attributes and len(float_inputs) == 2 and all(
            isinstance(v, np.ndarray) and v.dtype == np.float32 for v in (*float_inputs, *quant_inputs)):
        return (np.matmul(float_inputs[0], float_inputs[1]).astype(np.float64),
                np.matmul(quant_inputs[0], quant_inputs[1]).astype(np.float64))
    def build(values):
        inits, graph_inputs, names, feeds = [], [], [], {}
        for i, (v, is_const) in enumerate(zip(values, const_mask)):
            if v is None:
                names.append("")
                continue
            name = f"in{i}"
            names.append(name)
            if is_const:
                inits.append(numpy_helper.from_array(np.asarray(v), name))
            else:
                graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), None))
                feeds[name] = v
        node = helper.make_node(op_type, names, ["out"], **attributes)
        g = helper.make_graph([node], "probe", graph_inputs,
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m.SerializeToString(), feeds

    fb, ff = build(float_inputs)
    qb, qf = build(quant_inputs)
    ref = make_session(fb, optimize=False).run(None, ff)[0].astype(np.float64)
    got = make_session(qb, optimize=False).run(None, qf)[0].astype(np.float64)
    return ref, got
