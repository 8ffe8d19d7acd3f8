"""Export a PyTorch module to ONNX with the checks users need (``[torch]`` extra).

:func:`export` runs ``torch.onnx.export`` (the TorchScript exporter first, the dynamo exporter
when it fails, or the one named), then, before anything is written:

1. loads the result with onnxcompress's own loader (external data memory-mapped: models over
   protobuf's 2 GB limit work) and checks it with ``onnx.checker`` and an ONNX Runtime load;
2. runs it in ONNX Runtime (CPU, optimizations off) on the sample inputs and compares every
   output with PyTorch's: max |ORT - torch| / max |torch| must stay within ``rtol``;
3. with a dynamic batch axis, runs it again at another batch size (the samples repeated) and
   compares with PyTorch at that size, the usual export bug being a batch size baked into a
   ``Reshape``;
4. writes it atomically (:func:`onnxcompress.model_io.save_model`; ``OUT`` + ``OUT.data``
   over 2 GB).

Source: PyTorch's ``torch.onnx.export`` (https://pytorch.org/docs/stable/onnx.html).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError, InvalidModelError, OnnxCompressError

#: the default opset of the exported model
OPSET = 17
#: the batch size of the dynamic-axis check
CHECK_BATCH = 3
EXPORTERS = ("auto", "torchscript", "dynamo")


class ExportError(OnnxCompressError):
    """The module cannot be exported, or its export disagrees with it."""


@dataclass
class ExportResult:
    output: Path
    report: dict[str, Any]


@contextlib.contextmanager
def _user_code(what: str):
    """Run the user's code (their module's import, factory, forward): its exceptions, ``sys.exit``
    included, become one-line errors naming ``what``; Ctrl-C stays Ctrl-C."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except OnnxCompressError:
        raise
    except SystemExit as exc:
        raise OnnxCompressError(f"{what} called sys.exit({exc.code!r})") from None
    except BaseException as exc:  # noqa: BLE001 - the user's code: any error is theirs
        text = _clean(str(exc))
        raise OnnxCompressError(f"{what} failed: {type(exc).__name__}: {text}") from None


def _clean(text: str, lines: int = 2) -> str:
    """An exception text for one line: ANSI colour codes removed, the first ``lines`` non-empty
    lines joined, at most 400 characters."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text or "")
    parts = [t.strip() for t in text.splitlines() if t.strip()][:lines]
    return " / ".join(parts)[:400]


def module_file(spec: str) -> Path | None:
    """The source file of ``module`` in ``module:function`` without running it (``None`` when it
    cannot be found; the import says why later)."""
    import importlib.util

    mod_name = spec.partition(":")[0]
    if not mod_name or mod_name.startswith(".") or "/" in mod_name or mod_name.endswith(".py"):
        return None
    try:
        with _cwd_first(), _user_code(f"finding {mod_name!r}"):
            found = importlib.util.find_spec(mod_name)
    except OnnxCompressError:
        return None
    return Path(found.origin) if found is not None and found.origin and found.has_location else None


@contextlib.contextmanager
def _cwd_first():
    """The current folder first on ``sys.path`` while the user's module is found or imported (as
    ``python -m`` does); removed afterwards, even when the import changed folder."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _torch():
    try:
        import torch
    except ImportError:
        raise OnnxCompressError("export needs PyTorch: pip install 'onnxcompress[torch]' "
                                "(torch==2.13.0, the CPU build)") from None
    return torch


