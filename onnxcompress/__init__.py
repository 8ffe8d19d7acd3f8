"""onnxcompress: make trained ONNX models smaller and faster, and prove the result.

Public API::

    from onnxcompress import optimize, OptimizeOptions, inspect_model, compare
"""

__version__ = "0.2.0"

from .api import OptimizeOptions, OptimizeResult, optimize  # noqa: E402
from .errors import OnnxCompressError  # noqa: E402
from .inspect import inspect_model, summarize  # noqa: E402
from .validate import compare  # noqa: E402

__all__ = ["OptimizeOptions", "OptimizeResult", "optimize", "inspect_model", "summarize", "compare",
           "OnnxCompressError", "__version__"]
