"""Knowledge distillation: train a (pruned, low-rank, smaller) student to match a teacher's outputs.

The teacher is any ONNX model, run once over the data by ONNX Runtime; its outputs are cached as
memory-mapped ``.npy`` files in a state folder (the inputs too), so memory stays bounded by one
batch whatever the data's size. Ragged data (sentences of different token lengths, in the
``<i>__<input>`` layout of ``--calibration``) trains in groups of one shape: each batch comes from
one group, nothing is padded. The student is an ONNX model turned into a trainable
``torch.nn.Module`` by `onnx2torch <https://github.com/ENOT-AutoDL/onnx2torch>`_, or a user's
``torch.nn.Module`` (Python API). The loss follows Hinton et al. 2015, "Distilling the Knowledge in
a Neural Network": ``KL(softmax(t/T) || softmax(s/T))·T²`` for class scores, MSE or cosine for
other outputs, optionally mixed with cross-entropy on labels (weight ``alpha``). Training runs on
the CPU with Adam, checkpoints every epoch and resumes; the trained student is exported with
``torch.onnx.export`` (opset 17, dynamic batch axis), checked by ``onnx.checker``, compared with
the torch module in ONNX Runtime on a few samples, and written atomically
(:func:`onnxcompress.model_io.save_model`).

Converter (onnx2torch 1.5.15, evaluated here) — where it falls short and what this module does:

* Its ``import`` needs torchvision (for ``NonMaxSuppression`` / ``RoiAlign``). The torchvision
  wheel on PyPI is built against CUDA torch and fails to import beside the CPU build of torch
  (``operator torchvision::nms does not exist``): a stand-in ``torchvision`` is given to
  onnx2torch's import, so only those two ops are lost.
* Float initializers read by plain ops (a ``MatMul`` / ``Add`` weight, as in transformers and our
  low-rank factors) become *buffers*, so they would not train: they are turned into parameters
  here (scalars and BatchNorm statistics stay fixed).
* No converter for: quantized ops (``QuantizeLinear``, ``DequantizeLinear``, ``QLinearConv``,
  ``QLinearMatMul``, ``MatMulInteger``, ``ConvInteger``, ``DynamicQuantizeLinear``: distil the
  float model, quantize afterwards), any ``com.microsoft`` op (``Attention``,
  ``SkipLayerNormalization``, ``FusedConv``: produce the student without fusion), control flow
  (``If``, ``Loop``), recurrent layers (``LSTM``, ``GRU``, ``RNN``), ``Gelu`` (opset 20),
  ``GroupNormalization``, ``Mish``, ``Trilu``, ``SpaceToDepth``, ``OneHot``, ``Hardmax``,
  ``Upsample``, ``GridSample``, ``Size``. They are named in one :class:`DistillError` before any
  work. An op whose converter exists only for an older opset is retried after
  ``onnx.version_converter`` brings the model to opset 17.
* ``Flatten`` with ``axis`` equal to the rank (or 0) fails in its module (all-MiniLM-L6-v2's
  attention-mask path); the module's ``forward`` is replaced by the operator spec's form.
* A node with a trailing empty optional input (``Clip(x, min, "")``) fails: such inputs are
  dropped before conversion (the same op in ONNX).
* Dimensions baked into a ``Reshape`` constant (a fixed batch) stay fixed in the module; the
  data then has to come in that batch size.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import logging
import os
import re
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .distill_params import LR, TEMPERATURE
from .errors import DataError, InvalidModelError, OnnxCompressError

log = logging.getLogger("onnxcompress")

LOSSES = ("auto", "kl", "mse", "cosine")
OPSET = 17
STATE_VERSION = 2
#: the names of the cache files this module writes in a state folder (nothing else is ever deleted)
_CACHE_FILE = re.compile(r"(input|teacher)_\d+(_g\d+)?\.npy|order_g\d+\.npy")


class DistillError(OnnxCompressError):
    """Distillation cannot run: torch missing, the student cannot be converted, or the state
    folder belongs to another run."""


@dataclass
class DistillProgress:
    """What a progress callback gets: ``phase`` is ``"teacher"`` (caching its outputs),
    ``"train"`` (one per batch: ``epoch`` 1-based, ``step`` of ``steps``, running mean ``loss``),
    ``"epoch"`` (an epoch ended: its mean ``loss``) or ``"export"``."""

    phase: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: Optional[float] = None


@dataclass
class DistillResult:
    output: Path
    report: dict = field(default_factory=dict)
    module: Any = None  # the trained torch module (eval mode)


# --------------------------------------------------------------------------- torch and the converter


def _torch():
    try:
        import torch
    except ImportError:
        raise DistillError("distillation needs PyTorch: pip install 'onnxcompress[torch]' (torch==2.13.0, "
                           "onnx2torch)") from None
    return torch


def _onnx2torch():
    """Import onnx2torch; with a stand-in torchvision where the installed one cannot be imported."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    stub = None
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or the CUDA-built wheel beside CPU torch ("operator torchvision::nms
        stub = _torchvision_stub()  # does not exist"): onnx2torch imports it at the top, for two ops only
    if stub is not None:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, stub.ops
    try:
        import onnx2torch
    except ImportError:
        raise DistillError("distilling an ONNX student needs onnx2torch: pip install 'onnxcompress[torch]' "
                           "(or pass a torch.nn.Module student through the Python API)") from None
    finally:
        if stub is not None:  # onnx2torch keeps its reference; nothing else sees the stand-in
            for k in ("torchvision.ops", "torchvision"):
                if sys.modules.get(k) in (stub, stub.ops):
                    del sys.modules[k]
    _register_type_only_versions()
    return onnx2torch


#: op versions whose only change from the previous one is the set of types (ONNX's Changelog.md),
#: which onnx2torch 1.5 does not register: ``(op, new version) -> version it registers``. Without
#: them an opset-16+ transformer export (all-MiniLM-L6-v2's attention mask: GreaterOrEqual) cannot
#: be converted. Our only addition to onnx2torch's converters.
TYPE_ONLY_VERSIONS = {("GreaterOrEqual", 16): 12, ("LessOrEqual", 16): 12}


def _register_type_only_versions() -> None:
    from onnx2torch.node_converters.registry import add_converter, get_converter

    for (op, new), old in TYPE_ONLY_VERSIONS.items():
        try:
            get_converter(op, new)
            continue  # registered (by onnx2torch itself, or an earlier call)
        except NotImplementedError:
            pass
        try:
            add_converter(operation_type=op, version=new)(get_converter(op, old))
        except (NotImplementedError, ValueError):  # another onnx2torch: leave it as it is
            pass
    _fix_flatten()


def _flatten_forward(self, x):
    """ONNX ``Flatten`` (operator spec): ``[prod(d[:axis]), prod(d[axis:])]`` for any axis in
    ``[-r, r]``. onnx2torch 1.5's module fails for ``axis == r`` (``[B, S]`` with axis 2, in
    all-MiniLM-L6-v2's attention-mask path) and ``axis == 0``; this form is exported with the
    shapes kept symbolic."""
    import torch

    axis = self.axis + x.dim() if self.axis < 0 else self.axis
    if axis == 0:
        return x.reshape(1, -1)
    x = torch.flatten(x, end_dim=axis - 1)
    return x.unsqueeze(1) if x.dim() == 1 else torch.flatten(x, start_dim=1)


def _fix_flatten() -> None:
    try:
        from onnx2torch.node_converters.flatten import OnnxFlatten
    except ImportError:  # another onnx2torch layout: leave it as it is
        return
    OnnxFlatten.forward = _flatten_forward
    # its axis-1 shortcut, nn.Flatten(1), fails on a rank-1 input; the spec's form covers axis 1 too
    OnnxFlatten.maybe_create_simple_flatten = classmethod(lambda cls, axis=1: cls(axis=axis))


def _torchvision_stub() -> types.ModuleType:
    def unavailable(*args, **kwargs):
        raise DistillError("this op needs torchvision, which cannot be imported beside this torch build")

    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    ops = types.ModuleType("torchvision.ops")
    ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)
    ops.nms = ops.roi_align = ops.box_convert = ops.batched_nms = unavailable
    tv.ops = ops
    return tv


