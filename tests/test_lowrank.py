"""Low-rank factorization (passes/lowrank.py): exactness at full rank, rank choice, whitening,
Gemm / 1x1 Conv rewrites, scope, and int8 on the factors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, model, run, vi
from onnx import helper

from onnxcompress import OptimizeOptions, optimize
from onnxcompress.passes.base import PassContext, Scope
from onnxcompress.passes.lowrank import LowRankPass
from onnxcompress.recipe import Recipe, Stage, from_options

R = np.random.default_rng(7)


def _ir(m: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(m)


def _proto(m: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(m)


def _aniso(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows with a strongly anisotropic, correlated covariance (log-spaced scales, rotated)."""
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(np.random.default_rng(99).standard_normal((k, k)))
    scales = np.logspace(0, -2.5, k)
    return ((g.standard_normal((n, k)) * scales) @ q.T).astype(np.float32)


def _chain(dims=(64, 96, 64, 48), batch=8):
    """x[batch, d0] -> MatMul -> Relu -> MatMul -> Relu -> MatMul -> y (layers mm0, mm1, mm2)."""
    nodes, inits, cur = [], [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        inits.append(init(f"W{i}", R.standard_normal((a, b)) / np.sqrt(a)))
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}" if out != "y" else "y"], name=f"mm{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
        cur = out
    return model(nodes, [vi("x", [batch, dims[0]])], [vi("y", [batch, dims[-1]])], inits)


def _feeds(n, shape, name="x", seed=1):
    g = np.random.default_rng(seed)
    return [{name: g.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _apply(m, calib=None, scope=Scope(), **kw):
    ir_m = _ir(m)
    p = LowRankPass(PassContext(calibration=calib or [], scope=scope), **kw)
    changed = p.apply(ir_m)
    return _proto(ir_m), p.report, changed


FULL = dict(min_saving=-1.0, round_to=1, min_size=1)  # a full-rank pair is dearer: allowed for exactness


def test_full_rank_is_exact_matmul():
    m = _chain()
    calib = _feeds(6, (8, 64))
    out, rep, changed = _apply(m, calib, rank=10_000, **FULL)
    assert changed and rep.counts["layers_factorized"] == 3
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMul") == 6
    onnx.checker.check_model(out)
    for f in calib[:3]:
        np.testing.assert_allclose(run(out, f)["y"], run(m, f)["y"], rtol=1e-5, atol=1e-5)
    assert all(d["rel_err"] < 1e-5 for d in rep.counts["layers"])


def test_budget_is_respected():
    m = _chain(dims=(128, 256, 128, 96))
    calib = _feeds(8, (8, 128))
    for target in (0.2, 0.4):
        out, rep, _ = _apply(m, calib, target_ratio=target, round_to=8, min_size=1)
        c = rep.counts
        assert c["macs_removed_pct"] >= 100 * target - 1e-6, c
        # greedy stops at the first step past the target: within one rank step of it
        assert c["macs_removed_pct"] <= 100 * target + 100 * max(
            8 * (k + n) for k, n in ((128, 256), (256, 128), (128, 96))) / c["params_before"] + 100 * 0.9, c
        got = run(out, calib[0])["y"]
        assert got.shape == (8, 96) and np.isfinite(got).all()


def test_an_overshot_budget_is_said():
    """Three layers: a 1 % budget cannot be met finely (a layer's first step saves at least
    min_saving of it), and the report says how much more was removed and why."""
    m = _chain(dims=(128, 256, 128, 96))
    out, rep, _ = _apply(m, _feeds(8, (8, 128)), target_ratio=0.01, round_to=8, min_size=1)
    assert rep.counts["macs_removed_pct"] > 6
    assert any("more than the 1% asked" in n and "min_saving" in n for n in rep.counts["notes"]), rep.counts["notes"]


def test_pass_notes_reach_the_run_notes(tmp_path):
    """What a pass says about its own choices (low-rank overshooting its budget) is one of the run's
    notes, so the terminal shows it (it stayed in the pass's counts before)."""
    from onnxcompress import OptimizeOptions, optimize

    m = _chain(dims=(128, 256, 128, 96))
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.stack([f["x"] for f in _feeds(8, (8, 128))]))
    res = optimize(tmp_path / "m.onnx", tmp_path / "o.onnx", OptimizeOptions(low_rank=0.01, calibration=tmp_path / "c.npz",
                                                                           latency=False))
    assert any(n.startswith("low-rank: removed") and "more than the 1% asked" in n for n in res.report["notes"])


def test_energy_threshold():
    m = _chain(dims=(96, 128, 96, 64))
    calib = _feeds(8, (8, 96))
    _, rep, _ = _apply(m, calib, energy=0.9, round_to=1, min_size=1, min_saving=-1.0)
    for d in rep.counts["layers"]:
        assert d["energy_kept"] >= 0.9
    # the least rank: one less would fall under the threshold (round_to=1)
    _, rep2, _ = _apply(m, calib, rank=1, round_to=1, min_size=1)
    assert all(d["rank"] == 1 for d in rep2.counts["layers"])


def test_whitening_beats_plain_svd_on_anisotropic_inputs():
    k, n = 64, 64
    w = R.standard_normal((k, n)).astype(np.float32) / 8
    m = model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [32, k])], [vi("y", [32, n])],
              [init("W", w)])
    calib = [{"x": _aniso(32, k, seed=s)} for s in range(8)]
    held = [{"x": _aniso(32, k, seed=100 + s)} for s in range(4)]
    errs = {}
    for whiten in ("on", "off"):
        out, rep, _ = _apply(m, calib, rank=16, round_to=1, min_size=1, whiten=whiten)
        assert rep.counts["whitened"] is (whiten == "on")
        num = sum(np.linalg.norm(run(out, f)["y"] - f["x"] @ w) ** 2 for f in held)
        den = sum(np.linalg.norm(f["x"] @ w) ** 2 for f in held)
        errs[whiten] = np.sqrt(num / den)
    assert errs["on"] < 0.5 * errs["off"], errs


