"""Weight-only int8 (Mul(Cast(int8), scale) -> float node) for Conv / LSTM / MatMul inside If
branches, LSTM/GRU weights, and dynamic-mode Conv; judged by ONNX Runtime (optimizations ON).

Tolerance: weight-only int8 moves each output by the weight rounding only (per-channel
SQNR ~40 dB on these random weights), so every output must stay within ``REL`` = 2 % of
its largest magnitude (max|Δ| / max|ref|) of fp32 on both branches.
"""

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs as G
from onnxcompress import OptimizeOptions, optimize
from onnxcompress.passes.base import PassContext, Scope
from onnxcompress.passes.quantize.weight_only import WeightOnlyQuantizePass, quantize

REL = 0.02
C, L, F, H, K = 8, 12, 16, 8, 4  # channels in, length, conv filters, LSTM hidden, MatMul out
COND = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])  # scalar
ROOT = Path(__file__).resolve().parents[1]
SILERO = ROOT / "zoo_cache" / "silero_vad"


def _branch(tag, rng, bidirectional, outer):
    """Conv -> Relu -> [L, N, F] -> LSTM -> [L, N, D*H] -> MatMul -> [L, N, K].

    ``outer``: weights are main-graph initializers (outer scope) instead of branch ones.
    """
    d = 2 if bidirectional else 1
    ws = {f"{tag}_wc": rng.standard_normal((F, C, 3)) * 0.3, f"{tag}_bc": rng.standard_normal(F) * 0.1,
          f"{tag}_W": rng.standard_normal((d, 4 * H, F)) * 0.3, f"{tag}_R": rng.standard_normal((d, 4 * H, H)) * 0.3,
          f"{tag}_B": rng.standard_normal((d, 8 * H)) * 0.1, f"{tag}_wm": rng.standard_normal((d * H, K)) * 0.3,
          f"{tag}_perm_shape": np.array([0, 0, d * H], np.int64)}
    inits = [G.init(k, v, v.dtype if v.dtype == np.int64 else np.float32) for k, v in ws.items()]
    nodes = [
        helper.make_node("Conv", ["x", f"{tag}_wc", f"{tag}_bc"], [f"{tag}_c"], pads=[1, 1], name=f"{tag}_conv"),
        helper.make_node("Relu", [f"{tag}_c"], [f"{tag}_r"], name=f"{tag}_relu"),
        helper.make_node("Transpose", [f"{tag}_r"], [f"{tag}_t"], perm=[2, 0, 1], name=f"{tag}_tr"),
        helper.make_node("LSTM", [f"{tag}_t", f"{tag}_W", f"{tag}_R", f"{tag}_B"], [f"{tag}_y"], hidden_size=H,
                         direction="bidirectional" if bidirectional else "forward", name=f"{tag}_lstm"),
        # Y [L, D, N, H] -> [L, N, D, H] -> [L, N, D*H]
        helper.make_node("Transpose", [f"{tag}_y"], [f"{tag}_yt"], perm=[0, 2, 1, 3], name=f"{tag}_tr2"),
        helper.make_node("Reshape", [f"{tag}_yt", f"{tag}_perm_shape"], [f"{tag}_y2"], name=f"{tag}_rs"),
        helper.make_node("MatMul", [f"{tag}_y2", f"{tag}_wm"], [f"{tag}_out"], name=f"{tag}_mm"),
    ]
    g = helper.make_graph(nodes, f"{tag}_branch", [], [G.vi(f"{tag}_out", [L, 2, K])], [] if outer else inits)
    return g, inits if outer else []


def if_model(seed=0):
    rng = np.random.default_rng(seed)
    then_g, _ = _branch("th", rng, bidirectional=False, outer=False)
    else_g, outer = _branch("el", rng, bidirectional=True, outer=True)
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")
    return G.model([node], [G.vi("x", [2, C, L]), COND], [G.vi("y", [L, 2, K])],
                   outer, opset=17, ir_version=8)


