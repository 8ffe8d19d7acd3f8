"""``onnxcompress export``: a PyTorch module to a checked ONNX model (see :mod:`onnxcompress.export`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .cli_common import one_line_errors, _check_out_paths, _setup_logging, _write_json, app, console
from .errors import DataError, OnnxCompressError


def _shape(text: str) -> list[int]:
    parts = text.replace("x", ",").split(",")
    try:
        dims = [int(d) for d in parts]
    except ValueError:
        raise DataError(f"--input-shape {text!r}: give dimensions as integers, e.g. 1,3,224,224") from None
    return dims


@app.command()
def export(
    factory: str = typer.Argument(..., help="module:function returning the torch.nn.Module (the current folder is "
                                  "searched first). It is imported and run: only name code you trust."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", help="One per module input, e.g. "
                                                    "1,3,224,224 (standard-normal samples; integers for int dtypes)."),
    input_dtype: str = typer.Option("float32", "--input-dtype", help="dtype of the generated samples."),
    data: Optional[Path] = typer.Option(None, "--data", help="Sample inputs instead (.npz: one array per module "
                                        "input, in order; the first --rows rows are used)."),
    rows: int = typer.Option(2, "--rows", min=1, help="Rows of --data used as samples."),
    input_names: Optional[List[str]] = typer.Option(None, "--input-name", help="Graph input names, in order."),
    output_names: Optional[List[str]] = typer.Option(None, "--output-name", help="Graph output names, in order."),
    opset: int = typer.Option(17, "--opset", min=7, help="Default-domain opset."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Keep the samples' batch size (default: axis 0 "
                                      "is a symbolic 'batch', checked at another size)."),
    rtol: float = typer.Option(1e-4, "--rtol", help="Largest max|ORT - torch| / max|torch| per output."),
    exporter: str = typer.Option("auto", "--exporter", help="auto (TorchScript, then dynamo), torchscript or dynamo."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the export report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
):
    r"""Export a PyTorch module to ONNX, check it in ONNX Runtime against PyTorch, write OUT.

    Checked before writing: onnx.checker, an ONNX Runtime load, every output against PyTorch's on
    the samples (--rtol) and, with a dynamic batch, at another batch size. Over 2 GB it is
    written as OUT + OUT.data. Needs the \[torch] extra: pip install 'onnxcompress\[torch]'."""
    from .export import export as run_export, load_factory, module_file, sample_inputs
    from .model_io import check_output_path

    _setup_logging(quiet)
    # absolute before the user's code runs: a factory that changes folder moves nothing
    output, data, report = (None if p is None else Path(os.path.abspath(p)) for p in (output, data, report))
    inputs = {"--data": data} if data is not None else {}
    src = module_file(factory)
    if src is not None:
        inputs[f"the factory's source ({src.name})"] = src
    _check_out_paths(report=report, inputs=inputs,
                     outputs={"-o": output, "the model's external data": output.with_name(output.name + ".data")})
    with one_line_errors():
        check_output_path(output, protect=tuple(inputs.values()))
        if data is not None and input_shape:
            raise OnnxCompressError("give the sample inputs by --input-shape or by --data, not both")
        if data is None and not input_shape:
            raise OnnxCompressError("give the sample inputs: --input-shape (one per input) or --data FILE.npz")
        if data is not None:
            from .data import read_npz_arrays

            arrays = read_npz_arrays(data)
            xs = [a[:rows] for a in arrays.values()]
            if any(a.shape[0] < rows for a in arrays.values()) and not quiet:
                console.print(f"note: --data has fewer than {rows} rows; using {min(a.shape[0] for a in arrays.values())}",
                              highlight=False)
        else:
            xs = sample_inputs([_shape(s) for s in input_shape], input_dtype)
        module = load_factory(factory)
        res = run_export(module, xs, output, opset=opset, dynamic_batch=not static_batch,
                         input_names=input_names or None, output_names=output_names or None, rtol=rtol,
                         exporter=exporter, protect=tuple(inputs.values()))
    if report:
        _write_json(report, res.report)
    if not quiet:
        r = res.report
        for n in r["notes"]:
            console.print(f"[yellow]note:[/] {escape(n)}", highlight=False)
        worst = max((o["max_rel_error"] for o in r["outputs"]), default=0.0)
        batch = (f"; batch axis checked at batch size {r['dynamic_batch_checked_at']}"
                 if r["dynamic_batch_checked_at"] else "; static batch")
        console.print(f"{r['exporter']} exporter, opset {r['opset']}: ONNX Runtime matches PyTorch (max rel. error "
                      f"{worst:.1e} ≤ {r['rtol']:g}){batch}; {r['parameters']:,} parameters, {r['seconds']:.1f} s",
                      highlight=False)
        console.print(f"[green]wrote[/] {escape(str(res.output))}")
