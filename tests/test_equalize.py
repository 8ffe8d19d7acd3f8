"""Cross-layer equalization (Nagel et al. 2019, arXiv:1906.04721, sec. 4.1): exactness in fp32,
balanced channel ranges, lower per-tensor int8 error, named skips, shared weights, defaults."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import graphs as G
from conftest import CPU_TARGET
from onnxcompress import OptimizeOptions, optimize
from onnxcompress.passes.base import PassContext, run_passes
from onnxcompress.passes.quantize.equalize import CrossLayerEqualizationPass, in_ranges, out_ranges

R = np.random.default_rng(7)


def _conv(name, x, y, w, b=None, group=1, pads=(0, 0, 0, 0)):
    inputs = [x, f"{name}_W"] + ([f"{name}_B"] if b is not None else [])
    inits = [G.init(f"{name}_W", w)] + ([G.init(f"{name}_B", b)] if b is not None else [])
    return helper.make_node("Conv", inputs, [y], name=name, group=group, pads=list(pads)), inits


def relu_chain():
    """x[1,4,8,8] -> conv1 -> Relu -> conv2 -> Relu -> MaxPool -> conv3 -> Relu -> Flatten -> gemm."""
    nodes, inits = [], []
    for n, args in (("conv1", ("x", "c1", R.standard_normal((8, 4, 3, 3)) * np.geomspace(0.05, 3, 8)[:, None, None, None],
                                R.standard_normal(8) * 0.1)),
                    ("conv2", ("r1", "c2", R.standard_normal((8, 8, 3, 3)) * 0.3, R.standard_normal(8) * 0.1)),
                    ("conv3", ("p2", "c3", R.standard_normal((6, 8, 1, 1)) * 0.3, R.standard_normal(6) * 0.1))):
        nd, it = _conv(n, *args, pads=(1, 1, 1, 1) if n != "conv3" else (0, 0, 0, 0))
        nodes.append(nd)
        inits += it
    nodes.insert(1, helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    nodes.insert(3, helper.make_node("Relu", ["c2"], ["r2"], name="relu2"))
    nodes.insert(4, helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="pool"))
    nodes += [helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
              helper.make_node("Flatten", ["r3"], ["f"], axis=1, name="flat"),
              helper.make_node("Gemm", ["f", "fc_W", "fc_B"], ["y"], transB=1, name="fc")]
    inits += [G.init("fc_W", R.standard_normal((5, 6 * 16)) * 0.2), G.init("fc_B", R.standard_normal(5) * 0.1)]
    return G.model(nodes, [G.vi("x", [1, 4, 8, 8])], [G.vi("y", [1, 5])], inits)


def mobilenet_like(c=16, skew=(-2.0, 1.0)):
    """x[1,8,16,16] -> pw1 -> Relu -> dw 3x3 (group=c, per-channel weight scales 10^U(skew))
    -> Relu -> pw2 -> y: the depthwise ranges differ by ~1000x, as after BatchNorm folding."""
    dws = 10.0 ** R.uniform(*skew, c)
    nodes, inits = [], []
    for n, args, kw in (("pw1", ("x", "a", R.standard_normal((c, 8, 1, 1)) * 0.4, R.standard_normal(c) * 0.1), {}),
                        ("dw", ("r1", "b", R.standard_normal((c, 1, 3, 3)) * dws[:, None, None, None],
                                R.standard_normal(c) * 0.05 * dws), {"group": c, "pads": (1, 1, 1, 1)}),
                        ("pw2", ("r2", "y", R.standard_normal((8, c, 1, 1)) * 0.3 / np.sqrt(dws)[None, :, None, None],
                                 R.standard_normal(8) * 0.1), {})):
        nd, it = _conv(n, *args, **kw)
        nodes.append(nd)
        inits += it
    nodes.insert(1, helper.make_node("Relu", ["a"], ["r1"], name="relu1"))
    nodes.insert(3, helper.make_node("Relu", ["b"], ["r2"], name="relu2"))
    return G.model(nodes, [G.vi("x", [1, 8, 16, 16])], [G.vi("y", [1, 8, 16, 16])], inits)


def gemm_chain():
    """x[4,16] -> Gemm(transB=1, C of shape [1]) -> LeakyRelu -> Gemm(transB=0) -> PRelu -> Gemm -> y."""
    inits = [G.init("W1", R.standard_normal((32, 16)) * np.geomspace(0.01, 2, 32)[:, None]), G.init("C1", [0.2]),
             G.init("W2", R.standard_normal((32, 24)) * 0.3), G.init("C2", R.standard_normal(24) * 0.1),
             G.init("slope", R.uniform(0.05, 0.3, 24)),
             G.init("W3", R.standard_normal((3, 24)) * 0.3), G.init("C3", R.standard_normal(3) * 0.1)]
    nodes = [helper.make_node("Gemm", ["x", "W1", "C1"], ["h1"], transB=1, alpha=0.5, name="g1"),
             helper.make_node("LeakyRelu", ["h1"], ["a1"], alpha=0.1, name="lrelu"),
             helper.make_node("Gemm", ["a1", "W2", "C2"], ["h2"], beta=2.0, name="g2"),
             helper.make_node("PRelu", ["h2", "slope"], ["a2"], name="prelu"),
             helper.make_node("Gemm", ["a2", "W3", "C3"], ["y"], transB=1, name="g3")]
    return G.model(nodes, [G.vi("x", [4, 16])], [G.vi("y", [4, 3])], inits)


def _feeds(m, n=3):
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": R.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _equalize(m, samples, **options):
    model = ir.from_proto(m)
    p = CrossLayerEqualizationPass(PassContext(), **{"mode": "on", **options})
    model, reps = run_passes(model, [p], samples)
    return ir.to_proto(model), reps[0]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _weights(m):
    return {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}


@pytest.mark.parametrize("build, n_pairs", [(relu_chain, 3), (mobilenet_like, 2), (gemm_chain, 2)])
def test_preserves_fp32_outputs(build, n_pairs):
    m = build()
    samples = _feeds(m)
    out, rep = _equalize(m, samples)
    assert rep.changed and rep.reverted is None, rep
    assert rep.counts["pairs_equalized"] == n_pairs, rep.counts
    onnx.checker.check_model(out)
    for s in samples:
        ref, got = G.run(m, s)["y"], G.run(out, s)["y"]
        assert _rel(ref, got) < 1e-5
    assert rep.max_rel_err < 1e-5
    changed = [k for k, v in _weights(m).items() if not np.array_equal(v, _weights(out).get(k, v))]
    assert changed, "no weight was rescaled"


def test_channel_ranges_become_balanced():
    m = mobilenet_like()
    out, rep = _equalize(m, _feeds(m))
    wb, wa = _weights(m), _weights(out)
    # the depthwise weight: its per-output-channel range spread collapses
    node = next(n for n in ir.from_proto(m).graph if n.name == "dw")
    before = out_ranges(node, wb["dw_W"].astype(np.float64))
    after = out_ranges(node, wa["dw_W"].astype(np.float64))
    assert after.max() / after.min() < 0.2 * before.max() / before.min(), (before, after)
    for p in rep.counts["pairs"]:
        assert p["w1_range_ratio"][1] < p["w1_range_ratio"][0]
    # after equalization both sides of each pair have equal per-channel ranges
    pw2 = next(n for n in ir.from_proto(out).graph if n.name == "pw2")
    assert np.allclose(out_ranges(node, wa["dw_W"].astype(np.float64)), in_ranges(pw2, wa["pw2_W"].astype(np.float64), 1),
                       rtol=1e-3)


def _fake_quant_per_tensor(m):
    """Every Conv/Gemm weight quantize-dequantized to int8, one symmetric scale per tensor."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    weights = {n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm")}
    for init in m.graph.initializer:
        if init.name in weights:
            w = onnx.numpy_helper.to_array(init)
            s = np.abs(w).max() / 127
            init.CopyFrom(onnx.numpy_helper.from_array((np.round(w / s) * s).astype(np.float32), init.name))
    return m


