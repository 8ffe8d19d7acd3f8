"""What every command module shares: the typer app, the consoles, logging, errors, paths.

Command modules (``cli.py``, ``cli_optimize.py``, ``cli_bench.py``, ``cli_zoo.py``,
``cli_recipe.py``, ...) import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.main
from rich.console import Console
from typer.core import TyperCommand, TyperGroup
from rich.markup import escape

from .errors import InternalError, OnnxCompressError

if not sys.stdout.isatty() and not os.environ.get("TERMINAL_WIDTH") and not os.environ.get("COLUMNS"):
    import typer.rich_utils

    # piped --help (less, files, CI logs): 120 columns, so option names are not cut to "--calibration-m…"
    typer.rich_utils.MAX_WIDTH = 120

def _no_flag_metavar() -> None:
    """Flags (``--quiet``, ``--per-channel/--per-tensor``) take no value: typer's help shows a
    ``<bool>`` type column for them anyway, which reads as if a value were expected. typer has no
    setting for it; its help renderer asks ``display_type_rich``, so flags answer "nothing"."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - another typer layout: keep its help as it is
        return
    orig = getattr(TyperOption, "display_type_rich", None)
    if orig is None or getattr(orig, "_onnxcompress", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else orig(self, ctx)

    display_type_rich._onnxcompress = True
    TyperOption.display_type_rich = display_type_rich


_no_flag_metavar()

#: commands whose definition needs the declared parameters (and so onnx-ir and the passes):
#: name -> (module, the first line of its help). The module is imported only when the command
#: runs or its own help is asked for; the root help lists it from this line (a test checks that it
#: is the command's). Each module registers its commands on a ``commands = command_group()``.
LAZY_COMMANDS = {
    "optimize": ("onnxcompress.cli_optimize", "Clean up and fuse, prune, quantize, validate with ONNX Runtime, then "
                 "write OUT atomically."),
    "recipe": ("onnxcompress.cli_recipe", "Recipes: what `optimize` runs, as TOML."),
}
#: the order of the root help
COMMAND_ORDER = ("inspect", "optimize", "zoo", "bench", "validate", "tune", "distill", "export", "recipe")


class _LazyGroup(TyperGroup):
    """The root command: :data:`LAZY_COMMANDS` are imported on use (click's lazy-loading group
    pattern), so that ``onnxcompress --help`` and light commands start without onnx-ir, sympy and
    onnxscript (about 0.7 s)."""

    _listing = False

    def format_help(self, ctx, formatter):
        self._listing = True  # the root help: one line per command, from the table
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def list_commands(self, ctx):
        names = [*self.commands, *(n for n in LAZY_COMMANDS if n not in self.commands)]
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    def get_command(self, ctx, name):
        cmd = self.commands.get(name)
        if cmd is not None or name not in LAZY_COMMANDS:
            return cmd
        module, short = LAZY_COMMANDS[name]
        if self._listing:
            return TyperCommand(name, help=short, short_help=short)
        import importlib

        group = typer.main.get_group(importlib.import_module(module).commands)
        cmd = self.commands[name] = group.get_command(ctx, name)
        return cmd

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name is not None and name not in self.list_commands(ctx) and not ctx.resilient_parsing \
                and not name.startswith("-"):
            from difflib import get_close_matches  # typer suggests from the loaded commands only

            matches = get_close_matches(name, self.list_commands(ctx))
            if matches:
                ctx.fail(f"No such command {name!r}. Did you mean " + ", ".join(map(repr, matches)) + "?")
        return super().resolve_command(ctx, args)


#: ``-h`` as well as ``--help``, on every command
CONTEXT = {"help_option_names": ["-h", "--help"]}


def command_group() -> typer.Typer:
    """The typer app a module of :data:`LAZY_COMMANDS` registers its commands on."""
    return typer.Typer(add_completion=False, context_settings=CONTEXT)


app = typer.Typer(cls=_LazyGroup, add_completion=False, no_args_is_help=True, context_settings=CONTEXT,
                  help="Make trained ONNX models smaller and faster, validated by ONNX Runtime.")
# Piped output (CI logs, files) gets 120 columns so numbers are not wrapped mid-value.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out_console = Console(width=None if sys.stdout.isatty() else 120)
_state = {"debug": False}
_warned: set[str] = set()  # messages already printed as warnings: not repeated as notes


class _RichWarnings(logging.Handler):
    def emit(self, record):  # warnings naming skipped nodes, reverted passes
        msg = record.getMessage()
        if msg in _warned:  # said once per command (--quantize auto runs the pipeline per candidate)
            return
        _warned.add(msg)
        console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False)


