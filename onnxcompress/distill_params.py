"""The distillation knobs, declared once (:mod:`onnxcompress.params`): the ``distill`` recipe stage
(:mod:`onnxcompress.passes.distill_stage`), ``optimize --distill`` and ``onnxcompress distill``'s
flags read these. A light module: the CLI imports it at start-up."""

from __future__ import annotations

from .params import Param

EPOCHS = Param("epochs", 10, "Distillation epochs over the data (each a pass over every row).", kind="int", low=1)
#: the flat option (``optimize --distill N``): a ``distill`` stage of N epochs after pruning / low-rank
DISTILL = Param("distill", None, "Distill after pruning or low-rank: train the model for this many epochs to "
                "reproduce the input model (the teacher) on the calibration rows, before int8 (needs the torch extra: PyTorch and onnx2torch).",
                kind="int", low=1, optional=True, flag="--distill")
LOSS = Param("loss", "auto", "Distillation loss: auto (KL at the temperature for class scores (batch x classes), "
             "MSE otherwise), or kl, mse, cosine for every output.", kind="str", choices=("auto", "kl", "mse", "cosine"))
TEMPERATURE = Param("temperature", 4.0, "Softmax temperature T of the KL loss (Hinton et al. 2015; the loss is scaled "
                    "by T^2).",
                    kind="float", low=0.0, low_open=True, high=1000.0)
LR = Param("lr", 1e-3, "Adam learning rate of the distillation.", kind="float", low=0.0, low_open=True, high=10.0)
BATCH_SIZE = Param("batch_size", 64, "Rows per distillation step.", kind="int", low=1)