def _sqnr(ref, got):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2))


def test_per_tensor_int8_error_drops_on_skewed_depthwise(tmp_path):
    m = mobilenet_like()
    samples = _feeds(m, 4)
    out, rep = _equalize(m, samples, per_channel=False)
    s0 = np.mean([_sqnr(G.run(m, s)["y"], G.run(_fake_quant_per_tensor(m), s)["y"]) for s in samples])
    s1 = np.mean([_sqnr(G.run(m, s)["y"], G.run(_fake_quant_per_tensor(out), s)["y"]) for s in samples])
    assert s1 > s0 + 10, (s0, s1)  # weights only: ~17 dB -> ~38 dB here
    assert rep.counts["pair_sqnr_db_after"] > rep.counts["pair_sqnr_db_before"] + 5

    # end to end: static QDQ with per-tensor weights; auto keeps CLE and the output SQNR rises
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    xs = np.concatenate([_feeds(m, 1)[0]["x"] for _ in range(48)])
    np.savez(tmp_path / "c.npz", x=xs[:32])
    np.savez(tmp_path / "v.npz", x=xs[32:])
    res = {}
    for eq in (False, "auto"):
        r = optimize(path, tmp_path / f"q{eq}.onnx", OptimizeOptions(
            quantize="static", per_channel=False, equalize=eq, calibration=tmp_path / "c.npz",
            validation=tmp_path / "v.npz", min_sqnr_db=None, fallback=False, latency=False, target=CPU_TARGET))
        res[eq] = r.report
    cle = [p for p in res["auto"]["passes"] if p["name"] == "cross-layer-equalization"][0]
    assert cle["changed"] and cle["counts"]["decision"].startswith("kept"), cle["counts"]
    assert not [p for p in res[False]["passes"] if p["name"] == "cross-layer-equalization"]
    q0 = res[False]["validation"][0]["outputs"][0]["sqnr_db"]
    q1 = res["auto"]["validation"][0]["outputs"][0]["sqnr_db"]
    assert q1 > q0 + 3, (q0, q1)