def _setup_logging(quiet: bool) -> None:
    _warned.clear()
    log = logging.getLogger("onnxcompress")
    log.handlers[:] = []
    log.propagate = False
    # quiet: a NullHandler, so Python's last-resort handler does not print warnings either
    log.addHandler(logging.NullHandler() if quiet else _RichWarnings())
    log.setLevel(logging.WARNING)


def _bug(exc: Exception) -> None:
    """Fail on an exception that is not the input's fault: still one line (exit 1), unless --debug."""
    if _state["debug"]:
        raise exc
    _fail(InternalError(f"internal error: {type(exc).__name__}: {exc} (not a problem found in the input; "
                        "rerun as onnxcompress --debug COMMAND ... for the traceback, and report it)"))


def _fail(exc: Exception) -> None:
    """End the command on ``exc``: its one-line message and exit code (2 unless it says); with
    ``--debug`` its traceback first, and the same exit code."""
    if _state["debug"]:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(exc, "exit_code", 2))


@contextlib.contextmanager
def one_line_errors():
    """The CLI's error contract around a call into the API: an :class:`OnnxCompressError` ends
    the command with its one-line message and exit code (:func:`_fail`), anything else with a
    one-line internal error, exit 1 (:func:`_bug`; ``--debug`` re-raises both)."""
    try:
        yield
    except OnnxCompressError as exc:
        _fail(exc)
    except Exception as exc:  # a bug or a runtime refusal: still one line unless --debug
        _bug(exc)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _check_out_paths(*, inputs: dict | None = None, outputs: dict | None = None, **paths: Optional[Path]) -> None:
    """Refuse ``--report`` / ``--html`` paths that cannot be written, before any work (a bad path
    must not cost the user the run, nor leave an output behind): an existing FIFO, device or
    folder, a missing or read-only folder, or a path equal to an input or another output
    (:mod:`onnxcompress.paths`).

    Args:
        inputs: label -> path of what the command reads (model, data, recipe).
        outputs: label -> path of the command's other outputs (``-o`` and its ``.data``).
        paths: flag name (``report``) -> path.
    """
    from .paths import check_distinct, check_output_file

    try:
        for flag, path in paths.items():
            if path is not None:
                check_output_file(path, f"--{flag} file")
        check_distinct({**(outputs or {}), **{f"--{k}": v for k, v in paths.items()}}, inputs or {})
    except OnnxCompressError as exc:
        _fail(exc)


def _write_json(path: Path, rep: dict) -> None:
    """Write ``rep`` as JSON atomically (:func:`onnxcompress.model_io.write_atomic`)."""
    from .model_io import write_atomic

    try:
        write_atomic(path, json.dumps(rep, indent=2, default=str))
    except OSError as exc:
        _fail(OnnxCompressError(f"{path}: cannot write report ({exc.strerror or exc})"))


def _write_reports(rep: dict, report: Optional[Path], html: Optional[Path]) -> None:
    """``--report`` (JSON) and ``--html`` of a command's report, each when asked for; a file that
    cannot be written ends the command with a one-line error."""
    if report:
        _write_json(report, rep)
    if html:
        from .report_html import write_html

        try:
            write_html(rep, html)
        except OnnxCompressError as exc:
            _fail(exc)