def _data(tmp_path, n=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n * 2, C, L)).astype(np.float32)
    cond = np.array([i % 2 == 0 for i in range(n)])
    p = tmp_path / "calib.npz"
    np.savez(p, x=x, cond=cond)
    return p


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _subgraph_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _subgraph_nodes(a.g)


def _int8_weights(m: onnx.ModelProto):
    """Per compute node name: the dtype of the tensor behind each weight input (through DQ/Reshape)."""
    inits = {}

    def collect(g):
        inits.update({t.name: t for t in g.initializer})
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    collect(a.g)
    collect(m.graph)
    producers = {o: n for n in _subgraph_nodes(m.graph) for o in n.output}
    out = {}
    for n in _subgraph_nodes(m.graph):
        idx = {"Conv": [1], "MatMul": [1], "LSTM": [1, 2], "GRU": [1, 2]}.get(n.op_type, [])
        kinds = []
        for i in idx:
            name = n.input[i]
            p = producers.get(name)
            c = producers.get(p.input[0]) if p is not None and p.op_type == "Mul" else None
            if c is not None and c.op_type == "Cast":  # Mul(Cast(int8), scale)
                kinds.append(numpy_helper.to_array(inits[c.input[0]]).dtype.name)
            elif name in inits:
                kinds.append(numpy_helper.to_array(inits[name]).dtype.name)
            else:
                kinds.append(p.op_type if p is not None else "?")
        if kinds:
            out[n.name] = kinds
    return out


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_if_branches_weight_only(mode, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(if_model(), str(src))
    dst = tmp_path / "q.onnx"
    res = optimize(src, dst, OptimizeOptions(quantize=mode, calibration=_data(tmp_path), latency=False))
    assert res.report["written"]
    m = onnx.load(str(dst))
    onnx.checker.check_model(m, full_check=True)
    # both branches, ORT optimizations on, within REL of fp32
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, C, L)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        ref = G.run(onnx.load(str(src)), feeds)["y"]
        got = G.run(m, feeds, optimize=True)["y"]
        assert ref.shape == got.shape
        assert _rel(ref, got) < REL, f"cond={cond}: {_rel(ref, got):.4f}"
    kinds = _int8_weights(m)
    for name in ("th_conv", "el_conv", "th_lstm", "el_lstm"):
        assert kinds[name] == ["int8"] * len(kinds[name]), (name, kinds[name])
    if mode == "static":
        assert kinds["th_mm"] == ["int8"] and kinds["el_mm"] == ["int8"]
    else:  # the dynamic pass's MatMulInteger took the MatMuls (inside the branches too)
        ops = {n.op_type for n in _subgraph_nodes(m.graph)}
        assert "MatMulInteger" in ops
    # no float weight left anywhere bigger than a bias
    all_inits = [t for g in [m.graph] for t in g.initializer] + \
        [t for n in _subgraph_nodes(m.graph) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
         for t in a.g.initializer]
    big_float = [t.name for t in all_inits if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 2 * 8 * H]
    assert not big_float, big_float
    rep = next(p for p in res.report["passes"] if p["name"] == "quantize-weight-only")
    whats = {e["node"]: e["what"] for e in rep["counts"]["weight_only"]}
    assert whats["th_lstm"] == "weight-only int8 (inside subgraph th_branch)"
    assert whats["el_conv"] == "weight-only int8 (inside subgraph el_branch)"


