"""`bench` and `validate`: interleaved timing, ratios, memory per model, verdicts, HTML report."""

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import graphs as G
from onnxcompress.bench import benchmark, parse_shapes, validate_models
from onnxcompress.cli import app
from onnxcompress.errors import DataError, OnnxCompressError

runner = CliRunner()
CHROMIUM = "/usr/bin/chromium"
GPU_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _gather_model(path: Path, n_weights: int) -> Path:
    """y = W[idx]: a model whose weight ORT cannot fold away; 4 * n_weights bytes of weights."""
    w = numpy_helper.from_array(np.arange(n_weights, dtype=np.float32), "W")
    m = G.model([helper.make_node("Gather", ["W", "idx"], ["y"], axis=0)],
                [G.vi("idx", ["batch"], TensorProto.INT64)], [G.vi("y", ["batch"])], [w])
    onnx.save(m, str(path))
    return path


def _mlp(path: Path, hidden: int = 64) -> Path:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["logits"])]
    inits = [G.init("W1", rng.standard_normal((32, hidden)) * 0.2), G.init("W2", rng.standard_normal((hidden, 10)) * 0.2)]
    m = G.model(nodes, [G.vi("x", ["batch", 32])], [G.vi("logits", ["batch", 10])], inits)
    onnx.save(m, str(path))
    return path


@pytest.fixture
def two_models(tmp_path, digits):
    a = tmp_path / "digits.onnx"
    shutil.copy(digits["model"], a)
    b = tmp_path / "digits_copy.onnx"
    shutil.copy(digits["model"], b)
    return a, b


def _broken_copy(src: Path, dst: Path, delta: float = 1.0) -> Path:
    m = onnx.load(str(src))
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.ndim == 4:  # the first conv weight: change one value
            arr = arr.copy()
            arr.flat[0] += delta
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            break
    onnx.save(m, str(dst))
    return dst


# --------------------------------------------------------------------------- benchmark API


def test_bench_two_models_sane_fields(tmp_path, digits):
    small, big = _mlp(tmp_path / "small.onnx", 16), _mlp(tmp_path / "big.onnx", 256)
    res = benchmark([small, big], runs=30, warmup=2, memory=True)
    (g,) = res.groups
    assert g.provider == "CPUExecutionProvider" and g.batch == 1 and g.rounds == 30
    for m in g.models:
        lat = m.latency
        assert lat.n_runs == 30 and len(m.latencies_ms) == 30
        assert 0 < lat.min_ms <= lat.p50_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
        assert lat.mean_ms > 0 and m.throughput == pytest.approx(1e3 / lat.mean_ms)
        assert m.session_ms > 0 and m.file_bytes == Path(m.path).stat().st_size
        assert m.peak_rss_bytes is not None and m.peak_rss_bytes >= 0
        assert m.session_providers[0] == "CPUExecutionProvider"
    first, second = g.models
    assert first.latency_ratio == 1.0 and first.size_ratio == 1.0
    assert second.size_ratio > 5  # 256 vs 16 hidden units
    assert second.latency_ratio == pytest.approx(second.latency.p50_ms / first.latency.p50_ms)
    lo, hi = second.latency_ratio_ci
    assert lo <= second.latency_ratio <= hi
    rep = res.to_dict()
    json.dumps(rep)  # JSON-safe
    assert rep["machine"]["versions"]["onnxruntime"] and "cpu_flags" in rep["machine"]
    assert rep["config"]["timing"] == "interleaved in blocks of 10 (auto)" and g.block == 10  # fast models: 10
    # blocks: 10 runs of A, 10 of B, 10 of A, ... (each turn after one untimed switch run)
    assert g.order[:20] == [0] * 10 + [1] * 10


def test_identical_files_ratio_near_one(two_models):
    res = benchmark(list(two_models), runs=400, warmup=10, threads=1, memory=False)
    ratio = res.groups[0].models[1].latency_ratio
    assert 0.8 < ratio < 1.25, ratio  # generous: CI machines are noisy; the zoo check asks 5 %
    assert res.groups[0].models[1].size_ratio == 1.0


