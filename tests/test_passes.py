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
from onnxcompress.passes.fusion import ConvAffinePass, ConvBiasPass, FoldBatchNormPass, HardSwishPass, MatMulAddToGemmPass
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
    out, reps = _apply(m, [Broken(PassContext(), sparsity=0.9, min_size=1)], x)
    assert reps[0].reverted and "tolerance" in reps[0].reverted
    _close(G.run(m, x), G.run(out, x), tol=0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_sparsity(scope):
    m = G.mlp(k=64)
    x = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    out, reps = _apply(m, [MagnitudePrunePass(PassContext(), sparsity=0.5, scope=scope, min_size=1)], x)
    c = reps[0].counts
    assert abs(c["achieved_sparsity"] - 0.5) < 0.01
    if scope == "layer":
        assert all(abs(s - 0.5) < 0.01 for s in c["sparsity_per_tensor"].values())


def test_pruning_at_zero_is_identity():
    m = G.mlp()
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    out, reps = _apply(m, [MagnitudePrunePass(PassContext(), sparsity=0.0)], x)
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


def test_conv_affine_folding():
    """PP-LCNetV3 "learnable affine blocks": scalar Mul + Add after a Conv fold into it (exact);
    before a Conv only when it has no padding (zero padding of the affine input would differ)."""
    rng = np.random.default_rng(5)
    inits = [G.init("w1", rng.standard_normal((6, 3, 3, 3)) * 0.3), G.init("b1", rng.standard_normal(6) * 0.1),
             G.init("w2", rng.standard_normal((4, 6, 1, 1)) * 0.3), G.init("b2", rng.standard_normal(4) * 0.1),
             G.init("w3", rng.standard_normal((4, 4, 3, 3)) * 0.3), G.init("b3", rng.standard_normal(4) * 0.1),
             G.init("a", [1.7]), G.init("c", [-0.4]), G.init("a2", [0.6]), G.init("c2", [0.25]),
             G.init("a3", [1.3]), G.init("c3", [0.5])]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Mul", ["a", "c1"], ["m1"]),          # constant first: commuted match
             helper.make_node("Add", ["m1", "c"], ["y1"]),
             helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("Mul", ["r1", "a2"], ["m2"]),
             helper.make_node("Add", ["m2", "c2"], ["y2"]),
             helper.make_node("Conv", ["y2", "w2", "b2"], ["c2o"], pads=[0] * 4),   # 1x1, no padding: folds
             helper.make_node("Mul", ["c2o", "a3"], ["m3"]),
             helper.make_node("Add", ["m3", "c3"], ["y3"]),
             helper.make_node("Relu", ["y3"], ["r3"]),
             helper.make_node("Conv", ["r3", "w3", "b3"], ["y"], pads=[1] * 4)]
    m = G.model(nodes, [G.vi("x", [1, 3, 8, 8])], [G.vi("y", [1, 4, 8, 8])], inits)
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    out, reps = _apply(m, [ConvAffinePass(PassContext())], feeds)
    assert not reps[0].reverted and reps[0].counts["affine_folded"] == 3
    assert not any(n.op_type in ("Mul", "Add") for n in out.graph.node)
    _close(G.run(m, feeds), G.run(out, feeds), 1e-5)
    # the same affine before a padded 3x3 Conv is left alone
    nodes2 = [helper.make_node("Mul", ["x", "a"], ["mx"]), helper.make_node("Add", ["mx", "c"], ["ax"]),
              helper.make_node("Conv", ["ax", "w1", "b1"], ["y"], pads=[1] * 4)]
    m2 = G.model(nodes2, [G.vi("x", [1, 3, 8, 8])], [G.vi("y", [1, 6, 8, 8])], inits[:2] + inits[6:8])
    out2, reps2 = _apply(m2, [ConvAffinePass(PassContext())], feeds)
    assert reps2[0].counts["affine_folded"] == 0 and [n.op_type for n in out2.graph.node] == ["Mul", "Add", "Conv"]


