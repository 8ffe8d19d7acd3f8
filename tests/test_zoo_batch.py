"""`onnxcompress zoo`: manifest parsing, failure isolation, caching/resume (also after kill -9),
memory/time limits, and the Ray executor. Uses the committed digits CNN and tiny generated
models only (never zoo_cache)."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.zoo import ManifestError, load_manifest, run_zoo, stable_table, task_key
from onnxcompress.zoo.runner import STATE_NAME, _Hasher

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _mlp(path: Path, seed: int, k: int = 16, h: int = 32, n: int = 10) -> Path:
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((k, h), dtype=np.float32) * np.float32(0.3), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, (h,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (h, n)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [w1, b1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    np.savez(path.with_suffix(".npz"), x=rng.normal(size=(32, k)).astype(np.float32))
    return path


@pytest.fixture
def zoo_dir(tmp_path):
    """A folder with the digits CNN + data, two tiny MLPs, a corrupt and a non-ONNX file."""
    for f in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"):
        shutil.copy(ROOT / "models" / f, tmp_path / f)
    _mlp(tmp_path / "mlp_a.onnx", 1)
    _mlp(tmp_path / "mlp_b.onnx", 2)
    raw = (ROOT / "models" / "digits_cnn.onnx").read_bytes()
    (tmp_path / "corrupt.onnx").write_bytes(raw[: len(raw) // 3] + b"\xff" * 64)
    (tmp_path / "notes.onnx").write_text("this is a README, not a model\n" * 20)
    return tmp_path


RECIPES = """
[recipes.fuse]
description = "fusion only"
[recipes.dyn]
quantize = "dynamic"
[recipes.static]
quantize = "static"
"""


def _manifest(d: Path, body: str, recipes: str = RECIPES, defaults: str = 'recipes = ["fuse", "dyn"]',
              options: str = "latency = false") -> Path:
    text = f"[defaults]\n{defaults}\noptions = {{ {options} }}\n{recipes}\n{textwrap.dedent(body)}"
    p = d / "zoo.toml"
    p.write_text(text)
    return p


MLPS = """
[models.mlp_a]
path = "mlp_a.onnx"
calibration = "mlp_a.npz"
[models.mlp_b]
path = "mlp_b.onnx"
calibration = "mlp_b.npz"
"""

DIGITS = """
[models.digits]
path = "digits_cnn.onnx"
calibration = "digits_calib.npz"
validation = "digits_test.npz"
"""


def _state(out: Path) -> dict:
    p = out / STATE_NAME
    return json.loads(p.read_text())["tasks"] if p.exists() else {}


# ----------------------------------------------------------------------------- manifest


def test_manifest_defaults_and_overrides(zoo_dir):
    p = _manifest(zoo_dir, """
        [models.mlp_a]
        path = "mlp_a.onnx"
        calibration = "mlp_a.npz"
        options = { max-calibration-samples = 8, min_sqnr_db = false }
        image = { size = [8, 8], layout = "nhwc" }
        [models.mlp_a.overrides.static]
        calibration_method = "entropy"
        [models.mlp_b]
        path = "sub/../mlp_b.onnx"
        recipes = ["static"]
        """, options="latency = false, max_calibration_samples = 64")
    mf = load_manifest(p)
    assert mf.tasks() == [("mlp_a", "fuse"), ("mlp_a", "dyn"), ("mlp_b", "static")]
    assert mf.tasks(only=["mlp_b"], recipes=["fuse", "static"]) == [("mlp_b", "fuse"), ("mlp_b", "static")]
    a = mf.options_for("mlp_a", "static")
    assert a["quantize"] == "static" and a["calibration_method"] == "entropy"     # recipe < model override
    assert a["max_calibration_samples"] == 8 and a["min_sqnr_db"] is None        # defaults < model options
    assert a["latency"] is False and a["calibration"] == str((zoo_dir / "mlp_a.npz").resolve())
    assert a["image"] == {"size": [8, 8], "layout": "NHWC"}
    assert "calibration_method" not in mf.options_for("mlp_a", "dyn")  # optimize()'s default
    b = mf.options_for("mlp_b", "static")
    assert b["max_calibration_samples"] == 64 and b["calibration"] is None
    assert mf.models["mlp_b"].path == (zoo_dir / "mlp_b.onnx").resolve()


@pytest.mark.parametrize("text, needle", [
    ("[models.a\npath = 1", "invalid TOML"),
    ("[recipes.r]\nquantise = 'static'\n[models.a]\npath = 'a.onnx'", "unknown option 'quantise'"),
    ("[recipes.r]\nquantize = 'int4'\n[models.a]\npath = 'a.onnx'", "[recipes.r]: --quantize must be one of"),
    ("[recipes.r]\nprune = 'half'\n[models.a]\npath = 'a.onnx'", "--prune must be a number"),
    ("[recipes.r]\ncalibration = 'c.npz'\n[models.a]\npath = 'a.onnx'", "per-model setting"),
    ("[defaults]\nrecipes = ['nope']\n[recipes.r]\n[models.a]\npath = 'a.onnx'", "'nope', which is not defined"),
    ("[recipes.r]\n[models.a]\ncalibration = 'c.npz'", "missing 'path'"),
    ("[recipes.r]\n[models.a]\npath = 'a.onnx'\nrecipes = ['x']", "recipe 'x' is not defined"),
    ("[recipes.r]\n[models.a]\npath = 'a.onnx'\ncolour = 'red'", "unknown key(s) ['colour']"),
    ("[recipes.r]\n[models.'a/b']\npath = 'a.onnx'", "becomes a file name"),
    ("[recipes.r]\n[models.a]\npath = 'a.onnx'\nfetch = 'make'", "'fetch' must be a command"),
    ("[recipes.r]\n[models.a]\npath = 'a.onnx'\n[models.a.overrides.q]\nfuse = false", "overrides for recipe 'q'"),
    ("[models.a]\npath = 'a.onnx'", "no recipes"),
    ("[recipes.r]", "no models"),
    ("[run]\njobs = 'many'\n[recipes.r]\n[models.a]\npath = 'a.onnx'", "'jobs' must be an integer"),
    ("[recipes.r]\n[models.a]\npath = 'a.onnx'\nimage = { size = [1, 2, 3] }", "image.size must be a list of 2"),
])
def test_manifest_errors(tmp_path, text, needle):
    p = tmp_path / "m.toml"
    p.write_text(text)
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    assert needle in str(ei.value), str(ei.value)


def test_manifest_missing_and_bad_selection(tmp_path, zoo_dir):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.toml")
    mf = load_manifest(_manifest(zoo_dir, MLPS))
    with pytest.raises(ManifestError, match="--only mlp_c: no such model"):
        mf.tasks(only=["mlp_c"])
    with pytest.raises(ManifestError, match="--recipe turbo: no such recipe"):
        mf.tasks(recipes=["turbo"])
    res = runner.invoke(app, ["zoo", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such manifest" in res.output


def test_shipped_zoo_manifest():
    mf = load_manifest(ROOT / "models" / "zoo.toml")
    assert len(mf.models) == 7
    # every model runs fuse and both int8 modes, but PP-OCRv4 rec, whose static model the default floor refuses
    assert all(len(m.recipes) >= 3 for n, m in mf.models.items() if n != "ppocr_rec")
    assert mf.models["ppocr_rec"].recipes == ["fuse", "int8-dynamic"]
    for name, m in mf.models.items():
        assert m.path == (ROOT / "zoo_cache" / name / "model.onnx").resolve()
        assert m.calibration.name == "calib.npz" and m.validation.name == "val.npz"
        assert any("fetch_zoo.py" in a for cmd in m.fetch for a in cmd)
    assert {"fuse", "int8-dynamic", "int8-static", "prune50-int8"} <= set(mf.recipes)


def test_key_covers_content_not_paths(zoo_dir, tmp_path, monkeypatch):
    import onnxcompress.zoo.runner as R

    mf = load_manifest(_manifest(zoo_dir, MLPS))
    k = task_key(mf, "mlp_a", "fuse", _Hasher())
    assert k == task_key(mf, "mlp_a", "fuse", _Hasher())
    with monkeypatch.context() as mp:  # edited conversion code, same version: not served from the cache
        mp.setattr(R, "_code_fp", "edited")
        assert task_key(mf, "mlp_a", "fuse", _Hasher()) != k
    assert k != task_key(mf, "mlp_a", "dyn", _Hasher())
    # same bytes elsewhere: same key; changed data: new key
    other = tmp_path / "elsewhere"
    shutil.copytree(zoo_dir, other)
    assert task_key(load_manifest(other / "zoo.toml"), "mlp_a", "fuse", _Hasher()) == k
    np.savez(zoo_dir / "mlp_a.npz", x=np.zeros((4, 16), np.float32))
    assert task_key(mf, "mlp_a", "fuse", _Hasher()) != k
    # external data is part of the key
    m = onnx.load(str(zoo_dir / "mlp_b.onnx"))
    onnx.save(m, str(zoo_dir / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    mf2 = load_manifest(_manifest(zoo_dir, MLPS + '[models.ext]\npath = "ext.onnx"\n'))
    k1 = task_key(mf2, "ext", "fuse", _Hasher())
    data = bytearray((zoo_dir / "ext.bin").read_bytes())
    data[0] ^= 1
    (zoo_dir / "ext.bin").write_bytes(bytes(data))
    assert task_key(mf2, "ext", "fuse", _Hasher()) != k1


# ----------------------------------------------------------------------------- runs


def test_corrupt_and_non_onnx_rows_fail_rest_succeed(zoo_dir, screenshot):
    p = _manifest(zoo_dir, DIGITS + MLPS + """
        [models.corrupt]
        path = "corrupt.onnx"
        [models.readme]
        path = "notes.onnx"
        [models.gone]
        path = "missing.onnx"
        """)
    out = zoo_dir / "out"
    res = runner.invoke(app, ["zoo", str(p), "--out", str(out), "--jobs", "2", "--threads", "1"])
    assert res.exit_code == 1, res.output
    rep = json.loads((out / "zoo_report.json").read_text())
    by = {(r["model"], r["recipe"]): r for r in rep["rows"]}
    assert len(by) == 12
    for (m, r), row in by.items():
        if m in ("corrupt", "readme", "gone"):
            assert row["status"] == "failed", row
        else:
            assert row["status"] == "ok", row
            assert (out / "models" / m / f"{r}.onnx").is_file()
            onnx.checker.check_model(onnx.load(str(out / "models" / m / f"{r}.onnx")))
    assert "corrupt.onnx: not a readable ONNX model" in by["corrupt", "fuse"]["error"]
    assert "notes.onnx: not" in by["readme", "fuse"]["error"] and "ONNX model" in by["readme", "fuse"]["error"]
    assert "model file not found" in by["gone", "fuse"]["error"]
    assert "corrupt / fuse" in res.output and "failed" in res.output
    md = (out / "zoo_report.md").read_text()
    assert "FAILED (input)" in md and "not a readable ONNX model" in md
    html = (out / "zoo_report.html").read_text()
    assert "not a readable ONNX model" in html and "<table>" in html
    screenshot(out / "zoo_report.html")  # the page, failed rows included, renders in a browser
    assert by["digits", "dyn"]["accuracy_candidate"] is not None
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())


def test_rerun_skips_everything_then_recipe_change_reruns_only_it(zoo_dir):
    p = _manifest(zoo_dir, MLPS + '[models.corrupt]\npath = "corrupt.onnx"\n')
    out = zoo_dir / "out"
    first = run_zoo(p, out, jobs=2, threads=1)
    assert sorted(first.executed) == ["corrupt/dyn", "corrupt/fuse", "mlp_a/dyn", "mlp_a/fuse", "mlp_b/dyn",
                                      "mlp_b/fuse"]
    assert first.exit_code == 1
    mtimes = {f: f.stat().st_mtime_ns for f in (out / "models").rglob("*.onnx")}
    t0 = time.perf_counter()
    again = run_zoo(p, out, jobs=2, threads=1)
    assert again.executed == [] and len(again.cached) == 6
    assert time.perf_counter() - t0 < 5
    assert again.exit_code == 1 and stable_table(again.rows) == stable_table(first.rows)
    assert {f: f.stat().st_mtime_ns for f in (out / "models").rglob("*.onnx")} == mtimes
    # change one recipe: only its tasks run (the corrupt model's failure is redone too: its key changed)
    p.write_text(p.read_text().replace('quantize = "dynamic"', 'quantize = "dynamic"\nper_channel = false'))
    third = run_zoo(p, out, jobs=2, threads=1)
    assert sorted(third.executed) == ["corrupt/dyn", "mlp_a/dyn", "mlp_b/dyn"]
    # a deleted output is noticed and rebuilt; --retry-failed reruns cached failures
    (out / "models" / "mlp_a" / "fuse.onnx").unlink()
    fourth = run_zoo(p, out, jobs=2, threads=1, retry_failed=True)
    assert sorted(fourth.executed) == ["corrupt/dyn", "corrupt/fuse", "mlp_a/fuse"]
    assert (out / "models" / "mlp_a" / "fuse.onnx").is_file()
    # --only keeps the other models' finished rows out of the rows but in the report
    fifth = run_zoo(p, out, only=["mlp_b"])
    assert fifth.executed == [] and [r["model"] for r in fifth.rows] == ["mlp_b", "mlp_b"]
    assert len(fifth.report["other_finished"]) == 4
    assert "4 other finished task(s)" in (out / "zoo_report.md").read_text()  # the page says what it leaves out


def test_kill9_midway_then_resume(zoo_dir):
    recipes = RECIPES + """