@pytest.mark.parametrize("act, needle", [("relu6", "ReLU6"), ("hardswish", "HardSwish"), ("silu", "SiLU"),
                                         ("clipmax", "upper bound")])
def test_non_equivariant_activations_are_skipped_by_name(act, needle):
    w1, w2 = R.standard_normal((8, 4, 1, 1)), R.standard_normal((8, 8, 1, 1))
    n1, i1 = _conv("convA", "x", "a", w1, R.standard_normal(8))
    n2, i2 = _conv("convB", "h", "y", w2)
    extra = []
    if act == "relu6":
        mid = [helper.make_node("Clip", ["a", "lo", "hi"], ["h"], name="act")]
        extra = [G.init("lo", np.float32(0)), G.init("hi", np.float32(6))]
    elif act == "clipmax":
        mid = [helper.make_node("Clip", ["a", "", "hi"], ["h"], name="act")]
        extra = [G.init("hi", np.float32(3))]
    elif act == "hardswish":
        mid = [helper.make_node("HardSwish", ["a"], ["h"], name="act")]
    else:
        mid = [helper.make_node("Sigmoid", ["a"], ["sg"], name="sig"), helper.make_node("Mul", ["a", "sg"], ["h"], name="act")]
    m = G.model([n1, *mid, n2], [G.vi("x", [1, 4, 4, 4])], [G.vi("y", [1, 8, 4, 4])], i1 + i2 + extra)
    out, rep = _equalize(m, _feeds(m))
    assert not rep.changed and rep.counts["pairs_found"] == 0
    assert len(rep.skipped) == 1, rep.skipped
    assert needle in rep.skipped[0]["reason"] and "convA" in rep.skipped[0]["node"], rep.skipped


def test_clip_with_only_zero_min_is_a_relu():
    n1, i1 = _conv("convA", "x", "a", R.standard_normal((8, 4, 1, 1)) * np.geomspace(0.1, 5, 8)[:, None, None, None])
    n2, i2 = _conv("convB", "h", "y", R.standard_normal((8, 8, 1, 1)))
    clip = helper.make_node("Clip", ["a", "lo"], ["h"], name="clip0")
    m = G.model([n1, clip, n2], [G.vi("x", [1, 4, 4, 4])], [G.vi("y", [1, 8, 4, 4])], i1 + i2 + [G.init("lo", np.float32(0))])
    out, rep = _equalize(m, _feeds(m))
    assert rep.changed and rep.counts["pairs_equalized"] == 1 and rep.max_rel_err < 1e-5


def test_multi_consumer_intermediate_is_skipped():
    n1, i1 = _conv("convA", "x", "a", R.standard_normal((4, 4, 1, 1)), R.standard_normal(4))
    n2, i2 = _conv("convB", "h", "b", R.standard_normal((4, 4, 1, 1)))
    nodes = [n1, helper.make_node("Relu", ["a"], ["h"], name="relu"), n2,
             helper.make_node("Add", ["h", "b"], ["y"], name="residual")]
    m = G.model(nodes, [G.vi("x", [1, 4, 4, 4])], [G.vi("y", [1, 4, 4, 4])], i1 + i2)
    out, rep = _equalize(m, _feeds(m))
    assert not rep.changed
    reasons = " | ".join(f"{s['node']}: {s['reason']}" for s in rep.skipped)
    assert "convA" in reasons and "2 consumers" in reasons, reasons