def test_conv_affine_fold_keeps_the_conv_name_when_the_scale_comes_first():
    """Two branches reading one input (a MobileOne block), each Conv -> Mul(scale, conv) -> Add
    (an exported scalar affine, the constant first as PaddlePaddle writes it), folded into one
    Conv each: every new Conv carries its own original name, found through the Mul's second input
    (the first input alone cannot tell the siblings apart), so --exclude and the reports keep
    using the names inspect shows."""
    rng = np.random.default_rng(11)
    inits, nodes = [], []
    for k, (a, c) in {"a": (1.7, -0.4), "b": (0.6, 0.25)}.items():
        inits += [G.init(f"w{k}", rng.standard_normal((4, 3, 1, 1)) * 0.3), G.init(f"b{k}", rng.standard_normal(4) * 0.1),
                  G.init(f"s{k}", [a]), G.init(f"o{k}", [c])]
        nodes += [helper.make_node("Conv", ["x", f"w{k}", f"b{k}"], [f"c{k}"], name=f"p2o.Conv.{k}"),
                  helper.make_node("Mul", [f"s{k}", f"c{k}"], [f"m{k}"], name=f"p2o.Mul.{k}"),
                  helper.make_node("Add", [f"m{k}", f"o{k}"], [f"y{k}"], name=f"p2o.Add.{k}")]
    m = G.model(nodes, [G.vi("x", [1, 3, 5, 5])], [G.vi("ya", [1, 4, 5, 5]), G.vi("yb", [1, 4, 5, 5])], inits)
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    out, reps = _apply(m, [ConvAffinePass(PassContext())], feeds)
    assert reps[0].counts["affine_folded"] == 2
    assert {n.output[0]: (n.op_type, n.name) for n in out.graph.node} == {"ya": ("Conv", "p2o.Conv.a"),
                                                                          "yb": ("Conv", "p2o.Conv.b")}
    _close(G.run(m, feeds), G.run(out, feeds), 1e-5)


@pytest.mark.parametrize("opset", [12, 17])
def test_hardswish_fusion(opset):
    """``x * Clip(x + 3, 0, 6) / 6`` (exported HardSwish) -> HardSwish (opset >= 14) or
    Mul(x, HardSigmoid(x)) below; outputs equal within float rounding."""
    inits = [G.init("three", 3.0), G.init("zero", 0.0), G.init("six", 6.0)]
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]
    m = G.model(nodes, [G.vi("x", [2, 5, 7])], [G.vi("y", [2, 5, 7])], inits, opset=opset)
    feeds = {"x": (np.random.default_rng(6).standard_normal((2, 5, 7)) * 4).astype(np.float32)}
    out, reps = _apply(m, [HardSwishPass(PassContext())], feeds)
    assert not reps[0].reverted and reps[0].counts["hardswish_fused"] == 1
    ops = sorted(n.op_type for n in out.graph.node)
    assert ops == (["HardSwish"] if opset >= 14 else ["HardSigmoid", "Mul"]), ops
    onnx.checker.check_model(out, full_check=True)
    _close(G.run(m, feeds), G.run(out, feeds), 1e-6)