def unsupported_ops(model) -> list[str]:
    """``domain::op`` (or ``op``) of the nodes onnx2torch has no converter for, at the model's opset."""
    _onnx2torch()
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    bad = []
    for node in model.graph.node:
        dom = node.domain or ""
        try:
            get_converter(node.op_type, opsets.get("ai.onnx" if dom == "" else dom, opsets.get(dom, OPSET)), dom)
        except NotImplementedError:
            name = f"{dom}::{node.op_type}" if dom else node.op_type
            if name not in bad:
                bad.append(name)
    return bad


def onnx_to_torch(model) -> "Any":
    """An ``onnx.ModelProto`` as a trainable ``torch.nn.Module`` (onnx2torch, float initializers made
    parameters). Trailing empty optional inputs of its nodes are dropped in place (the same model).
    Raises :class:`DistillError` naming the ops that cannot be converted."""
    import onnx

    torch = _torch()
    o2t = _onnx2torch()
    bad = unsupported_ops(model)
    if bad:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
        if opset > OPSET and not any("::" in b for b in bad):
            try:
                lowered = onnx.version_converter.convert_version(model, OPSET)
            except Exception:
                lowered = None
            if lowered is not None and not unsupported_ops(lowered):
                log.warning(f"student converted from opset {opset} to {OPSET} for onnx2torch")
                model, bad = lowered, []
        if bad:
            hint = ("; in a recipe, set attention = false in the fuse stage before distill (optimize --distill "
                    "does so)") if any(b.endswith("::Attention") for b in bad) else ""
            raise DistillError(f"student: onnx2torch cannot convert op(s) {', '.join(bad)} to PyTorch (see "
                               f"onnxcompress.distill for the list; distil a float model without fused ops{hint})")
    for node in model.graph.node:  # trailing empty optional inputs (Clip(x, min, "")): the same op in ONNX,
        while node.input and node.input[-1] == "":  # but onnx2torch looks '' up as a constant and fails
            node.input.pop()
        if node.op_type == "Clip" and len(node.input) == 3 and node.input[1] == "":  # Clip(x, "", max): min -inf
            name = "onnxcompress_clip_no_min"
            if not any(i.name == name for i in model.graph.initializer):
                model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(-np.inf, np.float32), name))
            node.input[1] = name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = o2t.convert(model)
    except Exception as exc:
        raise DistillError(f"student: onnx2torch failed: {_what_node(exc)}") from None
    container = getattr(module, "initializers", None)
    if container is not None:
        for name, buf in list(container.named_buffers(recurse=False)):
            if buf.is_floating_point() and buf.numel() > 1:
                del container._buffers[name]
                container.register_parameter(name, torch.nn.Parameter(buf.detach().clone()))
    return module