def test_gemm_bias_transb():
    k, n = 48, 40
    b = R.standard_normal((n, k)).astype(np.float32) / 7  # transB=1: stored [N, K]
    c = R.standard_normal(n).astype(np.float32)
    m = model([helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=1, alpha=0.7, beta=1.3, name="gemm")],
              [vi("x", [8, k])], [vi("y", [8, n])], [init("B", b), init("C", c)])
    calib = _feeds(4, (8, k))
    out, rep, _ = _apply(m, calib, rank=10_000, **FULL)
    assert [nd.op_type for nd in out.graph.node] == ["MatMul", "Gemm"]
    onnx.checker.check_model(out)
    np.testing.assert_allclose(run(out, calib[0])["y"], run(m, calib[0])["y"], rtol=1e-5, atol=1e-5)
    out, rep, _ = _apply(m, calib, rank=8, round_to=8, min_size=1)
    assert rep.counts["layers"][0]["rank"] == 8
    y = run(out, calib[1])["y"]
    assert y.shape == (8, n) and np.isfinite(y).all()


def test_conv_1x1():
    cin, cout = 32, 24
    w = R.standard_normal((cout, cin, 1, 1)).astype(np.float32) / 6
    m = model([helper.make_node("Conv", ["x", "W", "B"], ["y"], strides=[2, 2], name="conv"),
               helper.make_node("Conv", ["y", "W3"], ["z"], pads=[1, 1, 1, 1], name="conv3")],
              [vi("x", [1, cin, 8, 8])], [vi("z", [1, 8, 4, 4])],
              [init("W", w), init("B", R.standard_normal(cout)), init("W3", R.standard_normal((8, cout, 3, 3)) / 9)])
    calib = _feeds(4, (1, cin, 8, 8))
    out, rep, _ = _apply(m, calib, rank=10_000, **FULL)
    assert [nd.op_type for nd in out.graph.node] == ["Conv", "Conv", "Conv"]
    assert any("k x k Conv" in s["reason"] for s in rep.skipped)
    onnx.checker.check_model(out)
    np.testing.assert_allclose(run(out, calib[0])["z"], run(m, calib[0])["z"], rtol=1e-5, atol=1e-5)


def test_excluded_nodes_untouched():
    m = _chain()
    calib = _feeds(4, (8, 64))
    out, rep, _ = _apply(m, calib, scope=Scope.of(["mm1"]), rank=8, round_to=8, min_size=1)
    names = {nd.name for nd in out.graph.node}
    assert "mm1" in names and "mm0" not in names and "mm2" not in names
    mm1 = next(nd for nd in out.graph.node if nd.name == "mm1")
    assert mm1.input[1] == "W1" and "W1" in {i.name for i in out.graph.initializer}
    assert {"node": "mm1", "reason": "excluded by the user (scope)"} in rep.skipped


def test_random_inputs_fall_back_to_plain_svd():
    m = _chain()
    from onnxcompress.data import input_specs, random_samples

    with pytest.warns(UserWarning):
        calib = random_samples(input_specs(_ir(m)), 4)
    _, rep, changed = _apply(m, calib, rank=8, round_to=8, min_size=1)
    assert changed and rep.counts["whitened"] is False
    assert any("plain SVD" in n for n in rep.counts["notes"])


def test_planner_and_recipe():
    r = from_options(OptimizeOptions(low_rank=0.3, quantize="dynamic"))
    names = [s.name for s in r.stages]
    assert names.index("low-rank") < names.index("quantize-dynamic")
    assert r.stage("low-rank").config.target_ratio == 0.3
    with pytest.raises(Exception):
        from_options(OptimizeOptions(low_rank=1.5))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_on_the_factors(tmp_path, mode):
    m = _chain(dims=(128, 256, 128, 96))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    xs = np.random.default_rng(3).standard_normal((24, 8, 128)).astype(np.float32)
    from onnxcompress.recipe import DataSettings, OutputSettings

    rec = Recipe(stages=[Stage("low-rank", {"target_ratio": 0.3, "min_size": 1, "round_to": 8}),
                         Stage(f"quantize-{mode}")],
                 data=DataSettings(calibration={"x": xs}), output=OutputSettings(latency=False))
    res = optimize(src, tmp_path / "q.onnx", recipe=rec)
    out = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(out)
    lr = next(p for p in res.report["passes"] if p["name"] == "low-rank")
    assert lr["counts"]["layers_factorized"] >= 1
    ops = [nd.op_type for nd in out.graph.node]
    assert "MatMul" not in ops or mode == "static"
    if mode == "dynamic":
        assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") >= 2 * lr["counts"]["layers_factorized"]
    else:
        deq = {o for nd in out.graph.node if nd.op_type == "DequantizeLinear" for o in nd.output}
        mms = [nd for nd in out.graph.node if nd.op_type == "MatMul"]
        assert mms and all(nd.input[1] in deq for nd in mms)
    y = run(out, {"x": xs[0]})["y"]
    assert y.shape == (8, 96) and np.isfinite(y).all()