def test_conv_affine_shared_weight_and_4d_scalars():
    """Two convolutions sharing one weight, each with its own affine (new initializers must not
    collide), and the scalars stored as [1, 1, 1, 1] (the bias keeps its shape)."""
    rng = np.random.default_rng(7)
    inits = [G.init("w", rng.standard_normal((3, 3, 3, 3)) * 0.3), G.init("b", rng.standard_normal(3)),
             G.init("a", np.full((1, 1, 1, 1), 2.0)), G.init("c", np.full((1, 1, 1, 1), 1.0)),
             G.init("a2", [3.0]), G.init("c2", [-1.0])]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c1"], pads=[1] * 4),
             helper.make_node("Mul", ["c1", "a"], ["m1"]), helper.make_node("Add", ["m1", "c"], ["y1"]),
             helper.make_node("Conv", ["y1", "w", "b"], ["c2o"], pads=[1] * 4),
             helper.make_node("Mul", ["c2o", "a2"], ["m2"]), helper.make_node("Add", ["m2", "c2"], ["y"])]
    m = G.model(nodes, [G.vi("x", [1, 3, 6, 6])], [G.vi("y", [1, 3, 6, 6])], inits)
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    out, reps = _apply(m, [ConvAffinePass(PassContext())], feeds)
    assert not reps[0].reverted and reps[0].counts["affine_folded"] == 2
    onnx.checker.check_model(out, full_check=True)
    assert all(i.dims == [3] for i in out.graph.initializer if i.name.startswith("b_offset"))
    _close(G.run(m, feeds), G.run(out, feeds), 1e-5)


def test_conv_bias_add_folding_then_batchnorm():
    """Paddle's ``ConvTranspose -> Add(bias [1, C, 1, 1]) -> BatchNormalization`` (PP-OCRv4 det head)
    and ``Conv(x, W, B) -> Add(c [C, 1, 1])``: the Add folds into the bias (exact), which lets the
    BatchNormalization fold too. Addends that are not one value per output channel stay."""
    rng = np.random.default_rng(9)
    inits = [G.init("wt", rng.standard_normal((4, 3, 2, 2)) * 0.3), G.init("bt", rng.standard_normal((1, 3, 1, 1))),
             G.init("g", rng.uniform(0.5, 1.5, 3)), G.init("beta", rng.standard_normal(3) * 0.1),
             G.init("mean", rng.standard_normal(3) * 0.1), G.init("var", rng.uniform(0.5, 1.5, 3)),
             G.init("w", rng.standard_normal((5, 3, 3, 3)) * 0.3), G.init("b", rng.standard_normal(5)),
             G.init("c", rng.standard_normal((5, 1, 1))),
             G.init("w2", rng.standard_normal((5, 5, 1, 1)) * 0.3),
             G.init("row", rng.standard_normal(8)),              # [W]: broadcasts along the width, not channels
             G.init("full", rng.standard_normal((1, 5, 8, 8)))]  # per position
    nodes = [helper.make_node("ConvTranspose", ["x", "wt"], ["t"], strides=[2, 2]),
             helper.make_node("Add", ["bt", "t"], ["tb"]),  # constant first: commuted match
             helper.make_node("BatchNormalization", ["tb", "g", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "w", "b"], ["c1"], pads=[0, 0, 0, 0]),
             helper.make_node("Add", ["c1", "c"], ["y1"]),
             helper.make_node("Conv", ["y1", "w2"], ["c2"]),
             helper.make_node("Add", ["c2", "row"], ["y2"]),
             helper.make_node("Conv", ["y2", "w2"], ["c3"]),
             helper.make_node("Add", ["c3", "full"], ["y"])]
    m = G.model(nodes, [G.vi("x", [1, 4, 5, 5])], [G.vi("y", [1, 5, 8, 8])], inits)
    feeds = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    out, reps = _apply(m, [ConvBiasPass(PassContext()), FoldBatchNormPass(PassContext())], feeds)
    assert not reps[0].reverted and reps[0].counts["bias_folded"] == 2
    assert reps[1].counts["batchnorm_folded"] == 1
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose", "Relu", "Conv", "Conv", "Add", "Conv", "Add"]
    onnx.checker.check_model(out, full_check=True)
    _close(G.run(m, feeds), G.run(out, feeds), 1e-5)


