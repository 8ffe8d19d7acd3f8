"""`onnxcompress tune`: a budget in, a model out — feasible, impossible (closest model, exit 3),
resumed after a stop or a kill, cached, with a user metric; the chosen recipe reproduces the model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("optuna")

from onnxcompress.cli import app  # noqa: E402
from onnxcompress.tune import Budget, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
M, C, V = (ROOT / "models" / f for f in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"))
runner = CliRunner()


def test_feasible_budget_writes_a_model_its_recipe_reproduces(tmp_path, screenshot):
    out = tmp_path / "t.onnx"
    res = runner.invoke(app, ["tune", str(M), "-o", str(out), "--calibration", str(C), "--validation", str(V),
                              "--metric", "accuracy", "--max-drop", "1.0", "--trials", "4", "-q",
                              "--report", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["met"] and len(rep["trials"]) == 4 and rep["held_out"]["samples"] > 0
    assert rep["kind"] == "tune" and rep["seconds"] > 0
    page = (tmp_path / "r.html").read_text()
    # the verdict, every trial's row, the trials plot and the two sensitivity charts (int8 nodes, pruning groups)
    assert "Budget met" in page and f"Chosen: trial {rep['chosen']}" in page
    assert page.count("<tr class=") == 4 and page.count("data:image/png;base64,") == 3
    assert "Per-group pruning sensitivity" in page and rep["prune_sensitivity"]
    screenshot(tmp_path / "r.html")
    assert list(Path(rep["pareto_recipes"]).glob("*.toml"))
    again = tmp_path / "again.onnx"
    r2 = runner.invoke(app, ["optimize", str(M), "-o", str(again), "--recipe", rep["chosen_recipe"], "-q"])
    assert r2.exit_code == 0, r2.output
    assert again.read_bytes() == out.read_bytes()


def test_impossible_budget_writes_the_closest_and_exits_3(tmp_path):
    out = tmp_path / "t.onnx"
    res = runner.invoke(app, ["tune", str(M), "-o", str(out), "--calibration", str(C), "--validation", str(V),
                              "--max-size-mb", "0.001", "--trials", "3"])
    assert res.exit_code == 3, res.output
    assert "budget not met" in res.output and "size" in res.output and out.exists()


def test_resume_continues_the_study_and_the_cache_skips_known_recipes(tmp_path, monkeypatch):
    state = tmp_path / "state"
    b = Budget(metric="top1", max_drop=5.0)
    first = tune(M, tmp_path / "a.onnx", b, calibration=C, validation=V, trials=2, state=state)
    assert len(first.trials) == 2
    second = tune(M, tmp_path / "b.onnx", b, calibration=C, validation=V, trials=4, state=state)
    assert len(second.trials) == 4
    assert [t.number for t in second.trials[:2]] == [t.number for t in first.trials]
    # a recipe already evaluated is read from the cache, not optimized again
    import onnxcompress.api as api
    import onnxcompress.tune as T

    s = T._prepare(M, b, C, V, state, lambda m: None)
    chosen = dict(first.trials[0].options)
    monkeypatch.setattr(api, "optimize", lambda *a, **k: pytest.fail("evaluated again"))
    t = s.evaluate(99, chosen)
    assert t.error is None and t.size_bytes == first.trials[0].size_bytes


def test_resume_after_kill(tmp_path):
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "onnxcompress.cli", "tune", str(M), "-o", str(tmp_path / "k.onnx"),
           "--calibration", str(C), "--validation", str(V), "--trials", "40", "--resume", str(state), "-q"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 2:
        time.sleep(1)
        cache = state / "cache.json"
        done = len(json.loads(cache.read_text())) if cache.exists() else 0
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert done >= 2
    res = tune(M, tmp_path / "k.onnx", Budget(max_drop=5.0), calibration=C, validation=V, trials=done + 1, state=state)
    assert res.output.exists() and len(res.trials) >= done + 1


def test_user_metric(tmp_path, monkeypatch):
    (tmp_path / "mymetric.py").write_text(
        "import numpy as np\n"
        "def score(session, feeds):\n"
        "    name = session.get_inputs()[0].name\n"
        "    return float(np.mean([session.run(None, {name: f[name]})[0].max() for f in feeds]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = tune(M, tmp_path / "u.onnx", Budget(metric="python:mymetric:score", max_drop=100.0), calibration=C,
               validation=V, trials=2)
    assert res.met and all(t.error is None for t in res.trials)
    with pytest.raises(Exception, match="cannot import"):
        tune(M, tmp_path / "v.onnx", Budget(metric="python:no_such_module:f"), calibration=C, validation=V, trials=1)


def test_digits_size_budget_is_met_by_pruning_and_int8(tmp_path):
    """fp32 is 189 KB and int8 alone 52 KB: 30 KB at most 0.5 pp accuracy lost needs channel
    pruning and int8 together (the size budget seeds them among the first trials)."""
    res = tune(M, tmp_path / "s.onnx", Budget(metric="accuracy", max_drop=0.5, max_size_mb=0.03), calibration=C,
               validation=V, trials=4)
    assert res.met, res.report["failed"]
    assert (tmp_path / "s.onnx").stat().st_size <= 30_000 and res.chosen.drop <= 0.5
    assert res.report["held_out"]["drop"] <= 1.0


def _tune_cli(*args):
    res = runner.invoke(app, ["tune", str(M), "--calibration", str(C), "--trials", "1", "-q", *map(str, args)])
    assert "Traceback" not in res.output
    return res


def test_hostile_state_folders_and_outputs_are_refused_and_inputs_survive(tmp_path):
    import shutil

    cal, val = tmp_path / "cal.npz", tmp_path / "val.npz"
    shutil.copy(C, cal)
    shutil.copy(V, val)
    before = {p: p.read_bytes() for p in (cal, val)}
    # state files that are links to the inputs
    st = tmp_path / "s.onnx.tune"
    st.mkdir()
    (st / "report.json").symlink_to(val)
    res = _tune_cli("-o", tmp_path / "s.onnx", "--validation", val, "--resume", st)
    assert res.exit_code == 2 and "symbolic link" in res.output, res.output
    # an input inside the state folder
    st2 = tmp_path / "y.onnx.tune"
    st2.mkdir()
    shutil.copy(V, st2 / "timing.npz")
    res = _tune_cli("-o", tmp_path / "y.onnx", "--validation", st2 / "timing.npz")
    assert res.exit_code == 2 and "tune state" in res.output, res.output
    # outputs colliding with the state, a FIFO in it, a state "folder" that is a file
    st3 = tmp_path / "z"
    st3.mkdir()
    res = _tune_cli("-o", st3 / "study.db", "--validation", val, "--resume", st3)
    assert res.exit_code == 2, res.output
    os.mkfifo(st3 / "report.json")
    res = _tune_cli("-o", tmp_path / "z.onnx", "--validation", val, "--resume", st3)
    assert res.exit_code == 2 and "FIFO" in res.output, res.output
    res = _tune_cli("-o", tmp_path / "w.onnx", "--validation", val, "--resume", cal)
    assert res.exit_code == 2 and "not a folder" in res.output, res.output
    # a corrupt study database: one line naming it
    st4 = tmp_path / "g"
    st4.mkdir()
    (st4 / "study.db").write_bytes(b"not a database" * 100)
    res = _tune_cli("-o", tmp_path / "g.onnx", "--validation", val, "--resume", st4)
    assert res.exit_code == 2 and "study.db" in res.output, res.output
    assert all(p.read_bytes() == b for p, b in before.items())


def test_a_corrupt_cache_only_costs_re_evaluation(tmp_path):
    st = tmp_path / "st"
    st.mkdir()
    (st / "cache.json").write_text("[]")
    (st / "sensitivity.json").write_text("[[1, 2, 3]]")
    res = tune(M, tmp_path / "c.onnx", Budget(max_drop=5.0), calibration=C, validation=V, trials=1, state=st)
    assert res.output.exists() and isinstance(json.loads((st / "cache.json").read_text()), dict)


def test_user_metric_failures_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "badmetric.py").write_text(
        "def boom(session, feeds):\n    raise RuntimeError('no')\n"
        "def nan(session, feeds):\n    return float('nan')\n"
        "def leave(session, feeds):\n    raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for fn, needle in (("boom", "raised RuntimeError"), ("nan", "not a finite number"), ("leave", "raised SystemExit")):
        res = _tune_cli("-o", tmp_path / f"{fn}.onnx", "--validation", V, "--metric", f"python:badmetric:{fn}")
        assert res.exit_code == 2 and needle in res.output, (fn, res.output)


def test_task_metric_reads_what_the_floor_reads(tmp_path):
    """--metric task is the default floor's measure: on the digits logits, top-1 agreement over
    the rows where fp32 is decisive; the fp32 model scores 100 against itself."""
    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model
    from onnxcompress.runtime import make_session, run_samples
    from onnxcompress.tune import measure

    feeds, _ = load_npz(V, input_specs(load_model(M)), what="validation")
    ref = run_samples(make_session(str(M), optimize=True), feeds)
    assert measure(Budget("task"), M, ref, feeds, None) == 100.0
    res = runner.invoke(app, ["tune", str(M), "-o", str(tmp_path / "t.onnx"), "--calibration", str(C),
                              "--validation", str(V), "--metric", "task", "--max-drop", "1.0", "--trials", "2", "-q",
                              "--report", str(tmp_path / "r.json")])
    assert res.exit_code in (0, 3), res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["budget"]["metric"] == "task" and rep["fp32_metric"] == 100.0
    assert all(t["error"] or 0.0 <= t["metric"] <= 100.0 for t in rep["trials"])


def test_calibration_only_splits_it_and_bad_budgets_are_one_line_errors(tmp_path):
    """Without validation data the calibration data is split three ways (its calibration third is a
    file in the state folder, so trial recipes can name it); an infinite speed-up and a time budget
    that ends before the first trial are one-line errors."""
    out = tmp_path / "c.onnx"
    res = runner.invoke(app, ["tune", str(M), "-o", str(out), "--calibration", str(C), "--trials", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and (tmp_path / "c.onnx.tune" / "calibration.npz").is_file()
    for args, needle in ((["--min-speedup", "inf"], "finite number > 0"),
                         (["--time-budget", "0s"], "must be more than 0 seconds"),
                         (["--time-budget", "0.001s"], "ran out before the first trial")):
        res = runner.invoke(app, ["tune", str(M), "-o", str(tmp_path / "x.onnx"), "--calibration", str(C),
                                  "--validation", str(V), "--trials", "2", *args])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output


def test_finalists_are_timed_together_before_one_is_chosen(monkeypatch, tmp_path):
    """Trials that tie by their short search timings are timed again together with fp32; the
    choice follows that timing (a noisy search had let a 1.0x trial tie with a 1.7x one)."""
    from types import SimpleNamespace

    import onnxcompress.bench as bench_mod
    from onnxcompress.tune import Trial, _final_timing

    ratios = {"a.onnx": 1.0, "b.onnx": 0.6}  # b: 1.67x faster than fp32 when timed together

    def fake(paths, **kw):
        # bench's rows: speedup is the inverse of latency_ratio (bench._ratios)
        models = [SimpleNamespace(latency_ratio=1.0, speedup=1.0, latency_ratio_ci=(1.0, 1.0))]
        models += [SimpleNamespace(latency_ratio=ratios[Path(p).name], speedup=1 / ratios[Path(p).name],
                                   latency_ratio_ci=None) for p in paths[1:]]
        return SimpleNamespace(groups=[SimpleNamespace(models=models)])

    monkeypatch.setattr(bench_mod, "benchmark", fake)
    s = SimpleNamespace(model=M, bench_data=tmp_path / "t.npz", final_timing=[])
    a = Trial(1, {"quantize": "dynamic"}, speedup=1.3, speedup_ci=(0.9, 1.6), size_bytes=10, path=str(tmp_path / "a.onnx"))
    b = Trial(2, {"quantize": "static"}, speedup=1.25, speedup_ci=(0.9, 1.5), size_bytes=11, path=str(tmp_path / "b.onnx"))
    out = _final_timing(s, [a, b], lambda m: None)
    by = {t.number: t for t in out}
    assert by[1].speedup == pytest.approx(1.0) and by[2].speedup == pytest.approx(1 / 0.6)
    assert [f["trial"] for f in s.final_timing] == [1, 2]
    assert _final_timing(s, [a], lambda m: None) == [a]  # one finalist: nothing to time


def test_drop_bound_adds_the_noise_of_few_samples():
    """The budget judges a trial by the 80 % paired-bootstrap bound of its drop: above the point
    drop when few samples decide it, close to it when many do; none for worst-sample metrics; a
    trial within the budget only by the noise is not feasible."""
    import numpy as np

    from onnxcompress.tune import Budget, Trial, _Search, _score, drop_bound, judged_drop, resamples

    rng = np.random.default_rng(0)

    def pair(n, noise):
        ref = [rng.standard_normal((4, 10)).astype(np.float32) * 3 for _ in range(n)]
        return ref, [r + rng.standard_normal(r.shape).astype(np.float32) * noise for r in ref]

    for metric in ("top1", "task"):
        ref, got = pair(30, 0.4)
        point = _score(metric, ref, ref, None, "logits") - _score(metric, ref, got, None, "logits")
        bound = drop_bound(metric, ref, got, None, resamples(len(ref)), "logits")
        assert point > 0 and bound > point, (metric, point, bound)
    ref, got = pair(30, 0.4)
    labels = np.concatenate([r.argmax(-1) for r in ref])
    labels[::3] = 0
    point = _score("accuracy", ref, ref, labels) - _score("accuracy", ref, got, labels)
    assert drop_bound("accuracy", ref, got, labels, resamples(len(ref))) >= point
    for metric in ("cosine", "max_rel_error"):
        assert np.isnan(drop_bound(metric, ref, got, None, resamples(len(ref)), "logits"))
    # a scalar first output cannot be split into rows by label: no bound (and no crash of the search)
    assert np.isnan(drop_bound("accuracy", [np.float32(1.0)], [np.float32(1.0)], np.zeros(1), resamples(1)))
    t = Trial(0, {}, drop=0.8, drop_bound=1.4)
    assert judged_drop(t) == 1.4 and judged_drop(Trial(1, {}, drop=0.8)) == 0.8
    s = _Search.__new__(_Search)
    s.budget = Budget(metric="top1", max_drop=1.0)
    assert s.violation(t) > 0 and s.violation(Trial(1, {}, drop=0.8)) == 0


def test_accuracy_labels_are_checked_and_a_failed_start_leaves_no_state(tmp_path):
    """--metric accuracy with labels of the wrong count, shape or range is a one-line data error
    (an out-of-range label scored every model 0 % and let any recipe pass), and the state folder
    that the failed run created is gone."""
    import numpy as np

    from onnxcompress.errors import DataError

    d = np.load(V)
    x, y = d["input"][:40], d["labels"][:40]
    for bad, what in ((y[:30], "30 labels for 40 rows"), (y + 10, "outside 0..9"),
                      (np.eye(10, dtype=np.int64)[y], "1-D array")):
        val = tmp_path / "val.npz"
        np.savez(val, input=x, labels=bad)
        with pytest.raises(DataError, match=what):
            tune(M, tmp_path / "o.onnx", Budget(metric="accuracy", max_drop=1.0), calibration=str(C),
                 validation=str(val), trials=1)
        assert not (tmp_path / "o.onnx.tune").exists()


def test_boxes_metric_matches_detections_after_nms():
    """``--metric boxes``: YOLO-style raw output [images, 4 + classes, anchors] (or transposed)
    -> score threshold and class-wise NMS -> fp32's and the candidate's detections matched by class
    and IoU: F1 x 100. Per-sample parts feed the bootstrap bound like the counting metrics."""
    import numpy as np

    from onnxcompress.tune import _score, answer_step, box_matches, detections, drop_bound, resamples

    def raw(boxes, classes=3, anchors=50):
        """boxes: (cx, cy, w, h, class, score) rows; the other anchors score 0."""
        a = np.zeros((1, 4 + classes, anchors), np.float32)
        for j, (cx, cy, w, h, c, s) in enumerate(boxes):
            a[0, :4, j] = (cx, cy, w, h)
            a[0, 4 + c, j] = s
        return a

    ref = raw([(50, 50, 20, 20, 0, 0.9), (52, 50, 20, 20, 0, 0.8),  # a duplicate NMS removes
               (150, 150, 30, 30, 1, 0.7), (10, 10, 4, 4, 2, 0.1)])  # below the score threshold
    (b, c), = detections(ref)
    assert sorted(c.tolist()) == [0, 1] and np.allclose(b[c == 0][0], [40, 40, 60, 60])
    assert box_matches(ref, ref) == (2, 2, 2)
    assert detections(ref.transpose(0, 2, 1))[0][1].tolist() == c.tolist()  # [images, anchors, 4 + classes]
    shifted = raw([(53, 50, 20, 20, 0, 0.9), (150, 150, 30, 30, 2, 0.7)])  # same box; a class flip
    assert box_matches(ref, shifted) == (1, 2, 2)
    assert _score("boxes", [ref], [shifted], None) == 50.0 and _score("boxes", [ref], [ref], None) == 100.0
    moved = raw([(80, 50, 20, 20, 0, 0.9), (150, 150, 30, 30, 1, 0.7)])  # IoU 0.2: not the same detection
    assert box_matches(ref, moved) == (1, 2, 2)
    refs, gots = [ref] * 4 + [ref], [ref] * 4 + [shifted]
    assert _score("boxes", refs, gots, None) == 90.0  # 2 x 9 matched / 20 detections
    assert drop_bound("boxes", refs, gots, None, resamples(5)) >= 10.0 - 1e-9
    assert answer_step("boxes", refs, None) == (10.0, 10)  # one detection of ten: 10 points
    with pytest.raises(ValueError, match="YOLO-style"):
        detections(np.zeros((1, 10), np.float32))
    flat = raw([(50, 50, 0, 0, 0, 0.9), (90, 90, 10, 10, 1, 0.8)])  # a box without area matches itself
    assert box_matches(flat, flat) == (2, 2, 2)
    bad = raw([(np.nan, 50, 20, 20, 0, 0.9), (np.inf, 150, 30, 30, 1, 0.7)])  # non-finite: no detection
    assert box_matches(ref, bad) == (0, 2, 0) and _score("boxes", [ref], [bad], None) == 0.0


def test_boxes_without_detections_and_overlapping_data_are_called_out(tmp_path):
    """A detector that finds nothing in the data cannot be judged by ``boxes`` (a one-line error,
    exit 2, before any trial); calibration rows reused as validation rows are warned about."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 40])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 40])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    model = tmp_path / "det.onnx"
    onnx.save(m, model)
    x = np.random.default_rng(0).uniform(0, 0.2, (8, 1, 6, 40)).astype(np.float32)  # scores < 0.25
    np.savez(tmp_path / "v.npz", x=x[:, 0])
    res = runner.invoke(app, ["tune", str(model), "-o", str(tmp_path / "t.onnx"), "--calibration",
                              str(tmp_path / "v.npz"), "--validation", str(tmp_path / "v.npz"),
                              "--metric", "boxes", "--trials", "1"])
    assert res.exit_code == 2, res.output
    assert "finds no detection" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "t.onnx").exists()
    from onnxcompress.tune import _prepare

    said = []
    (tmp_path / "st").mkdir()
    s = _prepare(M, Budget(metric="top1"), str(C), str(C), tmp_path / "st", said.append)
    assert any("also --calibration samples" in w for w in said) and any("also --calibration" in w for w in s.resolution)
    assert s.shared_with_calibration > 0  # the report's held_out says so; the CLI stops saying "never saw"
    (tmp_path / "st0").mkdir()
    zero = []
    _prepare(M, Budget(metric="top1", max_drop=0.0), str(C), str(V), tmp_path / "st0", zero.append)
    assert not any("cannot tell" in w for w in zero)  # --max-drop 0 asks for no changed answer: no warning


