"""Builders for the field failure cases, ported from ``shared/cases/caseNN/make.py``.

Each ``build_caseNN()`` returns a :class:`Case` with the in-memory model, the feed dict
(``inputs.npz`` of the shared case), the calibration samples (``calib.npz``, or ``None``),
the ``expect`` dict of ``case.json``, the public report(s) it comes from and, for case24,
the keyword arguments that make ``onnx.save_model`` write external data. The random draws
happen in exactly the order of the original generators, so the models are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG_SEED = 1234


def rng(seed: int = RNG_SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


def const(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


_IR_FOR_OPSET = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8,
                 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


def make_model(graph, opset=13, ir_version=None):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="onnxcompress-cases")
    m.ir_version = _IR_FOR_OPSET.get(opset, 10) if ir_version is None else ir_version
    return m


@dataclass
class Case:
    id: str
    source: str
    model: onnx.ModelProto
    inputs: dict[str, np.ndarray]
    expect: dict[str, Any]
    calib: list[dict[str, np.ndarray]] | None = None
    save_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_calibration: tuple[str, ...] = ()


def build_case01() -> Case:
    r = rng(1)
    W = r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5
    B = r.standard_normal(4).astype(np.float32) * 0.1
    gamma = r.uniform(0.5, 2.0, 4)
    beta = r.standard_normal(4) * 0.2
    mean = r.standard_normal(4) * 0.3
    var = r.uniform(0.2, 3.0, 4)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c1"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["out_bn"],
                         name="bn_a", epsilon=1e-3),
        helper.make_node("Conv", ["y", "W", "B"], ["out_plain"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "shared_conv_weight_bn",
                          [vi("x", [1, 3, 8, 8]), vi("y", [1, 3, 8, 8])],
                          [vi("out_bn", [1, 4, 8, 8]), vi("out_plain", [1, 4, 8, 8])],
                          [const("W", W), const("B", B), const("gamma", gamma), const("beta", beta),
                           const("mean", mean), const("var", var)])
    m = make_model(g, opset=15)
    inputs = {"x": r.standard_normal((1, 3, 8, 8)).astype(np.float32),
              "y": r.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    return Case("case01", "https://github.com/Tencent/TNN/issues/808 ; https://github.com/pytorch/pytorch/issues/197539",
                m, inputs, {"max_abs_err_fused": 1e-4, "all_outputs_present": True,
                            "shared_initializer_must_be_cloned_or_fusion_skipped": True})


def build_case02() -> Case:
    r = rng(2)
    Wd = r.standard_normal((4, 1, 3, 3)).astype(np.float32)
    Wg = r.standard_normal((8, 2, 3, 3)).astype(np.float32) * 0.4
    Bg = r.standard_normal(8).astype(np.float32) * 0.1
    bn1 = [r.uniform(0.5, 1.5, 4), r.standard_normal(4) * 0.1, r.standard_normal(4) * 0.2, r.uniform(1e-3, 5e-3, 4)]
    bn2 = [r.uniform(0.5, 1.5, 8), r.standard_normal(8) * 0.1, r.standard_normal(8) * 0.2, r.uniform(0.5, 2.0, 8)]
    nodes = [
        helper.make_node("Conv", ["x", "Wd"], ["d"], name="dwconv", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["d", "g1", "b1", "m1", "v1"], ["d_bn"], name="bn1", epsilon=1e-2),
        helper.make_node("Relu", ["d_bn"], ["d_r"], name="relu1"),
        helper.make_node("Conv", ["d_r", "Wg", "Bg"], ["gc"], name="gconv", group=2, pads=[0, 0, 0, 0]),
        helper.make_node("BatchNormalization", ["gc", "g2", "b2", "m2", "v2"], ["out"], name="bn2", epsilon=1e-5),
    ]
    inits = [const("Wd", Wd), const("Wg", Wg), const("Bg", Bg)]
    inits += [const(n, v) for n, v in zip(["g1", "b1", "m1", "v1"], bn1)]
    inits += [const(n, v) for n, v in zip(["g2", "b2", "m2", "v2"], bn2)]
    g = helper.make_graph(nodes, "grouped_conv_bn", [vi("x", [1, 4, 6, 6])], [vi("out", [1, 8, 4, 4])], inits)
    m = make_model(g, opset=15)
    inputs = {"x": r.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    return Case("case02", "https://github.com/facebookresearch/LeViT/pull/22 ; https://github.com/ultralytics/yolov5/pull/898",
                m, inputs, {"max_abs_err_fused": 1e-4, "group_attribute_preserved": True})


def build_case04() -> Case:
    r = rng(4)
    W = r.standard_normal((3, 16, 3, 3)).astype(np.float32) * 0.3
    W *= np.linspace(0.05, 3.0, 16, dtype=np.float32)[None, :, None, None]
    B = r.standard_normal(16).astype(np.float32) * 0.1
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["out"], name="deconv", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "convtranspose_perchannel", [vi("x", [1, 3, 8, 8])], [vi("out", [1, 16, 8, 8])],
                          [const("W", W), const("B", B)])
    m = make_model(g, opset=13)
    x = r.standard_normal((1, 3, 8, 8)).astype(np.float32)
    calib = [{"x": r.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)] + [{"x": x}]
    return Case("case04", "https://github.com/microsoft/onnxruntime/issues/19694 (fix: https://github.com/microsoft/onnxruntime/pull/19996)",
                m, {"x": x}, {"must_load": True, "max_rel_err_quant": 0.05, "per_channel_axis": 1}, calib=calib)


def build_case05() -> Case:
    r = rng(5)
    W1 = r.standard_normal((8, 16)).astype(np.float32) * 0.3
    B1 = r.standard_normal(8).astype(np.float32) * 0.1
    W2 = r.standard_normal((8, 5)).astype(np.float32) * 0.3
    B2 = r.standard_normal((1, 5)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "W2", "B2"], ["out"], name="fc2", alpha=0.5, beta=2.0),
    ]
    g = helper.make_graph(nodes, "gemm_transB", [vi("x", [2, 16])], [vi("out", [2, 5])],
                          [const("W1", W1), const("B1", B1), const("W2", W2), const("B2", B2)])
    m = make_model(g, opset=13)
    x = r.standard_normal((2, 16)).astype(np.float32)
    return Case("case05", "https://github.com/microsoft/onnxruntime/issues/25890 ; https://github.com/microsoft/onnxruntime/pull/5432",
                m, {"x": x}, {"must_load": True, "max_rel_err_quant": 0.05})


def build_case06() -> Case:
    r = rng(6)
    W1 = r.standard_normal((8, 6)).astype(np.float32) * 0.4
    B1 = r.standard_normal(6).astype(np.float32) * 0.1
    W2 = r.standard_normal((6, 4)).astype(np.float32) * 0.4
    B2 = r.standard_normal((2, 1, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["mm1"], name="mm1"),
        helper.make_node("Add", ["mm1", "B1"], ["h"], name="add1"),
        helper.make_node("MatMul", ["h", "W2"], ["mm2"], name="mm2"),
        helper.make_node("Add", ["mm2", "B2"], ["out"], name="add2"),
    ]
    g = helper.make_graph(nodes, "matmul_add_batched", [vi("x", [2, 5, 8])], [vi("out", [2, 5, 4])],
                          [const("W1", W1), const("B1", B1), const("W2", W2), const("B2", B2)])
    m = make_model(g, opset=13)
    inputs = {"x": r.standard_normal((2, 5, 8)).astype(np.float32)}
    return Case("case06", "https://github.com/onnx/optimizer/issues/66 ; https://github.com/microsoft/onnxruntime/pull/3780 ; "
                "https://github.com/inisis/OnnxSlim/issues/210",
                m, inputs, {"max_abs_err_fused": 1e-5, "output_shape_unchanged": True})


def build_case08() -> Case:
    r = rng(8)
    gamma = r.uniform(0.5, 2.0, (3, 1)).astype(np.float32)
    beta = r.standard_normal(8).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], name="rm1", axes=[-1], keepdims=1),
        helper.make_node("Sub", ["x", "mu"], ["d"], name="sub"),
        helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"),
        helper.make_node("ReduceMean", ["d2"], ["var"], name="rm2", axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
        helper.make_node("Div", ["d", "sd"], ["n"], name="div"),
        helper.make_node("Mul", ["n", "gamma"], ["ng"], name="mul_gamma"),
        helper.make_node("Add", ["ng", "beta"], ["out"], name="add_beta"),
    ]
    g = helper.make_graph(nodes, "layernorm_bad_gamma", [vi("x", [2, 3, 8])], [vi("out", [2, 3, 8])],
                          [const("two", 2.0), const("eps", 1e-5), const("gamma", gamma), const("beta", beta)])
    m = make_model(g, opset=17)
    inputs = {"x": (r.standard_normal((2, 3, 8)) * 3 + 1).astype(np.float32)}
    return Case("case08", "https://github.com/microsoft/onnxruntime/issues/25855",
                m, inputs, {"max_abs_err_fused": 1e-4, "fusion_must_check_gamma_shape": True})


def build_case10() -> Case:
    r = rng(10)
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["xk"], name="qg_mul1"),
        helper.make_node("Sigmoid", ["xk"], ["sig"], name="qg_sigmoid"),
        helper.make_node("Mul", ["x", "sig"], ["quick_gelu"], name="qg_mul2"),
        helper.make_node("Div", ["x", "sqrt2"], ["xd"], name="g_div"),
        helper.make_node("Erf", ["xd"], ["erf"], name="g_erf"),
        helper.make_node("Add", ["erf", "one"], ["erf1"], name="g_add"),
        helper.make_node("Mul", ["x", "erf1"], ["xm"], name="g_mul1"),
        helper.make_node("Mul", ["xm", "half"], ["gelu"], name="g_mul2"),
    ]
    g = helper.make_graph(nodes, "gelu_intermediate_outputs", [vi("x", [2, 8])],
                          [vi("quick_gelu", [2, 8]), vi("sig", [2, 8]), vi("gelu", [2, 8]), vi("erf", [2, 8])],
                          [const("k", 1.702), const("sqrt2", np.sqrt(2.0)), const("one", 1.0), const("half", 0.5)])
    m = make_model(g, opset=13)
    inputs = {"x": (r.standard_normal((2, 8)) * 2).astype(np.float32)}
    return Case("case10", "https://github.com/microsoft/onnxruntime/pull/15109 ; https://github.com/microsoft/onnxruntime/issues/4110",
                m, inputs, {"max_abs_err_fused": 1e-5, "all_outputs_present": True})


def build_case11() -> Case:
    r = rng(11)
    W1 = r.standard_normal((2, 2, 1, 1)).astype(np.float32)
    W2 = r.standard_normal((2, 2, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
        helper.make_node("Resize", ["c1", "", "scales"], ["up"], name="resize_linear", mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Conv", ["up", "W2"], ["out"], name="conv2"),
    ]
    g = helper.make_graph(nodes, "resize_linear_qdq", [vi("x", [1, 2, 4, 4])], [vi("out", [1, 2, 8, 8])],
                          [const("W1", W1), const("W2", W2), const("scales", [1.0, 1.0, 2.0, 2.0])])
    m = make_model(g, opset=13)
    x = r.uniform(-1, 1, (1, 2, 4, 4)).astype(np.float32)
    return Case("case11", "https://github.com/microsoft/onnxruntime/issues/21319 (fix: https://github.com/microsoft/onnxruntime/pull/28414)",
                m, {"x": x}, {"must_load": True, "max_rel_err_quant": 0.05,
                              "quantized_model_same_with_and_without_runtime_graph_opt": 1e-6})


def build_case12() -> Case:
    r = rng(12)
    W1 = r.standard_normal((8, 4)).astype(np.float32) * 0.4
    W2 = r.standard_normal((8, 4)).astype(np.float32) * 0.4
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["t_out"], name="then_mm")],
                               "then_branch", [], [vi("t_out", [2, 4])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W2"], ["e_mm"], name="else_mm"),
                                helper.make_node("Relu", ["e_mm"], ["e_out"], name="else_relu")],
                               "else_branch", [], [vi("e_out", [2, 4])])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "if_matmul", [vi("cond", [], TensorProto.BOOL), vi("x", [2, 8])],
                          [vi("out", [2, 4])], [const("W1", W1), const("W2", W2)])
    m = make_model(g, opset=13)
    x = r.standard_normal((2, 8)).astype(np.float32)
    return Case("case12", "https://github.com/microsoft/onnxruntime/issues/8488 (subgraph support: "
                "https://github.com/microsoft/onnxruntime/pull/8012)",
                m, {"cond": np.array(True), "x": x},
                {"must_load": True, "max_rel_err_quant": 0.05, "both_branches_valid": True,
                 "uncalibrated_branch": "keep fp32 or refuse with a clear message; never invent ranges silently"})


def build_case14() -> Case:
    r = rng(14)
    W = r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.4
    bn = [r.uniform(0.5, 1.5, 4), r.standard_normal(4) * 0.1, r.standard_normal(4) * 0.2, r.uniform(0.3, 2.0, 4)]
    Wf = r.standard_normal((5, 64)).astype(np.float32) * 0.2
    Bf = r.standard_normal(5).astype(np.float32) * 0.1
    inits = [const("W", W)] + [const(n, v) for n, v in zip(["g", "b", "m", "v"], bn)] + [const("Wf", Wf), const("Bf", Bf)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["cb"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["cb"], ["cr"], name="relu"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["out"], name="fc", transB=1),
    ]
    graph_inputs = [vi("x", [1, 3, 4, 4])] + [vi(t.name, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "initializers_as_inputs", graph_inputs, [vi("out", [1, 5])], inits)
    m = make_model(g, opset=9, ir_version=3)
    inputs = {"x": r.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    return Case("case14", "https://github.com/microsoft/onnxruntime/pull/3449 ; https://github.com/microsoft/onnxruntime/pull/1872 ; "
                "https://github.com/microsoft/onnxruntime/issues/9663 ; https://github.com/microsoft/onnxruntime/pull/32143",
                m, inputs, {"must_load": True, "max_abs_err_fused": 1e-4,
                            "policy": "either treat as constants and drop them from graph.input (bumping IR version, "
                                      "with a warning) or leave those nodes untouched; never keep a graph input whose "
                                      "value is ignored"})


def build_case16() -> Case:
    r = rng(16)
    W1 = r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.4
    W2 = r.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3
    b = r.standard_normal(4).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b"], ["b0"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b0"], ["b1"], name="relu"),
        helper.make_node("Conv", ["b1", "W2", "b"], ["out"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "shared_bias_name_clash", [vi("x", [1, 3, 6, 6])], [vi("out", [1, 4, 6, 6])],
                          [const("W1", W1), const("W2", W2), const("b", b)],
                          value_info=[vi("b0", [1, 4, 6, 6]), vi("b1", [1, 4, 6, 6])])
    m = make_model(g, opset=13)
    x = r.standard_normal((1, 3, 6, 6)).astype(np.float32)
    return Case("case16", "https://github.com/microsoft/onnxruntime/issues/24705",
                m, {"x": x}, {"must_load": True, "max_rel_err_quant": 0.05, "unique_tensor_names": True})


def build_case18() -> Case:
    r = rng(18)
    W = r.standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        helper.make_node("ReduceSum", ["y"], ["total"], name="sum_all", keepdims=0),
    ]
    g = helper.make_graph(nodes, "scalar_output", [vi("x", [2, 4])], [vi("y", [2, 3]), vi("total", [])],
                          [const("W", W)])
    m = make_model(g, opset=13)
    x = r.standard_normal((2, 4)).astype(np.float32)
    calib = [{"x": r.standard_normal((2, 4)).astype(np.float32)} for _ in range(4)] + [{"x": x}]
    return Case("case18", "https://github.com/microsoft/onnxruntime/issues/19529",
                m, {"x": x}, {"must_load": True, "no_crash_any_calibration_method": True, "max_rel_err_quant": 0.05},
                calib=calib, extra_calibration=("percentile", "entropy"))


def build_case20() -> Case:
    r = rng(20)
    W = r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.4
    W[1] = 0.0
    W[2] = np.float32(1e-39) * np.sign(r.standard_normal((3, 3, 3)))
    B = np.array([0.1, 0.5, -0.2, 0.0], dtype=np.float32)
    Wz = np.zeros((4 * 4 * 4, 3), dtype=np.float32)
    Wm = r.standard_normal((4 * 4 * 4, 3)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flatten", axis=1),
        helper.make_node("MatMul", ["f", "Wz"], ["z"], name="mm_zero"),
        helper.make_node("MatMul", ["f", "Wm"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "z"], ["out"], name="add"),
    ]
    g = helper.make_graph(nodes, "pruned_zero_weights", [vi("x", [1, 3, 4, 4])], [vi("out", [1, 3])],
                          [const("W", W), const("B", B), const("Wz", Wz), const("Wm", Wm)])
    m = make_model(g, opset=13)
    inputs = {"x": r.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    return Case("case20", "https://github.com/apple/coremltools/issues/2853 ; https://github.com/ml-explore/mlx/pull/1028 ; "
                "https://github.com/openvinotoolkit/openvino/pull/20541",
                m, inputs, {"must_load": True, "no_nan_or_inf_in_output_model": True, "scales_strictly_positive": True,
                            "max_rel_err_quant": 0.05})


def build_case21() -> Case:
    r = rng(21)
    W = r.standard_normal((64, 16)).astype(np.float32) * 0.2
    W[7, :] = 0.0
    x = r.standard_normal((4, 64)).astype(np.float32)
    x[:, 7] = 1000.0
    nodes = [helper.make_node("MatMul", ["x", "W"], ["out"], name="mm")]
    g = helper.make_graph(nodes, "activation_outlier", [vi("x", [4, 64])], [vi("out", [4, 16])], [const("W", W)])
    m = make_model(g, opset=13)
    return Case("case21", "https://github.com/microsoft/onnxruntime/issues/9599 ; https://github.com/onnx/onnx-mlir/issues/2566",
                m, {"x": x}, {"max_rel_err_quant": 0.05,
                              "or_refuse": "keep this MatMul in fp32 / report accuracy loss instead of silently emitting it"})


def build_case22() -> Case:
    r = rng(22)
    W1 = r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.4
    W2 = r.standard_normal((2, 4, 1, 1)).astype(np.float32) * 0.4
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Upsample", ["c", "scales"], ["u"], name="upsample", mode="nearest"),
        helper.make_node("Conv", ["u", "W2"], ["out"], name="conv2"),
    ]
    g = helper.make_graph(nodes, "upsample_opset9", [vi("x", [1, 3, 4, 4])], [vi("out", [1, 2, 8, 8])],
                          [const("W1", W1), const("W2", W2), const("scales", [1.0, 1.0, 2.0, 2.0])])
    m = make_model(g, opset=9)
    inputs = {"x": r.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    return Case("case22", "https://github.com/microsoft/onnxruntime/pull/24896",
                m, inputs, {"must_load": True, "max_rel_err_quant": 0.05,
                            "opset_upgrade_must_convert_deprecated_ops": True})


def build_case24() -> Case:
    r = rng(24)
    W1 = r.standard_normal((256, 256)).astype(np.float32) * 0.05
    W2 = r.standard_normal((256, 8)).astype(np.float32) * 0.05
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["out"], name="mm2"),
    ]
    g = helper.make_graph(nodes, "external_data", [vi("x", [2, 256])], [vi("out", [2, 8])],
                          [const("W1", W1), const("W2", W2)])
    m = make_model(g, opset=13)
    inputs = {"x": r.standard_normal((2, 256)).astype(np.float32)}
    return Case("case24", "https://github.com/microsoft/onnxruntime/issues/17098 ; https://github.com/huggingface/optimum/issues/300 ; "
                "https://github.com/NVIDIA/Model-Optimizer/pull/1058",
                m, inputs, {"must_load": True, "max_rel_err_quant": 0.05, "external_data_respected": True,
                            "no_in_memory_serialisation_over_2GB": True},
                save_kwargs={"save_as_external_data": True, "all_tensors_to_one_file": True,
                             "location": "model.onnx.data", "size_threshold": 0})


BUILDERS = {name[len("build_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("build_case")}
