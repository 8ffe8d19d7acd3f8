"""Errors raised by onnxcompress.

Every error a user can cause (bad path, corrupt model, wrong calibration data, a missed
fidelity gate) derives from :class:`OnnxCompressError`; the CLI prints its message on one
line and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OnnxCompressError(Exception):
    """Base class of the errors a user can cause; the message is meant for the user."""

    exit_code = 2


class ModelLoadError(OnnxCompressError):
    """The input model is missing, unreadable, not ONNX, or refers to missing external data."""


class ModelWriteError(OnnxCompressError):
    """The output model could not be written (bad path, read-only folder, disk full)."""


class InvalidModelError(OnnxCompressError):
    """A rewritten model failed ``onnx.checker`` or ONNX Runtime refused to load it."""


class DataError(OnnxCompressError):
    """Calibration or validation data does not match the model's inputs."""


class ConversionError(OnnxCompressError):
    """An opset conversion cannot be made exact, so it is refused."""


class GateFailedError(OnnxCompressError):
    """The optimized model missed a fidelity gate (``--min-cosine`` and the like)."""

    exit_code = 3