def test_interleaving_order(tmp_path, two_models):
    third = _mlp(tmp_path / "mlp.onnx")
    # digits takes [batch,1,8,8]; the MLP [batch,32]: each model gets its own synthesized input
    res = benchmark([*two_models, third], runs=7, warmup=1, memory=False, block=1)
    g = res.groups[0]
    assert g.order == [0, 1, 2] * 7
    assert res.to_dict()["groups"][0]["order"][:6] == [0, 1, 2, 0, 1, 2]
    # blocks of 3: A A A B B B C C C, then the last turn takes what --runs leaves (1 each)
    res = benchmark([*two_models, third], runs=7, warmup=1, memory=False, block=3)
    g = res.groups[0]
    assert g.order == [0] * 3 + [1] * 3 + [2] * 3 + [0] * 3 + [1] * 3 + [2] * 3 + [0, 1, 2]
    assert all(len(m.latencies_ms) == 7 for m in g.models) and g.rounds == 7
    with pytest.raises(OnnxCompressError, match="--block"):
        benchmark([*two_models], runs=2, memory=False, block=0)
    assert [m.label for m in g.models] == ["digits.onnx", "digits_copy.onnx", "mlp.onnx"]


def test_peak_memory_per_model_grows_with_weights(tmp_path):
    tiny = _gather_model(tmp_path / "tiny.onnx", 16)
    big = _gather_model(tmp_path / "big.onnx", 10_000_000)  # 40 MB initializer
    res = benchmark([tiny, big], runs=3, warmup=1, shapes={"idx": (1,)})
    t, b = res.groups[0].models
    assert t.peak_rss_bytes is not None and b.peak_rss_bytes is not None
    assert b.peak_rss_bytes - t.peak_rss_bytes > 30e6, (t.peak_rss_bytes, b.peak_rss_bytes)
    assert b.memory_ratio > 2


def test_batch_sweep_with_data(digits):
    res = benchmark([digits["model"]], data=digits["test"], batches=[1, 4], runs=5, warmup=1, memory=True)
    assert [g.batch for g in res.groups] == [1, 4]
    m4 = res.groups[1].models[0]
    assert m4.batch == 4 and m4.throughput == pytest.approx(4e3 / m4.latency.mean_ms)
    # peak memory is measured per batch size, not only for the first one
    assert all(g.models[0].peak_rss_bytes is not None for g in res.groups)


def test_duration_mode(digits):
    res = benchmark([digits["model"]], duration=0.3, warmup=1, memory=False)
    assert res.groups[0].rounds >= 5


def test_profile_lists_ops_and_placement(digits):
    res = benchmark([digits["model"]], runs=3, warmup=1, memory=False, profile=True, profile_runs=3, top=3)
    prof = res.groups[0].models[0].profile
    assert prof and len(prof["top_ops"]) <= 3 and prof["top_ops"][0]["op_type"]
    assert prof["nodes_per_provider"].get("CPUExecutionProvider", 0) > 0 and prof["n_fallback"] == 0


def test_bad_inputs_are_user_errors(tmp_path, digits):
    with pytest.raises(DataError):
        parse_shapes(["x=1xAx3"])
    with pytest.raises(DataError):
        benchmark([digits["model"]], shapes={"nope": (1,)}, runs=1, memory=False)
    fixed = G.model([helper.make_node("Relu", ["x"], ["y"])], [G.vi("x", [1, 4])], [G.vi("y", [1, 4])])
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    with pytest.raises(DataError, match="fixed first dimension"):
        benchmark([tmp_path / "fixed.onnx"], batches=[2], runs=1, memory=False)
    with pytest.raises(OnnxCompressError):
        benchmark([digits["model"]], runs=3, duration=1.0)


# --------------------------------------------------------------------------- CLI


def test_cli_bench_report(tmp_path, two_models):
    rep = tmp_path / "bench.json"
    res = _invoke("bench", *two_models, "--runs", "20", "--warmup", "2", "--no-memory", "--report", rep,
                  "--shape", "input=1x1x8x8")
    assert res.exit_code == 0, res.output
    assert "p50 ms" in res.output and "digits_copy.onnx" in res.output
    data = json.loads(rep.read_text())
    assert data["kind"] == "bench" and len(data["groups"][0]["models"]) == 2
    assert data["groups"][0]["models"][1]["latency"]["p99_ms"] > 0


