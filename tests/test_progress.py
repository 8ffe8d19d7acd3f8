"""Progress: one event per stage (with the last stage's cost) and counts inside stages; the
events are the strings a plain ``progress(str)`` callback always got."""


from typer.testing import CliRunner

from onnxcompress import OptimizeOptions, optimize
from onnxcompress import progress as P
from onnxcompress.cli import app


def test_event_is_its_text():
    assert P.ProgressEvent("loading model") == "loading model"
    ev = P.ProgressEvent("quantize", "recording activations", 3, 8, "sample runs")
    assert isinstance(ev, str) and ev == "quantize: recording activations 3/8 sample runs"
    assert (ev.done, ev.total, ev.unit) == (3, 8, "sample runs")
    pre = ev.prefixed("auto (static): ")
    assert pre.stage == "auto (static): quantize" and pre.done == 3 and pre.total == 8


def test_tick_without_listener_is_silent():
    P.tick("anything", 1, 2, "nodes")  # no listener: nothing happens, nothing raises
    assert list(P.counted([1, 2, 3], "x", "nodes")) == [1, 2, 3]


def test_listener_throttles_and_keeps_completion(monkeypatch):
    got = []
    monkeypatch.setattr(P, "MIN_INTERVAL_S", 3600.0)
    with P.listening(lambda: "stage", got.append):
        for k in range(1, 101):
            P.tick("step", k, 100, "nodes")
    # the first and the completing tick: the 98 in between fall inside the interval
    assert [e.done for e in got] == [1, 100]
    assert all(e.stage == "stage" and e.unit == "nodes" for e in got)


def test_outer_step_holds_the_bar(monkeypatch):
    got = []
    monkeypatch.setattr(P, "MIN_INTERVAL_S", 0.0)
    with P.listening(lambda: "stage", got.append):
        for _ in P.counted(range(3), "outer", "nodes"):
            for k in range(1, 3):
                P.tick("inner", k, 2, "runs")
    steps = [e.step for e in got]
    # the inner loop shows until the outer one first ticks; then only the outer one until it completes
    assert steps == ["inner", "inner", "outer", "outer", "outer"]
    assert [e.done for e in got if e.step == "outer"] == [1, 2, 3]


def test_optimize_reports_stages_and_counts(digits, tmp_path):
    events = []
    opts = OptimizeOptions(quantize="static", calibration=digits["calib"], validation=digits["test"])
    res = optimize(digits["model"], tmp_path / "q.onnx", opts, progress=events.append)
    assert all(isinstance(e, str) for e in events)
    starts = [e for e in events if e.done is None]
    names = [e.stage for e in starts if not e.final]
    assert names[0] == "loading model" and names[-1].startswith("writing")
    assert "validating with ONNX Runtime" in names
    # each start carries the stage before it, exactly as report["cost"] has it; the final event the last one
    closed = [e.closed for e in starts if e.closed is not None]
    assert closed == res.report["cost"]["stages"]
    assert starts[-1].final and starts[-1].closed == res.report["cost"]["stages"][-1]
    counts = [e for e in events if e.done is not None]
    by_step = {}
    for e in counts:
        by_step.setdefault((e.stage, e.step), []).append(e)
    steps = {s for _, s in by_step}
    assert {"recording activations", "quantizing weights", "writing"} <= steps, steps
    for evs in by_step.values():  # counts go up and every step that ran completes
        assert [e.done for e in evs] == sorted(e.done for e in evs)
        assert evs[-1].total is None or evs[-1].done == evs[-1].total
    val = [e for e in counts if e.stage == "validating with ONNX Runtime"]
    assert val and val[-1].total == 450 and val[-1].unit == "samples"


def test_plain_string_callback_still_works(digits, tmp_path):
    seen = []
    optimize(digits["model"], tmp_path / "f.onnx", progress=lambda s: seen.append(s.upper()))
    assert "LOADING MODEL" in seen


