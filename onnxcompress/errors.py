"""Errors raised by onnxcompress.

Every error a user can cause (bad path, corrupt model, wrong calibration data, a missed
fidelity gate) derives from :class:`OnnxCompressError`; the CLI prints its message on one
line and exits non-zero: 2 for bad input, 3 for a missed gate. Anything else is the tool's own
failure: the CLI reports it as :class:`InternalError` (exit 1, one line; ``--debug`` keeps the
traceback).
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


class InternalError(OnnxCompressError):
    """A failure that is not the user's input: a bug, a library or runtime limit the tool hit
    (exit code 1, never the bad-input code 2)."""

    exit_code = 1


class GateFailedError(OnnxCompressError):
    """The optimized model missed a fidelity gate (``--min-cosine`` and the like)."""

    exit_code = 3