def test_cli_bench_missing_model_one_line(tmp_path):
    res = _invoke("bench", tmp_path / "nope.onnx", "--runs", "1")
    assert res.exit_code == 2
    assert [l for l in res.output.splitlines() if l.startswith("error:")] and "Traceback" not in res.output


def test_validate_identical_passes_broken_fails(tmp_path, digits):
    copy = tmp_path / "copy.onnx"
    shutil.copy(digits["model"], copy)
    ok = _invoke("validate", digits["model"], copy, "--data", digits["test"], "--report", tmp_path / "v.json")
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["passed"] and rep["checks"][0]["outputs"][0]["allclose"]

    broken = _broken_copy(digits["model"], tmp_path / "broken.onnx")
    bad = _invoke("validate", digits["model"], broken, "--data", digits["test"])
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.output and "allclose" in bad.output


def test_validate_gates_api(tmp_path, digits):
    broken = _broken_copy(digits["model"], tmp_path / "broken.onnx", delta=0.01)
    # a loose cosine gate alone: allclose reported, not gated
    res = validate_models(digits["model"], broken, data=digits["test"], min_cosine=0.5)
    assert res.passed and not res.checks[0].outputs[0].allclose and not res.config["allclose_gated"]
    res = validate_models(digits["model"], broken, data=digits["test"], min_cosine=0.9999999)
    assert not res.passed and "cosine" in res.checks[0].outputs[0].failed[0]
    res = validate_models(digits["model"], broken, data=digits["test"], atol=10, rtol=0)
    assert res.passed
    with pytest.raises(OnnxCompressError):
        validate_models(digits["model"], None)
    # a fraction where a percentage is meant is refused, not read as 0.99 %
    with pytest.raises(OnnxCompressError, match="percentage"):
        validate_models(digits["model"], broken, data=digits["test"], min_top1=0.99)