def test_dynamic_main_graph_conv_and_output_sqnr(tmp_path):
    """Dynamic mode: a main-graph Conv gets int8 weights with a measured output SQNR; static
    mode leaves main-graph Conv to the QDQ pass."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((F, C, 3)).astype(np.float32) * 0.3
    m = G.model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1], name="conv")],
                [G.vi("x", [2, C, L])], [G.vi("y", [2, F, L])], [G.init("w", w)], opset=17)
    calib = [{"x": rng.standard_normal((2, C, L)).astype(np.float32)} for _ in range(3)]
    model = ir.from_proto(m)
    p = WeightOnlyQuantizePass(PassContext(calibration=calib), mode="dynamic")
    p(model)
    (entry,) = p.report.counts["weight_only"]
    assert entry["where"] == "main graph" and entry["output_sqnr_db"] > 30
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    feeds = {"x": calib[0]["x"]}
    assert _rel(G.run(m, feeds)["y"], G.run(out, feeds, optimize=True)["y"]) < REL
    model2 = ir.from_proto(m)
    p2 = WeightOnlyQuantizePass(PassContext(calibration=calib), mode="static")
    assert not p2(model2).modified
    # ORT folds Cast -> Mul back into a float weight at session creation: the deployed graph
    # is the fp32 one (same kernels, same speed)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "ort_opt.onnx")
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "ort_opt.onnx")).graph.node}
    assert not ops & {"Cast", "Mul", "DequantizeLinear"}, ops


def test_bias_correction_depthwise_positive_inputs():
    """Depthwise 3x3 (9 weights per channel) on positive inputs: the int8 rounding errors shift
    each channel's mean; the measured shift is added to the bias (created when absent)."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((F, 1, 3, 3)).astype(np.float32)
    m = G.model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, group=F, name="dw")],
                [G.vi("x", [1, F, 16, 16])], [G.vi("y", [1, F, 16, 16])], [G.init("w", w)], opset=17)
    calib = [{"x": (rng.random((1, F, 16, 16)) * 6).astype(np.float32)} for _ in range(2)]
    test = {"x": (rng.random((1, F, 16, 16)) * 6).astype(np.float32)}
    ref = G.run(m, test)["y"]
    errs = {}
    for bc in (False, True):
        model = ir.from_proto(m)
        p = WeightOnlyQuantizePass(PassContext(calibration=calib), mode="dynamic", bias_correction=bc)
        p(model)
        assert p.report.counts["weight_only"][0].get("bias_corrected", False) is bc
        out = ir.to_proto(model)
        onnx.checker.check_model(out)
        got = G.run(out, test, optimize=True)["y"]
        errs[bc] = float(np.abs((ref - got).mean(axis=(0, 2, 3))).mean())  # mean shift per channel
    assert errs[True] < 0.5 * errs[False], errs


def test_bidirectional_gru_main_graph_and_low_sqnr_kept_float():
    """GRU W/R with D=2 get one scale per (direction, gate row); a weight whose int8 SQNR is too low
    (one huge value per channel, the rest tiny) stays float and is named."""
    rng = np.random.default_rng(5)
    wg = rng.standard_normal((2, 3 * H, F)).astype(np.float32) * 0.3
    rg = rng.standard_normal((2, 3 * H, H)).astype(np.float32) * 0.3
    # per channel one value 1.0 and 1551 values just under half an int8 step: all round to 0,
    # weight SQNR ~16 dB (int8 per channel cannot do worse than 48 - 10 log10(n) dB)
    wc = np.full((F, F, 97), 0.49 / 127, np.float32) * np.sign(rng.standard_normal((F, F, 97))).astype(np.float32)
    wc[:, 0, 0] = 1.0
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "wc"], ["c"], pads=[48, 48], name="bad_conv")],
                               "then_g", [], [G.vi("c", [2, F, L])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["c2"], name="id")], "else_g", [],
                               [G.vi("c2", [2, F, L])])
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1], name="tr"),
             helper.make_node("GRU", ["t", "wg", "rg"], ["y"], hidden_size=H, direction="bidirectional", name="gru"),
             helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g, name="if")]
    m = G.model(nodes, [G.vi("x", [2, F, L]), COND], [G.vi("y", [L, 2, 2, H]), G.vi("z", [2, F, L])],
                [G.init("wg", wg), G.init("rg", rg), G.init("wc", wc)], opset=17)
    calib = [{"x": rng.standard_normal((2, F, L)).astype(np.float32), "cond": np.array(True)} for _ in range(2)]
    model = ir.from_proto(m)
    p = WeightOnlyQuantizePass(PassContext(calibration=calib), mode="static")
    p(model)
    done = {e["node"]: e for e in p.report.counts["weight_only"]}
    assert set(done) == {"gru"} and done["gru"]["output_sqnr_db"] > 30
    assert any(s["node"] == "bad_conv" and "SQNR" in s["reason"] for s in p.report.skipped)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    scales = {t.name: tuple(t.dims) for t in out.graph.initializer if t.name.endswith("_int8_scale")}
    assert scales == {"wg_int8_scale": (2, 3 * H, 1), "rg_int8_scale": (2, 3 * H, 1)}
    for cond in (True, False):
        feeds = dict(calib[0], cond=np.array(cond))
        ref, got = G.run(m, feeds), G.run(out, feeds, optimize=True)
        assert _rel(ref["y"], got["y"]) < REL
        np.testing.assert_array_equal(ref["z"], got["z"])  # bad_conv untouched


