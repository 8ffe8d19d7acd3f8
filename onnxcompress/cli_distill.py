"""``onnxcompress distill``: train a student to match a teacher (see :mod:`onnxcompress.distill`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .distill_params import BATCH_SIZE, EPOCHS, LOSS, LR, TEMPERATURE
from .cli_common import one_line_errors, _check_out_paths, _fail, _setup_logging, _write_json, app, console
from .errors import OnnxCompressError


@app.command()
def distill(
    teacher: Path = typer.Argument(..., help="Teacher ONNX model (run by ONNX Runtime; never modified)."),
    student: Path = typer.Argument(..., help="Student ONNX model to train, e.g. a pruned output (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the trained student."),
    data: Path = typer.Option(..., "--data", help="Inputs (.npz, the --calibration format); labels not needed."),
    labels_from: Optional[str] = typer.Option(None, "--labels-from", help="Key of integer labels in --data: "
                                              "cross-entropy mixed in with weight --alpha."),
    epochs: int = typer.Option(EPOCHS.default, "--epochs", min=1, help=EPOCHS.help + " A resumed run trains the "
                               "missing ones."),
    loss: str = typer.Option(LOSS.default, "--loss", help=LOSS.help),
    temperature: float = typer.Option(TEMPERATURE.default, "--temperature", help=TEMPERATURE.help),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Weight of the label loss (with "
                                "--labels-from)."),
    lr: float = typer.Option(LR.default, "--lr", help=LR.help),
    batch_size: int = typer.Option(BATCH_SIZE.default, "--batch-size", min=1, help=BATCH_SIZE.help),
    seed: int = typer.Option(0, "--seed", help="Shuffling seed."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="PyTorch threads (default: torch's; 1 is "
                                          "fastest for small students on a busy machine)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="State folder of an earlier run to continue "
                                          "(default state: OUT.distill, which a rerun also continues)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the distillation report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
):
    r"""Distil TEACHER into STUDENT on unlabelled data (PyTorch, CPU), export it to ONNX and write OUT.

    The teacher's outputs are cached once in the state folder; every epoch is checkpointed there.
    Needs the \[torch] extra: pip install 'onnxcompress\[torch]'."""
    from .distill import distill as run_distill

    _setup_logging(quiet)
    if resume is not None and not (resume / "checkpoint.pt").is_file():
        _fail(OnnxCompressError(f"--resume {resume}: no checkpoint there (a state folder of an earlier distill run)"))
    _check_out_paths(report=report, inputs={"teacher model": teacher, "student model": student,
                                            "distillation data": data},
                     outputs={"-o": output, "the model's external data": output.with_name(output.name + ".data")})
    kw = dict(labels=labels_from, epochs=epochs, loss=loss, temperature=temperature, alpha=alpha, lr=lr,
              batch_size=batch_size, seed=seed, state=resume, threads=threads)
    with one_line_errors():
        if quiet:
            res = run_distill(teacher, student, output, data, **kw)
        else:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console) as bar:
                tasks: dict = {}

                def progress(ev):
                    key = ("teacher",) if ev.phase == "teacher" else ("epoch", ev.epoch)
                    if ev.phase == "export":
                        return
                    if key not in tasks:
                        desc = "teacher outputs" if ev.phase == "teacher" else f"epoch {ev.epoch}/{ev.epochs}"
                        tasks[key] = bar.add_task(desc, total=ev.steps, loss="-")
                    loss_s = "-" if ev.loss is None else f"{ev.loss:.4g}"
                    bar.update(tasks[key], completed=ev.step, loss=loss_s)

                res = run_distill(teacher, student, output, data, progress=progress, **kw)
    if report:
        _write_json(report, res.report)
    if not quiet:
        r = res.report
        if r["resumed_from_epoch"] is not None:
            console.print(f"resumed after epoch {r['resumed_from_epoch']}", highlight=False)
        for w in r.get("warnings", []):
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
        ratio = f"{r['loss_ratio']:.1f}× lower" if r.get("loss_ratio") else "no lower"
        console.print(f"loss {r['initial_loss']:.4g} → {r['final_loss']:.4g} ({ratio}) "
                      f"over {r['epochs']} epochs on {r['rows']} rows; export checked in ONNX Runtime (max rel. "
                      f"error {r['export_check']['max_rel_error']:.1e}); {r['seconds']:.1f} s", highlight=False)
        console.print(f"[green]wrote[/] {escape(str(res.output))} (state: {escape(r['state'])})")
