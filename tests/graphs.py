"""Small generated graphs for pass tests (built with onnx.helper; weights seeded)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)


def vi(name, shape, elem=TensorProto.FLOAT):
    """A value info; ``shape=None`` means unknown rank (no shape field)."""
    if shape is None or shape == []:
        return helper.make_tensor_value_info(name, elem, None)
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m


def run(m, feeds, optimize=False):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    data = m if isinstance(m, (str, bytes)) else m.SerializeToString()
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def conv_bn_relu(c_in=3, c_out=8, group=1, eps=1e-5, with_bias=True):
    """x[1,c_in,8,8] -> Conv(group) -> BN(eps) -> Relu -> y."""
    w = RNG.standard_normal((c_out, c_in // group, 3, 3)).astype(np.float32) * 0.3
    inits = [init("W", w), init("g", RNG.uniform(0.5, 1.5, c_out)), init("b", RNG.standard_normal(c_out)),
             init("m", RNG.standard_normal(c_out) * 0.1), init("v", RNG.uniform(0.5, 2.0, c_out))]
    conv_in = ["x", "W"]
    if with_bias:
        inits.append(init("B", RNG.standard_normal(c_out) * 0.1))
        conv_in.append("B")
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1], group=group, name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], epsilon=eps, name="bn"),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    return model(nodes, [vi("x", [1, c_in, 8, 8])], [vi("y", [])], inits)


def mlp(k=16, n=8, batch=4):
    """x[batch,k] -> MatMul(W) -> Add(b) -> Relu -> MatMul -> Add -> y."""
    inits = [init("W1", RNG.standard_normal((k, 32)) * 0.3), init("b1", RNG.standard_normal(32) * 0.1),
             init("W2", RNG.standard_normal((32, n)) * 0.3), init("b2", RNG.standard_normal(n) * 0.1)]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="mm1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="mm2"),
             helper.make_node("Add", ["h3", "b2"], ["y"], name="add2")]
    return model(nodes, [vi("x", [batch, k])], [vi("y", [batch, n])], inits)
