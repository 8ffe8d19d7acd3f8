"""``onnxcompress zoo``: batch-convert a manifest of models x recipes (see :mod:`onnxcompress.zoo`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from .cli_common import _bug, _fail, _setup_logging, app, console
from .errors import OnnxCompressError


class _Live:
    """Rich progress: done / failed / running / cached counts, bar over the tasks to run, ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.n = {"ok": 0, "failed": 0, "running": 0, "cached": 0, "cached_failed": 0, "refused": 0}

    def _desc(self) -> str:
        n = self.n
        return (f"[green]done {n['ok']}[/] · [red]failed {n['failed']}[/] · [cyan]running {n['running']}[/]"
                f" · [dim]cached {n['cached']}[/]" + (f" · [red]refused before running {n['refused']}[/]"
                                                      if n["refused"] else ""))

    def __call__(self, ev: str, d: dict) -> None:
        if ev == "plan":
            self.n["cached"] = d["cached"]
            self.n["refused"] = d["failed_before_run"]  # not in the bar: the bar counts the tasks to run
            if not self.quiet:
                console.print(f"zoo: {d['total']} tasks, {d['to_run']} to run, {d['cached']} cached "
                              f"(executor {d['executor']}, jobs {d['jobs'] or 'cluster CPUs'})", highlight=False)
                if d["to_run"]:
                    self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                             MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                             TimeRemainingColumn(), console=console, transient=False)
                    self.progress.start()
                    self.task = self.progress.add_task(self._desc(), total=d["to_run"])
        elif ev == "start":
            self.n["running"] += 1
        elif ev == "done":
            self.n["running"] = max(0, self.n["running"] - 1)
            self.n["ok" if d["status"] == "ok" else "failed"] += 1
            if d["status"] != "ok":
                msg = f"[red]failed[/] {d['model']} / {d['recipe']} ({d.get('kind')}): {d.get('error')}"
                (self.progress.console if self.progress else console).print(msg, highlight=False, soft_wrap=True)
            elif not self.quiet and self.progress:
                ratio = d.get("size_ratio")
                self.progress.console.print(
                    f"[green]ok[/] {d['model']} / {d['recipe']} in {d.get('wall_s', 0):.1f} s"
                    + (f", {ratio:.2f}× smaller" if ratio else "")
                    + (f", cos {d['min_cosine']:.4f}" if d.get("min_cosine") is not None else ""), highlight=False)
            if self.progress:
                self.progress.advance(self.task)
        if self.progress is not None:
            self.progress.update(self.task, description=self._desc())

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@app.command("zoo")
def zoo(
    manifest: Path = typer.Argument(..., help="Zoo manifest (TOML): models, data, recipes (see models/zoo.toml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: models, reports, state file (resumable)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Tasks in parallel (default: the manifest run.jobs, else the CPU count; Ray: the cluster's CPUs)."),
    recipe: List[str] = typer.Option([], "--recipe", "-r", help="Run exactly this recipe on every selected model (repeatable; default: each model's list)."),
    only: List[str] = typer.Option([], "--only", help="Only this model (repeatable)."),
    executor: str = typer.Option("local", "--executor", help="local (process per task, default) or ray."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)."),
    memory_limit_mb: Optional[int] = typer.Option(None, "--memory-limit-mb", help="Per-task address-space cap (MB); a task over it fails, the rest go on."),
    timeout_s: Optional[float] = typer.Option(None, "--timeout-s", help="Per-task time limit (s); the worker is killed past it (default: the manifest run.timeout_s, else 3600; 0 = no limit)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads per task (default: CPUs / jobs)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also rerun tasks that failed on bad input or a missed gate."),
    force: bool = typer.Option(False, "--force", help="Rerun every task, ignoring the state file."),
    allow_fetch: bool = typer.Option(False, "--allow-fetch", help="Run the manifest's fetch commands even if the manifest is not yours or is group/other-writable."),
    no_fetch: bool = typer.Option(False, "--no-fetch", help="Never run the manifest's fetch commands (models without their file fail)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress; only failures and errors."),
):
    """Batch-convert every (model, recipe) of a manifest: parallel, resumable, failure-isolated.

    A manifest is code: a model's `fetch` commands run as you, with your permissions, when its
    file is missing. Run only manifests you trust; fetch commands are refused when the manifest
    is not owned by you or is writable by group/others, unless --allow-fetch (--no-fetch: never
    run them). Each task runs under a time limit (default 3600 s).

    Exit code: 0 all tasks ok, 1 some task failed, 2 bad manifest or arguments (or refused fetch).
    """
    import math

    from .zoo import run_zoo

    _setup_logging(quiet)
    for flag, v, ok in (("--jobs", jobs, lambda x: x >= 1), ("--timeout-s", timeout_s, lambda x: math.isfinite(x) and x >= 0),
                        ("--threads", threads, lambda x: x >= 1), ("--memory-limit-mb", memory_limit_mb, lambda x: x >= 0)):
        if v is not None and not ok(v):
            _fail(OnnxCompressError(f"{flag} {v}: out of range"))
    live = _Live(quiet)
    t0 = time.perf_counter()
    try:
        res = run_zoo(manifest, out, jobs=jobs, recipes=list(recipe) or None, only=list(only) or None,
                      executor=executor, address=address, memory_limit_mb=memory_limit_mb, timeout_s=timeout_s,
                      threads=threads, retry_failed=retry_failed, force=force, allow_fetch=allow_fetch,
                      no_fetch=no_fetch, progress=live)
    except OnnxCompressError as exc:
        live.stop()
        _fail(exc)
    except KeyboardInterrupt:
        live.stop()
        console.print("[red]interrupted[/]: finished tasks are kept; run the same command again to resume")
        raise typer.Exit(130)
    except Exception as exc:  # a bug: one line unless --debug
        live.stop()
        _bug(exc)
    live.stop()
    c = res.report["counts"]
    if not quiet:
        console.print(f"zoo: {c['tasks']} tasks, [green]{c['ok']} ok[/], "
                      f"{'[red]' if c['failed'] else ''}{c['failed']} failed{'[/]' if c['failed'] else ''}; "
                      f"{c['ran']} ran, {c['cached']} cached, {time.perf_counter() - t0:.1f} s", highlight=False)
    for r in res.failed:  # the ones that ran were shown as they finished
        if not r.get("ran"):
            console.print(f"[red]failed[/] {r['model']} / {r['recipe']} ({r.get('kind')}"
                          f"{', cached' if r.get('key') else ''}): {r.get('error')}", highlight=False, soft_wrap=True)
    if not quiet:
        console.print(f"report: {res.paths['html']}", highlight=False, soft_wrap=True)
    raise typer.Exit(res.exit_code)
