"""onnxcompress: make trained ONNX models smaller and faster, and prove the result.

Public API::

    from onnxcompress import optimize, OptimizeOptions, inspect_model, compare

The names are imported on first use (PEP 562), so that ``import onnxcompress.cli`` and
``onnxcompress --help`` do not pay for onnx, onnx-ir and ONNX Runtime.
"""

__version__ = "0.2.0"

#: public name -> the module that defines it
_PUBLIC = {
    "OptimizeOptions": "api", "OptimizeResult": "api", "optimize": "api",
    "OnnxCompressError": "errors",
    "inspect_model": "inspect", "summarize": "inspect",
    "compare": "validate",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxcompress' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC})
