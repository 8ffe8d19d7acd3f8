"""``bench`` and ``validate`` commands: a thin typer layer over :mod:`onnxcompress.bench`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_common import one_line_errors, _check_out_paths, _fail, _fmt_bytes, app, console, out_console
from .errors import OnnxCompressError


@contextmanager
def _progress(quiet: bool):
    """A rich progress bar fed by the API's ``progress(phase, done, total)`` callback."""
    if quiet:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1)

        def update(phase: str, done: float, total: float) -> None:
            bar.update(task, description=phase, completed=done, total=total or 1)

        yield update


def _providers(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _outputs(rep: dict, report: Optional[Path], html: Optional[Path]) -> None:
    if report:
        from .bench import write_json

        write_json(report, rep)
    if html:
        from .report_html import write_html

        write_html(rep, html)


def _call(fn, *args, **kwargs):
    with one_line_errors():
        return fn(*args, **kwargs)


@app.command()
def bench(
    models: List[Path] = typer.Argument(..., help="ONNX models; the first is the baseline of the ratios."),
    providers: str = typer.Option("cpu", "--providers", help="cpu,cuda,tensorrt (CPU always; missing GPU ones are skipped)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ORT intra-op threads (default: ORT's)."),
    batch: List[str] = typer.Option(["1"], "--batch", help="Batch size; several (1,8 or repeated) give a sweep."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs per model first."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed runs per model."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds of timed runs per provider x batch (default 10 when --runs is not given)."),
    block: Optional[int] = typer.Option(None, "--block", help="Timed runs of one model in a row per turn, after one untimed switch run. Default: blocks of ~250 ms of the first model's runs (2-10 runs: AAA BBB CCC AAA ...), which keeps caches warm per model; 1: run by run (A B C A B C), which README explains is misleading for small models."),
    data: Optional[Path] = typer.Option(None, "--data", help="Inputs (.npz, README format); default: synthesized."),
    shape: List[str] = typer.Option([], "--shape", help="NAME=1x3x224x224 for a synthesized input's symbolic dims (repeatable)."),
    profile: bool = typer.Option(False, "--profile", help="ORT profiler: top ops by time and node placement per provider."),
    top: int = typer.Option(10, "--top", help="Op types listed by --profile."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak RSS on the CPU provider (one child process per model and batch size)."),
    memory_repeats: int = typer.Option(1, "--memory-repeats", help="Child processes per model and batch size for peak RSS (median)."),
    fidelity: bool = typer.Option(False, "--fidelity", help="Also run the samples of --data (at most 1000) through "
                                  "each model as deployed on the CPU, outside the timing: accuracy with the data's "
                                  "labels, top-1 agreement and mean cosine of the first output against the first "
                                  "model's; the HTML page charts them against the latency ratio (architectures side "
                                  "by side)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write every figure, machine and versions as JSON."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report (needs matplotlib, jinja2)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors (and --report/--html files)."),
):
    """Time models interleaved in blocks (AAA BBB CCC AAA ..., see --block) with ONNX Runtime: latency, throughput, memory, ratios against the first model."""
    try:
        batches = [int(b) for item in batch for b in item.split(",") if b.strip()]
    except ValueError:
        _fail(OnnxCompressError(f"--batch takes integers (got {batch})"))
    from .bench import benchmark, parse_shapes

    shapes = _call(parse_shapes, shape)
    _check_out_paths(report=report, html=html, inputs={**{f"model {m}": m for m in models}, "--data": data})
    if html:
        from .report_html import _require

        _call(_require)
    with _progress(quiet) as prog:
        result = _call(benchmark, models, providers=_providers(providers), threads=threads, batches=batches,
                       warmup=warmup, runs=runs, duration=duration, data=data, shapes=shapes or None,
                       memory=memory, memory_repeats=memory_repeats, profile=profile, top=top, progress=prog,
                       block=block, fidelity=fidelity)
    rep = result.to_dict()
    _call(_outputs, rep, report, html)
    if quiet:
        return
    for s in result.skipped:
        console.print(f"[yellow]skipped:[/] {escape(s)}", highlight=False)
    for g in result.groups:
        _render_group(g)
    if result.fidelity:
        _render_fidelity(result)
    for n in result.notes:
        console.print(f"[dim]note:[/] {escape(n)}", highlight=False)


def _ratio(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _render_fidelity(result) -> None:
    g = result.groups[0]
    first = escape(result.fidelity[0].label)
    n = max((f.n_samples for f in result.fidelity), default=0)
    t = Table(title=f"task fidelity on {n} samples of --data (CPU, as deployed), against {first}; "
                    f"latency ratio from {g.provider.replace('ExecutionProvider', '')}, batch {g.batch}")
    for col in ("model", "output", "accuracy %", f"top-1 agreement with {first} %", f"mean cosine with {first}",
                "latency ratio (lower is faster)", "size ratio"):
        t.add_column(col, justify="left" if col in ("model", "output") else "right")
    for f, m in zip(result.fidelity, g.models):
        if f.error:
            t.add_row(escape(f.label), "-", "[red]failed[/] (below)", "", "", "", "")
            continue
        t.add_row(escape(f.label), escape(f.output or "-"), _ratio(f.accuracy_pct, ".2f"),
                  _ratio(f.top1_agreement_pct, ".1f"), _ratio(f.mean_cosine, ".5f"), _ratio(m.latency_ratio),
                  _ratio(m.size_ratio))
    out_console.print(t)
    for f in result.fidelity:
        if f.error:
            console.print(f"[red]fidelity of {escape(f.label)} failed:[/] {escape(f.error)}", highlight=False)


def _render_group(g) -> None:
    first = escape(g.models[0].label)
    prov = g.provider.replace("ExecutionProvider", "")
    t = Table(title=f"{prov}, batch {g.batch}: latency over {g.rounds} timed runs per model, interleaved in blocks (ratio vs {first})")
    for col in ("model", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s (from mean)",
                f"median latency ratio vs {first} [95 % CI] (lower is faster)", "speed-up (median)"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for m in g.models:
        lat = m.latency
        lo, hi = m.latency_ratio_ci or (None, None)
        t.add_row(escape(m.label), f"{lat.p50_ms:.3f}", f"{lat.p90_ms:.3f}", f"{lat.p99_ms:.3f}", f"{lat.mean_ms:.3f}",
                  _ratio(m.throughput, ".1f"),
                  # the bootstrap interval is not symmetric around the ratio: print its ends
                  (f"{m.latency_ratio:.3f} [{lo:.4g}, {hi:.4g}]" if lo is not None else f"{m.latency_ratio:.3f}")
                  if m.latency_ratio else "-", f"{1 / m.latency_ratio:.2f}x" if m.latency_ratio else "-")
    out_console.print(t)
    r = Table(title=f"{prov}, batch {g.batch}: size and memory (ratio vs {first})")
    for col in ("model", "file size", "ratio", "peak RSS above baseline", "ratio", "session ms"):
        r.add_column(col, justify="left" if col == "model" else "right")
    for m in g.models:
        r.add_row(escape(m.label), _fmt_bytes(m.file_bytes), _ratio(m.size_ratio), _fmt_bytes(m.peak_rss_bytes),
                  _ratio(m.memory_ratio, ".2f"), f"{m.session_ms:.1f}")
    out_console.print(r)
    for m in g.models:
        if not m.profile:
            continue
        p = Table(title=f"profile {escape(m.label)} on {g.provider.replace('ExecutionProvider', '')}: "
                        f"{m.profile['kernel_ms_per_run']:.3f} ms of kernels per run")
        for col in ("op type", "ms/run", "share %", "calls/run", "providers"):
            p.add_column(col, justify="left" if col in ("op type", "providers") else "right")
        for o in m.profile["top_ops"]:
            p.add_row(o["op_type"], f"{o['ms_per_run']:.3f}", f"{o['share_pct']:.1f}", f"{o['calls_per_run']:.0f}",
                      ", ".join(x.replace("ExecutionProvider", "") for x in o["providers"]))
        out_console.print(p)
        place = ", ".join(f"{k.replace('ExecutionProvider', '')} {v}" for k, v in m.profile["nodes_per_provider"].items())
        console.print(f"nodes per provider: {place}", highlight=False)
        if m.profile["n_fallback"]:
            names = ", ".join(f"{f['node']} ({f['op_type']})" for f in m.profile["fallback_nodes"][:10])
            console.print(f"[yellow]{m.profile['n_fallback']} node(s) not on {g.provider}:[/] {names}", highlight=False)
    for n in g.notes:
        console.print(f"[yellow]confidence:[/] {escape(n)}", highlight=False)


@app.command()
def validate(
    reference: Path = typer.Argument(..., help="Reference model."),
    candidate: Optional[Path] = typer.Argument(None, help="Candidate model (optional with --cross-provider)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Inputs (.npz, README format); default: random."),
    samples: int = typer.Option(8, "--samples", help="Random samples when --data is not given."),
    shape: List[str] = typer.Option([], "--shape", help="NAME=1x3x224x224 for random inputs' symbolic dims (repeatable)."),
    providers: str = typer.Option("cpu", "--providers", help="cpu,cuda,tensorrt (missing GPU ones are skipped)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance of allclose (default 1e-5)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance of allclose (default 1e-5)."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Gate: minimum cosine similarity per output."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", "--min-top1-agreement", help="Gate: minimum top-1 agreement in % (99 for 99 %)."),
    cross_provider: bool = typer.Option(False, "--cross-provider", help="Also compare each model on CPU vs the other providers."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Also compare every intermediate tensor both models compute (same name) and list the N that add the most error (all in --report); does not change the verdict."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the comparison as JSON."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report (needs matplotlib, jinja2)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the verdict."),
):
    """Run REFERENCE and CANDIDATE on the same inputs per provider and compare every output.

    Exit code 0: every check passed; 1: a check failed; 2: bad input.
    """
    from .bench import parse_shapes, validate_models

    shapes = _call(parse_shapes, shape)
    _check_out_paths(report=report, html=html, inputs={"reference": reference, "candidate": candidate, "--data": data})
    if samples < 1:
        _fail(OnnxCompressError(f"--samples must be >= 1, got {samples}"))
    if layers is not None and layers < 1:
        _fail(OnnxCompressError(f"--layers must be >= 1 (how many tensors to list), got {layers}"))
    if layers and candidate is None:
        _fail(OnnxCompressError("--layers compares a CANDIDATE with the reference: give one"))
    if html:
        from .report_html import _require

        _call(_require)
    with _progress(quiet) as prog:
        result = _call(validate_models, reference, candidate, data=data, shapes=shapes or None, n_samples=samples,
                       providers=_providers(providers), atol=atol, rtol=rtol, min_cosine=min_cosine,
                       min_top1=min_top1, cross_provider=cross_provider, progress=prog, layers=bool(layers))
    rep = result.to_dict()
    _call(_outputs, rep, report, html)
    if not quiet:
        for s in result.skipped:
            console.print(f"[yellow]skipped:[/] {escape(s)}", highlight=False)
        for c in result.checks:
            what = (f"{Path(c.reference).name} vs {Path(c.candidate).name} on {c.provider.replace('ExecutionProvider', '')}"
                    if c.kind == "models" else
                    f"{Path(c.reference).name}: {c.reference_provider.replace('ExecutionProvider', '')} vs "
                    f"{c.provider.replace('ExecutionProvider', '')}")
            t = Table(title=f"{what} (n={c.n_samples})")
            for col in ("output", "allclose", "mismatch %", "max abs", "max rel", "cosine", "SQNR dB", "top-1 %", ""):
                t.add_column(col, justify="left" if col in ("output", "") else "right")
            for o in c.outputs:
                t.add_row(o.name, "yes" if o.allclose else "no", f"{o.mismatch_pct:.3g}", f"{o.max_abs_err:.3g}",
                          f"{o.max_rel_err:.3g}", f"{o.cosine:.6f}", f"{o.sqnr_db:.1f}",
                          f"{o.top1_agreement:.2f}" if o.top1_agreement is not None else
                          (f"lines {o.sequence_agreement:.2f}" if o.sequence_agreement is not None else "-"),
                          "[green]pass[/]" if o.passed else "[red]FAIL[/]")
            out_console.print(t)
            for o in c.outputs:
                if not o.passed:
                    console.print(f"  {escape(o.name)}: {escape('; '.join(o.failed))}", highlight=False)
        if result.layers:
            _print_layers(result.layers, layers, result.config.get("layers_samples"))
        for n in result.notes:
            console.print(f"[dim]note:[/] {escape(n)}", highlight=False)
    if result.passed:
        console.print("[green]PASS[/]", highlight=False)
    else:
        failed = [f"{Path(c.candidate).name}/{o.name} on {c.provider.replace('ExecutionProvider', '')}: {'; '.join(o.failed)}"
                  for c in result.checks for o in c.outputs if not o.passed]
        console.print(f"[red]FAIL[/]: {escape(failed[0])}" + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""),
                      highlight=False)
        raise typer.Exit(1)


def _print_layers(rows, n: int, n_samples) -> None:
    """The ``n`` tensors whose step lowers the SQNR most (``drop_db``), in graph order, and the
    last shared tensor."""
    from .validate import LAYER_SQNR_CAP_DB

    ranked = sorted((r for r in rows if r.drop_db is not None and r.drop_db < 0), key=lambda r: r.drop_db)[:n]
    keep = {id(r) for r in ranked}
    t = Table(title=f"where the candidate departs: the {len(ranked)} of {len(rows)} shared tensors that add the "
                    f"most error (n={n_samples}, optimizations off)")
    for col in ("#", "tensor", "op", "SQNR dB", "step dB", "worst cos"):
        t.add_column(col, justify="left" if col in ("tensor", "op") else "right")
    for i, r in enumerate(rows):
        if id(r) in keep:
            t.add_row(str(i), r.name, r.op_type, f"{r.sqnr_db:.1f}",
                      f"{r.drop_db:+.1f}", f"{r.cosine:.4f}")
    out_console.print(t)
    last = rows[-1]
    console.print(f"  last shared tensor {escape(last.name)} ({last.op_type}): SQNR {last.sqnr_db:.1f} dB; "
                  f"'step dB': its SQNR minus its inputs' worst (both capped at {LAYER_SQNR_CAP_DB:g} dB)",
                  highlight=False)
