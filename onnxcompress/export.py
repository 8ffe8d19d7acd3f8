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
            failing factory, or a result that is not a ``torch.nn.Module``.
    """
    torch = _torch()
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise OnnxCompressError(f"{spec!r}: give the module factory as module:function (e.g. mynet:build)")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # the user's module: any error is theirs, said in one line
        raise OnnxCompressError(f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(os.getcwd())
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise OnnxCompressError(f"{mod_name!r} has no callable {fn_name!r}")
    try:
        module = fn()
    except Exception as exc:
        raise OnnxCompressError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise OnnxCompressError(f"{spec}() returned {type(module).__name__}, not a torch.nn.Module")
    return module


def sample_inputs(shapes: Sequence[Sequence[int]], dtype: str = "float32", seed: int = 0) -> list[np.ndarray]:
    """Standard-normal inputs of the given shapes (integers: 0..9), one array per input."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    out = []
    for s in shapes:
        if any(int(d) < 1 for d in s):
            raise DataError(f"--input-shape {','.join(map(str, s))}: every dimension must be >= 1")
        out.append(rng.integers(0, 10, size=tuple(s)).astype(dt) if dt.kind in "iu" else
                   rng.standard_normal(tuple(s)).astype(dt))
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
    t0 = time.perf_counter()
    out = Path(output)
    module.eval()
    xs = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in inputs]
    if not xs:
        raise DataError("export needs at least one sample input")
    in_names = list(input_names or [f"input_{i}" for i in range(len(xs))])
    with torch.no_grad():
        ref = _as_list(module(*xs))
    out_names = list(output_names or [f"output_{i}" for i in range(len(ref))])
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
            big = [x.repeat_interleave(CHECK_BATCH, 0) if x.ndim else x for x in xs]
            with torch.no_grad():
                ref_big = _as_list(module(*big))
            try:
                _compare(model, big, ref_big, in_names, out_names, rtol)
            except (ExportError, OnnxCompressError) as exc:
                raise ExportError(f"the export does not hold at batch {CHECK_BATCH * _rows(xs)} ({exc}); a batch size "
                                  "is likely baked into the graph (x.view(1, ...), a Reshape constant): fix the "
                                  "module or export with --static-batch") from None
            batch_check = CHECK_BATCH * _rows(xs)
        size = save_model(model, out, protect=tuple(protect))
        del model
    notes = [] if got_opset == opset else [f"the {used} exporter wrote opset {got_opset}, not the {opset} asked for "
                                             "(it could not convert the graph)"]
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


def _run_exporter(torch, module, xs, path: Path, in_names, out_names, opset, dynamic_batch, exporter) -> str:
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[exporter]
    errors = []
    for kind in order:
        try:
            with warnings.catch_warnings(), _quiet(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if kind == "dynamo":
                    shapes = tuple({0: torch.export.Dim("batch")} if dynamic_batch and x.ndim else None for x in xs)
                    torch.onnx.export(module, tuple(xs), str(path), input_names=in_names, output_names=out_names,
                                      opset_version=opset, dynamo=True, external_data=True,
                                      dynamic_shapes=shapes if dynamic_batch else None, verbose=False)
                else:
                    dyn = {n: {0: "batch"} for n in [*in_names, *out_names]} if dynamic_batch else None
                    torch.onnx.export(module, tuple(xs), str(path), input_names=in_names, output_names=out_names,
                                      opset_version=opset, dynamo=False, dynamic_axes=dyn)
            if path.is_file():
                return kind
            errors.append(f"{kind} exporter: wrote nothing")
        except Exception as exc:  # the exporter's refusal, whatever its type
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{kind} exporter: {type(exc).__name__}: {first[:300]}")
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