def test_exclusions_and_weight_chain_folding():
    """An LSTM weight computed from constants (Slice/Concat, as exported LSTMs reorder gates)
    is folded then quantized; an excluded op type is left alone and named."""
    rng = np.random.default_rng(9)
    w_full = rng.standard_normal((4 * H, F)).astype(np.float32) * 0.3
    r = rng.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.3
    half = 2 * H
    nodes = [helper.make_node("Slice", ["w_full", "s0", "e0", "ax"], ["wa"], name="sl_a"),
             helper.make_node("Slice", ["w_full", "e0", "e1", "ax"], ["wb"], name="sl_b"),
             helper.make_node("Concat", ["wb", "wa"], ["wcat"], axis=0, name="cat"),
             helper.make_node("Unsqueeze", ["wcat", "ax"], ["w3"], name="unsq"),
             helper.make_node("LSTM", ["x", "w3", "r"], ["y"], hidden_size=H, name="lstm")]
    inits = [G.init("w_full", w_full), G.init("r", r), G.init("s0", [0], np.int64), G.init("e0", [half], np.int64),
             G.init("e1", [4 * H], np.int64), G.init("ax", [0], np.int64)]
    m = G.model(nodes, [G.vi("x", [L, 2, F])], [G.vi("y", [L, 1, 2, H])], inits, opset=17)
    feeds = {"x": rng.standard_normal((L, 2, F)).astype(np.float32)}
    model = ir.from_proto(m)
    p = WeightOnlyQuantizePass(PassContext(scope=Scope.of(op_types=("LSTM",))), mode="dynamic")
    assert not p(model).modified
    assert p.report.skipped == [{"node": "lstm", "reason": "excluded by the user"}]
    model = ir.from_proto(m)
    p = WeightOnlyQuantizePass(PassContext(), mode="dynamic")
    p(model)
    assert p.report.counts["weight_nodes_folded"] == 4 and p.report.counts["nodes_quantized"] == 1
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    assert not any(t.name == "w_full" for t in out.graph.initializer)  # the float source is gone
    assert _rel(G.run(m, feeds)["y"], G.run(out, feeds, optimize=True)["y"]) < REL


def test_quantize_helper_layout():
    w = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], np.float32)
    q, s, total, worst = quantize(w, (0,))
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (2, 1)
    assert q[0, 1] == -127 and s[1, 0] == 1.0 and np.all(q[1] == 0)
    assert total > 40 and worst > 40


