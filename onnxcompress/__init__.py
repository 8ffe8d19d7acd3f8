"""onnxcompress: make trained ONNX models smaller and faster, and prove the result.

Public API::

    from onnxcompress import optimize, OptimizeOptions, inspect_model, compare

The names are imported on first use (PEP 562), so that ``import onnxcompress.cli`` and
``onnxcompress --help`` do not pay for onnx, onnx-ir and ONNX Runtime.
"""

import sys as _sys
import threading as _threading
import types as _types

__version__ = "0.2.0"


def _defer_sympy() -> None:
    """Let onnx-ir import SymPy on first use instead of at import.

    onnx-ir (1.1) imports SymPy eagerly (``onnx_ir/_core.py``, ``onnx_ir/_symbolic_shapes.py``)
    but uses it only for arithmetic on symbolic dimensions (``SymbolicDim + 1``, parsing
    ``"N*2"``), which onnxcompress never does on its common paths. The import is 0.2-0.4 s of
    every command's start-up (about a third of ``import onnx_ir``). Both modules are put in
    ``sys.modules`` as :class:`_Deferred` stand-ins that execute the real module on the first
    attribute access, so anything that does use SymPy gets the real module, unchanged.
    (The standard library's ``importlib.util.LazyLoader`` cannot serve: an ``import sympy``
    statement reads the module's ``__spec__``, which makes it load at once.) Nothing is done
    when SymPy or onnx-ir is already imported or cannot be found.
    """
    import importlib.util
    import os

    if "sympy" in _sys.modules or "onnx_ir" in _sys.modules:
        return
    try:
        specs = [importlib.util.find_spec("sympy"), importlib.util.find_spec("onnx_ir")]
    except (ImportError, ValueError):
        return
    if None in specs or not specs[1].submodule_search_locations:
        return
    # the submodule's spec without importing its package (find_spec would run onnx_ir, and
    # with it the eager import this is about)
    path = os.path.join(list(specs[1].submodule_search_locations)[0], "_symbolic_shapes.py")
    if not os.path.isfile(path):
        return
    specs[1] = importlib.util.spec_from_file_location("onnx_ir._symbolic_shapes", path)
    for spec in specs:
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return
    for spec in specs:
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _Deferred
        _sys.modules[spec.name] = module


class _Deferred(_types.ModuleType):
    """A module in ``sys.modules`` not yet executed: the first access to an attribute other than
    those the import system reads to find it (``__spec__``, ``__name__``, ...) executes it in
    place (its class becomes a plain module) and returns the attribute; importing a submodule
    reads ``__path__``, so it executes the package first. An error while executing removes it
    from ``sys.modules`` and is raised, as a failed import would be."""

    _IMPORT_SYSTEM = frozenset({"__spec__", "__name__", "__class__", "__dict__", "__loader__", "__package__"})

    def __getattribute__(self, attr):
        if attr in _Deferred._IMPORT_SYSTEM:
            return object.__getattribute__(self, attr)
        with _DEFER_LOCK:
            if type(self) is _Deferred:
                spec = object.__getattribute__(self, "__spec__")
                object.__setattr__(self, "__class__", _types.ModuleType)
                try:
                    spec.loader.exec_module(self)
                except BaseException:
                    _sys.modules.pop(spec.name, None)
                    raise
        return getattr(self, attr)


_DEFER_LOCK = _threading.RLock()

_defer_sympy()

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