def test_cli_prints_one_line_per_stage(digits, tmp_path):
    res = CliRunner().invoke(app, ["optimize", str(digits["model"]), "-o", str(tmp_path / "q.onnx"), "--quantize",
                                   "dynamic"])
    assert res.exit_code == 0, res.output
    lines = [l for l in res.output.splitlines() if l.startswith("✓")]
    assert any("loading model" in l and "MiB peak" in l for l in lines), res.output
    assert any("dynamic int8" in l.lower() or "quantiz" in l.lower() for l in lines), res.output
    assert any(l.startswith("✓ writing") for l in lines), res.output


def test_stages_that_did_not_do_their_job_are_marked(digits, tmp_path, monkeypatch):
    """A fallback round that misses the gates and a stage whose passes were all reverted end with a
    yellow cross and their outcome, not the check mark of a stage that did its job (a newcomer read
    "✓ distillation" beside "distillation failed and was reverted"); the report's cost says so too."""
    from onnxcompress.passes import distill_stage

    def no_torch(self, model):
        raise RuntimeError("distillation needs PyTorch (simulated)")

    monkeypatch.setattr(distill_stage.DistillPass, "apply", no_torch)
    res = CliRunner().invoke(app, ["optimize", str(digits["model"]), "-o", str(tmp_path / "q.onnx"), "--quantize",
                                   "static", "--calibration", str(digits["calib"]), "--min-cosine", "0.99999999",
                                   "--prune", "0.5", "--prune-mode", "channel", "--distill", "1",
                                   "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 3, res.output
    lines = res.output.splitlines()
    assert any(l.startswith("✗ fallback") and "gates missed" in l for l in lines), res.output
    assert any(l.startswith("✗ distillation") and "reverted" in l for l in lines), res.output
    assert any(l.startswith("✓ clean-up and fusion") for l in lines), res.output
    assert "(stopped)" not in res.output  # the refused run's last round ends with its outcome too
    import json

    stages = json.loads((tmp_path / "r.json").read_text())["cost"]["stages"]
    assert {s.get("outcome") for s in stages if s["stage"].startswith("fallback")} == {"gates missed"}
    assert next(s for s in stages if s["stage"].startswith("distillation"))["outcome"] == "reverted"
    assert "outcome" not in next(s for s in stages if s["stage"].startswith("loading"))


def test_a_failing_callback_is_the_callers_error_not_a_pass_failure(digits):
    """The callback runs inside passes now: its exception surfaces as itself, after the pass,
    not as 'quantize-static failed on this model'."""
    import pytest

    def cb(ev):
        if ev.done is not None and ev.step == "recording activations":
            raise KeyError("callback bug")

    opts = OptimizeOptions(quantize="static", calibration=digits["calib"], validation=digits["test"])
    with pytest.raises(KeyError, match="callback bug"):
        optimize(digits["model"], None, opts, progress=cb)


def test_pages_draw_infinite_sqnr_and_dollar_names(tmp_path):
    """A node whose int8 output is exact (SQNR +inf) or whose name holds matplotlib's math
    markers ($...$) does not break the tune page."""
    import pytest

    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    from onnxcompress.report_html import render_tune_html

    trial = {"number": 0, "options": {"quantize": "static"}, "metric": 97.0, "drop": 0.3, "speedup": 1.4,
             "speedup_ci": [1.3, 1.5], "size_bytes": 1000, "seconds": 1.0, "error": None, "violation": 0.0,
             "path": None}
    rep = {"kind": "tune", "version": "x", "input": "m.onnx", "output": "o.onnx", "seconds": 1.0,
           "budget": {"metric": "top1", "max_drop": 1.0, "min_speedup": None, "max_size_mb": None},
           "fp32_metric": 97.3, "fp32_size_bytes": 4000, "chosen": 0, "why": "w", "met": True, "failed": [],
           "held_out": {"metric": 97.0, "fp32_metric": 97.3, "drop": 0.3, "samples": 10}, "trials": [trial],
           "pareto": [0], "pareto_recipes": "p", "chosen_recipe": "c.toml",
           "sensitivity": [{"node": "a$\\frac{$b", "int8_sqnr_db": 12.0}, {"node": "exact", "int8_sqnr_db": float("inf")},
                           {"node": "<script>", "int8_sqnr_db": 30.0}]}
    page = render_tune_html(rep)
    assert page.count("data:image/png;base64,") == 2 and "<script>" not in page
    assert "infinite SQNR" in page