def test_fusion_keeps_node_names_of_sibling_branches():
    """Two Conv+BatchNorm branches read the same input (ResNet downsample beside conv1): after the
    fold each new Conv carries its own original name, found up the chain that produced its output."""
    rng = np.random.default_rng(3)
    inits = []
    nodes = []
    for k in ("a", "b"):
        inits += [G.init(f"w{k}", rng.standard_normal((4, 3, 1, 1))), G.init(f"g{k}", rng.uniform(0.5, 1.5, 4)),
                  G.init(f"be{k}", rng.standard_normal(4)), G.init(f"m{k}", rng.standard_normal(4) * 0.1),
                  G.init(f"v{k}", rng.uniform(0.5, 1.5, 4))]
        nodes += [helper.make_node("Conv", ["x", f"w{k}"], [f"c{k}"], name=f"/{k}/Conv"),
                  helper.make_node("BatchNormalization", [f"c{k}", f"g{k}", f"be{k}", f"m{k}", f"v{k}"], [f"y{k}"],
                                   name=f"/{k}/BatchNormalization")]
    m = G.model(nodes, [G.vi("x", [1, 3, 5, 5])], [G.vi("ya", [1, 4, 5, 5]), G.vi("yb", [1, 4, 5, 5])], inits)
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    out, reps = _apply(m, [FoldBatchNormPass(PassContext())], feeds)
    assert reps[0].counts["batchnorm_folded"] == 2
    by_out = {n.output[0]: n.name for n in out.graph.node}
    assert by_out == {"ya": "/a/Conv", "yb": "/b/Conv"}


def test_run_passes_ref_returns_the_outputs_of_the_model_it_returns():
    """The next stage's checks start from these outputs instead of running the model again: they
    must be the returned model's, and ``None`` once an unchecked pass changed it."""
    from onnxcompress.passes.base import reference_outputs, run_passes_ref

    m = G.mlp()
    x = [{"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}]
    model = ir.from_proto(m)
    ir.passes.common.ShapeInferencePass()(model)
    model, reps, ref = run_passes_ref(model, [MatMulAddToGemmPass()], x)
    assert reps[0].changed and ref is not None
    got = reference_outputs(model, x)
    assert all(np.array_equal(ref[0][k], got[0][k]) for k in got[0])
    same, _, ref2 = run_passes_ref(model, [MatMulAddToGemmPass()], x, ref=ref)  # nothing to fuse: ref carries
    assert ref2 is ref
    ctx = PassContext()
    _, reps3, ref3 = run_passes_ref(same, [MagnitudePrunePass(ctx, sparsity=0.5, min_size=1)], x, ref=ref)
    assert reps3[0].changed and ref3 is None  # a lossy, unchecked rewrite: the outputs are not known


def test_a_pass_that_cannot_act_is_not_run_and_costs_no_snapshot(monkeypatch):
    """A pass whose op types the model lacks (``CompressionPass.needs``) is skipped before the
    snapshot that a run costs (a clone of every node: 1.8 s of a 2.4 GB stack's 12 fusion passes);
    one that can act still runs, and the outputs stay checked."""
    from onnxcompress.passes import base

    taken = []
    real = base.snapshot
    monkeypatch.setattr(base, "snapshot", lambda m: taken.append(1) or real(m))
    mlp = ir.serde.deserialize_model(G.mlp())  # MatMul + Add + Relu only
    for p in (FoldBatchNormPass(PassContext()), HardSwishPass(PassContext()), ConvBiasPass(PassContext())):
        out, before = base._run_one(mlp, p)
        assert out is mlp and before is mlp and not p.report.changed
    assert not taken
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    passes = [FoldBatchNormPass(PassContext()), MatMulAddToGemmPass(PassContext())]
    out, reports = run_passes(mlp, passes, [{"x": x}])
    assert [r.changed for r in reports] == [False, True]
    assert reports[1].max_rel_err is not None and reports[1].max_rel_err < 1e-5
    assert len(taken) == 2  # the batch's start and the Gemm pass's own: none for the BatchNorm pass
    assert {n.op_type for n in out.graph} == {"Gemm", "Relu"}