def _what_node(exc: Exception) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {msg}"[:300]


# --------------------------------------------------------------------------- data and the teacher cache


def _file_id(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fixed_batch(shape) -> Optional[int]:
    if not shape:
        return None
    d = shape[0]
    return d if isinstance(d, int) and d > 0 else None


def _cache_teacher(teacher_path: Path, data_path: Path, state: Path, key: dict, batch_size: int,
                   progress: Optional[Callable]) -> dict:
    """Inputs and the teacher's outputs as ``.npy`` files in ``state`` (read back memory-mapped);
    reused when ``key`` matches the cached one.

    Samples are grouped by their shapes past the first axis (ragged data, such as sentences of
    different token lengths, gives one group per length; data of one shape, one group): a batch
    is drawn from one group, so nothing is padded and the model sees each sample as it is. The
    returned ``meta["groups"]`` lists per group its ``rows``, ``inputs`` and ``outputs`` files and
    ``order`` (a file of each row's index in the data's own row order, for the labels).
    """
    meta_path = state / "cache.json"
    old_files: list = []
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("files"), list):
            old_files = [f for f in meta["files"] if isinstance(f, str) and _CACHE_FILE.fullmatch(f)]
            if meta.get("key") == key and all((state / f).is_file() for f in old_files) \
                    and len(old_files) == len(meta["files"]):
                return meta
        # a new cache: the old index goes first (an interrupted rewrite must not leave it pointing
        # at half-written files), then the files it lists, and only names this module writes (a
        # state folder may hold the user's own files)
        meta_path.unlink()
    for f in old_files:
        (state / f).unlink(missing_ok=True)
    from .data import input_specs, load_npz
    from .model_io import load_model
    from .runtime import is_ort_error, make_session

    tmodel = load_model(teacher_path)
    specs = input_specs(tmodel)
    del tmodel
    samples, _ = load_npz(data_path, specs, what="distillation")
    by_shape: dict[tuple, list[int]] = {}
    for k, x in enumerate(samples):
        bad = [s.name for s in specs if np.ndim(x[s.name]) == 0]
        if bad:
            raise DataError(f"distillation data {data_path}: input '{bad[0]}' is a scalar; distillation needs a "
                            "first (batch) axis")
        n = {s.name: len(x[s.name]) for s in specs}
        if len(set(n.values())) != 1:
            raise DataError(f"distillation data {data_path}: sample {k} has different row counts per input {n}")
        by_shape.setdefault(tuple(x[s.name].shape[1:] for s in specs), []).append(k)
    starts = np.cumsum([0] + [len(x[specs[0].name]) for x in samples])
    sizes = np.diff(starts)
    try:
        sess = make_session(str(teacher_path), optimize=True)
    except Exception as exc:  # ORT's refusal: an op it does not know, a broken model
        if not is_ort_error(exc):
            raise
        raise DataError(f"ONNX Runtime cannot load the teacher: {_what_node(exc)}") from None
    out_names = [o.name for o in sess.get_outputs()]
    fixed = _fixed_batch(specs[0].shape)
    step = fixed or batch_size
    groups: list[dict] = []
    files: list[str] = []
    out_ranks: Optional[list[int]] = None
    n_steps = sum(-(-int(sizes[idx].sum()) // step) for idx in by_shape.values())
    done_steps = 0
    for g, idx in enumerate(by_shape.values()):
        ins = {}
        g_in = []
        for i, s in enumerate(specs):
            f = f"input_{i}_g{g}.npy"
            arr = np.concatenate([samples[k][s.name] for k in idx], axis=0)
            np.save(state / f, arr)
            g_in.append({"name": s.name, "file": f, "dtype": str(arr.dtype), "shape": list(arr.shape)})
            files.append(f)
            ins[s.name] = np.load(state / f, mmap_mode="r")
        order = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in idx]).astype(np.int64)
        rows = len(order)
        f_order = f"order_g{g}.npy"
        np.save(state / f_order, order)
        files.append(f_order)
        outs = None
        g_out: list[dict] = []
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if fixed and stop - start != fixed:
                break  # the teacher takes exactly `fixed` rows: the remainder is dropped
            try:
                res = sess.run(None, {name: np.ascontiguousarray(a[start:stop]) for name, a in ins.items()})
            except Exception as exc:
                if not is_ort_error(exc):
                    raise
                raise DataError(f"ONNX Runtime cannot run the teacher on the data: {_what_node(exc)}") from None
            if outs is None:
                outs = []
                if out_ranks is not None and [r.ndim for r in res] != out_ranks:
                    raise DataError("the teacher's outputs change rank between samples of different shapes; "
                                    "distillation needs outputs of one rank")
                out_ranks = [r.ndim for r in res]
                for j, (name, r) in enumerate(zip(out_names, res)):
                    if r.ndim == 0 or r.shape[0] != stop - start:
                        raise DataError(f"teacher output '{name}' has shape {list(r.shape)}: its first axis is not "
                                        "the batch, which distillation needs")
                    f = f"teacher_{j}_g{g}.npy"
                    mm = np.lib.format.open_memmap(state / f, mode="w+", dtype=r.dtype, shape=(rows,) + r.shape[1:])
                    outs.append(mm)
                    files.append(f)
                    g_out.append({"name": name, "file": f, "dtype": str(r.dtype), "shape": list(mm.shape)})
            for name, mm, r in zip(out_names, outs, res):
                if r.shape[1:] != mm.shape[1:]:
                    raise DataError(f"teacher output '{name}' changes shape between batches of one input shape "
                                    f"({list(mm.shape[1:])} vs {list(r.shape[1:])}); distillation needs outputs "
                                    "whose shape follows the inputs'")
                mm[start:stop] = r
            done_steps += 1
            if progress:
                progress(DistillProgress("teacher", step=done_steps, steps=n_steps))
        if fixed:
            rows = (rows // fixed) * fixed
        for mm in outs or ():
            mm.flush()
        del outs, ins
        if rows:
            groups.append({"rows": rows, "inputs": g_in, "outputs": g_out, "order": f_order})
    del sess, samples
    meta = {"key": key, "rows": int(sum(g["rows"] for g in groups)), "data_rows": int(starts[-1]), "groups": groups,
            "files": files}
    from .model_io import write_atomic

    write_atomic(meta_path, json.dumps(meta, indent=1))
    return meta


def _labels(data_path: Path, key: str, rows: int) -> np.ndarray:
    with np.load(data_path, allow_pickle=False) as z:
        if key not in z.files:
            raise DataError(f"distillation data {data_path}: no array '{key}' for the labels; keys {sorted(z.files)}")
        y = np.asarray(z[key])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels '{key}' in {data_path}: need one integer class per row, got {y.dtype} "
                        f"{list(y.shape)}")
    if len(y) < rows:
        raise DataError(f"labels '{key}' in {data_path}: {len(y)} labels for {rows} rows")
    return y[:rows].astype(np.int64)