def load_factory(spec: str):
    """``module:factory`` -> the ``torch.nn.Module`` that ``factory()`` returns (the current folder
    is searched first, as ``python -m`` does).

    Raises:
        OnnxCompressError: a malformed spec, a module that cannot be imported, a missing or
            failing factory (``sys.exit`` included), or a result that is not a ``torch.nn.Module``.
    """
    torch = _torch()
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name or ":" in fn_name:
        raise OnnxCompressError(f"{spec!r}: give the module factory as module:function (e.g. mynet:build)")
    if "/" in mod_name or mod_name.endswith(".py"):
        raise OnnxCompressError(f"{spec!r}: give the module's import name (mynet for ./mynet.py), not a file path")
    try:
        with _cwd_first(), _user_code(f"importing {mod_name!r}"):
            mod = importlib.import_module(mod_name)
    except OnnxCompressError as exc:
        raise OnnxCompressError(f"cannot import {mod_name!r}: {str(exc).split(' failed: ', 1)[-1]}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise OnnxCompressError(f"{mod_name!r} has no callable {fn_name!r}")
    with _user_code(f"{spec}()"):
        module = fn()
    if not isinstance(module, torch.nn.Module):
        raise OnnxCompressError(f"{spec}() returned {type(module).__name__}, not a torch.nn.Module")
    return module


#: dtypes of generated samples
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def sample_inputs(shapes: Sequence[Sequence[int]], dtype: str = "float32", seed: int = 0) -> list[np.ndarray]:
    """Standard-normal inputs of the given shapes (integers: 0..9; bool: random), one array per
    input, in ``dtype`` (one of :data:`DTYPES`).

    Raises:
        DataError: an unknown dtype, a dimension below 1, or samples larger than half the memory.
    """
    from .data import max_data_bytes

    if dtype not in DTYPES:
        raise DataError(f"--input-dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dt = np.dtype(dtype)
    total = 0
    for s in shapes:
        if not s or any(int(d) < 1 for d in s):
            raise DataError(f"--input-shape {','.join(map(str, s))}: every dimension must be >= 1")
        total += int(np.prod([int(d) for d in s], dtype=object)) * dt.itemsize
    if total > max_data_bytes():
        raise DataError(f"--input-shape: the samples would take {total / 2**30:.1f} GiB, more than half this "
                        "machine's memory")
    rng = np.random.default_rng(seed)
    out = []
    for s in shapes:
        shape = tuple(int(d) for d in s)
        if dt.kind == "b":
            out.append(rng.integers(0, 2, size=shape).astype(bool))
        elif dt.kind in "iu":
            out.append(rng.integers(0, 10, size=shape).astype(dt))
        else:
            out.append(rng.standard_normal(shape, dtype=np.float32).astype(dt))
    return out


def export(module, inputs: Sequence, output: str | os.PathLike, *, opset: int = OPSET, dynamic_batch: bool = True,
           input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
           rtol: float = 1e-4, exporter: str = "auto", protect: Sequence[str | os.PathLike] = ()) -> ExportResult:
    """Export ``module`` on ``inputs``, check it (see the module docstring) and write ``output``.

    Args:
        module: a ``torch.nn.Module`` (put in eval mode).
        inputs: one sample per module argument: numpy arrays or tensors, batch first.
        output: the ``.onnx`` path to write (with ``.data`` beside it over 2 GB).
        opset: the default-domain opset.
        dynamic_batch: axis 0 of every input and output is symbolic (``batch``) and checked at
            another batch size; ``False`` keeps the sample's shapes.
        input_names / output_names: graph names (default ``input_0``..., ``output_0``...).
        rtol: largest allowed max |ORT - torch| / max |torch| per output.
        exporter: ``auto`` (TorchScript, then dynamo), ``torchscript`` or ``dynamo``.
        protect: paths that must never be overwritten.

    Returns:
        :class:`ExportResult`; ``report`` holds the exporter used, opset, the inputs' and outputs'
        names, shapes and dtypes, per-output max relative error and cosine, whether the dynamic
        batch was checked, the file size and the seconds.

    Raises:
        ExportError: neither exporter could export it, or ORT's outputs disagree with PyTorch's.
        InvalidModelError: the exported model fails ``onnx.checker`` or ONNX Runtime's load.
        ModelWriteError: the output cannot be written.
    """
    torch = _torch()
    if exporter not in EXPORTERS:
        raise OnnxCompressError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < float("inf")):
        raise OnnxCompressError(f"--rtol must be a positive finite number, got {rtol!r}")
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if not (isinstance(opset, int) and 7 <= opset <= newest):
        raise OnnxCompressError(f"--opset {opset!r}: the installed onnx {onnx.__version__} knows default-domain "
                                f"opsets 7 to {newest}")
    t0 = time.perf_counter()
    out = Path(output)
    module.eval()
    xs = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in inputs]
    if not xs:
        raise DataError("export needs at least one sample input")
    in_names = list(input_names or [f"input_{i}" for i in range(len(xs))])
    shapes = ", ".join(f"{list(x.shape)} {str(x.dtype).replace('torch.', '')}" for x in xs)
    with torch.no_grad(), _user_code(f"the module on the samples ({shapes})"):
        ref = _as_list(module(*xs))
    out_names = list(output_names or [f"output_{i}" for i in range(len(ref))])
    for kind, names in (("input", in_names), ("output", out_names)):
        if len(set(names)) != len(names) or not all(names):
            raise OnnxCompressError(f"{kind} names must be distinct and not empty, got {names}")
    if len(in_names) != len(xs) or len(out_names) != len(ref):
        raise OnnxCompressError(f"{len(in_names)} input name(s) for {len(xs)} input(s), {len(out_names)} output "
                                f"name(s) for {len(ref)} output(s)")
    from .model_io import check_model, load_model, save_model

    folder = out.parent if str(out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=".onnxcompress-export-", dir=folder) as tmp:
        path = Path(tmp) / "model.onnx"
        used = _run_exporter(torch, module, xs, path, in_names, out_names, opset, dynamic_batch, exporter)
        model = load_model(path)
        check_model(model, runtime=True)
        got_opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", opset))
        errors = _compare(model, xs, ref, in_names, out_names, rtol)
        batch_check = None
        if dynamic_batch:
            n_big = CHECK_BATCH * _rows(xs)
            hint = ("a batch size is likely baked into the module or the graph (x.view(1, ...), a Reshape "
                    "constant): fix the module or export with --static-batch")
            big = [x.repeat_interleave(CHECK_BATCH, 0) if x.ndim else x for x in xs]
            try:
                with torch.no_grad(), _user_code(f"the module at batch {n_big}"):
                    ref_big = _as_list(module(*big))
            except OnnxCompressError as exc:
                raise ExportError(f"{exc}; axis 0 must be the batch for a dynamic batch: {hint}") from None
            for n, r, rb in zip(out_names, ref, ref_big):
                if r.ndim and rb.shape[0] != CHECK_BATCH * r.shape[0]:
                    raise ExportError(f"output {n!r} has {rb.shape[0]} rows at batch {n_big} (and {r.shape[0]} at "
                                      f"{_rows(xs)}): its axis 0 does not follow the batch; {hint}")
            try:
                _compare(model, big, ref_big, in_names, out_names, rtol)
            except OnnxCompressError as exc:
                raise ExportError(f"the export does not hold at batch {n_big} ({exc}); {hint}") from None
            batch_check = n_big
        size = save_model(model, out, protect=tuple(protect))
        del model
    notes = [] if got_opset == opset else [f"the {used} exporter wrote opset {got_opset}, not the {opset} asked for "
                                             "(it cannot convert this graph to that opset)"]
    report = {"output": str(out), "exporter": used, "opset": got_opset, "opset_asked": opset, "notes": notes,
              "dynamic_batch": dynamic_batch,
              "dynamic_batch_checked_at": batch_check,
              "inputs": [{"name": n, "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
                         for n, x in zip(in_names, xs)],
              "outputs": [{"name": n, "shape": list(r.shape), **errors[n]} for n, r in zip(out_names, ref)],
              "rtol": rtol, "file_bytes": size, "parameters": int(sum(p.numel() for p in module.parameters())),
              "seconds": round(time.perf_counter() - t0, 2)}
    return ExportResult(out, report)


def _rows(xs) -> int:
    return int(xs[0].shape[0]) if xs and xs[0].ndim else 1


def _as_list(y) -> list:
    import torch

    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in y):
        return list(y)
    raise ExportError(f"the module returns {type(y).__name__}; export needs a tensor or a tuple/list of tensors")


