"""The ``distill`` recipe stage: train the model as it stands (a pruned or low-rank student) to
reproduce the input model (the teacher) on the calibration data, so that ``optimize`` runs
prune -> distill -> quantize in one command.

Knowledge distillation after Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural
Network"): KL divergence between the softmax outputs at temperature T (scaled by T²) for class
scores, MSE for other outputs (:func:`onnxcompress.distill.distill`, which this stage calls; the
``[torch]`` extra). The student is converted with onnx2torch, trained on CPU, exported back to
ONNX and checked against torch in ONNX Runtime before it replaces the model.

The knobs are declared once in :mod:`onnxcompress.distill_params`; ``onnxcompress distill``'s
flags take their defaults and help from the same declarations.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..distill_params import BATCH_SIZE, DISTILL, EPOCHS, LOSS, LR, TEMPERATURE  # noqa: F401 - DISTILL re-exported
from .base import CompressionPass

@dataclass
class DistillConfig:
    epochs: int = EPOCHS.field()
    loss: str = LOSS.field()
    temperature: float = TEMPERATURE.field()
    lr: float = LR.field()
    batch_size: int = BATCH_SIZE.field()


def _stack(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Feed dicts -> one array per input, rows concatenated along the first axis (the ``.npz``
    layout of ``--calibration``).

    Raises:
        ValueError: samples whose shapes differ past the first axis (they cannot be batched).
    """
    names = list(feeds[0])
    out = {}
    for n in names:
        parts = [np.asarray(f[n]) for f in feeds if n in f]
        if any(p.ndim == 0 or p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError(f"the calibration samples of input '{n}' differ in shape past the first axis; "
                             "distillation batches rows")
        out[n] = np.concatenate(parts)
    return out


class DistillPass(CompressionPass):
    """Replace the model with its distilled version (a lossy stage: validation and the gates judge it).

    Reads ``context.teacher`` (the input model, set by the pipeline) and ``context.calibration``
    (the rows the student trains on: their first axis is the batch). The teacher, the student and
    the rows go to a private temporary folder that is removed afterwards (onnx2torch and ONNX
    Runtime read files); nothing the user named is written.

    Report counts: ``rows``, ``epochs``, ``initial_loss``, ``final_loss``, ``loss_ratio``,
    ``export_max_rel_error``, ``train_seconds``, ``parameters``.

    Raises (the runner reverts the stage and the report names the reason):
        DistillError: torch or onnx2torch missing, an op onnx2torch cannot convert, a student that
            cannot take batches of ``batch_size`` rows, a loss that became non-finite.
    """

    name = "distill"
    checked = False
    Config = DistillConfig

    def apply(self, model: ir.Model) -> bool:
        from ..distill import distill
        from ..model_io import load_model, save_model
        from ..progress import tick

        teacher = self.context.teacher
        feeds = self.context.calibration
        if teacher is None or not feeds:
            self.report.skip("model", "no teacher or no calibration rows to distill on")
            return False
        c = self.config
        try:
            rows = _stack(feeds)
        except ValueError as exc:
            self.report.skip("model", str(exc))
            return False

        def progress(ev) -> None:
            if ev.phase == "epoch":
                tick("distillation", ev.epoch, ev.epochs, "epochs")

        with tempfile.TemporaryDirectory(prefix="onnxcompress-distill-") as tmp:
            folder = Path(tmp)
            save_model(teacher, folder / "teacher.onnx")
            save_model(model, folder / "student.onnx")
            with open(folder / "rows.npz", "wb") as f:
                np.savez(f, **rows)
            del rows
            res = distill(folder / "teacher.onnx", folder / "student.onnx", folder / "distilled.onnx",
                          folder / "rows.npz", epochs=c.epochs, loss=c.loss, temperature=c.temperature, lr=c.lr,
                          batch_size=c.batch_size, state=folder / "state", resume=False, progress=progress)
            new = load_model(folder / "distilled.onnx")
            _materialize(new)
        r = res.report
        self.report.counts.update(rows=r["rows"], epochs=r["epochs"], initial_loss=round(r["initial_loss"], 6),
                                  final_loss=round(r["final_loss"], 6),
                                  loss_ratio=round(r["loss_ratio"], 3) if r["loss_ratio"] else None,
                                  export_max_rel_error=r["export_check"]["max_rel_error"],
                                  train_seconds=r["train_seconds"], parameters=r["parameters"])
        for w in r["warnings"]:
            self.report.skip("model", w)
        model.graph = new.graph
        model.ir_version = new.ir_version
        model.functions.clear()
        model.functions.update(new.functions)
        return True


def _materialize(model: ir.Model) -> None:
    """Read every initializer into memory (the temporary folder its external data may lie in is
    about to go)."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            v.const_value = ir.tensor(np.array(t.numpy()), name=t.name)
