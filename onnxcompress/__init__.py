"""onnxcompress: make trained ONNX models smaller and faster, and prove the result.

Public API::

    from onnxcompress import optimize, OptimizeOptions, inspect_model, compare

The names are imported on first use (PEP 562), so that ``import onnxcompress.cli`` and
``onnxcompress --help`` do not pay for onnx, onnx-ir and ONNX Runtime.
"""

import sys as _sys
import threading as _threading
import types as _types
import weakref as _weakref

__version__ = "0.2.0"


def _defer_sympy() -> None:
    """Let onnx-ir import SymPy on first use instead of at import (the command line only).

    onnx-ir (1.1) imports SymPy eagerly (``onnx_ir/_core.py``, ``onnx_ir/_symbolic_shapes.py``)
    but uses it only for arithmetic on symbolic dimensions (``SymbolicDim + 1``, parsing
    ``"N*2"``), which onnxcompress never does on its common paths. The import is 0.2-0.4 s of
    every command's start-up (about a third of ``import onnx_ir``). A finder at the head of
    ``sys.meta_path`` (:class:`_DeferringFinder`) hands both modules to the import system as
    :class:`_Deferred` modules, executed on their first attribute access, so anything that does
    use SymPy gets the real module. (The standard library's ``importlib.util.LazyLoader``
    cannot serve: an ``import sympy`` statement reads the module's ``__spec__``, which makes it
    load at once.) Nothing is done when SymPy or onnx-ir is already imported.

    Called when the command line's module (:mod:`onnxcompress.cli`) is imported, before a command
    imports onnx-ir, not on ``import onnxcompress``: a library user's threads could import a SymPy submodule while
    another executes SymPy (the stand-in's lock and the import system's module locks would
    deadlock), or ``importlib.reload`` it; the command's own threads never touch SymPy.
    """
    if "sympy" in _sys.modules or "onnx_ir" in _sys.modules:
        return
    _sys.meta_path.insert(0, _DeferringFinder({"sympy", "onnx_ir._symbolic_shapes"}))


class _DeferringFinder:
    """Finds each of ``names`` once with the other finders and wraps its loader in a
    :class:`_DeferringLoader`; leaves ``sys.meta_path`` when all were found."""

    def __init__(self, names: set[str]) -> None:
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        self.names.discard(name)
        if not self.names and self in _sys.meta_path:
            _sys.meta_path.remove(self)
        for finder in list(_sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _DeferringLoader(spec.loader)
        return spec


class _DeferringLoader:
    """Loader whose ``exec_module`` only marks the module :class:`_Deferred`; the wrapped loader
    executes it on first use (and directly on a reload)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.deferred = False

    def create_module(self, spec):
        return self.loader.create_module(spec) if hasattr(self.loader, "create_module") else None

    def exec_module(self, module) -> None:
        if self.deferred or type(module) is not _types.ModuleType:  # a reload, or an unusual module type
            self.loader.exec_module(module)
            return
        self.deferred = True
        module.__class__ = _Deferred

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)


class _Deferred(_types.ModuleType):
    """A module not yet executed: the first access to an attribute other than those the import
    system reads to find it (``__spec__``, ``__name__``, ...) executes it in place, under a lock
    (another thread waits; the executing thread's own accesses pass through), then it becomes a
    plain module. Importing a submodule first reads ``__path__``, so the package runs first (and
    the import system then executes that submodule a second time; SymPy's package files only
    re-export names, so this is harmless). An error while executing is raised, and again (as an
    ImportError naming it) on every later access."""

    _IMPORT_SYSTEM = frozenset({"__spec__", "__name__", "__class__", "__dict__", "__loader__", "__package__"})

    def __getattribute__(self, attr):
        get = _types.ModuleType.__getattribute__
        if attr in _Deferred._IMPORT_SYSTEM:
            return get(self, attr)
        with _DEFER_LOCK:
            if type(self) is _Deferred:
                state = _DEFER_STATE.get(self)
                if state == "executing":  # the executing thread itself (it holds the lock)
                    return get(self, attr)
                spec = get(self, "__spec__")
                if isinstance(state, BaseException):
                    raise ImportError(f"module {spec.name!r} failed to execute: {state}") from state
                _DEFER_STATE[self] = "executing"
                try:
                    spec.loader.loader.exec_module(self)
                except BaseException as exc:
                    _DEFER_STATE[self] = exc
                    raise
                del _DEFER_STATE[self]
                object.__setattr__(self, "__class__", _types.ModuleType)
        return getattr(self, attr)


_DEFER_LOCK = _threading.RLock()
_DEFER_STATE: "_weakref.WeakKeyDictionary" = _weakref.WeakKeyDictionary()

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