def _ident(name: str) -> str:
    """A dim name as a Python identifier (``torch.export.Dim`` wants one)."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() else "d_" + out


def _run_exporter(torch, module, xs, path: Path, in_names, out_names, opset, dynamic_batch, exporter,
                  axes: dict[str, dict[int, str]] | None = None) -> str:
    """Export with the first exporter of ``exporter`` that works; returns its kind. ``axes``
    (name -> {axis: dim name}) replaces ``dynamic_batch``'s batch-only dynamic axes."""
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[exporter]
    errors = []
    for kind in order:
        try:
            with warnings.catch_warnings(), _quiet(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                if kind == "dynamo":
                    if axes is not None:
                        dims: dict[str, object] = {}
                        shapes = tuple({a: dims.setdefault(d, torch.export.Dim(_ident(d))) for a, d in axes.get(n, {}).items()}
                                       or None for n in in_names)
                        dynamic_batch = True
                    else:
                        shapes = tuple({0: torch.export.Dim("batch")} if dynamic_batch and x.ndim else None for x in xs)
                    torch.onnx.export(module, tuple(xs), str(path), input_names=in_names, output_names=out_names,
                                      opset_version=opset, dynamo=True, external_data=True,
                                      dynamic_shapes=shapes if dynamic_batch else None, verbose=False)
                else:
                    dyn = {n: {0: "batch"} for n in [*in_names, *out_names]} if dynamic_batch else None
                    if axes is not None:
                        dyn = {n: dict(a) for n, a in axes.items() if a}
                    torch.onnx.export(module, tuple(xs), str(path), input_names=in_names, output_names=out_names,
                                      opset_version=opset, dynamo=False, dynamic_axes=dyn)
            if path.is_file():
                return kind
            errors.append(f"{kind} exporter: wrote nothing")
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:
            raise OnnxCompressError(f"the module called sys.exit({exc.code!r}) during the export") from None
        except Exception as exc:  # the exporter's refusal, whatever its type
            cause = exc
            while cause is not None:  # Ctrl-C inside the exporter comes back wrapped
                if isinstance(cause, KeyboardInterrupt):
                    raise KeyboardInterrupt from None
                cause = cause.__cause__ or cause.__context__
            errors.append(f"{kind} exporter: {type(exc).__name__}: {_clean(str(exc)) or '(no message)'}")
    raise ExportError("torch.onnx.export failed: " + "; ".join(errors))


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' loggers (the dynamo exporter's onnxscript version converter logs a
    traceback when it cannot convert to the asked opset and keeps its own)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _compare(model, xs, ref, in_names, out_names, rtol) -> dict[str, dict]:
    """Per output: max relative error and cosine of ORT (CPU, optimizations off) vs ``ref``."""
    from .runtime import make_session

    sess = make_session(model, optimize=False)
    want = {i.name for i in sess.get_inputs()}
    feed = {n: x.detach().numpy() for n, x in zip(in_names, xs) if n in want}
    try:
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    except Exception as exc:  # ORT's refusal
        raise ExportError(f"ONNX Runtime cannot run the export: {str(exc).strip().splitlines()[0][:300]}") from None
    res = {}
    for n, r in zip(out_names, ref):
        r = r.detach().numpy()
        g = got.get(n)
        if g is None or np.shape(g) != r.shape:
            raise ExportError(f"output {n!r}: ONNX Runtime gives shape {None if g is None else list(np.shape(g))}, "
                              f"PyTorch {list(r.shape)}")
        r64, g64 = r.astype(np.float64).ravel(), np.asarray(g, np.float64).ravel()
        scale = max(float(np.abs(r64).max()) if r64.size else 0.0, 1e-12)
        rel = float(np.abs(g64 - r64).max()) / scale if r64.size else 0.0
        den = float(np.linalg.norm(r64) * np.linalg.norm(g64))
        cos = float(r64 @ g64) / den if den > 0 else (1.0 if not np.any(r64) and not np.any(g64) else 0.0)
        if not rel <= rtol:
            raise ExportError(f"output {n!r}: max relative error {rel:.2e} > {rtol:g} between ONNX Runtime and PyTorch")
        res[n] = {"max_rel_error": rel, "cosine": cos}
    return res


__all__ = ["export", "load_factory", "sample_inputs", "ExportResult", "ExportError", "InvalidModelError"]