def test_shared_weight_is_cloned_and_the_other_user_keeps_it():
    w_shared = R.standard_normal((8, 8, 3, 3)) * 0.3
    n1, i1 = _conv("convA", "x", "a", R.standard_normal((8, 8, 1, 1)) * np.geomspace(0.05, 4, 8)[:, None, None, None],
                   R.standard_normal(8))
    n2 = helper.make_node("Conv", ["h", "Ws"], ["y1"], name="convB", pads=[1, 1, 1, 1])
    n3 = helper.make_node("Conv", ["x", "Ws"], ["y2"], name="convX", pads=[1, 1, 1, 1])
    nodes = [n1, helper.make_node("Relu", ["a"], ["h"], name="relu"), n2, n3]
    m = G.model(nodes, [G.vi("x", [1, 8, 6, 6])], [G.vi("y1", [1, 8, 6, 6]), G.vi("y2", [1, 8, 6, 6])],
                i1 + [G.init("Ws", w_shared)])
    samples = _feeds(m)
    out, rep = _equalize(m, samples)
    assert rep.changed and rep.counts["shared_weights_cloned"] == 1 and rep.max_rel_err < 1e-5
    by_name = {n.name: n for n in out.graph.node}
    assert by_name["convX"].input[1] == "Ws" and by_name["convB"].input[1] != "Ws"
    assert np.array_equal(_weights(out)["Ws"], w_shared.astype(np.float32))
    for s in samples:
        for k in ("y1", "y2"):
            assert _rel(G.run(m, s)[k], G.run(out, s)[k]) < 1e-5


def test_auto_reverts_when_weight_sqnr_does_not_improve():
    # balanced ranges already: nothing to gain, auto leaves the model alone and says why
    n1, i1 = _conv("convA", "x", "a", np.ones((4, 4, 1, 1)) * 0.5)
    n2, i2 = _conv("convB", "h", "y", np.ones((4, 4, 1, 1)) * 0.5)
    m = G.model([n1, helper.make_node("Relu", ["a"], ["h"], name="relu"), n2],
                [G.vi("x", [1, 4, 4, 4])], [G.vi("y", [1, 4, 4, 4])], i1 + i2)
    out, rep = _equalize(m, _feeds(m), mode="auto")
    assert not rep.changed and rep.counts["decision"].startswith("reverted"), rep.counts
    assert _weights(out)["convA_W"].tolist() == _weights(m)["convA_W"].tolist()


def test_digits_default_keeps_accuracy(digits, tmp_path):
    res = optimize(digits["model"], tmp_path / "q.onnx",
                   OptimizeOptions(quantize="static", calibration=digits["calib"], validation=digits["test"], latency=False))
    v = res.report["validation"][0]
    assert abs(v["accuracy_reference"] - v["accuracy_candidate"]) <= 0.5
    cle = [p for p in res.report["passes"] if p["name"] == "cross-layer-equalization"][0]
    assert cle["counts"]["pairs_found"] == 4  # conv->conv, conv->pool->conv, conv->flatten->gemm, gemm->gemm
    assert cle["counts"]["decision"].split(":")[0] in ("kept", "reverted")
    json.dumps(res.report)


def test_cli_flag(digits, tmp_path):
    from typer.testing import CliRunner

    from onnxcompress.cli import app

    runner = CliRunner()
    rep = tmp_path / "r.json"
    res = runner.invoke(app, ["optimize", str(digits["model"]), "-o", str(tmp_path / "q.onnx"), "--quantize", "static",
                              "--calibration", str(digits["calib"]), "--equalize", "on", "--per-tensor",
                              "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    cle = [p for p in json.loads(rep.read_text())["passes"] if p["name"] == "cross-layer-equalization"][0]
    assert cle["changed"] and cle["counts"]["decision"].startswith("forced on")
    res = runner.invoke(app, ["optimize", str(digits["model"]), "-o", str(tmp_path / "q2.onnx"), "--equalize", "maybe"])
    assert res.exit_code != 0 and "--equalize" in res.output
