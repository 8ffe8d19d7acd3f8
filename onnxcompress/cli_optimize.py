"""The `optimize` command: flags from the declared parameters (:mod:`onnxcompress.cli_flags`),
the API call with one line per stage, and the before/after tables.

Imported on use (:data:`onnxcompress.cli_common.LAZY_COMMANDS`): building its flags imports the
passes' declarations."""

from __future__ import annotations

import inspect as _inspect
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .api import optimize as api_optimize
from .cli_common import (_bug, _check_out_paths, _fail, _fmt_bytes, _setup_logging, _warned, _write_json, _write_reports,
                         command_group, console, one_line_errors, out_console, StageBars)
from .cli_flags import effective_recipe, given, with_flags
from .errors import GateFailedError, OnnxCompressError

commands = command_group()


def _optimize(model: Path, output: Path, recipe: Optional[str], report: Optional[Path], html: Optional[Path],
              quiet: bool, **flags):
    """Clean up and fuse, prune, quantize, validate with ONNX Runtime, then write OUT atomically.

    What runs is a recipe: the flags below (each a declared parameter), or --recipe FILE|NAME with
    the given flags overriding its fields (`onnxcompress recipe show ...` prints it)."""
    _setup_logging(quiet)
    if not output.name or output.name in (".", ".."):
        _fail(OnnxCompressError(f"-o {str(output)!r}: give an output file path"))
    with one_line_errors():
        rec = effective_recipe(recipe, given(flags))
    _check_out_paths(report=report, html=html, inputs=_inputs(model, rec, recipe),
                     outputs={"-o": output, "the model's external data": output.with_name(output.name + ".data")})
    try:
        if quiet:
            result = api_optimize(model, output, recipe=rec)
        else:
            with StageBars(console) as bars:
                result = api_optimize(model, output, recipe=rec, progress=bars)
    except GateFailedError as exc:
        rep = getattr(exc, "report", None)
        if rep is not None:
            if not quiet and "before" in rep and "after" in rep:
                _render(rep)
            if report:
                _write_json(report, rep)
        _fail(exc)
    except OnnxCompressError as exc:
        _fail(exc)
    except Exception as exc:  # a bug or a runtime refusal: still one line unless --debug
        _bug(exc)
    _write_reports(result.report, report, html)
    if not quiet:
        _render(result.report)
        console.print(f"[green]wrote[/] {escape(str(result.output))}")


def _inputs(model: Path, rec, recipe: Optional[str]) -> dict:
    """What an optimize run reads: the model, its external data, the data files, the recipe file."""
    from .model_io import external_data_files

    inputs = {"input model": model}
    for i, f in enumerate(external_data_files(model) if model.is_file() else []):
        inputs[f"input model's external data ({f.name})"] = f
    for k in ("calibration", "validation"):
        v = getattr(rec.data, k)
        if isinstance(v, (str, Path)):
            inputs[f"{k} data"] = Path(v)
    if recipe is not None and Path(recipe).is_file():
        inputs["recipe"] = Path(recipe)
    return inputs


def _optimize_command(**kw):
    return _optimize(**kw)