def test_a_choice_that_misses_on_held_out_data_gives_way_or_fails_the_budget(tmp_path, monkeypatch):
    """The winner is re-measured on the held-out half. Here the held-out metric of the search's
    choice is forced 10 points under fp32 (budget: 1): the next feasible trial that holds there is
    written; when every trial misses there, the budget is not met (exit 3 from the CLI)."""
    import onnxcompress.tune as tmod

    real, bad = tmod.measure, set()

    def measure(budget, model_path, ref, feeds, labels):
        value = real(budget, model_path, ref, feeds, labels)
        return value - 10.0 if Path(model_path).name in bad else value

    monkeypatch.setattr(tmod, "measure", measure)
    b = Budget(metric="top1", max_drop=1.0)
    state = tmp_path / "st"
    first = tune(M, tmp_path / "a.onnx", b, calibration=C, validation=V, trials=3, state=state)
    assert first.met and len([t for t in first.trials if t.feasible()]) >= 2
    bad.add(Path(first.chosen.path).name)  # the search's choice now misses on the held-out half
    second = tune(M, tmp_path / "b.onnx", b, calibration=C, validation=V, trials=3, state=state)
    assert second.met and second.chosen.number != first.chosen.number
    tried = second.report["held_out"]["tried"]
    assert tried[0]["trial"] == first.chosen.number and tried[0]["drop"] > 1.0
    assert tried[-1]["trial"] == second.chosen.number and second.report["held_out"]["within_budget"]
    assert "held-out" in second.report["why"]
    assert (tmp_path / "b.onnx").read_bytes() == Path(second.chosen.path).read_bytes()
    bad.update(Path(t.path).name for t in first.trials if t.path)  # now every trial misses there
    res = runner.invoke(app, ["tune", str(M), "-o", str(tmp_path / "c.onnx"), "--calibration", str(C),
                              "--validation", str(V), "--trials", "3", "--resume", str(state), "--max-drop", "1",
                              "--report", str(tmp_path / "c.json")])
    assert res.exit_code == 3, res.output
    assert "budget not met" in res.output and "held-out" in res.output
    rep = json.loads((tmp_path / "c.json").read_text())
    assert not rep["met"] and any("held-out" in f for f in rep["failed"])
    tried = rep["held_out"]["tried"]
    nums = [x["trial"] for x in tried]
    assert len(nums) == len(set(nums)) <= 1 + tmod.HELD_OUT_TRIES and nums[0] == first.chosen.number
    least = min(tried, key=lambda x: x["drop"])  # written: the one that misses least held out
    assert rep["chosen"] == least["trial"] and rep["held_out"]["drop"] == least["drop"]
    assert "misses it least" in rep["why"]
    written = next(t for t in first.trials if t.number == least["trial"])
    assert (tmp_path / "c.onnx").read_bytes() == Path(written.path).read_bytes()


