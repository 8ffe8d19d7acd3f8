"""Each pass on small generated graphs: outputs equal to the original within a stated tolerance."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import graphs as G
from onnxcompress.passes.base import PassContext, run_passes
from onnxcompress.passes.cleanup import (ConstantFoldingPass, DeadCodePass, IdentityDropoutPass,
                                         InitializerInputsPass, LiftConstantsPass)
from onnxcompress.passes.fusion import FoldBatchNormPass, MatMulAddToGemmPass
from onnxcompress.passes.prune import MagnitudePrunePass

TOL = 1e-5  # relative to max|ref| for exact rewrites


def _apply(m, passes, feeds):
    model = ir.from_proto(m)
    model, reps = run_passes(model, passes, [feeds])
    return ir.to_proto(model), reps


def _close(a, b, tol=TOL):
    for k in a:
        assert a[k].shape == b[k].shape
        assert np.max(np.abs(a[k] - b[k])) <= tol * max(1.0, np.max(np.abs(a[k])))


@pytest.mark.parametrize("group,c_in,c_out,eps,bias", [(1, 3, 8, 1e-5, True), (4, 4, 8, 1e-2, False), (8, 8, 8, 1e-3, True)])
def test_fold_batchnorm_conv(group, c_in, c_out, eps, bias):
    m = G.conv_bn_relu(c_in, c_out, group, eps, bias)
    x = {"x": np.random.default_rng(0).standard_normal((1, c_in, 8, 8)).astype(np.float32)}
    out, reps = _apply(m, [FoldBatchNormPass()], x)
    assert reps[0].counts["batchnorm_folded"] == 1 and not reps[0].reverted
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == group
    _close(G.run(m, x), G.run(out, x))


def test_fold_batchnorm_shared_weight_is_cloned():
    """A Conv weight shared with a second Conv must not be rewritten in place (case01 kind)."""
    m = G.conv_bn_relu()
    m.graph.node.append(helper.make_node("Conv", ["x", "W"], ["plain"], pads=[1, 1, 1, 1], name="conv_b"))
    m.graph.output.append(G.vi("plain", []))
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    out, reps = _apply(m, [FoldBatchNormPass()], x)
    assert reps[0].counts["shared_weights_cloned"] >= 1
    _close(G.run(m, x), G.run(out, x))


def test_fold_batchnorm_conv_transpose_groups():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # [C_in, C_out/group, k, k], group=2 -> 6 out
    inits = [G.init("W", w), G.init("g", rng.uniform(0.5, 1.5, 6)), G.init("b", rng.standard_normal(6)),
             G.init("m", rng.standard_normal(6)), G.init("v", rng.uniform(0.5, 2, 6))]
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["c"], group=2, name="ct"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], epsilon=1e-3, name="bn")]
    m = G.model(nodes, [G.vi("x", [1, 4, 5, 5])], [G.vi("y", [])], inits)
    x = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    out, reps = _apply(m, [FoldBatchNormPass()], x)
    assert reps[0].counts["batchnorm_folded"] == 1
    _close(G.run(m, x), G.run(out, x))


def test_matmul_add_to_gemm_rank2_and_refused_rank3():
    m = G.mlp()
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    model = ir.from_proto(m)
    ir.passes.common.ShapeInferencePass()(model)
    model, reps = run_passes(model, [MatMulAddToGemmPass()], [x])
    out = ir.to_proto(model)
    assert reps[0].counts["gemm_fused"] == 2
    assert [n.op_type for n in out.graph.node].count("Gemm") == 2
    _close(G.run(m, x), G.run(out, x))
    # rank-3 input with a per-batch bias: Gemm would be wrong (case06 kind)
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    m3 = G.model(nodes, [G.vi("x", [2, 3, 4])], [G.vi("y", [])],
                 [G.init("W", rng.standard_normal((4, 4))), G.init("b", rng.standard_normal((2, 1, 4)))])
    model = ir.from_proto(m3)
    ir.passes.common.ShapeInferencePass()(model)
    model, reps = run_passes(model, [MatMulAddToGemmPass()], [{"x": rng.standard_normal((2, 3, 4)).astype(np.float32)}])
    assert reps[0].counts["gemm_fused"] == 0


def test_cleanup_passes_constants_identity_dropout_deadcode():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["Wc"], value=onnx.numpy_helper.from_array(w)),
             helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("Dropout", ["xi"], ["xd"]),
             helper.make_node("MatMul", ["xd", "Wc"], ["y"]),
             helper.make_node("Relu", ["x"], ["dead"])]
    m = G.model(nodes, [G.vi("x", [2, 4])], [G.vi("y", [])], [G.init("unused", [1.0, 2.0])])
    x = {"x": rng.standard_normal((2, 4)).astype(np.float32)}
    out, reps = _apply(m, [ConstantFoldingPass(), LiftConstantsPass(), IdentityDropoutPass(), DeadCodePass()], x)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["MatMul"], ops
    assert not any(i.name == "unused" for i in out.graph.initializer)
    assert any(i.name == "Wc" for i in out.graph.initializer)  # weight lifted to an initializer
    _close(G.run(m, x), G.run(out, x))
    assert all(not r.reverted for r in reps)


def test_initializer_inputs_ir3_become_constants():
    m = G.mlp()
    for i in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
    m.ir_version = 3
    m.opset_import[0].version = 8
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    out, reps = _apply(m, [InitializerInputsPass()], x)
    assert [i.name for i in out.graph.input] == ["x"]
    assert out.ir_version >= 4 and reps[0].skipped  # named in the report
    _close(G.run(m, x), G.run(out, x))


def test_checked_pass_is_reverted_when_outputs_move():
    class Broken(MagnitudePrunePass):
        name = "broken"
        checked = True

    m = G.mlp()
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    out, reps = _apply(m, [Broken(PassContext(options={"sparsity": 0.9, "min_size": 1}))], x)
    assert reps[0].reverted and "tolerance" in reps[0].reverted
    _close(G.run(m, x), G.run(out, x), tol=0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_sparsity(scope):
    m = G.mlp(k=64)
    x = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    out, reps = _apply(m, [MagnitudePrunePass(PassContext(options={"sparsity": 0.5, "scope": scope, "min_size": 1}))], x)
    c = reps[0].counts
    assert abs(c["achieved_sparsity"] - 0.5) < 0.01
    if scope == "layer":
        assert all(abs(s - 0.5) < 0.01 for s in c["sparsity_per_tensor"].values())


def test_pruning_at_zero_is_identity():
    m = G.mlp()
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    out, reps = _apply(m, [MagnitudePrunePass(PassContext(options={"sparsity": 0.0}))], x)
    assert not reps[0].changed
    _close(G.run(m, x), G.run(out, x), tol=0)


def test_identity_forwarding_outer_value_in_if_branches():
    """Both If branches forward the same outer-scope value through an Identity to their own
    output (Silero VAD): onnx-ir's IdentityEliminationPass raised; ours keeps those nodes."""
    T = onnx.TensorProto
    thn = helper.make_graph([helper.make_node("Identity", ["r"], ["t_out"])], "then", [], [G.vi("t_out", [2])])
    els = helper.make_graph([helper.make_node("Identity", ["r"], ["e_out"])], "else", [], [G.vi("e_out", [2])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["r2"]),
             helper.make_node("If", ["c"], ["y"], then_branch=thn, else_branch=els),
             helper.make_node("Add", ["y", "r2"], ["z"])]
    m = G.model(nodes, [G.vi("x", [2]), G.vi("c", [], T.BOOL)], [G.vi("z", [2])])
    m.graph.input[1].type.tensor_type.shape.SetInParent()
    feeds = {"x": np.array([-1, 2], np.float32), "c": np.array(True)}
    out, reps = _apply(m, [IdentityDropoutPass()], feeds)
    assert not reps[0].reverted, reps[0].reverted
    assert reps[0].counts["nodes_removed"] == 1  # the main-graph Identity only
    _close(G.run(m, feeds), G.run(out, feeds))
