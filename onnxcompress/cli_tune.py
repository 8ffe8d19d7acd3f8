"""``onnxcompress tune``: a budget in, the best model found out (see :mod:`onnxcompress.tune`)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import one_line_errors, _check_out_paths, _setup_logging, _write_reports, app, console, out_console
from .errors import OnnxCompressError
from .tune_params import SENSITIVITY_GROUPS, SENSITIVITY_NODES


def _seconds(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise OnnxCompressError(f"--time-budget takes a duration like 90s, 20m or 1h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@app.command()
def tune(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the chosen model."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration data (.npz or image folder)."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Validation data (.npz): half scores the "
                                              "trials, half (never seen by the search) checks the winner."),
    metric: str = typer.Option("top1", "--metric", help="top1 (agreement with fp32 over every row, %), task (what the "
                               "default fidelity floor reads: top-1 on rows where fp32 is decisive, decoded CTC "
                               "sequences, or mean cosine x100), accuracy (needs labels), boxes (YOLO-style detections "
                               "[images, 4 + classes, anchors] after score 0.25 and NMS: F1 x100 against fp32's), "
                               "cosine (worst, x100), max_rel_error (negated, x100) or python:module:function "
                               "(session, feeds) -> float, higher is better."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Most the metric may fall below fp32's (its units)."),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="fp32 latency / model latency at least this."),
    max_size_mb: Optional[float] = typer.Option(None, "--max-size-mb", help="The written model at most this many MB."),
    trials: int = typer.Option(30, "--trials", min=1, help="Most trials (resumed ones count)."),
    sensitivity_nodes: int = typer.Option(SENSITIVITY_NODES.default, "--sensitivity-nodes", min=0,
                                          help=SENSITIVITY_NODES.help),
    sensitivity_groups: int = typer.Option(SENSITIVITY_GROUPS.default, "--sensitivity-groups", min=0,
                                           help=SENSITIVITY_GROUPS.help),
    target: Optional[str] = typer.Option(None, "--target", help="Int8 target of every trial (optimize's --target "
                                         "values). Default: searched between this CPU's own target and generic "
                                         "(saturation-free weights that compute alike on every x86 CPU), where "
                                         "the two differ."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Stop starting trials after this long "
                                              "(90s, 20m, 1h)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="State folder of an earlier run to continue "
                                          "(default state: OUT.tune, which a rerun also continues)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the tune report as JSON."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write the tune report as one self-contained HTML page: "
                                        "the trials (speed-up vs metric drop, the Pareto set, the chosen one), the "
                                        "trial table, the per-node int8 sensitivity and the per-group pruning "
                                        "sensitivity (needs the report extra)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
):
    """Search recipes (quantization mode and settings, pruning) for a budget; write the best model.

    Exit 0 when the budget is met; 3 when no trial met it, or when none of the feasible trials
    holds it on the held-out validation samples the search never saw (the closest model is
    written and the failed constraint named). Every Pareto-optimal trial is saved as a recipe in OUT.tune/pareto/."""
    from .tune import Budget, tune as run_tune

    _setup_logging(True)
    inputs = {"input model": model, "calibration data": calibration, "validation data": validation}
    _check_out_paths(report=report, html=html, inputs=inputs, outputs={"-o": output})
    if not output.name or output.name in (".", ".."):
        from .cli_common import _fail

        _fail(OnnxCompressError(f"-o: give an output file path, got {str(output)!r}"))
    with one_line_errors(), _resume_hint(resume if resume is not None else output.with_name(output.name + ".tune")):
        budget = Budget(metric, max_drop, min_speedup, max_size_mb)
        seconds = _seconds(time_budget)
        if quiet:
            res = run_tune(model, output, budget, calibration=calibration, validation=validation, trials=trials,
                           sensitivity_nodes=sensitivity_nodes, sensitivity_groups=sensitivity_groups, target=target,
                           time_budget_s=seconds, state=resume)
        else:
            with console.status("tuning") as status:
                res = run_tune(model, output, budget, calibration=calibration, validation=validation, trials=trials,
                               sensitivity_nodes=sensitivity_nodes, sensitivity_groups=sensitivity_groups,
                               target=target, time_budget_s=seconds, state=resume,
                               progress=lambda s: status.update(escape(s)))
    _write_reports(res.report, report, html)
    if not quiet:
        _render(res)
    if not res.met:
        console.print(f"[red]budget not met[/]: {escape('; '.join(res.report['failed']))} -- wrote the closest "
                      f"model {escape(str(res.output))}", highlight=False)
        raise typer.Exit(3)
    if not quiet:
        console.print(f"[green]wrote[/] {escape(str(res.output))} (recipe: {escape(res.report['chosen_recipe'])})")


@contextlib.contextmanager
def _resume_hint(state: Path):
    """On Ctrl-C: say where the finished trials are kept and how to continue (exit 130 stays)."""
    try:
        yield
    except KeyboardInterrupt:
        if (state / "study.db").is_file():
            console.print(f"interrupted: the finished trials are kept in {escape(str(state))}; run the same command "
                          f"(or --resume {escape(str(state))}) to continue", highlight=False)
        raise


def _render(res) -> None:
    t = Table(title="tune: trials (best first)")
    for col in ("#", "recipe", "metric drop (bound)", "speed-up", "size", "s", "note"):
        t.add_column(col, justify="right" if col not in ("recipe", "note") else "left")
    order = sorted(res.trials, key=lambda x: (x.error is not None, not x.feasible(), -(x.speedup if x.speedup == x.speedup else 0)))
    for x in order[:15]:
        from .tune import _describe

        mark = "chosen" if res.chosen is not None and x.number == res.chosen.number else ("" if x.feasible() else
                                                                                          "over budget")
        drop = "-" if x.error else f"{x.drop:.2f}" + (f" ({x.drop_bound:.2f})" if x.drop_bound == x.drop_bound else "")
        t.add_row(str(x.number), escape(_describe(x.options)), drop,
                  "-" if x.error else f"{x.speedup:.2f}x", f"{x.size_bytes / 1e6:.3f} MB" if x.size_bytes else "-",
                  f"{x.seconds:.1f}", escape(x.error[:60]) if x.error else mark)
    out_console.print(t)
    sens = res.report.get("sensitivity") or []
    if sens:
        console.print("most int8-sensitive nodes, in keep_float's order (metric gain kept in float alone; "
                      "int8 output SQNR): " + ", ".join(
                          f"{escape(x['node'])} (" + (f"{x['metric_gain_in_float']:+.3g}, "
                                                     if x.get("metric_gain_in_float") is not None else "")
                          + f"{x['int8_sqnr_db']:.1f} dB)" for x in sens[:5]), highlight=False)
    groups = [g for g in res.report.get("prune_sensitivity") or [] if g.get("drop") is not None]
    if groups:
        console.print(f"most pruning-sensitive channel groups, in prune_groups' order (metric drop pruned alone at "
                      f"{res.report.get('prune_probe_ratio', 0.5):.0%}; share of the MACs): " + ", ".join(
                          f"{escape(g['group'])} ({g['drop']:+.3g}, {g['macs_share']:.0%})" for g in groups[:5]),
                      highlight=False)
    for w in res.report.get("resolution") or []:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    targets = res.report.get("targets_searched") or []
    if targets:
        console.print("int8 target: " + (escape(targets[0]) + " (fixed)" if len(targets) == 1 else
                                         " or ".join(map(escape, targets)) + " (searched)"), highlight=False)
    h = res.report["held_out"]
    seen = (f"{h['samples']} samples the search never saw" if not h.get("shared_with_calibration") else
            f"{h['samples']} samples the search did not score; the validation data shares "
            f"{h['shared_with_calibration']} samples with --calibration")
    console.print(f"held-out check ({seen}): metric {h['metric']:.3f} vs fp32 "
                  f"{h['fp32_metric']:.3f} (drop {h['drop']:.3f})", highlight=False)
    if not h.get("within_budget", True):
        console.print(f"[yellow]warning:[/] on the held-out samples the drop ({h['drop']:.3f}) exceeds --max-drop "
                      f"{res.report['budget']['max_drop']:g}: the search half was too small or too easy to judge "
                      "this budget (give more --validation data)", highlight=False)