def test_held_out_retries_try_each_trial_once_timed_finalists_first():
    """``_final_timing`` returns copies: the retry order tells trials by number, tries the
    finalists timed together first (fastest, then smaller), then the rest, never the choice."""
    from dataclasses import replace

    from onnxcompress.tune import Trial, _held_out_order

    def t(n, speed, size):
        return Trial(n, {}, speedup=speed, size_bytes=size, metric=99.0)

    feasible = [t(0, 1.2, 10), t(1, 1.9, 10), t(2, 1.5, 10), t(3, 1.5, 5), t(4, 1.1, 10)]
    timed = [replace(feasible[1], speedup=1.4), replace(feasible[2], speedup=1.6)]
    chosen = timed[1]
    assert [x.number for x in _held_out_order(chosen, timed, feasible)] == [1, 3, 0, 4]


def test_sensitivity_is_measured_with_the_metric_and_orders_keep_float(tmp_path):
    """Before the search each of the lowest-SQNR nodes is kept in float alone and scored with the
    budget's metric: the gain is what an independent optimize with that node excluded measures;
    nodes whose float version raises the metric come first (largest gain first), then the rest by
    SQNR; a trial's keep_float = 1 keeps the first in float. The cache is reused for the same
    model, data, budget and --sensitivity-nodes only; 0 orders by SQNR alone."""
    from dataclasses import replace

    from onnxcompress.api import OptimizeOptions, optimize
    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model
    from onnxcompress.runtime import run_reference
    from onnxcompress.tune import _options, measure

    st = tmp_path / "st"
    b = Budget(metric="cosine", max_drop=5.0)
    res = tune(M, tmp_path / "s.onnx", b, calibration=C, validation=V, trials=3, state=st, sensitivity_nodes=3)
    sens = res.report["sensitivity"]
    assert len(sens) >= 4  # the digits CNN's int8 nodes
    measured = [x for x in sens if x["metric_gain_in_float"] is not None]
    assert len(measured) == 3 and any(x["metric_gain_in_float"] != 0 for x in measured)
    by_sqnr = sorted(sens, key=lambda x: x["int8_sqnr_db"])
    assert {x["node"] for x in measured} == {x["node"] for x in by_sqnr[:3]}
    up = [x for x in sens if (x["metric_gain_in_float"] or 0) > 0][:1]
    if up:  # (a gain below 5 % of the all-int8 drop is noise and keeps the SQNR order)
        assert sens[0]["metric_gain_in_float"] >= max(x["metric_gain_in_float"] or 0 for x in sens)

    # the gain, measured independently: the all-int8 model and the one with that node in float
    val, _ = load_npz(V, input_specs(load_model(M)), what="validation")
    search = val[0::2]  # tune's search half: the even samples
    _, ref = run_reference(str(M), search)
    base = OptimizeOptions(calibration=str(C), validation=None, latency=False, fallback=False,
                           accept_degraded=True, quantize="static")
    node = measured[0]["node"]
    optimize(M, tmp_path / "all.onnx", base)
    optimize(M, tmp_path / "one.onnx", replace(base, exclude_nodes=(node,)))
    gain = measure(b, tmp_path / "one.onnx", ref, search, None) - measure(b, tmp_path / "all.onnx", ref, search, None)
    assert measured[0]["metric_gain_in_float"] == pytest.approx(gain, rel=1e-3, abs=1e-9)
    assert _options({"keep_float": 1, "quantize": "static"}, base, [x["node"] for x in sens]).exclude_nodes \
        == (sens[0]["node"],)

    cached = json.loads((st / "sensitivity.json").read_text())
    assert [c[0] for c in cached["nodes"]] == [x["node"] for x in sens]
    assert not list(st.glob(".sensitivity-*"))  # the measuring models are removed
    again = tune(M, tmp_path / "s2.onnx", b, calibration=C, validation=V, trials=3, state=st, sensitivity_nodes=3)
    assert again.report["sensitivity"] == sens  # resumed: the same order, from the cache
    other = tune(M, tmp_path / "s3.onnx", Budget(metric="max_rel_error", max_drop=50.0), calibration=C,
                 validation=V, trials=3, state=st, sensitivity_nodes=3)
    assert json.loads((st / "sensitivity.json").read_text())["key"] != cached["key"]  # another budget: measured again
    assert len([x for x in other.report["sensitivity"] if x["metric_gain_in_float"] is not None]) == 3
    none = tune(M, tmp_path / "s4.onnx", b, calibration=C, validation=V, trials=3, state=tmp_path / "st0",
                sensitivity_nodes=0)
    assert all(x["metric_gain_in_float"] is None for x in none.report["sensitivity"])
    assert [x["node"] for x in none.report["sensitivity"]] == [x["node"] for x in by_sqnr]


