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

#: times the stage retries a first epoch that did not lower the loss, each at a tenth of the rate
LR_BACKOFF = 2
#: a starting loss at or below this: the model is its teacher (no lossy stage changed it)
NOTHING_TO_WIN = 1e-9


@dataclass
class DistillConfig:
    epochs: int = EPOCHS.field()
    loss: str = LOSS.field()
    temperature: float = TEMPERATURE.field()
    lr: float = LR.field()
    batch_size: int = BATCH_SIZE.field()


def _rows(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Feed dicts -> the ``.npz`` arrays of ``--calibration``: one array per input with the rows
    concatenated along the first axis when every sample has one shape past it; otherwise the
    ragged layout (``<i>__<input>``, one feed per sample), which distillation trains on in groups
    of one shape (sentences of different token lengths)."""
    names = list(feeds[0])
    if all(np.ndim(f[n]) > 0 and np.shape(f[n])[1:] == np.shape(feeds[0][n])[1:] for f in feeds for n in names):
        return {n: np.concatenate([np.asarray(f[n]) for f in feeds]) for n in names}
    return {f"{i}__{n}": np.asarray(f[n]) for i, f in enumerate(feeds) for n in names}


class DistillPass(CompressionPass):
    """Replace the model with its distilled version (a lossy stage: validation and the gates judge it).

    Reads ``context.teacher`` (the input model, set by the pipeline) and ``context.calibration``
    (the rows the student trains on: their first axis is the batch). The teacher, the student and
    the rows go to a private temporary folder that is removed afterwards (onnx2torch and ONNX
    Runtime read files); nothing the user named is written.

    The first epoch runs alone; while it does not lower the loss (or diverges) it is run again from
    the start at a tenth of the learning rate, up to :data:`LR_BACKOFF` times (a rate that suits a
    CNN makes a transformer's loss rise: all-MiniLM-L6-v2 low-rank, 1e-3 raised it 0.049 -> 0.142,
    1e-4 lowered it to 0.029); the other epochs then continue from it.

    Report counts: ``rows``, ``epochs``, ``initial_loss``, ``final_loss``, ``loss_ratio``,
    ``export_max_rel_error``, ``train_seconds``, ``parameters``, ``names_kept`` (nodes given their
    names back), ``opset`` (``"13 -> 17"`` where the export changed it), ``lr`` (the rate trained
    at) and ``lr_tried_first`` (rates whose first epoch did not lower the loss).

    Raises (the runner reverts the stage and the report names the reason):
        DistillError: torch or onnx2torch missing, an op onnx2torch cannot convert, a student that
            cannot take batches of ``batch_size`` rows, a loss that became non-finite.
    """

    name = "distill"
    checked = False
    Config = DistillConfig

    def apply(self, model: ir.Model) -> bool:
        from ..data import save_npz
        from ..distill import DistillError, _onnx2torch, _torch, distill
        from ..model_io import load_model, save_model
        from ..progress import tick

        teacher = self.context.teacher
        feeds = self.context.calibration
        if teacher is None or not feeds:
            self.report.skip("", "no teacher or no calibration rows to distill on")
            return False
        fixed = [(v.name, v.shape[0]) for v in model.graph.inputs  # (-1: "unknown" in Paddle's exports)
                 if v.shape is not None and len(v.shape) and isinstance(v.shape[0], int) and v.shape[0] > 0]
        if fixed:
            name, n = fixed[0]
            self.report.skip("", f"input '{name}' has a fixed batch size of {n}: distillation trains on "
                             "batches of rows (export the model with a dynamic batch axis)")
            return False
        _torch(), _onnx2torch()  # DistillError (the stage is reverted) before any file is written
        c = self.config
        rows = _rows(feeds)
        before = _signature(model)

        def progress(ev) -> None:
            if ev.phase == "epoch":
                tick("distillation", ev.epoch, c.epochs, "epochs")

        with tempfile.TemporaryDirectory(prefix="onnxcompress-distill-") as tmp:
            folder = Path(tmp)
            save_model(teacher, folder / "teacher.onnx", check=False)
            save_model(model, folder / "student.onnx", check=False)
            save_npz(folder / "rows.npz", rows)
            del rows
            # the first epoch, at lr and then at a tenth of it while it does not lower the loss (a
            # learning rate good for a CNN makes a transformer's loss rise); then the rest, resumed
            def run(epochs: int, lr: float, resume: bool):
                return distill(folder / "teacher.onnx", folder / "student.onnx", folder / "distilled.onnx",
                               folder / "rows.npz", epochs=epochs, loss=c.loss, temperature=c.temperature, lr=lr,
                               batch_size=c.batch_size, state=folder / "state", resume=resume, progress=progress)

            lr, tried, spent, res = c.lr, [], 0.0, None
            for _ in range(LR_BACKOFF + 1):
                try:
                    res = run(1, lr, resume=False)
                except DistillError as exc:
                    if not str(exc).startswith("the loss became"):
                        raise
                    res = None  # diverged: as a loss that did not go down
                if res is not None:
                    spent += res.report["train_seconds"]
                    if res.report["final_loss"] < res.report["initial_loss"]:
                        break
                    if abs(res.report["initial_loss"]) <= NOTHING_TO_WIN:
                        self.report.skip("", f"the model already matches its teacher (loss "
                                         f"{res.report['initial_loss']:.3g}): nothing to win back, the model is kept")
                        return False
                tried.append(lr)
                lr /= 10
            if res is None:
                self.report.skip("", f"distillation diverged in its first epoch at lr {', '.join(f'{x:g}' for x in tried)}:"
                                 " the model before it is kept")
                return False
            if len(tried) <= LR_BACKOFF and c.epochs > 1:
                res = run(c.epochs, lr, resume=True)
                spent += res.report["train_seconds"]
            r = dict(res.report, train_seconds=round(spent, 2))
            if tried:
                self.report.counts["lr_tried_first"] = tried
            if len(tried) <= LR_BACKOFF:
                self.report.counts["lr"] = lr
            if r.get("rows_not_trained_per_epoch"):
                self.report.counts["rows_not_trained_per_epoch"] = r["rows_not_trained_per_epoch"]
            self.report.counts.update(rows=r["rows"], epochs=r["epochs"], initial_loss=round(r["initial_loss"], 6),
                                      final_loss=round(r["final_loss"], 6),
                                      loss_ratio=round(r["loss_ratio"], 3) if r["loss_ratio"] else None,
                                      train_seconds=r["train_seconds"], parameters=r["parameters"])
            if not r["final_loss"] < r["initial_loss"]:
                at = (f" in its first epoch at lr {', '.join(f'{x:g}' for x in tried)}" if len(tried) > LR_BACKOFF
                      else "")
                self.report.skip("", f"distillation did not lower the loss{at} ({r['initial_loss']:.4g} -> "
                                 f"{r['final_loss']:.4g}): the model before it is kept (lower lr, or fewer epochs)")
                return False
            new = load_model(folder / "distilled.onnx")
            _materialize(new)
            tick("distillation", r["epochs"], r["epochs"], "epochs")  # the stage line counts epochs, not tensors
        after = _signature(new)
        lost = _lost_axes(before, after)
        if lost:
            raise DistillError("the distilled model's inputs/outputs differ from the model's: " + "; ".join(lost[:4]))
        self.report.counts["export_max_rel_error"] = r["export_check"]["max_rel_error"]
        self.report.counts["names_kept"] = _restore_names(model, new)
        old_opset, new_opset = model.opset_imports.get("", None), new.opset_imports.get("", None)
        if old_opset != new_opset:  # PyTorch's exporter writes its own opset
            self.report.counts["opset"] = f"{old_opset} -> {new_opset}"
        model.graph = new.graph
        model.ir_version = new.ir_version
        model.functions.clear()
        model.functions.update(new.functions)
        gone = sorted(n for n in self.context.scope.nodes if not any(x.name == n for x in model.graph))
        if gone:
            self.report.skip("", "node names given to --exclude are not in the distilled model (PyTorch's "
                             "export names nodes anew), so they exclude nothing after this stage: "
                             + ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else "") + " (exclude op types, "
                             "or quantize the distilled model in a second run)")
        return True


def _restore_names(old: ir.Model, new: ir.Model) -> int:
    """Give the exported nodes their names from before the stage: onnx2torch names each module after
    its node and PyTorch's exporter names the node ``<module>/<op type>`` (``/3/Conv`` becomes
    ``/3/Conv/Conv``); where that module name is a node of the same op type before, the name
    comes back, so reports, ``--exclude`` and the fallback keep naming the same nodes. Returns
    how many were renamed."""
    before = {n.name: n.op_type for n in old.graph}
    used = {n.name for n in new.graph}
    renamed = 0
    for node in new.graph:
        if node.name in before:
            continue
        base, sep, tail = (node.name or "").rpartition("/")
        if sep and tail == node.op_type and before.get(base) == node.op_type and base not in used:
            used.discard(node.name)
            node.name = base
            used.add(base)
            renamed += 1
    return renamed


def _signature(model: ir.Model) -> dict:
    """Graph inputs and outputs: name -> (dtype, per axis: the fixed size or ``None``)."""
    def one(v):
        dims = None if v.shape is None else tuple(d if isinstance(d, int) else None for d in v.shape)
        return v.dtype, dims
    return {"in": {v.name: one(v) for v in model.graph.inputs}, "out": {v.name: one(v) for v in model.graph.outputs}}


def _lost_axes(before: dict, after: dict) -> list[str]:
    """What the distilled model no longer takes or gives: a missing name, another dtype or rank,
    an axis that was free and became fixed (a fixed axis that became free is a widening)."""
    out = []
    for side in ("in", "out"):
        for name, (dtype, dims) in before[side].items():
            if name not in after[side]:
                out.append(f"{'input' if side == 'in' else 'output'} '{name}' is missing")
                continue
            dtype2, dims2 = after[side][name]
            if dtype is not None and dtype2 is not None and dtype != dtype2:
                out.append(f"'{name}' is {dtype2}, was {dtype}")
            elif dims is not None and dims2 is not None:
                if len(dims) != len(dims2):
                    out.append(f"'{name}' has rank {len(dims2)}, was {len(dims)}")
                else:
                    out += [f"axis {k} of '{name}' is fixed at {b}, was free" for k, (a, b) in
                            enumerate(zip(dims, dims2)) if a is None and b is not None]
    return out


def _materialize(model: ir.Model) -> None:
    """Read every initializer into memory (the temporary folder its external data may lie in is
    about to go)."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            v.const_value = ir.tensor(np.array(t.numpy()), name=t.name)
