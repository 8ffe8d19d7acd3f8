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