# --------------------------------------------------------------------------- losses


def is_class_output(shape) -> bool:
    """Class scores: ``[batch, classes]`` with more than one class."""
    return len(shape) == 2 and shape[1] > 1


def _loss_fns(kinds: list[str], temperature: float):
    torch = _torch()
    F = torch.nn.functional
    T = float(temperature)

    def kl(s, t):
        c = s.shape[-1]
        log_ps = F.log_softmax(s.reshape(-1, c) / T, dim=-1)
        log_pt = F.log_softmax(t.reshape(-1, c) / T, dim=-1)
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * (T * T)

    def mse(s, t):
        return F.mse_loss(s, t)

    def cosine(s, t):
        return (1 - F.cosine_similarity(s.reshape(len(s), -1), t.reshape(len(t), -1), dim=1, eps=1e-8)).mean()

    table = {"kl": kl, "mse": mse, "cosine": cosine}
    return [table[k] for k in kinds]


# --------------------------------------------------------------------------- the run


def _as_tuple(out):
    if isinstance(out, (tuple, list)):
        return tuple(out)
    if isinstance(out, dict):
        return tuple(out.values())
    return (out,)


def distill(
    teacher: str | os.PathLike,
    student: "str | os.PathLike | Any",
    output: str | os.PathLike,
    data: str | os.PathLike,
    *,
    labels: Optional[str] = None,
    epochs: int = 10,
    loss: str = "auto",
    temperature: float = 4.0,
    alpha: float = 0.5,
    lr: float = 1e-3,
    batch_size: int = 64,
    state: Optional[str | os.PathLike] = None,
    resume: bool = True,
    seed: int = 0,
    check_samples: int = 8,
    threads: Optional[int] = None,
    progress: Optional[Callable[[DistillProgress], None]] = None,
) -> DistillResult:
    """Train ``student`` to reproduce ``teacher`` on ``data``, export it to ONNX and write ``output``.

    Args:
        teacher: ONNX model (path), run by ONNX Runtime; its outputs on ``data`` are cached once.
        student: ONNX model (path) converted with onnx2torch, or a ``torch.nn.Module`` (a copy is
            trained; its outputs pair with the teacher's in order).
        output: where the trained student is written (never an input).
        data: ``.npz`` of the teacher's inputs (unlabelled is fine), the format of ``--calibration``.
        labels: key of an integer label array in ``data``: cross-entropy on the first class output
            is mixed in with weight ``alpha`` (``(1 - alpha)·distillation + alpha·CE``).
        epochs: total epochs (a resumed run trains the missing ones).
        loss: ``auto`` (KL for class scores ``[batch, classes]``, MSE for the rest), or ``kl``,
            ``mse``, ``cosine`` for every output.
        temperature: softmax temperature T of the KL loss (scaled by T²).
        lr, batch_size, seed: Adam's learning rate, rows per step, shuffling and initialisation.
        state: folder for the cached teacher outputs and the per-epoch checkpoint (default
            ``OUTPUT.distill``, kept afterwards so a rerun with more epochs continues).
        resume: continue from the checkpoint in ``state`` when there is one.
        check_samples: rows on which ONNX Runtime's outputs of the export are compared with torch's.
        threads: torch intra-op threads (default: torch's).
        progress: called with :class:`DistillProgress` events (the CLI draws its progress bars).

    Returns:
        :class:`DistillResult` (``report``: losses, epochs, export check, seconds).

    Raises:
        DistillError: torch/onnx2torch missing, an unconvertible op, a state folder of another run.
        DataError, PathError, ModelLoadError, ModelWriteError, InvalidModelError: as ``optimize``.
    """
    t0 = time.perf_counter()
    if loss not in LOSSES:
        raise DistillError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
    for name, v, ok in (("epochs", epochs, epochs >= 1), ("batch_size", batch_size, batch_size >= 1),
                        ("temperature", temperature, 0 < temperature <= TEMPERATURE.high),
                        ("lr", lr, 0 < lr <= LR.high),
                        ("alpha", alpha, 0 <= alpha <= 1), ("check_samples", check_samples, check_samples >= 1)):
        if not ok:
            raise DistillError(f"{name} {v!r} is out of range")
    from .model_io import external_data_files
    from .paths import check_distinct, check_input_file, check_output_file

    teacher_p = check_input_file(teacher, "teacher model")
    data_p = check_input_file(data, "distillation data")
    student_is_path = isinstance(student, (str, os.PathLike))
    student_p = check_input_file(student, "student model") if student_is_path else None
    out = Path(output)
    if not out.name or out.name in (".", ".."):
        raise DistillError(f"output {str(output)!r}: give an output file path")
    state_p = Path(state) if state is not None else out.with_name(out.name + ".distill")
    inputs = {"teacher model": teacher_p, "distillation data": data_p}
    for f in external_data_files(teacher_p):
        inputs[f"teacher's external data ({f.name})"] = f
    if student_p is not None:
        inputs["student model"] = student_p
        for f in external_data_files(student_p):
            inputs[f"student's external data ({f.name})"] = f
    check_output_file(out, "model")
    check_output_file(out.with_name(out.name + ".data"), "model's external data")
    check_distinct({"-o": out, "the model's external data": out.with_name(out.name + ".data"),
                    "the state folder": state_p}, inputs)
    if state_p.exists() and not state_p.is_dir():
        raise DistillError(f"state folder {state_p}: exists and is not a folder")
    torch = _torch()
    if threads:
        torch.set_num_threads(threads)

    # the student
    import onnx

    if student_is_path:
        from .model_io import load_model, to_proto

        sproto = to_proto(load_model(student_p))
        module = onnx_to_torch(sproto)
        s_in = [i.name for i in sproto.graph.input if i.name not in {x.name for x in sproto.graph.initializer}]
        s_out = [o.name for o in sproto.graph.output]
        axes = dynamic_axes(sproto)
        del sproto
        student_id = _file_id(student_p)
    else:
        import copy

        if not isinstance(student, torch.nn.Module):
            raise DistillError(f"student: a path to an ONNX model or a torch.nn.Module, not {type(student).__name__}")
        module = copy.deepcopy(student)
        s_in = s_out = None
        axes = None
        student_id = {"module": type(student).__qualname__,
                      "params": [[n, list(p.shape)] for n, p in module.state_dict().items()]}

    state_p.mkdir(parents=True, exist_ok=True)
    cache_key = {"v": STATE_VERSION, "teacher": _file_id(teacher_p), "data": _file_id(data_p),
                 "batch": batch_size}
    meta = _cache_teacher(teacher_p, data_p, state_p, {k: v for k, v in cache_key.items() if k != "batch"},
                          batch_size, progress)
    rows = meta["rows"]
    if rows < 1:
        raise DataError(f"distillation data {data_p}: no rows to train on")
    groups = meta["groups"]
    first = groups[0]
    X = [[np.load(state_p / d["file"], mmap_mode="r") for d in g["inputs"]] for g in groups]
    Y = [[np.load(state_p / d["file"], mmap_mode="r") for d in g["outputs"]] for g in groups]
    ORDER = [np.load(state_p / g["order"]) for g in groups]
    in_names = s_in or [d["name"] for d in first["inputs"]]
    out_names = s_out or [d["name"] for d in first["outputs"]]
    if len(in_names) != len(X[0]):
        raise DistillError(f"student has {len(in_names)} input(s), the teacher {len(X[0])}; they must take the same "
                           "inputs")
    if s_in is not None and set(s_in) == {d["name"] for d in first["inputs"]}:  # pair by name when they share them
        order = {d["name"]: i for i, d in enumerate(first["inputs"])}
        X = [[xg[order[n]] for n in s_in] for xg in X]
    y_lab = _labels(data_p, labels, meta["data_rows"]) if labels else None

    # loss per output
    kinds = []
    for d in first["outputs"]:
        if loss == "auto":
            kinds.append("kl" if is_class_output(d["shape"]) else "mse")
        else:
            kinds.append(loss)
    class_idx = next((i for i, d in enumerate(first["outputs"]) if is_class_output(d["shape"])), None)
    if y_lab is not None and class_idx is None:
        raise DistillError("labels given but no teacher output is class scores [batch, classes]")
    if y_lab is not None:
        n_cls = int(first["outputs"][class_idx]["shape"][1])
        if y_lab.min() < 0 or y_lab.max() >= n_cls:
            raise DataError(f"labels '{labels}' in {data_p}: values {int(y_lab.min())}..{int(y_lab.max())} outside "
                            f"0..{n_cls - 1} (the class output has {n_cls} classes)")
    fns = _loss_fns(kinds, temperature)
    ce = torch.nn.functional.cross_entropy

    def batch(g, idx):
        xs = [torch.from_numpy(np.ascontiguousarray(x[idx])) for x in X[g]]
        ys = [torch.from_numpy(np.ascontiguousarray(y[idx])).float() for y in Y[g]]
        return xs, ys

    def objective(outs, ys, g, idx):
        outs = _as_tuple(outs)
        if len(outs) < len(ys):
            raise DistillError(f"student gives {len(outs)} output(s), the teacher {len(ys)}")
        total = 0
        for f, s, t in zip(fns, outs, ys):
            if s.shape != t.shape:
                raise DistillError(f"student output shape {list(s.shape)} differs from the teacher's {list(t.shape)}")
            total = total + f(s.float(), t)
        if y_lab is not None:
            total = (1 - alpha) * total + alpha * ce(outs[class_idx].float(), torch.from_numpy(y_lab[ORDER[g][idx]]))
        return total

    def forward(xs):
        try:
            return module(*xs)
        except (RuntimeError, ValueError, IndexError) as exc:  # shapes the student cannot take
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistillError(f"the student failed on a batch of {len(xs[0]) if xs else 0} row(s): {msg} (a student "
                               "with a fixed batch size needs --batch-size equal to it)") from None

    def evaluate() -> float:
        module.eval()
        tot = 0.0
        with torch.no_grad():
            for g, grp in enumerate(groups):
                for start in range(0, grp["rows"], batch_size):
                    idx = np.arange(start, min(grp["rows"], start + batch_size))
                    xs, ys = batch(g, idx)
                    tot += float(objective(forward(xs), ys, g, idx)) * len(idx)
        return tot / rows

    # BatchNorm cannot train on a batch of one row; other models can (a sentence length seen once)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())

    def plan(epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches: each group's rows shuffled and cut into batches, the batches of all
        groups shuffled together (one group, as data of one shape: the earlier plain shuffle)."""
        rng = np.random.default_rng(seed + epoch)
        out = []
        for g, grp in enumerate(groups):
            perm = rng.permutation(grp["rows"])
            for k in range(0, grp["rows"], batch_size):
                idx = np.sort(perm[k:k + batch_size])
                if len(idx) == 1 and rows > 1 and has_bn:
                    continue
                out.append((g, idx))
        if len(groups) > 1:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    # checkpoint and resume
    run_key = {"v": STATE_VERSION, "teacher": cache_key["teacher"], "data": cache_key["data"], "student": student_id,
               "loss": kinds, "temperature": temperature, "labels": labels, "alpha": alpha if labels else None}
    ckpt = state_p / "checkpoint.pt"
    optim = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    done, history, initial = 0, [], None
    resumed = False
    if resume and ckpt.is_file():
        try:
            c = torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise DistillError(f"state folder {state_p}: unreadable checkpoint ({_what_node(exc)}); remove it") from None
        if (c.get("key") or {}).get("v") != STATE_VERSION:
            raise DistillError(f"state folder {state_p}: its checkpoint was written by another version of "
                               "onnxcompress; remove the folder or choose another state folder")
        if c.get("key") != json.loads(json.dumps(run_key)):
            diff = [k for k in run_key if c.get("key", {}).get(k) != json.loads(json.dumps(run_key[k]))]
            raise DistillError(f"state folder {state_p}: its checkpoint is from another run (differs in "
                               f"{', '.join(diff) or 'format'}); remove the folder or choose another state folder")
        module.load_state_dict(c["model"])
        with contextlib.suppress(Exception):
            optim.load_state_dict(c["optim"])
        for g in optim.param_groups:
            g["lr"] = lr
        torch.set_rng_state(c["torch_rng"])
        done, history, initial = c["epoch"], c["history"], c["initial_loss"]
        resumed = True
    else:
        torch.manual_seed(seed)
    if initial is None:
        initial = evaluate()
    if not np.isfinite(initial):
        raise DistillError(f"the loss is {initial} before any training: the teacher's or the student's outputs on "
                           "the data are not finite (NaN/Inf); check both models on this data")
    first_plan = plan(1)
    steps = len(first_plan)
    left_out = rows - sum(len(idx) for _, idx in first_plan)  # one-row batches a BatchNorm student skips
    if steps == 0:
        raise DistillError("every batch would hold one row and the student has BatchNorm, which cannot train on "
                           "one row: raise --batch-size, or give more samples of each input shape")
    for epoch in range(done + 1, epochs + 1):
        module.train()
        run_sum, seen = 0.0, 0
        for k, (g, idx) in enumerate(plan(epoch)):
            xs, ys = batch(g, idx)
            optim.zero_grad(set_to_none=True)
            value = objective(forward(xs), ys, g, idx)
            if not torch.isfinite(value):
                raise DistillError(f"the loss became {value.detach().item()} in epoch {epoch}: lower the learning "
                                   "rate (lr) or the temperature")
            value.backward()
            optim.step()
            run_sum += value.detach().item() * len(idx)
            seen += len(idx)
            if progress:
                progress(DistillProgress("train", epoch, epochs, k + 1, steps, run_sum / seen))
        history.append(run_sum / seen)
        _save_checkpoint(torch, ckpt, {"key": run_key, "epoch": epoch, "model": module.state_dict(),
                                       "optim": optim.state_dict(), "torch_rng": torch.get_rng_state(),
                                       "history": history, "initial_loss": initial})
        if progress:
            progress(DistillProgress("epoch", epoch, epochs, steps, steps, history[-1]))
    final = evaluate()
    t_train = time.perf_counter() - t0
    warnings_: list[str] = []
    if final > initial:
        warnings_.append(f"the distillation loss rose from {initial:.4g} to {final:.4g}: the written student is worse "
                         "than before training (lower --lr, fewer --epochs, or check the student)")

    # export, check, write
    if progress:
        progress(DistillProgress("export", epochs, epochs))
    module.eval()
    g0 = max(range(len(groups)), key=lambda g: groups[g]["rows"])  # the export traces the largest group's rows
    n_check = min(check_samples, groups[g0]["rows"])
    idx = np.arange(max(2, n_check) if groups[g0]["rows"] >= 2 else 1)
    xs, _ = batch(g0, idx)
    if axes is None and len(groups) > 1:  # a module student on ragged data: the axes that vary stay free
        axes = {}
        for key, names_ in (("inputs", in_names), ("outputs", out_names)):
            for j, name in enumerate(names_):
                shapes = [g[key][j]["shape"] for g in groups]  # one rank per input / output (checked)
                axes[name] = {0: "batch", **{k: f"{name}_{k}" for k in range(1, len(shapes[0]))
                                             if len({sh[k] for sh in shapes}) > 1}}
    proto = export_onnx(module, xs, in_names, out_names, state_p, axes)
    max_rel = compare_with_ort(module, proto, xs, in_names)
    if len(groups) > 1:  # and on a row of another shape than the traced one
        g1 = next(g for g in range(len(groups)) if g != g0)
        xs1, _ = batch(g1, np.arange(1))
        max_rel = max(max_rel, compare_with_ort(module, proto, xs1, in_names))
    from .model_io import save_model
    import onnx_ir as ir

    size = save_model(ir.from_proto(proto), out, protect=tuple(inputs.values()))
    report = {"output": str(out), "state": str(state_p), "rows": rows, "epochs": max(epochs, done),
              "warnings": warnings_,
              "epochs_trained_now": epochs - done if epochs > done else 0, "resumed_from_epoch": done if resumed else None,
              "loss_kinds": dict(zip(out_names, kinds)), "temperature": temperature, "labels": labels,
              "alpha": alpha if labels else None, "lr": lr, "batch_size": batch_size,
              "initial_loss": initial, "final_loss": final, "epoch_losses": history,
              "rows_not_trained_per_epoch": int(left_out),
              "loss_ratio": (initial / final) if final > 0 and initial > 0 else None,
              "export_check": {"samples": int(len(idx)), "max_rel_error": max_rel, "opset": OPSET},
              "parameters": int(sum(p.numel() for p in module.parameters())), "file_bytes": size,
              "seconds": round(time.perf_counter() - t0, 2), "train_seconds": round(t_train, 2)}
    return DistillResult(out, report, module)


def _save_checkpoint(torch, path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dynamic_axes(model) -> dict[str, dict[int, str]]:
    """Per graph input and output of an ``onnx.ModelProto``: the axes that are not fixed numbers,
    by their dim name (``batch`` for an unnamed first axis, ``<name>_<axis>`` for other unnamed
    ones), and the first axis always (distillation trains on batches): what the export keeps
    dynamic, so the distilled model takes every shape the student took."""
    inits = {x.name for x in model.graph.initializer}
    out: dict[str, dict[int, str]] = {}
    for v in [*[i for i in model.graph.input if i.name not in inits], *model.graph.output]:
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        a = {}
        for k, d in enumerate(t.shape.dim):
            if d.HasField("dim_value") and k != 0:
                continue
            a[k] = d.dim_param if d.HasField("dim_param") and d.dim_param else ("batch" if k == 0 else f"{v.name}_{k}")
        out[v.name] = a
    return out


def export_onnx(module, xs: list, in_names: list[str], out_names: list[str], folder: Path,
                axes: dict[str, dict[int, str]] | None = None):
    """``torch.onnx.export`` at opset 17 with the dynamic ``axes`` (:func:`dynamic_axes`; default: the
    batch axis of every input and output) (:mod:`onnxcompress.export`'s exporter loop: the TorchScript exporter first, as it handles
    onnx2torch's modules in a fraction of the dynamo exporter's time, the dynamo exporter when it
    fails), then ``onnx.checker``."""
    import onnx

    from .export import ExportError, _run_exporter

    torch = _torch()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "student.onnx"
        try:
            _run_exporter(torch, module, xs, path, list(in_names), list(out_names), OPSET, True, "auto", axes)
        except ExportError as exc:
            raise DistillError(str(exc)) from None
        proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise InvalidModelError(f"exported student fails onnx.checker: {_what_node(exc)}") from None
    return proto


def compare_with_ort(module, proto, xs: list, in_names: list[str], rtol: float = 1e-4) -> float:
    """max|ORT − torch| / max|torch| over the outputs on ``xs`` (:func:`onnxcompress.export._compare`);
    raises :class:`InvalidModelError` above ``rtol``."""
    import onnx_ir as ir

    from .export import ExportError, _compare

    torch = _torch()
    with torch.no_grad():
        ref = list(_as_tuple(module(*xs)))
    try:
        errs = _compare(ir.from_proto(proto), xs, ref, in_names, [o.name for o in proto.graph.output], rtol)
    except ExportError as exc:
        raise InvalidModelError(f"exported student disagrees with the torch module in ONNX Runtime: {exc}") from None
    return max((e["max_rel_error"] for e in errs.values()), default=0.0)