_optimize_command.__doc__ = _optimize.__doc__
commands.command("optimize")(with_flags(_optimize_command, [
    _inspect.Parameter("model", _inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Input ONNX model (never modified).")),
    _inspect.Parameter("output", _inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                      default=typer.Option(..., "-o", "--output", help="Where to write the optimized model.")),
    _inspect.Parameter("recipe", _inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                      default=typer.Option(None, "--recipe", help="A recipe file (TOML) or a built-in recipe name "
                                           "(`onnxcompress recipe list`); flags given beside it override its fields.")),
    _inspect.Parameter("report", _inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                      default=typer.Option(None, "--report", help="Write the full report as JSON.")),
    _inspect.Parameter("html", _inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                      default=typer.Option(None, "--html", help="Write a self-contained HTML report (needs "
                                           "matplotlib and jinja2).")),
    _inspect.Parameter("quiet", _inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--quiet", "-q", help="Only errors.")),
]))


def _ratio(before: float, after: float, better: str, worse: str) -> str:
    """``"2.10× faster"`` or ``"1.27× slower"``: never a ratio below 1 called an improvement."""
    if not before or not after:
        return ""
    r = before / after
    return f"{r:.2f}× {better}" if r >= 1 else f"{1 / r:.2f}× {worse}"


def _gate_value(value: float, limit: float) -> tuple[str, str]:
    """``(value, limit)`` printed with enough digits to tell them apart (0.99498 vs 0.995, not
    0.995 vs 0.995): at least 4 significant digits and the limit's own; NaN prints as ``nan``."""
    exact = next((d for d in range(1, 18) if float(f"{limit:.{d}g}") == limit), 17)
    for digits in range(max(4, exact), 18):
        a, b = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        if a != b or value == limit or value != value:
            return a, b
    return repr(value), repr(limit)


def _render(rep: dict) -> None:
    b, a = rep["before"], rep["after"]
    t = Table(title="onnxcompress: before / after")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("ratio", justify="right")
    sb, sa = b.get("file_bytes", b["size_bytes"]), a.get("file_bytes", a["size_bytes"])
    t.add_row("size", _fmt_bytes(sb), _fmt_bytes(sa), _ratio(sb, sa, "smaller", "larger"))
    if a.get("compressed_bytes") and b.get("compressed_bytes"):
        t.add_row("size (zlib)", _fmt_bytes(b["compressed_bytes"]), _fmt_bytes(a["compressed_bytes"]),
                  _ratio(b["compressed_bytes"], a["compressed_bytes"], "smaller", "larger"))
    t.add_row("nodes", str(b["n_nodes"]), str(a["n_nodes"]), "")
    cost = rep.get("cost")
    if cost and cost.get("stages"):
        slow = max(cost["stages"], key=lambda st: st["seconds"])
        t.add_row("tool's own cost", "", f"{sum(st['seconds'] for st in cost['stages']):.1f} s, "
                  f"peak {cost['peak_rss_mb'] / 1024:.2f} GB RSS", f"slowest: {slow['stage']} ({slow['seconds']:.1f} s)")
    t.add_row("weight sparsity", f"{b['sparsity_pct']} %", f"{a['sparsity_pct']} %", "")
    for v in rep.get("validation", []):
        lr, lc = v.get("latency_ms_reference"), v.get("latency_ms_candidate")
        prov = v["provider"].replace("ExecutionProvider", "")
        if lr and lc:
            t.add_row(f"latency {prov} (median, ms)", f"{lr:.3f}", f"{lc:.3f}", _ratio(lr, lc, "faster", "slower"))
        if v.get("accuracy_reference") is not None:
            t.add_row(f"accuracy {prov}", f"{v['accuracy_reference']:.2f} %", f"{v['accuracy_candidate']:.2f} %",
                      f"{v['accuracy_candidate'] - v['accuracy_reference']:+.2f} pp")
        for o in v["outputs"]:
            cos = (f"cos mean {float(o['mean_cosine']):.5f} / worst {float(o['cosine']):.5f}"
                   if o.get("mean_cosine") is not None and v["n_samples"] > 1 else f"cos {float(o['cosine']):.5f}")
            desc = f"max rel err {float(o['max_rel_err']):.3g}, {cos}, SQNR {float(o['sqnr_db']):.1f} dB"
            if o.get("sequence_agreement") is not None:
                desc += f", sequences {o['sequence_agreement']:.1f} % of {o['n_sequences']}"
            if o.get("top1_agreement") is not None:
                desc += f", top-1 {o['top1_agreement']:.1f} %"
                if o.get("n_decisive") and o["n_decisive"] != o.get("n_rows") and o.get("top1_agreement_decisive") is not None:
                    desc += f" ({o['top1_agreement_decisive']:.1f} % of {o['n_decisive']} decisive)"
            t.add_row(f"fidelity {o['name']} ({prov}, n={v['n_samples']})", "", desc, "")
    out_console.print(t)
    p = Table(title="passes")
    p.add_column("pass")
    p.add_column("result")
    p.add_column("changes")
    for r in rep["passes"]:
        status = "reverted: " + r["reverted"] if r["reverted"] else ("changed" if r["changed"] else "no change")
        counts = {k: v for k, v in r["counts"].items() if not isinstance(v, (dict, list))}
        extra = f"; {len(r['skipped'])} skipped" if r["skipped"] else ""
        p.add_row(r["name"], status, ", ".join(f"{k}={v}" for k, v in counts.items()) + extra)
    out_console.print(p)
    fb = rep.get("fallback")
    if fb:
        mm = [r for r in fb["rounds"] if r.get("calibration_method") == "minmax"]
        tried = (" (min/max activation ranges tried first: " + ("they held" if mm[0]["passed"] else "not enough") + ")"
                 if mm else "")
        kept = fb["kept_in_float"]
        console.print(f"fallback: {len(kept)} node(s) kept in float after {len(fb['rounds'])} round(s){tried}"
                      + (": " + ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else "") if kept else ""), highlight=False)
    for g in rep.get("gates", []):
        mark = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
        value, limit = _gate_value(g["value"], g["limit"])
        name = g["gate"] + (f" ({', '.join(g['outputs'])})" if g.get("outputs") else "")
        why = ""
        floor = rep.get("recipe", {}).get("gates", {}).get("floor_top1_agreement", 97.0)
        if g["gate"] == "floor-top1-agreement" and g["limit"] < floor - 1e-9:
            from .gates import FLOOR_MIN_TOLERATED

            why = (f", the floor's {floor:g} % lowered for few decisive rows or sequences: one changed answer "
                   f"tolerated, never below {FLOOR_MIN_TOLERATED:g} %")
        console.print(f"gate {escape(name)} on {g['provider']}: {value} (limit {limit}{why}) {mark}", highlight=False)
    for n in rep.get("notes", []):
        if n not in _warned:
            console.print(f"[dim]note:[/] {escape(n)}", highlight=False)
