"""Command line: a thin typer layer over the Python API (parse, call, render)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .api import OptimizeOptions, optimize as api_optimize
from .data import ImageSpec
from .errors import GateFailedError, InternalError, OnnxCompressError
from .inspect import inspect_model

if not sys.stdout.isatty() and not os.environ.get("TERMINAL_WIDTH") and not os.environ.get("COLUMNS"):
    import typer.rich_utils

    # piped --help (less, files, CI logs): 120 columns, so option names are not cut to "--calibration-m…"
    typer.rich_utils.MAX_WIDTH = 120

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make trained ONNX models smaller and faster, validated by ONNX Runtime.")
# Piped output (CI logs, files) gets 120 columns so numbers are not wrapped mid-value.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out_console = Console(width=None if sys.stdout.isatty() else 120)
_state = {"debug": False}
_warned: set[str] = set()  # messages already printed as warnings: not repeated as notes


class _RichWarnings(logging.Handler):
    def emit(self, record):  # warnings naming skipped nodes, reverted passes
        msg = record.getMessage()
        _warned.add(msg)
        console.print(f"[yellow]warning:[/] {msg}", highlight=False)


def _setup_logging(quiet: bool) -> None:
    _warned.clear()
    log = logging.getLogger("onnxcompress")
    log.handlers[:] = []
    log.propagate = False
    # quiet: a NullHandler, so Python's last-resort handler does not print warnings either
    log.addHandler(logging.NullHandler() if quiet else _RichWarnings())
    log.setLevel(logging.WARNING)


def _fail(exc: Exception) -> None:
    if _state["debug"]:
        raise exc
    console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(exc, "exit_code", 2))


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 is_eager=True, callback=lambda v: _print_version(v)),
):
    """onnxcompress: fusion, pruning and int8 quantization of ONNX models."""
    _state["debug"] = debug
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: temp files and folders are removed
    with contextlib.suppress(ValueError):  # not in the main thread (embedded use): leave it
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _print_version(value: bool) -> None:
    if value:
        out_console.print(__version__)
        raise typer.Exit(0)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="ONNX model to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Describe a model: I/O, opset, op histogram, parameters, weights, subgraphs, sparsity."""
    try:
        info = inspect_model(model)
    except OnnxCompressError as exc:
        _fail(exc)
    except Exception as exc:
        _fail(InternalError(f"internal error: {type(exc).__name__}: {exc} (not a problem found in the input; "
                            "run with --debug for the traceback and report it)"))
    if as_json:
        try:
            print(json.dumps(info, indent=2), flush=True)
        except BrokenPipeError:  # `inspect --json | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    t = Table(title=f"{model}", show_header=False)
    t.add_row("opsets", ", ".join(f"{k or 'ai.onnx'}={v}" for k, v in info["opsets"].items()))
    t.add_row("IR version", str(info["ir_version"]))
    t.add_row("producer", info["producer"] or "-")
    for io in ("inputs", "outputs"):
        for v in info[io]:
            t.add_row(io[:-1], f"{v['name']}  {v['dtype']}  {v['shape']}")
    t.add_row("nodes", str(info["n_nodes"]))
    t.add_row("parameters", f"{info['parameters']:,}")
    t.add_row("size", _fmt_bytes(info.get("file_bytes", info["size_bytes"])))
    w = info["weights"]
    t.add_row("weights", f"{w['initializers']['count']} initializers ({_fmt_bytes(w['initializers']['bytes'])}), "
                         f"{w['constant_nodes']['count']} Constant nodes ({_fmt_bytes(w['constant_nodes']['bytes'])})")
    t.add_row("int8 initializers", str(info["int8_initializers"]))
    t.add_row("weight sparsity", f"{info['sparsity_pct']} %")
    t.add_row("subgraphs", ", ".join(f"{s['op_type']} '{s['node']}'.{s['attribute']} ({s['nodes']} nodes)" for s in info["subgraphs"]) or "none")
    t.add_row("ops", ", ".join(f"{k}×{v}" for k, v in info["op_histogram"].items()))
    out_console.print(t)