@pytest.mark.skipif(not (SILERO / "calib.npz").exists(), reason="zoo_cache/silero_vad or its data missing "
                    "(scripts/fetch_zoo.py, then scripts/zoo_data.py, which needs espeak-ng)")
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_silero_vad_under_0_8_mb(mode, tmp_path):
    """Silero VAD (all weights inside the If on the sample rate) with default options:
    <= 0.8 MB (1e6 bytes, as scripts/bench_int8.py counts) and >= 99 % of the speech /
    non-speech decisions (prob > 0.5) on val.npz unchanged."""
    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model

    dst = tmp_path / "vad.onnx"
    res = optimize(SILERO / "model.onnx", dst, OptimizeOptions(quantize=mode, calibration=SILERO / "calib.npz",
                                                                validation=SILERO / "val.npz", latency=False))
    assert res.report["written"]
    assert dst.stat().st_size / 1e6 <= 0.8
    val, _ = load_npz(SILERO / "val.npz", input_specs(load_model(SILERO / "model.onnx")), what="validation")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s32 = ort.InferenceSession(str(SILERO / "model.onnx"), so, providers=["CPUExecutionProvider"])
    s8 = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    p32 = np.array([float(s32.run(None, f)[0].ravel()[0]) for f in val])
    p8 = np.array([float(s8.run(None, f)[0].ravel()[0]) for f in val])
    assert np.mean((p32 > 0.5) == (p8 > 0.5)) >= 0.99


def test_lstm_with_computed_int32_sequence_lens(tmp_path):
    """An LSTM whose ``sequence_lens`` is computed (Cast int64 -> int32) must not break the
    recording of float inputs (the whole pass used to fail and revert every node)."""
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((1, 4 * H, F)) * 0.3).astype(np.float32)
    R = (rng.standard_normal((1, 4 * H, H)) * 0.3).astype(np.float32)
    wc = (rng.standard_normal((F, C, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[2, 0, 1], name="tr"),
             helper.make_node("Cast", ["sl64"], ["sl"], to=TensorProto.INT32, name="cast"),
             helper.make_node("LSTM", ["t", "W", "R", "", "sl"], ["y"], hidden_size=H, name="lstm")]
    m = G.model(nodes, [G.vi("x", [2, C, L]), helper.make_tensor_value_info("sl64", TensorProto.INT64, [2])],
                [G.vi("y", [L, 1, 2, H])], [G.init("wc", wc), G.init("W", W), G.init("R", R)])
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    xs = rng.standard_normal((8, 2, C, L)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=xs, sl64=np.full((8, 2), L, np.int64))
    out = tmp_path / "q.onnx"
    res = optimize(src, out, OptimizeOptions(quantize="dynamic", calibration=tmp_path / "c.npz"))
    wo = next(p for p in res.report["passes"] if p["name"] == "quantize-weight-only")
    assert not wo["reverted"], wo
    assert {e["node"] for e in wo["counts"]["weight_only"]} == {"conv", "lstm"}, wo["counts"]
    feed = {"x": xs[0], "sl64": np.full(2, L, np.int64)}
    assert _rel(G.run(m, feed)["y"], G.run(onnx.load(out), feed, optimize=True)["y"]) < REL


def test_a_rerun_of_the_stage_reuses_each_nodes_check(monkeypatch):
    """The fallback re-runs the int8 stage with the same context: a weight-only node's one-node
    check (SQNR, bias shift) is remembered in ``context.cache``, so the rerun records nothing
    and writes the same bytes."""
    import onnxcompress.passes.quantize.calibrate as cal

    rng = np.random.default_rng(11)
    w = rng.standard_normal((F, 1, 3, 3)).astype(np.float32)
    m = G.model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, group=F, name="dw")],
                [G.vi("x", [1, F, 16, 16])], [G.vi("y", [1, F, 16, 16])], [G.init("w", w)], opset=17)
    calib = [{"x": (rng.random((1, F, 16, 16)) * 6).astype(np.float32)} for _ in range(2)]
    ctx = PassContext(calibration=calib)
    calls = []
    real = cal.observe
    monkeypatch.setattr(cal, "observe", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = []
    for _ in range(2):
        model = ir.from_proto(m)
        p = WeightOnlyQuantizePass(ctx, mode="dynamic")
        p(model)
        assert p.report.counts["weight_only"][0]["output_sqnr_db"] > 20
        outs.append(ir.to_proto(model).SerializeToString())
    assert len(calls) == 1 and outs[0] == outs[1]
