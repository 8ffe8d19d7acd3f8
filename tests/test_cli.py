"""The CLI contract and bad input: one-line errors, non-zero exit, input untouched, no partial output."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from typer.testing import CliRunner

import graphs as G
from onnxcompress.cli import app

runner = CliRunner()


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(res, *needles):
    assert res.exit_code != 0, res.output
    text = res.output.strip()
    assert "Traceback" not in text, text
    lines = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, text
    for n in needles:
        assert n in text, text


def test_inspect_json(digits):
    res = _invoke("inspect", digits["model"], "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["inputs"][0]["name"] == "input" and info["op_histogram"]["BatchNormalization"] == 3
    assert info["parameters"] > 40000 and info["weights"]["initializers"]["count"] > 0
    res = _invoke("inspect", digits["model"])
    assert res.exit_code == 0 and "BatchNormalization" in res.output


def test_optimize_static_with_report(digits, tmp_path):
    before = _digest(digits["model"])
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    res = _invoke("optimize", digits["model"], "-o", out, "--quantize", "static", "--calibration", digits["calib"],
                  "--validation", digits["test"], "--report", rep)
    assert res.exit_code == 0, res.output
    assert out.exists() and _digest(digits["model"]) == before
    r = json.loads(rep.read_text())
    assert r["written"] and r["validation"][0]["accuracy_candidate"] > 97
    assert "before / after" in res.output


def test_validation_on_the_calibration_data_is_called_out(digits, tmp_path):
    """Validation on the rows the stages were fitted to is not held out: said as a warning, also
    for a copy of the calibration file under another name; other data gets no such warning."""
    copy, part = tmp_path / "copy.npz", tmp_path / "part.npz"
    shutil.copy(digits["calib"], copy)
    x = np.load(digits["calib"])["input"]
    np.savez(part, input=np.concatenate([x[10:15][::-1], np.load(digits["test"])["input"][:5]]))
    for val, expect, mode in ((digits["calib"], True, "dynamic"), (copy, True, "dynamic"), (part, True, "dynamic"),
                              (digits["test"], False, "dynamic"), (copy, False, None)):  # fusion fits nothing
        rep = tmp_path / "r.json"
        res = _invoke("optimize", digits["model"], "-o", tmp_path / "f.onnx", "--calibration", digits["calib"],
                      "--validation", val, "--no-latency", "--report", rep, *(["--quantize", mode] if mode else []))
        assert res.exit_code == 0, res.output
        notes = " ".join(json.loads(rep.read_text())["notes"])
        assert ("same data as --calibration" in notes or "5 of the 10 --validation" in notes) is expect, notes


def test_optimize_prune_dynamic(digits, tmp_path):
    out = tmp_path / "s.onnx"
    res = _invoke("optimize", digits["model"], "-o", out, "--prune", "0.5", "--quantize", "dynamic",
                  "--calibration", digits["calib"], "-q")
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(onnx.load(out))


def test_gate_exit_code_and_nothing_written(digits, tmp_path):
    out = tmp_path / "q.onnx"
    res = _invoke("optimize", digits["model"], "-o", out, "--quantize", "static", "--calibration", digits["calib"],
                  "--min-cosine", "0.999999999", "--no-fallback", "-q")
    assert res.exit_code == 3
    assert not out.exists()


@pytest.fixture
def small(tmp_path):
    m = G.mlp()
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    return p


def _bad(tmp_path, model, *extra, needles=()):
    out = tmp_path / "out.onnx"
    before = {p: _digest(p) for p in tmp_path.iterdir() if p.is_file()}
    res = _invoke("optimize", model, "-o", out, *extra)
    _one_line_error(res, *needles)
    assert not out.exists()
    assert {p: _digest(p) for p in tmp_path.iterdir() if p.is_file() and p in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]  # no temp leftovers
    return res


def test_missing_path(tmp_path):
    _bad(tmp_path, tmp_path / "nope.onnx", needles=["no such file"])


def test_directory(tmp_path):
    (tmp_path / "d.onnx").mkdir()
    _bad(tmp_path, tmp_path / "d.onnx", needles=["directory"])


def test_truncated_model(tmp_path, small):
    data = small.read_bytes()
    t = tmp_path / "t.onnx"
    t.write_bytes(data[: len(data) // 2])
    _bad(tmp_path, t, needles=["t.onnx"])


def test_non_onnx_file(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model\n" * 10)
    _bad(tmp_path, p, needles=["ONNX"])


def test_missing_external_data(tmp_path, small):
    m = onnx.load(small)
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    os.unlink(tmp_path / "ext.onnx.data")
    _bad(tmp_path, tmp_path / "ext.onnx", needles=["ext.onnx.data"])


def _npz(tmp_path, **arrays):
    p = tmp_path / "calib.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("arrays,needle", [
    ({"wrong": np.zeros((4, 4, 16), np.float32)}, "no array for model input"),
    ({"x": np.zeros((4, 4, 15), np.float32)}, "shape"),
    ({"x": np.array([["a"] * 16] * 4)}, "dtype"),
    ({"x": np.full((4, 4, 16), np.nan, np.float32)}, "NaN"),
    ({"x": np.zeros((0, 4, 16), np.float32)}, "zero samples"),
])
def test_bad_calibration(tmp_path, small, arrays, needle):
    _bad(tmp_path, small, "--quantize", "static", "--calibration", _npz(tmp_path, **arrays), needles=[needle])


def test_output_equals_input(tmp_path, small):
    before = _digest(small)
    res = _invoke("optimize", small, "-o", small)
    _one_line_error(res, "input")
    assert _digest(small) == before


def test_unwritable_output_dir(tmp_path, small):
    res = _invoke("optimize", small, "-o", tmp_path / "missing_dir" / "x.onnx")
    _one_line_error(res, "does not exist")


def _mount(args):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting needs root and mount(8)")
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount not allowed here: {r.stderr.strip()}")


def test_read_only_output_dir(tmp_path, small):
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount(["--bind", str(ro), str(ro)])
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        res = _invoke("optimize", small, "-o", ro / "x.onnx")
        _one_line_error(res, "cannot write")
        assert not (ro / "x.onnx").exists()
    finally:
        subprocess.run(["umount", str(ro)])


def test_disk_full(tmp_path):
    # a model of ~400 KB written to a 64 KB tmpfs
    rng = np.random.default_rng(0)
    m = G.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [G.vi("x", [1, 320])], [G.vi("y", [1, 320])],
                [G.init("w", rng.standard_normal((320, 320)))])
    src = tmp_path / "big.onnx"
    onnx.save(m, src)
    full = tmp_path / "full"
    full.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)])
    try:
        res = _invoke("optimize", src, "-o", full / "x.onnx", "--no-fuse")
        _one_line_error(res, "cannot write")
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)])


def test_custom_domain_op_reported(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("FancyOp", ["r"], ["y"], domain="my.custom")]
    g = helper.make_graph(nodes, "g", [G.vi("x", [1, 4])], [G.vi("y", [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.custom", 1)])
    p = tmp_path / "c.onnx"
    onnx.save(m, p)
    res = _invoke("optimize", p, "-o", tmp_path / "out.onnx")
    assert res.exit_code == 0, res.output  # custom op kept as it is, and reported
    assert "FancyOp" in res.output and "no numeric validation" in res.output
    out = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph.node] == ["Relu", "FancyOp"]
    res = _invoke("optimize", p, "-o", tmp_path / "q.onnx", "--quantize", "dynamic")
    _one_line_error(res, "FancyOp")
    assert not (tmp_path / "q.onnx").exists()


def test_debug_shows_traceback(tmp_path):
    res = runner.invoke(app, ["--debug", "optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 2, res.output  # bad input: the traceback, and the same exit code as without --debug
    assert "Traceback" in res.output and "error:" in res.output


def test_console_script_entry_point(digits):
    exe = shutil.which("onnxcompress")
    if exe is None:
        pytest.skip("console script not installed")
    r = subprocess.run([exe, "inspect", str(digits["model"]), "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["opsets"]


def test_optimize_html_report(digits, tmp_path, screenshot):
    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    out, html = tmp_path / "q.onnx", tmp_path / "r.html"
    res = _invoke("optimize", digits["model"], "-o", out, "--quantize", "static", "--calibration", digits["calib"],
                  "--validation", digits["test"], "--html", html, "-q")
    assert res.exit_code == 0, res.output
    text = html.read_text()
    assert "data:image/png;base64," in text and "quantize-static" in text and "logits" in text
    screenshot(html)  # the page renders in a browser


def test_optimize_html_shows_the_terminal_ratio_column_gates_and_fidelity(digits, tmp_path):
    """The optimize page carries what the terminal prints: the ratio column ("3.63× smaller",
    "1.05× slower", "+0.00 pp"), the default-floor gate rows and whether the floor applied, and
    per-output fidelity (mean cosine, top-1 on decisive rows); a floor that did not apply says why."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    from onnxcompress.cli_optimize import _ratio
    from onnxcompress.report_html import optimize_rows, ratio_text, render_optimize_html

    out, html, rep = tmp_path / "q.onnx", tmp_path / "r.html", tmp_path / "r.json"
    res = _invoke("optimize", digits["model"], "-o", out, "--quantize", "static", "--calibration", digits["calib"],
                  "--validation", digits["test"], "--report", rep, "--html", html, "-q")
    assert res.exit_code == 0, res.output
    text, report = html.read_text(), json.loads(rep.read_text())
    b, a = report["before"], report["after"]
    size = ratio_text(b["file_bytes"], a["file_bytes"], "smaller", "larger")
    assert size == _ratio(b["file_bytes"], a["file_bytes"], "smaller", "larger") and size.endswith("× smaller")
    assert size in text
    v = report["validation"][0]
    lat = _ratio(v["latency_ms_reference"], v["latency_ms_candidate"], "faster", "slower")
    assert lat and lat in text
    assert f"{v['accuracy_candidate'] - v['accuracy_reference']:+.2f} pp" in text
    assert [r["ratio"] for r in optimize_rows(report)][:1] == [size]
    floor_rows = [g for g in report["gates"] if g.get("floor")]
    assert floor_rows and report["floor"]["applied"]
    assert "default floor" in text and floor_rows[0]["gate"] in text and "Default fidelity floor <b>applied</b>" in text
    assert "mean cosine" in text and "top-1 on decisive rows" in text
    assert f"{v['outputs'][0]['mean_cosine']:.5f}" in text
    assert "Per-node int8 error" in text or "per-node SQNR" in text
    assert "http://" not in text and "https://" not in text
    report["floor"] = {"applied": False, "why": "your gates judge the model"}
    report["gates"] = [dict(floor_rows[0], floor=False, gate="min-cosine", passed=False)]
    other = render_optimize_html(report)
    assert "Default fidelity floor <b>not applied</b>: your gates judge the model" in other
    assert "your gate" in other and "FAIL" in other