@app.command()
def optimize(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the optimized model."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Int8 quantization: dynamic, static, or auto (tries both — static only with --calibration — and writes the fastest whose worst-output cosine is within 0.01 of the best; each must pass the gates)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration data (.npz; see README)."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Held-out validation data (.npz). Default: a held-out split of the calibration data."),
    calibration_method: str = typer.Option("auto", "--calibration-method", help="auto (default: per tensor, the lowest expected error of the others), minmax, percentile, entropy or mse."),
    target: str = typer.Option("auto", "--target", help="Int8 target: auto (this CPU), avx2, avx512, vnni, arm64, cuda, tensorrt, generic (an unknown CPU: avx2's saturation-free weight scales)."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Per-channel weight scales."),
    min_sqnr: float = typer.Option(20.0, "--min-node-sqnr", help="Keep a node in float when its int8 output SQNR is below this (dB); 0 disables."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Pruning amount (0..1): sparsity for --prune-mode unstructured (default), share of channels removed per dependency group for channel."),
    prune_scope: str = typer.Option("global", "--prune-scope", help="global (one magnitude threshold over all weights, default) or layer (each tensor to the target)."),
    prune_skip_first_last: bool = typer.Option(False, "--prune-skip-first-last", help="Keep the first and last layer dense."),
    prune_mode: str = typer.Option("unstructured", "--prune-mode", help="unstructured (zeros; --prune = sparsity), channel (remove channels; --prune = share per dependency group, then least-squares repair) or nm (N:M sparsity, see --prune-nm)."),
    prune_importance: str = typer.Option("l2", "--prune-importance", help="Channel mode: l2, l1, bn (BatchNorm gamma) or activation (calibration data)."),
    prune_channel_scope: str = typer.Option("layer", "--prune-channel-scope", help="Channel mode: layer (each group loses --prune of its channels) or global (one normalised ranking)."),
    prune_round_to: int = typer.Option(1, "--prune-round-to", help="Channel mode: kept channels rounded up to a multiple of this (4/8/16 keep kernels fast)."),
    prune_repair: bool = typer.Option(True, "--prune-repair/--no-prune-repair", help="Channel mode: least-squares re-fit of the next layers on calibration data."),
    prune_protect: List[str] = typer.Option([], "--prune-protect", help="Channel mode: node whose channels are never pruned (repeatable)."),
    prune_nm: str = typer.Option("2:4", "--prune-nm", help="N:M pattern for --prune-mode nm."),
    prune_ratio: List[str] = typer.Option([], "--prune-ratio", help="Channel mode: NODE=RATIO, a per-layer ratio overriding --prune (repeatable)."),
    no_fuse: bool = typer.Option(False, "--no-fuse", help="Skip clean-up and fusion passes."),
    exclude: List[str] = typer.Option([], "--exclude", help="Node name or op type never pruned or quantized (repeatable)."),
    providers: str = typer.Option("cpu", "--providers", help="Execution providers to validate on: cpu,cuda,tensorrt."),
    max_rel_error: Optional[float] = typer.Option(None, "--max-rel-error", help="Gate: max |Δ|/max|ref| per output (fraction)."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Gate: minimum cosine similarity per output."),
    min_top1_agreement: Optional[float] = typer.Option(None, "--min-top1-agreement", "--min-top1", help="Gate: minimum top-1 agreement in % (99 for 99 %)."),
    bias_correction: bool = typer.Option(True, "--bias-correction/--no-bias-correction", help="Static: correct each quantized node's mean output shift in its bias."),
    bias_correction_mode: str = typer.Option("node", "--bias-correction-mode", help="Static: node (one-node shift on float inputs) or sequential (also absorb the shift accumulated through upstream int8 layers, measured on the int8 model in graph order; slower, opt-in)."),
    equalize: str = typer.Option("auto", "--equalize", help="Cross-layer equalization before int8: auto (static mode; kept only if the estimated weight quantization error drops by >= 1 dB per-channel, 0.1 dB per-tensor), on or off."),
    smooth_quant: bool = typer.Option(True, "--smooth-quant/--no-smooth-quant", help="SmoothQuant: move activation outlier channels of MatMul/Attention inputs into the weights, where it lowers the int8 error."),
    fallback: bool = typer.Option(True, "--fallback/--no-fallback", help="When a gate is missed after quantization, keep the least int8-friendly nodes in float until it holds."),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--inline-data", help="Store weights in OUT.data (default: only over 2 GB)."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Quick median latency of both models in validation (skipped over 1 GB; `onnxcompress bench` is the careful measure)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the full report as JSON."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report (needs matplotlib and jinja2)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Image folders: HxW after resize + centre crop (default: the model's input)."),
    mean: str = typer.Option("0,0,0", "--mean", help="Image folders: per-channel mean on 0-255 pixels."),
    std: str = typer.Option("255,255,255", "--std", help="Image folders: per-channel std on 0-255 pixels."),
    layout: str = typer.Option("NCHW", "--layout", help="Image folders: NCHW or NHWC."),
    channels: str = typer.Option("RGB", "--channels", help="Image folders: RGB or BGR."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
):
    """Clean up and fuse, prune, quantize, validate with ONNX Runtime, then write OUT atomically."""
    _setup_logging(quiet)
    try:
        image = ImageSpec(
            size=tuple(int(v) for v in image_size.lower().split("x")) if image_size else None,
            mean=tuple(float(v) for v in mean.split(",")), std=tuple(float(v) for v in std.split(",")),
            layout=layout.upper(), channels=channels.upper())
        if image.size is not None and (len(image.size) != 2 or min(image.size) < 1):
            raise ValueError(f"--image-size takes HxW, e.g. 224x224 (got {image_size!r})")
        if len(image.mean) != 3 or len(image.std) != 3 or image.layout not in ("NCHW", "NHWC") or image.channels not in ("RGB", "BGR"):
            raise ValueError("--mean/--std take 3 values; --layout NCHW|NHWC; --channels RGB|BGR")
    except ValueError as exc:
        _fail(OnnxCompressError(f"bad image options: {exc}"))
    op_types = {e for e in exclude if e[:1].isupper() and "/" not in e and "." not in e}
    bad_ratio = [r for r in prune_ratio if "=" not in r]
    try:
        ratios = {k.strip(): float(v) for k, v in (r.rsplit("=", 1) for r in prune_ratio if "=" in r)}
    except ValueError as exc:
        ratios, bad_ratio = {}, [str(exc)]
    if bad_ratio:
        _fail(OnnxCompressError(f"--prune-ratio takes NODE=RATIO (e.g. /conv1/Conv=0.5), got {bad_ratio[0]!r}"))
    opts = OptimizeOptions(
        fuse=not no_fuse, prune=prune, prune_scope=prune_scope, prune_skip_first_last=prune_skip_first_last,
        prune_mode=prune_mode, prune_importance=prune_importance, prune_channel_scope=prune_channel_scope,
        prune_round_to=prune_round_to, prune_repair=prune_repair, prune_protect=tuple(prune_protect), prune_nm=prune_nm,
        prune_ratios=ratios or None,
        quantize=quantize, calibration=calibration, validation=validation, calibration_method=calibration_method,
        target=target, per_channel=per_channel, min_sqnr_db=min_sqnr or None,
        exclude_nodes=tuple(exclude), exclude_op_types=tuple(op_types),
        providers=tuple(p.strip() for p in providers.split(",") if p.strip()),
        max_rel_error=max_rel_error, min_cosine=min_cosine, min_top1_agreement=min_top1_agreement, fallback=fallback,
        bias_correction=bias_correction, bias_correction_mode=bias_correction_mode, smooth_quant=smooth_quant,
        equalize={"on": True, "off": False, "true": True, "false": False}.get(equalize.lower(), equalize.lower()),
        external_data=external_data, image=image, latency=latency,
    )
    _check_out_paths(report=report, html=html)
    try:
        if quiet:
            result = api_optimize(model, output, opts)
        else:
            with console.status("optimizing") as status:
                result = api_optimize(model, output, opts, progress=lambda s: status.update(s))
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
        _fail(InternalError(f"internal error: {type(exc).__name__}: {exc} (not a problem found in the input; "
                            "run with --debug for the traceback and report it)"))
    if report:
        _write_json(report, result.report)
    if html:
        from .report_html import write_html

        try:
            write_html(result.report, html)
        except OnnxCompressError as exc:
            _fail(exc)
    if not quiet:
        _render(result.report)
        console.print(f"[green]wrote[/] {result.output}")


def _check_out_paths(**paths: Optional[Path]) -> None:
    """Refuse ``--report`` / ``--html`` paths that cannot be written, before any work (a bad path
    must not cost the user the run, nor leave an output behind)."""
    for flag, path in paths.items():
        if path is not None and (path.is_dir() or not path.resolve().parent.is_dir()):
            _fail(OnnxCompressError(f"{path}: cannot write the --{flag} file there "
                                    f"({'a folder' if path.is_dir() else 'its folder does not exist'})"))


def _write_json(path: Path, rep: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(rep, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _fail(OnnxCompressError(f"{path}: cannot write report ({exc.strerror or exc})"))


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
            desc = f"rel {float(o['max_rel_err']):.3g}, cos {float(o['cosine']):.5f}, SQNR {float(o['sqnr_db']):.1f} dB"
            if o.get("top1_agreement") is not None:
                desc += f", top-1 {o['top1_agreement']:.1f} %"
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
        console.print(f"fallback: {len(fb['kept_in_float'])} node(s) kept in float after {len(fb['rounds'])} round(s): "
                      + ", ".join(fb["kept_in_float"][:8]) + (" ..." if len(fb["kept_in_float"]) > 8 else ""), highlight=False)
    for g in rep.get("gates", []):
        mark = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
        value, limit = _gate_value(g["value"], g["limit"])
        console.print(f"gate {g['gate']} on {g['provider']}: {value} (limit {limit}) {mark}")
    for n in rep.get("notes", []):
        if n not in _warned:
            console.print(f"[dim]note:[/] {n}", highlight=False)


# Command modules: each registers its commands on `app` when imported (one import per line).
# --- command modules ---
from . import cli_zoo  # noqa: E402,F401
from . import cli_bench  # noqa: E402,F401


if __name__ == "__main__":  # pragma: no cover
    app()