class StageBars:
    """One progress line per stage of a run, fed by the API's ``progress`` callback
    (:class:`onnxcompress.progress.ProgressEvent`): a bar with what the stage counts (samples,
    nodes, tensors) while it runs, its wall time and peak RSS once it is done.

    A context manager and the callback in one: ``with StageBars(console) as bars: optimize(...,
    progress=bars)``. Plain strings (``tune``'s, ``auto``'s own steps) start a stage without
    numbers. On a terminal the lines update in place; elsewhere (a CI log) they are printed once,
    when the run ends."""

    def __init__(self, con: Console) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
        from rich.table import Column

        # long stage names (an output path) and counts are cut, never the cost; below 110
        # columns the bar goes (the counts show the progress) so that an 80-column terminal
        # keeps one line per stage
        narrow = con.width < 110
        desc_w = 28 if narrow else 44
        class StatusColumn(SpinnerColumn):
            """The spinner; once a stage is done a green check, or a yellow cross when the stage
            did not do what it set out to (a reverted pass, a fallback round that missed the gates)."""

            def render(self, task):
                if task.finished and task.fields.get("outcome"):
                    from rich.text import Text

                    return Text("✗", style="yellow")
                return super().render(task)

        cols = [StatusColumn(finished_text="[green]✓[/]"),
                TextColumn("{task.description}", table_column=Column(max_width=desc_w, no_wrap=True,
                                                                     overflow="ellipsis"))]
        if not narrow:
            cols.append(BarColumn(bar_width=20))
        cols += [TextColumn("{task.fields[count]}", table_column=Column(
                     no_wrap=True, overflow="ellipsis", max_width=max(10, con.width - desc_w - 24) if narrow else None)),
                 _cost_column(table_column=Column(no_wrap=True))]
        self._bars = Progress(*cols, console=con, transient=False)
        self._task = None

    def __enter__(self) -> "StageBars":
        self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._task is not None:
            t = self._bars.tasks[self._task]
            if exc[0]:  # the stage did not finish: a red cross, not the spinner's check mark
                self._bars.remove_task(self._task)
                self._bars.console.print(f"[red]✗[/] {t.description} [red](stopped)[/]", highlight=False)
            else:
                self._bars.update(self._task, total=t.total or 1, completed=t.total or 1)
                self._bars.stop_task(self._task)
            self._task = None
        self._bars.stop()

    def __call__(self, msg: str) -> None:
        from .progress import ProgressEvent

        ev = msg if isinstance(msg, ProgressEvent) else ProgressEvent(str(msg))
        if ev.done is None:
            self._close(ev.closed)
            if not ev.final:
                self._task = self._bars.add_task(escape(ev.stage), total=None, count="", cost="", outcome="")
            return
        if self._task is None:
            self._task = self._bars.add_task(escape(ev.stage), total=None, count="", cost="", outcome="")
        count = f"{ev.done}/{ev.total}" if ev.total is not None else f"{ev.done}"
        done = ev.total is not None and ev.done >= ev.total
        # while it runs: what it counts; once a step is complete only the numbers stay
        text = f"{count} {ev.unit}" if done else f"{ev.step} {count} {ev.unit}"
        self._bars.update(self._task, total=ev.total, completed=ev.done, count=escape(text.strip()))

    def _close(self, closed: dict | None) -> None:
        if self._task is None:
            return
        t = self._bars.tasks[self._task]
        cost = (f"{closed['seconds']:.1f} s, {closed['peak_rss_mb']:.0f} MiB peak" if closed else
                f"{t.elapsed or 0:.1f} s")
        outcome = (closed or {}).get("outcome")
        if outcome:
            cost = f"{outcome}; {cost}"
        done = t.total or 1
        self._bars.update(self._task, total=done, completed=done, cost=cost, outcome=outcome or "")
        self._bars.stop_task(self._task)
        self._task = None


def _cost_column(**kw):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CostColumn(ProgressColumn):
        """Seconds so far while a stage runs; its wall time and peak RSS once done."""

        def render(self, task):
            cost = task.fields.get("cost")
            return Text(cost, style="dim") if cost else Text(f"{task.elapsed or 0:.1f} s", style="cyan")

    return CostColumn(**kw)
