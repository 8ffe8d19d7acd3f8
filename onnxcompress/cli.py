"""Command line: a thin typer layer over the Python API (parse, call, render)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import typer
from rich.table import Table

from . import __version__, _defer_sympy

# before a command's module imports onnx-ir (click resolves the command, importing it, before this
# group's callback runs): onnx-ir's eager SymPy import is 0.2-0.4 s of every command's start-up
_defer_sympy()

from .cli_common import one_line_errors, _fmt_bytes, _state, app, out_console  # noqa: E402


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


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="ONNX model to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Describe a model: I/O, opset, op histogram, parameters, weights, subgraphs, sparsity."""
    from .inspect import inspect_model

    with one_line_errors():
        info = inspect_model(model)
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


# Command modules: each registers its commands on `app` when imported (one import per line);
# the commands of cli_common.LAZY_COMMANDS (optimize, recipe) are imported when used.
# --- command modules ---
from . import cli_zoo  # noqa: E402,F401
from . import cli_bench  # noqa: E402,F401
from . import cli_tune  # noqa: E402,F401
from . import cli_distill  # noqa: E402,F401
from . import cli_export  # noqa: E402,F401


if __name__ == "__main__":  # pragma: no cover
    app()