def test_accuracy_labels_follow_the_rows_of_the_first_output(tmp_path):
    """--metric accuracy takes one label per row of the first output's class scores: per token for
    ``[1, T, C]`` outputs of ragged samples, one per sample for a ``[C]`` output. With labels equal
    to fp32's own answers, fp32 scores 100 % on both halves (a hostile tester saw 30 % and 0 %: the
    labels were split by input rows and the [C] scores flattened into one row)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from onnxcompress.tune import _score, label_rows

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    for name, xshape, yshape, feeds in (
            ("tok", [1, "T", 8], [1, "T", 5], [rng.standard_normal((1, t, 8)).astype(np.float32) for t in (3, 5, 2, 6, 4, 3)]),
            ("vec", [8], [5], [rng.standard_normal(8).astype(np.float32) for _ in range(6)])):
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)],
                              [onnx.numpy_helper.from_array(w, "w")])
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        labels = np.concatenate([np.atleast_2d(x @ w).reshape(-1, 5).argmax(-1) for x in feeds])
        np.savez(tmp_path / f"{name}.npz", labels=labels, **{f"{i}__x": x for i, x in enumerate(feeds)})
        res = tune(path, tmp_path / f"{name}_out.onnx", Budget(metric="accuracy", max_drop=1.0),
                   validation=str(tmp_path / f"{name}.npz"), trials=1, sensitivity_nodes=0)
        held = res.report["held_out"]
        assert held["fp32_metric"] == 100.0, (name, held)
        if name == "tok":  # the resolution warning counts the 14 held-out tokens, not the 3 samples
            assert any("held-out half has 14 counted answers" in r for r in res.report["resolution"]), \
                res.report["resolution"]
    assert label_rows(np.zeros((2, 7, 5))) == 14 and label_rows(np.zeros(5)) == 1
    assert _score("accuracy", [], [np.eye(5)[2], np.eye(5)[4]], np.array([2, 4])) == 100.0


def test_sequential_bias_correction_is_searched_only_where_it_applies():
    """The search may pick the bias correction's mode (now one segmented pass: cheap enough to
    search) for static int8 with the correction on, and never sets it otherwise."""
    import optuna

    from onnxcompress.tune import _suggest

    def pick(**params):
        return _suggest(optuna.trial.FixedTrial({"prune_mode": "none", "per_channel": "True", "keep_float": "0",
                                                 "smooth_quant": "True", **params}), calibrated=True)

    static = dict(quantize="static", calibration_method="auto", equalize="auto")
    assert pick(**static, bias_correction="True", bias_correction_mode="sequential")["bias_correction_mode"] == "sequential"
    assert "bias_correction_mode" not in pick(**static, bias_correction="False")
    assert "bias_correction_mode" not in pick(quantize="dynamic")


def test_pruning_sensitivity_is_measured_per_group_and_picks_the_groups_pruned(tmp_path):
    """Before the search the channel-pruning groups with the most MACs are each pruned alone at 50 %
    and scored with the budget's metric: the drop is what an independent optimize with only that
    group pruned measures; the most sensitive group comes first. A trial's prune_groups = spare-1
    leaves it whole while the other groups lose their channels; least-1 prunes only the least
    sensitive measured group. The cache is reused for the same model, data and budget;
    --sensitivity-groups 0 measures nothing and prunes every group alike."""
    from dataclasses import replace

    import onnxcompress.tune as T
    from onnxcompress.api import OptimizeOptions, optimize
    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model
    from onnxcompress.runtime import run_reference
    from onnxcompress.tune import measure

    st = tmp_path / "st"
    b = Budget(metric="cosine", max_drop=5.0)
    res = tune(M, tmp_path / "p.onnx", b, calibration=C, validation=V, trials=3, state=st, sensitivity_nodes=0,
               sensitivity_groups=2)
    groups = res.report["prune_sensitivity"]
    measured = [g for g in groups if g["drop"] is not None]
    assert len(groups) >= 3 and len(measured) == 2  # the digits CNN's prunable groups; the 2 largest measured
    assert groups[:2] == measured  # measured first, most sensitive first
    assert measured[0]["drop"] > measured[1]["drop"] or (measured[0]["drop"] == measured[1]["drop"]
                                                          and measured[0]["cosine"] <= measured[1]["cosine"])
    unmeasured = [g for g in groups if g["drop"] is None]
    assert min(g["macs_share"] for g in measured) >= max(g["macs_share"] for g in unmeasured)
    # shares of the whole model's MACs: the digits CNN's pruned groups hold all but its last Gemm's
    assert 0.9 < sum(g["macs_share"] for g in groups) <= 1.0

    # the drop, measured independently: only that group pruned at 50 %
    val, _ = load_npz(V, input_specs(load_model(M)), what="validation")
    search = val[0::2]
    _, ref = run_reference(str(M), search)
    base = OptimizeOptions(calibration=str(C), validation=None, latency=False, fallback=False,
                           accept_degraded=True, prune_mode="channel", prune=0.5)
    g0, g1 = measured[0]["group"], measured[1]["group"]
    others = {g["group"]: 0.0 for g in groups if g["group"] != g0}
    optimize(M, tmp_path / "one.onnx", replace(base, prune_ratios=others))
    fp32 = measure(b, M, ref, search, None)
    got = measure(b, tmp_path / "one.onnx", ref, search, None)
    assert measured[0]["drop"] == pytest.approx(fp32 - got, rel=1e-3, abs=1e-6)

    # trials (through the search's own evaluate): spare-4 is cut to the 2 measured groups and leaves
    # them whole; least-1 prunes only the least sensitive; the recipe names the groups left whole
    msgs = []
    s = T._prepare(M, b, C, V, st, msgs.append, sensitivity_nodes=0, trials=3, sensitivity_groups=2)
    assert any("pruning sensitivity from" in m for m in msgs)  # resumed from the cache, not measured again
    assert s.prune_sensitivity == groups and s.ranked_groups() == [g0, g1]

    def kept(options):
        res = optimize(M, tmp_path / "k.onnx", T._options(options, s.base, (), s.ranked_groups(), s.pruned_groups()))
        return {d["roots"][0]: d["kept"] < d["channels"] for p in res.report["passes"] if p["name"] == "prune-channels"
                for d in p["counts"]["groups_detail"]}

    trial = {"quantize": None, "prune_mode": "channel", "prune": 0.5, "prune_round_to": 1}
    t = s.evaluate(99, {**trial, "prune_groups": "spare-4"})
    assert t.error is None and t.options["prune_groups"] == "spare-2"  # at most the measured groups
    assert g0 in t.recipe_toml and g1 in t.recipe_toml and "ratios" in t.recipe_toml
    pruned = kept(t.options)
    assert not pruned[g0] and not pruned[g1] and any(pruned[g] for g in s.pruned_groups() if g not in (g0, g1))
    pruned = kept({**trial, "prune_groups": "least-1"})
    assert [g for g, p in pruned.items() if p] == [g1]
    assert T.prune_groups_ratios("all", [g0, g1], s.pruned_groups()) == {}
    with pytest.raises(T.OnnxCompressError, match="prune_groups"):
        T.prune_groups_ratios("most-3", [g0], [g0])

    assert not list(st.glob(".prune-sensitivity-*"))  # the measuring models are removed
    none = tune(M, tmp_path / "p3.onnx", b, calibration=C, validation=V, trials=3, state=tmp_path / "st0",
                sensitivity_nodes=0, sensitivity_groups=0)
    assert none.report["prune_sensitivity"] == []
    assert all("prune_groups" not in t.options for t in none.trials)  # nothing measured: not searched


def test_the_int8_target_is_searched_where_this_cpu_tells_the_targets_apart(tmp_path, monkeypatch):
    """tune searches --target between this CPU's own target and generic (saturation-free weights,
    the same integer results on every x86 CPU) where their policies differ; on an AVX2-only CPU
    there is nothing to choose (vnni's weights would saturate there, so it is never tried). A
    given --target fixes it: no trial searches it and every trial uses it; one that is not this
    CPU is said to be measured here."""
    import optuna

    import onnxcompress.tune as T
    from onnxcompress.errors import OnnxCompressError
    from onnxcompress.runtime import CpuFeatures

    def cpu(avx512, vnni, arch="x86_64"):
        return CpuFeatures(arch=arch, avx2=True, avx512=avx512, vnni=vnni, flags=frozenset())

    monkeypatch.setattr("onnxcompress.runtime.cpu_features", lambda: cpu(True, False))
    assert T.search_targets() == ("avx512",)  # avx512's policy is generic's: nothing to choose
    monkeypatch.setattr("onnxcompress.runtime.cpu_features", lambda: cpu(False, False, "aarch64"))
    assert T.search_targets() == ("arm64", "generic")
    monkeypatch.setattr("onnxcompress.runtime.cpu_features", lambda: cpu(False, False))
    assert T.search_targets() == ("avx2",) and T.search_targets("auto") == ("avx2",)
    assert T.search_targets("avx512") == ("avx512",)
    assert T.target_warning("avx512") is None  # the same integer results as this AVX2 CPU
    assert "not this CPU" in T.target_warning("vnni")

    fixed = {"prune_mode": "none", "per_channel": "True", "keep_float": "0", "smooth_quant": "True",
             "quantize": "dynamic"}
    two = T._suggest(optuna.trial.FixedTrial({**fixed, "target": "generic"}), True, ("vnni", "generic"))
    assert two["target"] == "generic"
    assert "target" not in T._suggest(optuna.trial.FixedTrial(fixed), True, ("avx2",))
    assert "target" not in T._suggest(optuna.trial.FixedTrial({**fixed, "quantize": "none"}), True,
                                      ("vnni", "generic"))

    # a VNNI CPU: both targets searched, the seed recipes at this CPU's
    monkeypatch.setattr("onnxcompress.runtime.cpu_features", lambda: cpu(True, True))
    assert T.search_targets() == ("vnni", "generic")
    res = tune(M, tmp_path / "v.onnx", Budget(metric="top1", max_drop=5.0), calibration=C, validation=V, trials=2,
               sensitivity_nodes=0)
    assert res.report["targets_searched"] == ["vnni", "generic"]
    assert [t.options.get("target") for t in res.trials] == ["vnni", "vnni"]
    assert all('target = "vnni"' in t.recipe_toml for t in res.trials)
    monkeypatch.undo()

    res = tune(M, tmp_path / "g.onnx", Budget(metric="top1", max_drop=5.0), calibration=C, validation=V, trials=2,
               sensitivity_nodes=0, target="generic")
    assert res.report["targets_searched"] == ["generic"]
    assert all("target" not in t.options for t in res.trials)
    assert all('target = "generic"' in (t.recipe_toml or "") for t in res.trials if t.options.get("quantize"))
    with pytest.raises(OnnxCompressError, match="--target"):
        tune(M, tmp_path / "x.onnx", Budget(), calibration=C, validation=V, trials=1, target="z80")


def test_groups_the_sensitivity_finds_tolerant_are_seeded_pruned():
    """The search starts with int8 plus the K least pruning-sensitive measured groups pruned at the
    probe's ratio (least-K, the largest K whose drops measured alone add up to at most half of
    --max-drop; rounded to 8 channels); no such seed when not even 2 fit."""
    from onnxcompress.tune import PRUNE_GROUP_CHOICES, PRUNE_PROBE_RATIO, _seeds

    sens = [{"group": "a", "drop": 3.0}, {"group": "b", "drop": 0.3}, {"group": "c", "drop": 0.2},
            {"group": "d", "drop": -0.1}, {"group": "e", "drop": 0.0}, {"group": "f", "drop": None}]
    sens = [{**g, "channels": 64} for g in sens]
    seeds = _seeds(Budget(max_drop=1.0), True, ("vnni", "generic"), sens)
    # the 4 least: d (0 counted), e, c, b add up to 0.5 = half of 1.0: least-4
    assert len(seeds) == 3 and seeds[-1]["prune_groups"] == "least-4" and seeds[-1]["quantize"] == "static"
    assert seeds[-1]["prune_round_to"] == "8" and seeds[-1]["prune"] == PRUNE_PROBE_RATIO
    assert seeds[-1]["target"] == "vnni" and seeds[-1]["prune_groups"] in PRUNE_GROUP_CHOICES
    assert _seeds(Budget(max_drop=0.8), True, ("vnni",), sens)[-1]["prune_groups"] == "least-2"  # 0.5 > 0.4
    # groups of 6 channels: rounding 3 kept channels up to 8 would keep all 6, so no rounding
    assert _seeds(Budget(max_drop=1.0), True, ("vnni",), [{**g, "channels": 6} for g in sens])[-1]["prune_round_to"] == "1"
    assert _seeds(Budget(max_drop=1.0), False, ("avx2",), sens)[-1]["quantize"] == "dynamic"
    one = [{"group": "a", "drop": 3.0}, {"group": "e", "drop": 0.6}, {"group": "f", "drop": None}]
    assert len(_seeds(Budget(max_drop=1.0), True, ("vnni",), one)) == 2  # 3.6 > 0.5: no seed
    assert len(_seeds(Budget(max_drop=1.0), True, ("vnni",), [])) == 2


def test_hostile_tester_findings_on_tune(tmp_path, monkeypatch):
    """A hostile tester's reproducers: --metric top1 on a label output (always 100 % before) is
    refused; a resumed search draws new candidates (it replayed its random trials); the chosen
    recipe reproduces the model from another folder with relative data paths; a user metric's
    Ctrl-C stops tune and is not cached as a failed trial; -o . and --time-budget 0 are one-line
    errors; a crafted prune_sensitivity.json naming groups the model lacks is measured again."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    import onnxcompress.tune as T
    from onnxcompress.errors import DataError, OnnxCompressError

    # top1 on labels
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["s"]),
                           helper.make_node("ArgMax", ["s"], ["label"], axis=1, keepdims=0)], "lab",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
                          [onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32), "w")])
    lab = tmp_path / "lab.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), lab)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32))
    with pytest.raises(DataError, match="top1 needs class scores.*'label' is int64"):
        tune(lab, tmp_path / "l.onnx", Budget(metric="top1"), validation=str(tmp_path / "x.npz"), trials=1)

    # a resumed search: new candidates, not the first run's random ones again
    st = tmp_path / "st"
    kw = dict(calibration=C, validation=V, state=st, sensitivity_nodes=0, sensitivity_groups=0)
    first = tune(M, tmp_path / "a.onnx", Budget(max_drop=5.0), trials=4, **kw)
    again = tune(M, tmp_path / "a.onnx", Budget(max_drop=5.0), trials=6, **kw)
    old = {t.recipe_toml for t in first.trials}
    assert any(t.recipe_toml not in old for t in again.trials[4:]), [t.options for t in again.trials]

    # relative data paths: the chosen recipe reproduces the model from another working folder
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    for f in (M, C, V):
        (work / f.name).write_bytes(f.read_bytes())
    monkeypatch.chdir(work)
    res = runner.invoke(app, ["tune", M.name, "-o", "out/t.onnx", "--calibration", C.name, "--validation", V.name,
                              "--trials", "2", "-q", "--sensitivity-nodes", "0", "--sensitivity-groups", "0"])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)
    r2 = runner.invoke(app, ["optimize", str(work / M.name), "-o", str(tmp_path / "again.onnx"), "--recipe",
                             str(work / "out" / "t.onnx.tune" / "chosen.toml"), "-q"])
    assert r2.exit_code == 0, r2.output
    assert (tmp_path / "again.onnx").read_bytes() == (work / "out" / "t.onnx").read_bytes()

    # a user metric's Ctrl-C
    (tmp_path / "ctrlc.py").write_text("def f(sess, feeds):\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    st2 = tmp_path / "st2"
    with pytest.raises(KeyboardInterrupt):
        tune(M, tmp_path / "c.onnx", Budget(metric="python:ctrlc:f", max_drop=100.0), calibration=C, validation=V,
             trials=2, state=st2, sensitivity_nodes=0, sensitivity_groups=0)
    assert not any(v.get("error") for v in json.loads((st2 / "cache.json").read_text() or "{}").values()) \
        if (st2 / "cache.json").exists() else True
    (tmp_path / "badimport.py").write_text("def f(:\n")
    with pytest.raises(OnnxCompressError, match="cannot import it.*SyntaxError"):
        tune(M, tmp_path / "b.onnx", Budget(metric="python:badimport:f"), calibration=C, validation=V, trials=1)

    # one-line errors
    for args in (["-o", "."], ["-o", "x.onnx", "--time-budget", "0"], ["-o", str(tmp_path / "missing" / "o.onnx")]):
        r = runner.invoke(app, ["tune", str(M), "--calibration", str(C), "--trials", "1", *args])
        assert r.exit_code == 2 and "Traceback" not in r.output and "internal error" not in r.output, r.output
        assert "missing" not in args[1] or "-o " in r.output and "does not exist" in r.output, r.output
    with pytest.raises(OnnxCompressError, match="^--target must be one of"):
        tune(M, tmp_path / "x.onnx", Budget(), calibration=C, validation=V, trials=1, target="x" * 5000)

    # a cached sensitivity naming groups the model lacks (the key copied from a real one) is measured again
    st3 = tmp_path / "st3"
    real = tune(M, tmp_path / "p.onnx", Budget(metric="cosine", max_drop=5.0), calibration=C, validation=V, trials=3,
                state=st3, sensitivity_nodes=0, sensitivity_groups=2)
    cached = json.loads((st3 / "prune_sensitivity.json").read_text())
    cached["groups"] = [{**g, "group": "ghost" + str(i)} for i, g in enumerate(cached["groups"])]
    (st3 / "prune_sensitivity.json").write_text(json.dumps(cached))
    msgs = []
    s = T._prepare(M, Budget(metric="cosine", max_drop=5.0), C, V, st3, msgs.append, sensitivity_nodes=0, trials=3,
                   sensitivity_groups=2)
    assert not any("pruning sensitivity from" in m for m in msgs)
    assert [g["group"] for g in s.prune_sensitivity] == [g["group"] for g in real.report["prune_sensitivity"]]
