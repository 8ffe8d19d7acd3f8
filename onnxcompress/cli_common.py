"""What every command module shares: the typer app, the consoles, logging, errors, paths.

Command modules (``cli.py``, ``cli_bench.py``, ``cli_zoo.py``, ``cli_recipe.py``) import from
here, never from each other.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
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
                        "run with --debug for the traceback and report it)"))


def _fail(exc: Exception) -> None:
    if _state["debug"]:
        raise exc
    console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(exc, "exit_code", 2))


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