[recipes.static-entropy]
quantize = "static"
calibration_method = "entropy"
[recipes.static-pct]
quantize = "static"
calibration_method = "percentile"
[recipes.prune]
prune = 0.5
"""
    p = _manifest(zoo_dir, DIGITS, recipes=recipes,
                  defaults='recipes = ["static", "static-entropy", "static-pct", "dyn", "fuse", "prune"]')
    out = zoo_dir / "out"
    cmd = [sys.executable, "-c", "import sys; from onnxcompress.cli import app; sys.exit(app())",
           "zoo", str(p), "--out", str(out), "--jobs", "1", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(_state(out)) >= 1:
                break
        except ValueError:  # never: the state file is replaced atomically
            raise
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = set(_state(out))
    assert 1 <= len(done_before) < 6
    res = run_zoo(p, out, jobs=1, threads=1)
    all_tasks = {f"digits/{r}" for r in ("static", "static-entropy", "static-pct", "dyn", "fuse", "prune")}
    assert set(res.executed) == all_tasks - done_before
    assert res.exit_code == 0 and len(res.rows) == 6 and all(r["status"] == "ok" for r in res.rows)
    assert set(_state(out)) == all_tasks
    rep = json.loads((out / "zoo_report.json").read_text())
    assert rep["counts"] == {"tasks": 6, "ok": 6, "failed": 0, "ran": 6 - len(done_before), "cached": len(done_before)}
    for r in rep["rows"]:
        assert Path(r["output"]).is_file() and Path(r["report"]).is_file()
    assert not list(out.rglob("*.tmp"))


def test_memory_and_time_limits_fail_only_their_task(zoo_dir):
    _mlp(zoo_dir / "hog.onnx", 3, k=4096, h=8192, n=2)  # 128 MB of weights: cannot load under a 100 MB cap
    p = _manifest(zoo_dir, DIGITS + MLPS + """
        [models.hog]
        path = "hog.onnx"
        calibration = "hog.npz"
        memory_limit_mb = 100
        [models.slow]
        path = "digits_cnn.onnx"
        calibration = "digits_calib.npz"
        timeout_s = 0.05
        """, defaults='recipes = ["static"]')
    out = zoo_dir / "out"
    res = runner.invoke(app, ["zoo", str(p), "--out", str(out), "--jobs", "2", "--threads", "1",
                              "--memory-limit-mb", "6000", "--timeout-s", "120", "--quiet"])
    assert res.exit_code == 1, res.output
    by = {r["model"]: r for r in json.loads((out / "zoo_report.json").read_text())["rows"]}
    assert by["hog"]["status"] == "failed" and by["hog"]["kind"] == "memory", by["hog"]
    assert "memory limit" in by["hog"]["error"] and "100 MB" in by["hog"]["error"]
    assert by["slow"]["status"] == "failed" and by["slow"]["kind"] == "timeout", by["slow"]
    assert "time limit" in by["slow"]["error"] and "0.05 s" in by["slow"]["error"]
    assert all(by[m]["status"] == "ok" for m in ("digits", "mlp_a", "mlp_b"))
    # limit failures are not recorded as finished: the next run retries them, and only them
    assert set(_state(out)) == {"digits/static", "mlp_a/static", "mlp_b/static"}
    again = run_zoo(p, out, jobs=2, threads=1, timeout_s=120)
    assert sorted(again.executed) == ["hog/static", "slow/static"]


def test_fetch_commands(zoo_dir):
    p = _manifest(zoo_dir, """
        [models.fetched]
        path = "cache/fetched.onnx"
        calibration = "mlp_a.npz"
        fetch = [["{python}", "-c", "import os, shutil; os.makedirs('cache', exist_ok=True); shutil.copy('mlp_a.onnx', 'cache/fetched.onnx')"]]
        [models.unfetchable]
        path = "cache/never.onnx"
        fetch = ["{python}", "-c", "import sys; print('no network'); sys.exit(3)"]
        [models.nodata]
        path = "mlp_b.onnx"
        calibration = "nowhere.npz"
        """, defaults='recipes = ["fuse"]')
    res = run_zoo(p, zoo_dir / "out", jobs=1)
    by = {r["model"]: r for r in res.rows}
    assert by["fetched"]["status"] == "ok" and (zoo_dir / "cache" / "fetched.onnx").is_file()
    assert by["unfetchable"]["kind"] == "missing" and "fetch failed (exit 3)" in by["unfetchable"]["error"]
    assert "no network" in by["unfetchable"]["error"]
    assert "calibration data not found" in by["nodata"]["error"]
    assert res.exit_code == 1


def test_ray_missing_is_a_clear_error(zoo_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    p = _manifest(zoo_dir, MLPS)
    res = runner.invoke(app, ["zoo", str(p), "--out", str(zoo_dir / "out"), "--executor", "ray"])
    assert res.exit_code == 2 and "pip install" in res.output and "ray" in res.output


def test_ray_executor_same_results(zoo_dir):
    pytest.importorskip("ray")
    p = _manifest(zoo_dir, MLPS + '[models.corrupt]\npath = "corrupt.onnx"\n')
    local = run_zoo(p, zoo_dir / "local", jobs=2, threads=1)
    ray_res = run_zoo(p, zoo_dir / "ray", executor="ray", jobs=2, threads=1)
    assert len(ray_res.executed) == 6
    assert stable_table(ray_res.rows) == stable_table(local.rows)
    assert ray_res.exit_code == local.exit_code == 1
    again = run_zoo(p, zoo_dir / "ray", executor="ray", jobs=2, threads=1)  # cached: Ray is not even started
    assert again.executed == []


def test_zoo_runs_the_same_recipe_objects_as_optimize(zoo_dir):
    """A whole recipe (the `recipe show` schema) and a built-in `base` with flags over it, in a
    manifest: each task writes the bytes `optimize --recipe` writes."""
    from onnxcompress import recipe as R

    shown = runner.invoke(app, ["recipe", "show", "--quantize", "static", "--no-latency", "--min-cosine", "0.9"])
    assert shown.exit_code == 0, shown.output
    rfile = zoo_dir / "r.toml"
    rfile.write_text(shown.stdout)
    # the same recipe as a manifest table: [recipes.whole] + its stages/sections as sub-tables
    body = R.loads(shown.stdout).to_dict()
    import tomli_w
    whole = tomli_w.dumps({"recipes": {"whole": body, "based": {"base": "int8-static", "target": "avx2",
                                                                "latency": False}}})
    p = _manifest(zoo_dir, DIGITS, recipes=whole, defaults='recipes = ["whole", "based"]')
    mf = load_manifest(p)
    assert mf.recipe_for("digits", "whole").stages == R.loads(shown.stdout).stages
    out = zoo_dir / "out"
    res = run_zoo(p, out, jobs=1)
    assert [r["status"] for r in res.rows] == ["ok", "ok"], res.rows
    for recipe, extra in (("whole", ["--recipe", rfile]), ("based", ["--recipe", "int8-static", "--target", "avx2",
                                                                   "--no-latency"])):
        ref = zoo_dir / f"{recipe}.onnx"
        r = runner.invoke(app, ["optimize", str(zoo_dir / "digits_cnn.onnx"), "-o", str(ref), "-q",
                                "--calibration", str(zoo_dir / "digits_calib.npz"),
                                "--validation", str(zoo_dir / "digits_test.npz"), *map(str, extra)])
        assert r.exit_code == 0, r.output
        assert (out / "models" / "digits" / f"{recipe}.onnx").read_bytes() == ref.read_bytes(), recipe
    # a manifest recipe that names a data file is refused: data is per model
    bad = dict(body, data={"calibration": "x.npz"})
    with pytest.raises(ManifestError, match="per-model"):
        load_manifest(_manifest(zoo_dir, DIGITS, recipes=tomli_w.dumps({"recipes": {"w": bad}}),
                                defaults='recipes = ["w"]'))


# ----------------------------------------------------------------------------- guards


def _hang_model(path: Path) -> Path:
    """A valid model whose inference never ends in practice (a Loop of 2**62 steps): its task
    hangs once the model is loaded."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "one")])
    g = helper.make_graph([helper.make_node("Loop", ["M", "", "x"], ["y"], body=body)], "hang",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(np.array(2 ** 62, np.int64), "M")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    np.savez(path.with_suffix(".npz"), x=np.ones((2, 4), np.float32))
    return path


def _gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# the zoo parent without the current folder on sys.path, like the installed `onnxcompress` script
PARENT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
          "from onnxcompress.cli import app; sys.exit(app())")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill9_of_parent_kills_worker_and_forkserver(tmp_path):
    _hang_model(tmp_path / "hang.onnx")
    p = _manifest(tmp_path, '[models.hang]\npath = "hang.onnx"\ncalibration = "hang.npz"\n',
                  defaults='recipes = ["fuse"]')
    out = tmp_path / "out"
    log = out / "logs" / "hang.fuse.log"
    proc = subprocess.Popen([sys.executable, "-c", PARENT, "zoo", str(p), "--out", str(out), "--quiet",
                             "--timeout-s", "600"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and "loading model" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, "the zoo run ended before its task started"
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None, "the zoo run ended: its task did not hang"
        worker = int(log.read_text().split(" pid ")[1].split()[0])
        forkserver = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert forkserver != proc.pid and not _gone(worker)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and not (_gone(worker) and _gone(forkserver)):
            time.sleep(0.1)
        assert _gone(worker) and _gone(forkserver), "worker or fork server outlived the killed zoo process"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _child_task(tmp: Path, model: Path, timeout_s: float, parent_pid: int) -> Path:
    from onnxcompress.zoo import load_manifest as load

    mf = load(_manifest(tmp, f'[models.m]\npath = "{model.name}"\ncalibration = "{model.stem}.npz"\n',
                        defaults='recipes = ["fuse"]'))
    work = tmp / "work"
    work.mkdir()
    spec = {"model": "m", "recipe": "fuse", "key": "0" * 64, "model_path": str(model),
            "recipe_data": mf.recipe_for("m", "fuse").to_dict(), "output": str(tmp / "o.onnx"),
            "report": str(tmp / "r.json"), "log": str(tmp / "task.log"), "work_dir": str(work),
            "timeout_s": timeout_s, "memory_limit_mb": None, "threads": 1, "parent_pid": parent_pid}
    (work / "task.json").write_text(json.dumps(spec))
    return work / "task.json"


def _run_child(task: Path, wait_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from onnxcompress.zoo.worker import child_main; "
                           "child_main(sys.argv[1])", str(task)], timeout=wait_s, capture_output=True)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX timer")
def test_worker_enforces_its_own_time_limit(tmp_path):
    from onnxcompress.zoo.worker import SELF_LIMIT_GRACE_S, classify_exit

    task = _child_task(tmp_path, _hang_model(tmp_path / "hang.onnx"), 0.5, os.getpid())
    t0 = time.perf_counter()
    r = _run_child(task, 120)  # no parent kills it: it must stop itself
    assert r.returncode == -signal.SIGALRM, (r.returncode, r.stderr.decode()[-2000:])
    assert time.perf_counter() - t0 < 60
    kind, msg = classify_exit(r.returncode, started=True, timeout_s=0.5, memory_limit_mb=None)
    assert kind == "timeout" and f"{0.5 + SELF_LIMIT_GRACE_S:g} s" in msg
    assert not (tmp_path / "work" / "result.json").exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX pids")
def test_worker_watchdog_exits_when_parent_is_gone(tmp_path):
    """The portable backstop of PR_SET_PDEATHSIG: the worker exits when its parent pid is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    task = _child_task(tmp_path, _hang_model(tmp_path / "hang.onnx"), 600, dead.pid)
    r = _run_child(task, 120)
    assert r.returncode == 125, (r.returncode, r.stderr.decode()[-2000:])


def test_default_time_limit(zoo_dir):
    from onnxcompress.zoo.runner import DEFAULT_TIMEOUT_S

    body = '[models.gone]\npath = "missing.onnx"\n'  # nothing runs: only the resolved limits matter
    assert DEFAULT_TIMEOUT_S == 3600
    assert run_zoo(_manifest(zoo_dir, body), zoo_dir / "o1").report["timeout_s"] == DEFAULT_TIMEOUT_S
    assert run_zoo(_manifest(zoo_dir, body), zoo_dir / "o2", timeout_s=0).report["timeout_s"] is None
    p = _manifest(zoo_dir, "[run]\ntimeout_s = false\n" + body)
    assert run_zoo(p, zoo_dir / "o3").report["timeout_s"] is None
    p = _manifest(zoo_dir, "[run]\ntimeout_s = 30\n" + body)
    assert run_zoo(p, zoo_dir / "o4").report["timeout_s"] == 30
    assert run_zoo(p, zoo_dir / "o5", timeout_s=7).report["timeout_s"] == 7
    from onnxcompress.zoo.runner import _spec

    mf = load_manifest(_manifest(zoo_dir, MLPS))
    assert _spec(mf, zoo_dir, "mlp_a", "fuse", "k", None, DEFAULT_TIMEOUT_S, 1)["timeout_s"] == DEFAULT_TIMEOUT_S


def test_folder_named_onnxcompress_in_cwd_does_not_break_workers(zoo_dir, tmp_path):
    cwd = tmp_path / "here"
    (cwd / "onnxcompress" / "zoo").mkdir(parents=True)  # a namespace package that shadows nothing real
    p = _manifest(zoo_dir, MLPS, defaults='recipes = ["fuse"]')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", PARENT, "zoo", str(p), "--out", str(out), "--quiet",
                        "--memory-limit-mb", "6000", "--threads", "1"], cwd=cwd, capture_output=True, timeout=300)
    rows = json.loads((out / "zoo_report.json").read_text())["rows"]
    assert r.returncode == 0 and [x["status"] for x in rows] == ["ok", "ok"], (rows, r.stderr.decode()[-2000:])


def test_worker_exit_is_classified_by_cause():
    from onnxcompress.zoo.worker import _package_mismatch, classify_exit

    kind, msg = classify_exit(1, started=False, timeout_s=60, memory_limit_mb=4000)
    assert kind == "import" and "could not import onnxcompress" in msg and "memory" not in msg
    kind, msg = classify_exit(1, started=True, timeout_s=60, memory_limit_mb=4000, log_tail="KeyError: 'x'")
    assert kind == "crash" and "exited with code 1" in msg
    kind, msg = classify_exit(-signal.SIGSEGV, started=True, timeout_s=None, memory_limit_mb=4000)
    assert kind == "crash" and "SIGSEGV" in msg
    kind, msg = classify_exit(-signal.SIGABRT, started=True, timeout_s=None, memory_limit_mb=4000,
                              log_tail="terminate called after throwing an instance of 'std::bad_alloc'")
    assert kind == "memory" and "4000 MB" in msg
    kind, msg = classify_exit(-signal.SIGKILL, started=True, timeout_s=None, memory_limit_mb=None)
    assert kind == "crash" and "out-of-memory killer" in msg
    assert classify_exit(124, started=True, timeout_s=10, memory_limit_mb=4000)[0] == "timeout"
    assert _package_mismatch({"package_dir": str(ROOT / "onnxcompress")}) is None
    assert "not from /elsewhere/onnxcompress" in _package_mismatch({"package_dir": "/elsewhere/onnxcompress"})


FETCHED = """
[models.fetched]
path = "cache/fetched.onnx"
fetch = [["{python}", "-c", "import os, shutil; os.makedirs('cache', exist_ok=True); shutil.copy('mlp_a.onnx', 'cache/fetched.onnx')"]]
"""


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners")
def test_fetch_refused_from_untrusted_manifest(zoo_dir, monkeypatch):
    from onnxcompress.zoo import ZooRunError

    p = _manifest(zoo_dir, FETCHED, defaults='recipes = ["fuse"]')
    p.chmod(0o664)  # group-writable: anyone in the group could put commands in it
    with pytest.raises(ZooRunError) as ei:
        run_zoo(p, zoo_dir / "out")
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and "--allow-fetch" in msg and "writable by group" in msg
    assert not (zoo_dir / "cache").exists() and not (zoo_dir / "out").exists()
    res = runner.invoke(app, ["zoo", str(p), "--out", str(zoo_dir / "out")])
    assert res.exit_code == 2 and "--allow-fetch" in res.output and "a manifest is code" in res.output
    # --no-fetch: the model fails as missing, nothing runs
    res = run_zoo(p, zoo_dir / "out", no_fetch=True)
    assert "--no-fetch" in res.rows[0]["error"] and not (zoo_dir / "cache").exists()
    # owned by someone else
    p.chmod(0o644)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(p).st_uid + 1)
    with pytest.raises(ZooRunError, match="owned by uid"):
        run_zoo(p, zoo_dir / "out")
    # --allow-fetch runs it anyway
    res = runner.invoke(app, ["zoo", str(p), "--out", str(zoo_dir / "out"), "--allow-fetch", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (zoo_dir / "cache" / "fetched.onnx").is_file()
    help_text = " ".join(runner.invoke(app, ["zoo", "--help"]).output.replace("│", " ").split())
    assert "A manifest is code" in help_text and "--allow-fetch" in help_text and "--no-fetch" in help_text


def test_zoo_data_parses_metadata_names_without_eval(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo_data_under_test", ROOT / "scripts" / "zoo_data.py")
    zd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zd)
    assert zd.metadata_names({"names": "{0: 'person', 1: 'bicycle'}"}) == {0: "person", 1: "bicycle"}
    assert zd.metadata_names({}) == {}
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="not a Python literal"):
        zd.metadata_names({"names": f"__import__('pathlib').Path({str(marker)!r}).touch()"})
    assert not marker.exists()
    with pytest.raises(ValueError, match="must be a dict"):
        zd.metadata_names({"names": "['person']"})


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_fifo_inputs_fail_their_task_without_hanging(zoo_dir):
    import threading

    from onnxcompress.zoo.runner import TaskInputError

    fifo = zoo_dir / "calib.fifo"
    os.mkfifo(fifo)
    os.mkfifo(zoo_dir / "model.fifo")
    m = onnx.load(str(zoo_dir / "mlp_b.onnx"))
    onnx.save(m, str(zoo_dir / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    (zoo_dir / "ext.bin").unlink()
    os.mkfifo(zoo_dir / "ext.bin")
    (zoo_dir / "folder").mkdir()
    os.mkfifo(zoo_dir / "folder" / "img.png")
    p = _manifest(zoo_dir, MLPS + """
        [models.fifo_calib]
        path = "mlp_a.onnx"
        calibration = "calib.fifo"
        [models.fifo_model]
        path = "model.fifo"
        [models.fifo_ext]
        path = "ext.onnx"
        [models.fifo_in_folder]
        path = "mlp_a.onnx"
        calibration = "folder"
        """, defaults='recipes = ["fuse"]')
    box = {}
    t = threading.Thread(target=lambda: box.update(res=run_zoo(p, zoo_dir / "out", jobs=2, threads=1)), daemon=True)
    t.start()
    t.join(180)
    assert not t.is_alive(), "the batch hangs on a FIFO"
    by = {r["model"]: r for r in box["res"].rows}
    assert by["mlp_a"]["status"] == by["mlp_b"]["status"] == "ok"
    assert "calibration data is not a regular file or folder (a FIFO)" in by["fifo_calib"]["error"]
    assert "model path is not a regular file (a FIFO)" in by["fifo_model"]["error"]
    assert "external data 'ext.bin'" in by["fifo_ext"]["error"] and "a FIFO" in by["fifo_ext"]["error"]
    assert "img.png" in by["fifo_in_folder"]["error"] and "a FIFO" in by["fifo_in_folder"]["error"]
    for name in ("fifo_calib", "fifo_model", "fifo_ext", "fifo_in_folder"):
        assert by[name]["status"] == "failed" and by[name]["kind"] == "input", by[name]
        assert "\n" not in by[name]["error"] and not by[name].get("ran")
    with pytest.raises(TaskInputError, match="FIFO"):
        _Hasher().file(fifo)
    if Path("/dev/null").exists():
        with pytest.raises(TaskInputError, match="character device"):
            _Hasher().file(Path("/dev/null"))


def test_zoo_layers_over_whole_and_base_recipes(zoo_dir):
    """[defaults] options < the recipe's own settings < the model's options < its overrides, for a
    whole recipe and a built-in base alike; "off" survives the trip to the worker (TOML false)."""
    recipes = """
[recipes.custom]
[[recipes.custom.stages]]
pass = "quantize-static"
percentile = 99.0
[recipes.custom.gates]
min_cosine = 0.999
[recipes.custom.data]
max_calibration_samples = 128
[recipes.based]
base = "int8-static"
max_calibration_samples = 32
"""
    body = DIGITS + """
[models.digits.overrides.custom]
smooth_quant = false
[models.digits.overrides.based]
min_sqnr_db = false
"""
    p = _manifest(zoo_dir, body, recipes=recipes, defaults='recipes = ["custom", "based"]',
                  options="latency = false, min_cosine = 0.9, max_calibration_samples = 64")
    mf = load_manifest(p)
    c = mf.recipe_for("digits", "custom")
    assert c.gates.min_cosine == 0.999 and c.data.max_calibration_samples == 128  # the recipe's own
    assert c.output.latency is False                                              # defaults fill the rest
    assert c.stage("quantize-static").config.percentile == 99.0                   # kept through the re-plan
    b = mf.recipe_for("digits", "based")
    assert b.data.max_calibration_samples == 32 and b.gates.min_cosine == 0.9
    assert b.to_dict()["stages"][-1]["min_sqnr_db"] is False


def test_a_rerun_repairs_an_interrupted_fetch(zoo_dir):
    """The model file arrived but the data step died: the next run fetches again (the data is
    missing), instead of failing every task with "calibration data not found"."""
    (zoo_dir / "cache").mkdir()
    shutil.copy(zoo_dir / "mlp_a.onnx", zoo_dir / "cache" / "m.onnx")  # what the interrupted fetch left
    p = _manifest(zoo_dir, """
        [models.m]
        path = "cache/m.onnx"
        calibration = "cache/m.npz"
        fetch = [["{python}", "-c", "import shutil; shutil.copy('mlp_a.npz', 'cache/m.npz')"]]
        """, defaults='recipes = ["fuse"]')
    res = run_zoo(p, zoo_dir / "out", jobs=1)
    assert [r["status"] for r in res.rows] == ["ok"], res.rows
    assert (zoo_dir / "cache" / "m.npz").is_file()
    # a truncated data file is not missing: the task fails on it and says how to have it rebuilt
    data = zoo_dir / "cache" / "m.npz"
    data.write_bytes(data.read_bytes()[:100])
    res = run_zoo(p, zoo_dir / "out", jobs=1)
    assert res.rows[0]["status"] == "failed" and "delete that file and rerun" in res.rows[0]["error"], res.rows
    data.unlink()
    res = run_zoo(p, zoo_dir / "out", jobs=1)
    assert [r["status"] for r in res.rows] == ["ok"], res.rows


def test_fetch_failure_names_the_cause_not_the_last_line(zoo_dir):
    p = _manifest(zoo_dir, """
        [models.m]
        path = "cache/m.onnx"
        fetch = [["{python}", "-c", "import sys; print('starting'); sys.stderr.write('ModuleNotFoundError: No module named \\\\'cv2\\\\'\\\\n'); print('done in 0.6 s'); sys.exit(1)"]]
        """, defaults='recipes = ["fuse"]')
    res = run_zoo(p, zoo_dir / "out", jobs=1)
    err = res.rows[0]["error"]
    assert "No module named 'cv2'" in err and "[zoo]" in err, err
    assert err.count("done in 0.6 s") == 1  # only in the echoed command, not as the reason


def test_report_tells_gated_from_ungated_results(zoo_dir):
    recipes = RECIPES + """
[recipes.gated]
quantize = "dynamic"
min_cosine = 0.9
"""
    p = _manifest(zoo_dir, MLPS, recipes=recipes, defaults='recipes = ["fuse", "dyn", "gated"]')
    res = run_zoo(p, zoo_dir / "out", jobs=1)
    md = res.paths["md"].read_text() if "md" in res.paths else (zoo_dir / "out" / "zoo_report.md").read_text()
    # fuse: nothing judges it; dyn: int8 without gates meets the default floor; gated: its own gate
    assert "written (no gate)" in md and "ok (gates held)" in md and "ok (floor held)" in md


def test_zoo_html_shares_one_fidelity_scale_and_labels_do_not_collide():
    """The same min cosine gets the same colour on every chart and in the table (fixed bins, a
    legend on the page), and labels of points close together do not overlap."""
    pytest.importorskip("matplotlib")
    from onnxcompress.zoo.report import FIDELITY_BINS, fidelity_colour, html_report

    assert fidelity_colour(0.974) == fidelity_colour(0.974) == [c for lo, _, c in FIDELITY_BINS if lo == 0.95][0]
    assert fidelity_colour(0.809) != fidelity_colour(0.974) and fidelity_colour(None) == "#cccccc"
    base = {"status": "ok", "ran": True, "bytes_before": 4e6, "latency_ms_before": 2.0, "wall_s": 1.0}
    rows = [dict(base, model="m1", recipe="fuse", bytes_after=4e6, latency_ms_after=1.9, min_cosine=1.0),
            dict(base, model="m1", recipe="int8-a", bytes_after=1e6, latency_ms_after=1.0, min_cosine=0.974),
            dict(base, model="m1", recipe="int8-b", bytes_after=1.01e6, latency_ms_after=1.01, min_cosine=0.9741),
            dict(base, model="m2", recipe="int8-a", bytes_after=1e6, latency_ms_after=1.0, min_cosine=0.974),
            dict(base, model="m2", recipe="int8-c", bytes_after=1.2e6, latency_ms_after=1.5, min_cosine=0.809)]
    rep = {"rows": rows, "counts": {"tasks": 5, "ok": 5, "failed": 0, "ran": 5, "cached": 0}, "tool": {"version": "x"},
           "manifest": "zoo.toml", "executor": "local", "jobs": 1, "threads_per_task": 1, "started": "now",
           "wall_s": 1.0, "notes": []}
    text = html_report(rep)
    assert "one scale for the table and every chart" in text
    assert text.count(f'background:{fidelity_colour(0.974)}') >= 3  # legend + both 0.974 rows
    assert text.count('src="data:image/png;base64,') == 2


def test_zoo_chart_labels_do_not_overlap():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxcompress.zoo.report import place_labels

    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    pts = [(1.0, 1.0), (1.01, 1.01), (1.02, 0.99), (4.0, 1.9), (4.0, 2.0)]
    ax.scatter(*zip(*pts))
    ax.set_xlim(0, 5)
    ax.set_ylim(0.5, 2.5)
    anns = place_labels(fig, ax, pts, [f"recipe-{i}\ncos 0.9999" for i in range(len(pts))])
    r = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(r) for a in anns]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (i, j)
    plt.close(fig)


def test_a_tune_budget_per_model_runs_as_a_zoo_task(zoo_dir):
    """[models.X] tune = {...}: the model's budget search runs as the task X / tune beside its
    recipes; met -> ok with the model written; an impossible budget -> failed (budget), naming it."""
    pytest.importorskip("optuna")
    p = _manifest(zoo_dir, DIGITS.replace('validation = "digits_test.npz"', 'validation = "digits_test.npz"\n'
                                          'tune = { metric = "top1", max_drop = 5.0, trials = 2 }'),
                  defaults='recipes = ["fuse"]')
    res = run_zoo(p, zoo_dir / "out", jobs=1)
    by = {r["recipe"]: r for r in res.rows}
    assert set(by) == {"fuse", "tune"}
    t = by["tune"]
    assert t["status"] == "ok", t
    assert t["tune"]["trials"] == 2 and t["tune"]["drop"] <= 5.0 and t["bytes_after"] < t["bytes_before"]
    out = zoo_dir / "out" / "models" / "digits" / "tune.onnx"
    onnx.checker.check_model(onnx.load(str(out)))
    assert "ok (budget met: top1 drop" in (zoo_dir / "out" / "zoo_report.md").read_text()
    again = run_zoo(p, zoo_dir / "out", jobs=1)  # cached by the budget's content
    assert again.executed == []
    # an impossible budget: the row fails and says which constraint, other tasks are unaffected
    p = _manifest(zoo_dir, DIGITS.replace('validation = "digits_test.npz"', 'validation = "digits_test.npz"\n'
                                          'tune = { max_drop = 0.0, max_size_mb = 0.000001, trials = 1 }'),
                  defaults='recipes = ["fuse"]')
    res = run_zoo(p, zoo_dir / "out2", jobs=1, recipes=["tune"])
    assert [r["recipe"] for r in res.rows] == ["tune"]
    row = res.rows[0]
    assert row["status"] == "failed" and row["kind"] == "budget" and "size" in row["error"], row


@pytest.mark.parametrize("tune, needle", [
    ('tune = { metric = "bogus" }', "--metric must be one of"),
    ('tune = { trials = 0 }', "trials must be >= 1"),
    ('tune = { max_dorp = 1.0 }', "unknown key(s) ['max_dorp']"),
    ('tune = "fast"', "'tune' must be a table"),
])
def test_a_bad_tune_table_is_a_manifest_error(zoo_dir, tune, needle):
    p = _manifest(zoo_dir, DIGITS + tune + "\n")
    with pytest.raises(ManifestError, match=re.escape(needle)):
        load_manifest(p)


def test_tune_is_not_a_recipe_name(zoo_dir):
    p = _manifest(zoo_dir, DIGITS, recipes=RECIPES + "[recipes.tune]\nquantize = \"dynamic\"\n")
    with pytest.raises(ManifestError, match="names a model's budget search"):
        load_manifest(p)


def test_asking_for_tune_where_no_model_has_a_budget_is_an_error(zoo_dir):
    p = _manifest(zoo_dir, DIGITS, defaults='recipes = ["fuse"]')
    with pytest.raises(ManifestError, match="no selected model has it"):
        load_manifest(p).tasks(recipes=["tune"])
    p = _manifest(zoo_dir, DIGITS + 'recipes = ["tune"]\n', defaults='recipes = ["fuse"]')
    with pytest.raises(ManifestError, match="is not a recipe: give the model a tune"):
        load_manifest(p)
