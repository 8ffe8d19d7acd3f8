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
    import importlib
    import importlib.util

    module = _PUBLIC.get(name)
    if module is None:
        # a submodule (``onnxcompress.api``), reachable as an attribute as with the eager imports
        # of 0.1; anything else is a missing name
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'onnxcompress' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC})