def test_validate_layers_shows_where_int8_departs(tmp_path, digits):
    """--layers compares every intermediate tensor the two models compute under one name (a
    static int8 model keeps its float tensors' names) and lists those that add the most error;
    the verdict is the outputs'. An identical copy departs nowhere; a copy with one layer's
    weights changed departs at that layer first."""
    from onnxcompress import OptimizeOptions, optimize

    q = tmp_path / "q.onnx"
    optimize(digits["model"], q, OptimizeOptions(quantize="static", calibration=digits["calib"], latency=False))
    res = _invoke("validate", digits["model"], q, "--data", digits["test"], "--min-top1", 90, "--layers", 3,
                  "--report", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    assert "where the candidate departs" in res.output and "step dB" in res.output
    rep = json.loads((tmp_path / "v.json").read_text())
    rows = rep["layers"]
    ref_names = [o for n in onnx.load(str(digits["model"])).graph.node for o in n.output]
    assert len(rows) >= 3 and [r["name"] for r in rows] == [n for n in ref_names if n in {r["name"] for r in rows}]
    assert all(isinstance(r["sqnr_db"], float) and 0 < r["sqnr_db"] < 80 for r in rows), rows
    assert any(r["drop_db"] is not None and r["drop_db"] < 0 for r in rows)
    assert rep["config"]["layers_samples"] == 8

    # an identical copy: every tensor equal
    copy = tmp_path / "copy.onnx"
    shutil.copy(digits["model"], copy)
    same = validate_models(digits["model"], copy, data=digits["test"], layers=True).layers
    assert same and all(r.sqnr_db == float("inf") for r in same)
    # one layer's weights changed: the first departure is that layer's output
    m = onnx.load(str(digits["model"]))
    conv = [n for n in m.graph.node if n.op_type == "Conv"][1]
    w = next(i for i in m.graph.initializer if i.name == conv.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr[0] *= 1.5
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(tmp_path / "one.onnx"))
    rows = validate_models(digits["model"], tmp_path / "one.onnx", data=digits["test"], layers=True).layers
    first = next(r for r in rows if r.sqnr_db != float("inf"))
    assert (first.name, first.op_type) == (conv.output[0], "Conv")
    assert min((r for r in rows if r.drop_db is not None), key=lambda r: r.drop_db).name == conv.output[0]
    # a NaN the reference does not have is the worst departure there is, not a position left out
    arr[0] = np.nan
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    rows = validate_models(digits["model"], tmp_path / "nan.onnx", data=digits["test"], layers=True).layers
    first = next(r for r in rows if r.sqnr_db != float("inf"))
    assert (first.name, first.sqnr_db, first.cosine) == (conv.output[0], -float("inf"), -1.0)

    # refused plainly: no candidate, a count below 1
    assert _invoke("validate", digits["model"], "--layers", 3).exit_code == 2
    bad = _invoke("validate", digits["model"], copy, "--layers", 0)
    assert bad.exit_code == 2 and "--layers" in bad.output and "Traceback" not in bad.output


def test_validate_inputs_must_match(tmp_path, digits):
    other = _mlp(tmp_path / "mlp.onnx")
    res = _invoke("validate", digits["model"], other)
    assert res.exit_code == 2 and "inputs differ" in res.output


# --------------------------------------------------------------------------- GPU providers


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_gpu_provider_skipped_cleanly_without_gpu(name, digits):
    if GPU_PROVIDERS[name] in ort.get_available_providers():
        pytest.skip(f"{GPU_PROVIDERS[name]} is available: the skip path is not taken")
    res = benchmark([digits["model"]], providers=["cpu", name], runs=2, warmup=1, memory=False)
    assert [g.provider for g in res.groups] == ["CPUExecutionProvider"]
    assert len(res.skipped) == 1 and name in res.skipped[0]
    v = _invoke("validate", digits["model"], "--cross-provider", "--providers", f"cpu,{name}")
    assert v.exit_code == 2 and "no GPU provider" in v.output


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_gpu_provider_bench_and_cross_validate(name, digits):
    full = GPU_PROVIDERS[name]
    if full not in ort.get_available_providers():
        pytest.skip(f"{full} is not available in this onnxruntime build")
    try:
        res = benchmark([digits["model"]], providers=[name], data=digits["test"], runs=10, warmup=3,
                        memory=False, profile=True, profile_runs=3)
    except OnnxCompressError as exc:  # a GPU build without a usable GPU
        pytest.skip(f"{full} could not run: {exc}")
    g = [g for g in res.groups if g.provider == full][0]
    assert g.models[0].latency.p50_ms > 0 and g.models[0].session_providers[0] == full
    assert g.models[0].profile["nodes_per_provider"]
    v = validate_models(digits["model"], None, data=digits["test"], providers=["cpu", name],
                        cross_provider=True, atol=1e-2, rtol=1e-2)
    assert v.checks and v.checks[0].kind == "providers" and v.passed, v.checks


# --------------------------------------------------------------------------- HTML


@pytest.fixture
def html_report(tmp_path, digits):
    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    out = tmp_path / "bench.html"
    small = _mlp(tmp_path / "small.onnx", 16)
    res = _invoke("bench", digits["model"], small, "--runs", "30", "--warmup", "2", "--no-memory", "--html", out,
                  "--quiet")
    assert res.exit_code == 0, res.output
    return out


def test_html_report_has_embedded_plots(html_report):
    text = html_report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    imgs = text.split('<img src="data:image/png;base64,')[1:]
    assert len(imgs) >= 3  # latency distribution, latency over time, size vs latency
    for chunk in imgs:
        assert base64.b64decode(chunk.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "small.onnx" in text and "p99" in text
    assert "http://" not in text and "https://" not in text  # self-contained


def test_html_bench_page_reads_well(html_report):
    """Histograms span p1-p99 with the outliers in the caption, latency over time is a rolling
    median with a band, and the ratio column says it is a latency ratio, lower is faster."""
    text = html_report.read_text()
    assert "latency ratio vs digits_cnn.onnx [95 % CI] (lower is faster)" in text
    assert "speed-up (higher is faster)" in text and "peak RSS above baseline" in text
    assert "from the lowest p1 to the highest p99" in text
    assert "band their p10-p90" in text
    assert "A B C A B C" not in text.split("Timing:")[1][:40]  # the timing line names the block mode first


def _bench_dict(runs: dict[str, list[float]]) -> dict:
    return {"kind": "bench", "config": {"labels": list(runs)}, "groups": [{
        "provider": "CPUExecutionProvider", "batch": 1, "block": 10,
        "models": [{"label": k, "file_bytes": 1000 * (i + 1), "latencies_ms": v,
                    "latency": {"p50_ms": float(np.median(v))}} for i, (k, v) in enumerate(runs.items())]}]}


def test_html_histogram_axis_is_p1_to_p99_and_log_when_wide():
    """~1 % of runs 300x slower do not stretch the histogram axis: it spans the lowest p1 to the
    highest p99 of the models, the outliers are counted in the caption; a wide spread (p99/p1 >
    10) gets a log axis."""
    pytest.importorskip("matplotlib")
    from onnxcompress.report_html import _bench_plots, latency_axis

    rng = np.random.default_rng(0)
    a = rng.normal(0.02, 0.002, 5000)
    a[rng.choice(5000, 50, replace=False)] = 6.0  # outliers, 1 %
    b = rng.normal(0.03, 0.003, 5000)
    plots = _bench_plots(_bench_dict({"a": a.tolist(), "b": b.tolist()}))
    hist = plots[0]
    lo, hi = hist["axis_ms"]
    assert lo == pytest.approx(min(np.percentile(a, 1), np.percentile(b, 1)))
    assert hi == pytest.approx(max(np.percentile(a, 99), np.percentile(b, 99)))
    assert hi < 0.1 and not hist["log"]
    assert "Outliers not drawn: a: " in hist["caption"] and "up to 6 ms" in hist["caption"]
    wide = np.concatenate([rng.uniform(0.01, 0.02, 500), rng.uniform(1, 2, 500)])
    assert latency_axis([wide])[2] is True
    assert "band" in plots[1]["caption"] and len(plots) == 3


def test_rolling_bands_summarize_windows_in_time_order():
    from onnxcompress.report_html import rolling_bands

    ms = np.r_[np.full(1000, 1.0), np.full(1000, 2.0)]
    ms[::97] = 50.0  # single slow runs do not move the median
    b = rolling_bands(ms, max_points=100)
    assert b["window"] == 20 and len(b["median"]) == 100
    assert b["median"][0] == 1.0 and b["median"][-1] == 2.0 and max(b["median"]) == 2.0
    assert all(lo <= m <= hi for lo, m, hi in zip(b["p10"], b["median"], b["p90"]))
    assert rolling_bands([0.5, 0.6, 0.7])["window"] == 3


def test_validate_html(tmp_path, digits):
    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    out = tmp_path / "v.html"
    broken = _broken_copy(digits["model"], tmp_path / "broken.onnx")
    res = _invoke("validate", digits["model"], broken, "--data", digits["test"], "--html", out, "-q")
    assert res.exit_code == 1
    assert 'src="data:image/png;base64,' in out.read_text() and "FAIL" in out.read_text()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no /usr/bin/chromium")
def test_html_report_opens_in_headless_chromium(html_report, tmp_path):
    shot = tmp_path / "shot.png"
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--window-size=1200,2400", f"--screenshot={shot}", html_report.resolve().as_uri()],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_ratio_interval_resamples_whole_turns():
    """With blocks, runs of one turn share the machine's state: the interval resamples whole turns
    (paired in time), so a per-turn slowdown widens it instead of vanishing among 10x more runs."""
    from onnxcompress.bench import _bootstrap_ratio_ci

    rng = np.random.default_rng(3)
    turns, block = 20, 10
    slow_a = np.repeat(rng.uniform(1.0, 1.3, turns), block)  # each turn of A: its own machine state
    slow_b = np.repeat(rng.uniform(1.0, 1.3, turns), block)
    a = 10 * slow_a * rng.normal(1, 0.01, turns * block)
    b = 10 * slow_b * rng.normal(1, 0.01, turns * block)
    lo_t, hi_t = _bootstrap_ratio_ci(a, b, block=block)
    lo_r, hi_r = _bootstrap_ratio_ci(a, b, block=1)
    assert lo_t <= float(np.median(b) / np.median(a)) <= hi_t
    assert (hi_t - lo_t) > 1.5 * (hi_r - lo_r)


def test_fidelity_puts_architectures_side_by_side(tmp_path, digits, screenshot):
    """bench --fidelity: each model's accuracy on the data's labels and its agreement with the
    first, beside its latency ratio — the same accuracy optimize's validation reports."""
    from onnxcompress.api import OptimizeOptions, optimize

    int8 = tmp_path / "d8.onnx"
    res = optimize(digits["model"], int8, OptimizeOptions(quantize="static", calibration=digits["calib"],
                                                          validation=digits["test"], latency=False))
    broken = _broken_copy(digits["model"], tmp_path / "broken.onnx")
    rep, html = tmp_path / "b.json", tmp_path / "b.html"
    r = _invoke("bench", digits["model"], int8, broken, "--data", digits["test"], "--fidelity", "--runs", 20,
                "--warmup", 1, "--no-memory", "--report", rep, "--html", html)
    assert r.exit_code == 0, r.output
    fid = json.loads(rep.read_text())["fidelity"]
    assert [f["label"] for f in fid] == ["digits_cnn.onnx", "d8.onnx", "broken.onnx"]
    v = res.report["validation"][0]
    assert fid[0]["accuracy_pct"] == pytest.approx(v["accuracy_reference"])
    assert fid[1]["accuracy_pct"] == pytest.approx(v["accuracy_candidate"])
    assert fid[0]["top1_agreement_pct"] == 100.0 and fid[0]["mean_cosine"] == pytest.approx(1.0)
    assert fid[2]["mean_cosine"] < 0.999 and fid[2]["n_samples"] == 450
    assert "task fidelity on 450 samples" in r.output
    page = html.read_text()
    assert "Task fidelity on the samples of --data" in page and "Task fidelity vs latency" in page
    screenshot(html)
    # without data there is nothing to measure: a one-line error, exit 2
    r = _invoke("bench", digits["model"], "--fidelity", "--runs", 5)
    assert r.exit_code == 2 and "--fidelity needs --data" in r.output


def test_fidelity_says_what_it_cannot_compare(tmp_path, digits):
    """Another output shape is not compared (no 0 % agreement), labels that do not fit give no
    accuracy and a note; the numbers of the other models are unaffected."""
    m = onnx.load(str(digits["model"]))
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Unsqueeze", [out, "ax"], ["r3"]))
    m.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("r3", TensorProto.FLOAT, None))
    other = tmp_path / "r3.onnx"
    onnx.save(m, str(other))
    z = dict(np.load(digits["test"]))
    bad = tmp_path / "bad_labels.npz"
    np.savez(bad, input=z["input"], labels=z["labels"][:-1])
    r = _invoke("bench", digits["model"], other, "--data", digits["test"], "--fidelity", "--runs", 5,
                "--warmup", 1, "--no-memory", "--report", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    fid = json.loads((tmp_path / "a.json").read_text())["fidelity"]
    assert fid[0]["accuracy_pct"] > 90 and fid[1]["top1_agreement_pct"] is None and fid[1]["mean_cosine"] is None
    assert "not compared with it" in r.output
    r = _invoke("bench", digits["model"], "--data", bad, "--fidelity", "--runs", 5, "--warmup", 1, "--no-memory",
                "--report", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.json").read_text())["fidelity"][0]["accuracy_pct"] is None
    assert "one label per row" in r.output.replace("\n", " ")


def test_labels_of_files_with_the_same_name():
    from onnxcompress.bench import _labels

    assert _labels([Path("x.onnx"), Path("x.onnx")]) == ["x.onnx", "x.onnx#2"]  # no leading "/"
    assert _labels([Path("a/x.onnx"), Path("b/x.onnx")]) == ["a/x.onnx", "b/x.onnx"]