def test_input_external_data_is_never_overwritten(tmp_path, small):
    """Input a.onnx keeps its weights in b.onnx.data; writing b.onnx with external data would
    clobber them. The tool refuses and the input still loads."""
    m = onnx.load(small)
    onnx.save_model(m, tmp_path / "a.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="b.onnx.data", size_threshold=0)
    before = _digest(tmp_path / "b.onnx.data")
    res = _invoke("optimize", tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", "--external-data")
    _one_line_error(res, "b.onnx.data")
    assert _digest(tmp_path / "b.onnx.data") == before and not (tmp_path / "b.onnx").exists()
    G.run(str(tmp_path / "a.onnx"), {"x": np.zeros((4, 16), np.float32)})


def test_gate_without_runtime_fails(tmp_path):
    """Custom ops ORT cannot load: a requested gate cannot be checked, so nothing is written."""
    nodes = [helper.make_node("FancyOp", ["x"], ["y"], domain="my.custom")]
    g = helper.make_graph(nodes, "g", [G.vi("x", [1, 4])], [G.vi("y", [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.custom", 1)])
    onnx.save(m, tmp_path / "c.onnx")
    res = _invoke("optimize", tmp_path / "c.onnx", "-o", tmp_path / "o.onnx", "--min-cosine", "0.9")
    assert res.exit_code == 3 and not (tmp_path / "o.onnx").exists()


def test_output_file_has_default_permissions(digits, tmp_path):
    res = _invoke("optimize", digits["model"], "-o", tmp_path / "f.onnx", "-q")
    assert res.exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


def test_version_and_bad_option_values(small, tmp_path):
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip()
    for args, needle in ((["--min-top1-agreement", "0.99"], "percentage"), (["--min-top1", "0.5"], "percentage"),
                         (["--min-cosine", "1.5"], "[-1, 1]"),
                         (["--providers", "cpu,foo"], "unknown execution provider")):
        _bad(tmp_path, small, *args, needles=[needle])


def test_bad_report_path_fails_before_writing_anything(digits, tmp_path):
    """A --report / --html path that cannot be written is refused up front: no model is written
    (a script trusting the exit code must not find a fresh output) and no temp file is left."""
    out = tmp_path / "q.onnx"
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for flag, bad in (("--report", folder), ("--report", tmp_path / "nodir" / "r.json"), ("--html", folder)):
        res = _invoke("optimize", digits["model"], "-o", out, "--quantize", "dynamic", "--calibration", digits["calib"],
                      flag, bad)
        _one_line_error(res, str(bad))
        assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_gate_values_print_enough_digits_to_differ_from_the_limit():
    """A failed cosine gate never reads '0.995 (limit 0.995) FAIL'."""
    from onnxcompress.cli_optimize import _gate_value

    assert _gate_value(0.99498, 0.995) == ("0.99498", "0.995")
    assert _gate_value(0.99612, 0.995) == ("0.9961", "0.995")
    assert _gate_value(0.995, 0.995) == ("0.995", "0.995")
    assert _gate_value(97.5, 99.0) == ("97.5", "99")
    assert _gate_value(0.9999994, 0.9999995) == ("0.9999994", "0.9999995")
    assert _gate_value(float("nan"), 0.5) == ("nan", "0.5")


def test_external_data_option_writes_model_and_data(digits, tmp_path):
    """``--external-data``: OUT plus OUT.data, loadable from their folder, no temp files left
    (onnx >= 1.16 refuses to write external data into an existing file)."""
    out = tmp_path / "d.onnx"
    res = _invoke("optimize", digits["model"], "-o", out, "--external-data", "-q")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "d.onnx.data"]
    light = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in light.graph.initializer)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_node_names_survive_fusion_for_exclude(digits, tmp_path):
    """Fusion rewrites Conv+BatchNorm into a new Conv; it keeps the original Conv's name, so the
    names ``inspect`` shows work for --exclude (and reports use them)."""
    out = tmp_path / "q.onnx"
    rep = tmp_path / "r.json"
    res = _invoke("optimize", digits["model"], "-o", out, "--quantize", "static", "--calibration", digits["calib"],
                  "--exclude", "/0/Conv", "--report", rep)
    assert res.exit_code == 0, res.output
    assert "no node or op type named" not in res.output
    passes = {p["name"]: p for p in json.loads(rep.read_text())["passes"]}
    assert {"node": "/0/Conv", "reason": "excluded by the user"} in passes["quantize-static"]["skipped"]
    names = {n.name for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"}
    assert {"/0/Conv", "/3/Conv", "/7/Conv"} <= names
    bad = _invoke("optimize", digits["model"], "-o", tmp_path / "p.onnx", "--prune-ratio", "/0/Conv")
    _one_line_error(bad, "NODE=RATIO")


def test_integer_outputs_are_gated_by_agreement_not_relative_error(tmp_path):
    """An ArgMax (class index) output beside the logits: --max-rel-error judges the float output
    only; the index output's agreement (% equal) is what --min-top1-agreement reads."""
    from onnxcompress.validate import output_metrics

    ref = [np.array([[3], [1]], np.int64)]
    m = output_metrics("cls", ref, [np.array([[4], [1]], np.int64)])
    assert m.integer and m.top1_agreement == 50.0
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 10)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=1)]
    m = G.model(nodes, [G.vi("x", [4, 16])], [G.vi("logits", [4, 10]), G.vi("cls", [4, 1], onnx.TensorProto.INT64)],
                [G.init("w", w)])
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    cal = tmp_path / "c.npz"
    np.savez(cal, x=rng.standard_normal((8, 4, 16)).astype(np.float32))
    res = _invoke("optimize", src, "-o", tmp_path / "q.onnx", "--quantize", "dynamic", "--calibration", cal,
                  "--max-rel-error", "0.2", "-q")
    assert res.exit_code == 0, res.output
    from onnxcompress.gates import Gates, evaluate as _evaluate

    val = [{"provider": "CPUExecutionProvider", "outputs": [
        {"max_rel_err": 0.05, "cosine": 0.999, "top1_agreement": None, "integer": False},
        {"max_rel_err": 0.25, "cosine": 0.9, "top1_agreement": 97.0, "integer": True}]}]
    g = _evaluate(Gates(max_rel_error=0.1, min_cosine=0.99, min_top1_agreement=98.0), val)
    assert [x["passed"] for x in g] == [True, True, False] and g[2]["value"] == 97.0
    # only index outputs: a float gate cannot judge them (fails, saying why); "inf" strings are read
    only_idx = [{"provider": "cpu", "outputs": [{"max_rel_err": "inf", "cosine": -1.0, "top1_agreement": 0.0,
                                                 "integer": True}]}]
    g = _evaluate(Gates(max_rel_error=0.1), only_idx)
    assert not g[0]["passed"] and "min-top1-agreement" in g[0]["why"]
    # uint8 outputs are values (images, masks): they keep the float gates
    m8 = output_metrics("mask", [np.array([[200, 100]], np.uint8)], [np.array([[0, 0]], np.uint8)])
    assert not m8.integer and m8.cosine <= 0.0


def test_bad_labels_in_validation_data_are_refused(digits, tmp_path):
    """``labels`` must be integer classes (a float array is a clear error, not a 0 % accuracy line);
    a count that does not match the rows is warned about, not silently dropped."""
    d = np.load(digits["test"])
    bad = tmp_path / "float.npz"
    np.savez(bad, input=d["input"], labels=d["labels"] + 0.5)
    res = _invoke("optimize", digits["model"], "-o", tmp_path / "float.onnx", "--quantize", "dynamic",
                  "--calibration", digits["calib"], "--validation", bad)
    _one_line_error(res, "labels")
    assert not (tmp_path / "float.onnx").exists()
    short = tmp_path / "short.npz"  # too few labels: said, not silently dropped (rows may differ from outputs')
    np.savez(short, input=d["input"], labels=d["labels"][:10])
    res = _invoke("optimize", digits["model"], "-o", tmp_path / "short.onnx", "--quantize", "dynamic",
                  "--calibration", digits["calib"], "--validation", short)
    assert res.exit_code == 0 and "'labels' has 10 entries for 450 rows" in res.output


def test_quantize_auto_tries_both_modes_and_writes_one(digits, tmp_path):
    """--quantize auto: dynamic and static (calibration given) each run the whole pipeline; the
    output is the fastest candidate within 0.01 of the best worst-output cosine; the report says
    which and why; nothing but the output is left in the folder. An unmeetable gate writes nothing."""
    out, rep = tmp_path / "a.onnx", tmp_path / "a.json"
    res = _invoke("optimize", digits["model"], "-o", out, "--quantize", "auto", "--calibration", digits["calib"],
                  "--validation", digits["test"], "--report", rep)
    assert res.exit_code == 0, res.output
    auto = json.loads(rep.read_text())["auto"]
    assert set(auto["candidates"]) >= {"dynamic", "static"} and auto["chosen"] in ("dynamic", "static")
    assert all(auto["candidates"][m]["passed"] for m in ("dynamic", "static")) and auto["why"]
    assert "--quantize auto chose" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.onnx"]
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # without calibration data only dynamic is tried (no calibrating on random inputs for a choice)
    res = _invoke("optimize", digits["model"], "-o", tmp_path / "b.onnx", "--quantize", "auto", "--report", rep)
    assert res.exit_code == 0 and set(json.loads(rep.read_text())["auto"]["candidates"]) == {"dynamic"}
    res = _invoke("optimize", digits["model"], "-o", tmp_path / "c.onnx", "--quantize", "auto",
                  "--calibration", digits["calib"], "--min-cosine", "1.0", "--no-fallback")
    assert res.exit_code == 3 and "no mode passed" in res.output and not (tmp_path / "c.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxcompress-auto")]


def test_internal_failure_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """A failure of the tool's own (here a library error inside the pipeline) exits 1 with one
    line, never with the bad-input code 2."""
    import onnxcompress.cli_optimize as cli_mod

    def boom(*a, **k):
        raise RuntimeError("Failed to serialize proto")

    monkeypatch.setattr(cli_mod, "api_optimize", boom)
    model = os.path.join(os.path.dirname(__file__), "..", "models", "digits_cnn.onnx")
    res = runner.invoke(app, ["optimize", model, "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 1, res.output
    assert "internal error" in res.output and "Failed to serialize proto" in res.output
    assert "Traceback" not in res.output


def test_root_help_lists_each_lazy_command_with_its_own_first_line():
    """The root help prints optimize/recipe from cli_common.LAZY_COMMANDS without importing them:
    each line there must be the first line of the command's own help."""
    import importlib

    import typer.main

    from onnxcompress.cli_common import LAZY_COMMANDS

    for name, (module, short) in LAZY_COMMANDS.items():
        cmd = typer.main.get_group(importlib.import_module(module).commands).get_command(None, name)
        assert cmd is not None, name
        assert cmd.help.strip().splitlines()[0] == short, name
    r = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert r.exit_code == 0
    for name, (_, short) in LAZY_COMMANDS.items():
        assert short in r.output


def test_root_help_and_light_commands_do_not_import_onnx():
    """`onnxcompress --help`, `--version` and the help of the commands that need no declarations
    start without onnx, onnx-ir or ONNX Runtime (the lazy root group, PEP 562 in __init__);
    optimize's help loads them."""
    code = ("import sys\nfrom onnxcompress.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('onnx', 'onnx_ir', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    for args, heavy in ((["--help"], "[]"), (["--version"], "[]"), (["bench", "--help"], "[]"),
                        (["tune", "--help"], "[]"), (["optimize", "--help"], None)):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        line = next(x for x in r.stdout.splitlines() if x.startswith("HEAVY"))
        if heavy is None:
            assert "onnx_ir" in line, (args, line)
        else:
            assert line == f"HEAVY {heavy}", (args, line)


def test_a_mistyped_lazy_command_is_suggested():
    r = CliRunner().invoke(app, ["optimze"])
    assert r.exit_code == 2 and "Did you mean 'optimize'?" in r.output


def test_the_package_names_and_submodules_load_on_use():
    """PEP 562: the public names load on first use; submodules stay reachable as attributes (as
    the eager imports of 0.1 made them); anything else is an AttributeError."""
    code = ("import onnxcompress as oc, sys\n"
            "assert 'onnxcompress.api' not in sys.modules\n"
            "assert oc.optimize is oc.api.optimize and oc.compare is oc.validate.compare\n"
            "assert oc.runtime.make_session and oc.OnnxCompressError.__name__ == 'OnnxCompressError'\n"
            "try:\n    oc.no_such_name\nexcept AttributeError:\n    print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr


def test_short_help_and_python_dash_m(tmp_path):
    """-h works like --help on the root and on every command (lazy ones included);
    ``python -m onnxcompress`` is the command line."""
    for args in (["-h"], ["optimize", "-h"], ["bench", "-h"], ["recipe", "show", "-h"], ["zoo", "-h"]):
        r = CliRunner().invoke(app, args, terminal_width=200)
        assert r.exit_code == 0 and "Usage:" in r.output, (args, r.output)
    r = subprocess.run([sys.executable, "-m", "onnxcompress", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == __import__("onnxcompress").__version__


def test_a_lowered_floor_limit_says_why(tmp_path, small):
    """The floor tolerates one changed answer among few decisive rows (31 rows: limit 96.77 %, not
    97): the gate line says so instead of printing an unexplained limit."""
    from onnxcompress import cli_common, cli_optimize

    res = _invoke("optimize", small, "-o", tmp_path / "q.onnx", "--quantize", "dynamic", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    rep["gates"] = [{"gate": "floor-top1-agreement", "provider": "CPUExecutionProvider", "value": 100.0,
                     "limit": 96.7742, "passed": True, "floor": True, "outputs": ["logits"]}]
    from rich.console import Console

    rec = Console(record=True, width=200)
    old = (cli_common.console, cli_optimize.console, cli_optimize.out_console)
    cli_optimize.console = cli_optimize.out_console = rec
    try:
        cli_optimize._render(rep)
    finally:
        cli_common.console, cli_optimize.console, cli_optimize.out_console = old
    line = next(l for l in rec.export_text().splitlines() if l.startswith("gate floor-top1-agreement"))
    assert "limit 96.77" in line and "97 % lowered" in line and "one changed answer tolerated, never below 90 %" in line
    rep["gates"][0]["limit"] = 97.0
    rec = Console(record=True, width=200)
    cli_optimize.console = cli_optimize.out_console = rec
    try:
        cli_optimize._render(rep)
    finally:
        cli_common.console, cli_optimize.console, cli_optimize.out_console = old
    assert "lowered" not in rec.export_text()


def test_a_warning_is_printed_once_per_command(tmp_path, digits):
    """--quantize auto runs the pipeline once per candidate: a warning both runs raise (here channel
    pruning's) is printed once."""
    res = _invoke("optimize", digits["model"], "-o", tmp_path / "q.onnx", "--quantize", "auto", "--calibration",
                  digits["calib"], "--prune", "0.3", "--prune-mode", "channel")
    lines = [l for l in res.output.splitlines() if l.startswith("warning:")]
    assert any("prune-channels" in l for l in lines), res.output
    assert len(lines) == len(set(lines)), res.output
