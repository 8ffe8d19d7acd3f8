"""Synthetic transformer-shaped ONNX models of a chosen size (scale tests and benchmarks).

:func:`transformer_stack` writes a pre-LN stack of transformer blocks whose weights are random
but whose shapes, dtypes, op mix and file layout are those of a real encoder/decoder exported to
ONNX, so that memory and time can be measured on models from a few MB to several GB::

    hidden_states  float32 [batch, seq, hidden]        (batch, seq: symbolic dims)
    for i in range(layers):
        h = x + Add(MatMul(LayerNormalization(x), Wo [hidden, hidden]), bo)
        x = h + Add(MatMul(Gelu(Add(MatMul(LayerNormalization(h), W1 [hidden, ffn]), b1)),
                           W2 [ffn, hidden]), b2)
    last_hidden_state = LayerNormalization(x)   float32 [batch, seq, hidden]

GELU is written with ``Erf`` (``Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)``, constants as
scalar initializers), the pattern ONNX Runtime fuses into ``Gelu``/``BiasGelu``; the model is
valid from opset 17 (``LayerNormalization``). The attention *mixing* (Q/K/V, softmax) is left
out on purpose: its output projection carries the weight and the MatMul shape that matter here.

Weights are generated and written one tensor at a time (at most one tensor of one layer is in
memory), either inline in the protobuf (streamed: the ``.onnx`` is written field by field, never
serialized whole) or as external data in ``<model file name>.data`` (e.g. ``model.onnx.data``),
each tensor at a 64 KiB-aligned offset so ONNX Runtime can memory-map it.

:func:`real_input` gives inputs scaled like real transformer hidden states (a few outlier
channels), :func:`layers_for_size` / :func:`weight_bytes` convert between a size in bytes and a
layer count. Sizes are in bytes (decimal when written "MB"/"GB": 37.7 MB = 37.7e6 bytes).

Check a generated model by hand::

    python -m onnxcompress.synthetic out/s.onnx --hidden 256 --layers 2 [--sparse] [--external-data]
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# the protobuf pieces the model writer streams with (one implementation of each)
from .model_io import _GRAPH_INITIALIZER, _MODEL_GRAPH, _RAW_DATA, _default_mode, _varint

#: Protobuf's hard limit on a serialized model (inline weights must stay under it).
PROTOBUF_LIMIT = 2 * 1024**3
#: Default of ``external_data=None``: external data from this many weight bytes on.
AUTO_EXTERNAL_BYTES = int(1.5 * 1024**3)
#: External tensors start at multiples of this (ORT memory-maps page/granularity-aligned data).
ALIGN = 64 * 1024
#: With external data, tensors smaller than this (LayerNorm parameters, biases, GELU constants)
#: stay inline: aligning each to 64 KiB would pad the data file more than they weigh.
EXTERNAL_MIN_BYTES = 64 * 1024
#: ``sparse=True``: share of the rows of each weight matrix that are non-zero (at least 2 rows).
SPARSE_ROW_FRACTION = 0.01
LN_EPSILON = 1e-5

_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class _Spec:
    """One initializer to generate: name, shape, and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" (fan_in = shape[0]), "gamma", "beta", "bias"

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)


def _ffn(hidden: int, ffn: int | None) -> int:
    return 4 * hidden if ffn is None else ffn


def _check_dims(hidden: int, ffn: int | None, layers: int | None = None) -> int:
    if not isinstance(hidden, (int, np.integer)) or hidden < 1:
        raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
    f = _ffn(hidden, ffn)
    if not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"ffn must be a positive integer, got {ffn!r}")
    if layers is not None and (not isinstance(layers, (int, np.integer)) or layers < 1):
        raise ValueError(f"layers must be a positive integer, got {layers!r}")
    return int(f)


def _layer_specs(i: int, hidden: int, ffn: int) -> list[_Spec]:
    p = f"layers.{i}"
    return [
        _Spec(f"{p}.ln1.weight", (hidden,), "gamma"),
        _Spec(f"{p}.ln1.bias", (hidden,), "beta"),
        _Spec(f"{p}.attn.out_proj.weight", (hidden, hidden), "matrix"),
        _Spec(f"{p}.attn.out_proj.bias", (hidden,), "bias"),
        _Spec(f"{p}.ln2.weight", (hidden,), "gamma"),
        _Spec(f"{p}.ln2.bias", (hidden,), "beta"),
        _Spec(f"{p}.mlp.fc1.weight", (hidden, ffn), "matrix"),
        _Spec(f"{p}.mlp.fc1.bias", (ffn,), "bias"),
        _Spec(f"{p}.mlp.fc2.weight", (ffn, hidden), "matrix"),
        _Spec(f"{p}.mlp.fc2.bias", (hidden,), "bias"),
    ]


def _final_specs(hidden: int) -> list[_Spec]:
    return [_Spec("final_norm.weight", (hidden,), "gamma"), _Spec("final_norm.bias", (hidden,), "beta")]


def _groups(hidden: int, layers: int, ffn: int) -> list[tuple[list[int], list[_Spec]]]:
    """(seed entropy, specs) per layer and for the final norm: each group has its own RNG stream,
    so a layer's values do not depend on the storage mode or on the other layers."""
    return [([i, 0], _layer_specs(i, hidden, ffn)) for i in range(layers)] + [([0, 1], _final_specs(hidden))]


def weight_bytes(hidden: int, layers: int, ffn: int | None = None) -> int:
    """Bytes of float32 weights of ``transformer_stack(hidden=, layers=, ffn=)``.

    ``4 * (layers * (hidden**2 + 2*hidden*ffn + 6*hidden + ffn) + 2*hidden)``; hidden 1024 with
    ffn 4096 is 37.80e6 bytes per layer.

    Raises:
        ValueError: a dimension is not a positive integer.
    """
    f = _check_dims(hidden, ffn, layers)
    return 4 * (layers * (hidden * hidden + 2 * hidden * f + 6 * hidden + f) + 2 * hidden)


def layers_for_size(target_bytes: float, hidden: int, ffn: int | None = None) -> int:
    """Number of layers whose float32 weights come closest to ``target_bytes`` (at least 1).

    Args:
        target_bytes: wanted size of the weights in bytes (``2.4e9`` for "2.4 GB").
        hidden / ffn: as for :func:`transformer_stack` (``ffn`` defaults to ``4 * hidden``).

    Raises:
        ValueError: ``target_bytes`` is not positive, or a dimension is not a positive integer.
    """
    if not target_bytes or target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes!r}")
    per_layer = weight_bytes(hidden, 2, ffn) - weight_bytes(hidden, 1, ffn)
    fixed = weight_bytes(hidden, 1, ffn) - per_layer  # the final LayerNorm
    return max(1, int(round((target_bytes - fixed) / per_layer)))


def real_input(hidden: int, seq: int = 128, batch: int = 1, seed: int = 1) -> np.ndarray:
    """An input scaled like real transformer hidden states.

    Each channel is normal with its own mean (~N(0, 0.1)) and standard deviation (log-normal
    around 1); ``max(2, hidden // 256)`` outlier channels have an 8-20x larger scale and a
    mean of +-(3..8), as the "massive activations" of trained transformers. Which channels are
    outliers, and their scales, depend on ``hidden`` only (they are a property of the model,
    the same for every sample); the values depend on ``seed``.

    Returns:
        float32 array of shape ``[batch, seq, hidden]``.

    Raises:
        ValueError: a dimension is not a positive integer.
    """
    for name, v in (("hidden", hidden), ("seq", seq), ("batch", batch)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    fixed = np.random.default_rng([int(hidden), 0x5EED])
    mean = 0.1 * fixed.standard_normal(hidden)
    std = np.exp(0.25 * fixed.standard_normal(hidden))
    n_out = min(hidden, max(2, hidden // 256))
    idx = fixed.choice(hidden, n_out, replace=False)
    std[idx] *= fixed.uniform(8.0, 20.0, n_out)
    mean[idx] = fixed.choice([-1.0, 1.0], n_out) * fixed.uniform(3.0, 8.0, n_out)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, hidden), dtype=np.float32)
    x *= std.astype(np.float32)
    x += mean.astype(np.float32)
    return x


# --------------------------------------------------------------------------- values


def _values(rng: np.random.Generator, spec: _Spec, sparse: bool):
    """Dense ``np.ndarray`` (little-endian float32), or for a sparse matrix ``(rows, values)``:
    the sorted indices of its non-zero rows and those rows, ``[len(rows), fan_out]``."""
    if spec.kind == "matrix":
        fan_in, fan_out = spec.shape
        if sparse:
            k = min(fan_in, max(2, int(fan_in * SPARSE_ROW_FRACTION)))
            rows = np.sort(rng.choice(fan_in, k, replace=False))
            vals = rng.standard_normal((k, fan_out), dtype=np.float32)
            vals *= np.float32(1.0 / math.sqrt(k))  # the k live rows carry the variance of fan_in
            return rows, vals.astype(_F32, copy=False)
        w = rng.standard_normal(spec.shape, dtype=np.float32)
        w *= np.float32(1.0 / math.sqrt(fan_in))
        return w.astype(_F32, copy=False)
    v = rng.standard_normal(spec.shape, dtype=np.float32)
    if spec.kind == "gamma":
        v *= np.float32(0.05)
        v += np.float32(1.0)
    else:  # beta, bias: small
        v *= np.float32(0.02)
    return v.astype(_F32, copy=False)


def _dense(spec: _Spec, value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    rows, vals = value
    out = np.zeros(spec.shape, _F32)
    out[rows] = vals
    return out


def _write_at(f, offset: int, spec: _Spec, value) -> None:
    """Write a tensor's little-endian bytes at ``offset`` of ``f``; a sparse matrix writes only
    its live rows, leaving the rest as a hole (the file is extended by the caller)."""
    if isinstance(value, np.ndarray):
        f.seek(offset)
        f.write(memoryview(np.ascontiguousarray(value)).cast("B"))
        return
    rows, vals = value
    row_bytes = spec.shape[1] * 4
    for r, v in zip(rows, vals):
        f.seek(offset + int(r) * row_bytes)
        f.write(memoryview(np.ascontiguousarray(v)).cast("B"))


# --------------------------------------------------------------------------- graph


def _graph(hidden: int, layers: int, initializers: list[TensorProto]) -> onnx.GraphProto:
    nodes = []

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name + ".out"], name=name, **attrs))
        return name + ".out"

    x = "hidden_states"
    for i in range(layers):
        p = f"layers.{i}"
        a = node("LayerNormalization", [x, f"{p}.ln1.weight", f"{p}.ln1.bias"], f"{p}.ln1", axis=-1, epsilon=LN_EPSILON)
        a = node("MatMul", [a, f"{p}.attn.out_proj.weight"], f"{p}.attn.out_proj.matmul")
        a = node("Add", [a, f"{p}.attn.out_proj.bias"], f"{p}.attn.out_proj.bias_add")
        h = node("Add", [x, a], f"{p}.attn.residual")
        m = node("LayerNormalization", [h, f"{p}.ln2.weight", f"{p}.ln2.bias"], f"{p}.ln2", axis=-1, epsilon=LN_EPSILON)
        m = node("MatMul", [m, f"{p}.mlp.fc1.weight"], f"{p}.mlp.fc1.matmul")
        m = node("Add", [m, f"{p}.mlp.fc1.bias"], f"{p}.mlp.fc1.bias_add")
        g = node("Div", [m, "gelu.sqrt2"], f"{p}.mlp.gelu.div")
        g = node("Erf", [g], f"{p}.mlp.gelu.erf")
        g = node("Add", [g, "gelu.one"], f"{p}.mlp.gelu.add_one")
        g = node("Mul", [m, g], f"{p}.mlp.gelu.mul_x")
        g = node("Mul", [g, "gelu.half"], f"{p}.mlp.gelu.mul_half")
        g = node("MatMul", [g, f"{p}.mlp.fc2.weight"], f"{p}.mlp.fc2.matmul")
        g = node("Add", [g, f"{p}.mlp.fc2.bias"], f"{p}.mlp.fc2.bias_add")
        x = node("Add", [h, g], f"{p}.mlp.residual")
    nodes.append(helper.make_node("LayerNormalization", [x, "final_norm.weight", "final_norm.bias"],
                                  ["last_hidden_state"], name="final_norm", axis=-1, epsilon=LN_EPSILON))
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v])
              for n, v in (("gelu.sqrt2", math.sqrt(2.0)), ("gelu.one", 1.0), ("gelu.half", 0.5))]
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", hidden])  # noqa: E731
    return helper.make_graph(nodes, "transformer_stack", [io("hidden_states")], [io("last_hidden_state")],
                             initializer=consts + initializers)


def _model_header(opset: int) -> bytes:
    """The serialized ModelProto fields other than ``graph``."""
    m = onnx.ModelProto()
    opsets = [helper.make_opsetid("", opset)]
    m.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    m.opset_import.extend(opsets)
    m.producer_name = "onnxcompress.synthetic"
    m.doc_string = "synthetic pre-LN transformer stack (random weights)"
    return m.SerializeToString()


def _meta(spec: _Spec) -> TensorProto:
    t = TensorProto()
    t.name = spec.name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(spec.shape)
    return t


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _tmp(folder: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _finish(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_inline(tmp_model: str, hidden: int, layers: int, ffn: int, seed: int, sparse: bool, opset: int) -> None:
    """Stream the ModelProto: header, graph tag and length, the graph without weights, then each
    initializer as a length-delimited ``GraphProto.initializer`` field (protobuf accepts fields in
    any order, repeated ones interleaved), its raw bytes generated when written."""
    groups = _groups(hidden, layers, ffn)
    body = _graph(hidden, layers, []).SerializeToString()
    entries = []  # (spec, field prefix bytes up to the raw payload)
    graph_len = len(body)
    for _, specs in groups:
        for s in specs:
            meta = _meta(s).SerializeToString() + _RAW_DATA + _varint(s.nbytes)
            payload = len(meta) + s.nbytes
            prefix = _GRAPH_INITIALIZER + _varint(payload) + meta
            entries.append(prefix)
            graph_len += len(prefix) + s.nbytes
    header = _model_header(opset) + _MODEL_GRAPH + _varint(graph_len) + body
    total = len(header) + graph_len - len(body)
    if total >= PROTOBUF_LIMIT:
        raise ValueError(f"inline weights would make a {total / 1e9:.2f} GB protobuf (limit 2 GiB): "
                         "use external_data=True")
    k = 0
    with open(tmp_model, "r+b") as f:
        f.write(header)
        pos = len(header)
        for entropy, specs in groups:
            rng = np.random.default_rng([seed, *entropy])
            for s in specs:
                value = _values(rng, s, sparse)
                f.seek(pos)
                f.write(entries[k])
                pos += len(entries[k])
                _write_at(f, pos, s, value)
                pos += s.nbytes
                k += 1
                del value
        f.truncate(pos)  # extends over a trailing hole
        _finish(f)


def _write_external(tmp_model: str, tmp_data: str, data_name: str, hidden: int, layers: int, ffn: int,
                    seed: int, sparse: bool, opset: int) -> None:
    """Write the data file tensor by tensor at 64 KiB-aligned offsets (small tensors kept inline),
    then the small ``.onnx`` that refers to it."""
    tensors: list[TensorProto] = []
    end = 0
    with open(tmp_data, "r+b") as f:
        for entropy, specs in _groups(hidden, layers, ffn):
            rng = np.random.default_rng([seed, *entropy])
            for s in specs:
                value = _values(rng, s, sparse)
                t = _meta(s)
                if s.nbytes < EXTERNAL_MIN_BYTES:
                    t.raw_data = _dense(s, value).tobytes()
                else:
                    offset = _align(end)
                    _write_at(f, offset, s, value)
                    end = offset + s.nbytes
                    t.data_location = TensorProto.EXTERNAL
                    for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(s.nbytes))):
                        e = t.external_data.add()
                        e.key, e.value = key, val
                tensors.append(t)
                del value
        f.truncate(end)
        _finish(f)
    graph = _graph(hidden, layers, tensors).SerializeToString()
    with open(tmp_model, "r+b") as f:
        f.write(_model_header(opset) + _MODEL_GRAPH + _varint(len(graph)) + graph)
        f.truncate()
        _finish(f)


def transformer_stack(path, *, hidden: int, layers: int, ffn: int | None = None, seed: int = 0,
                      external_data: bool | None = None, sparse: bool = False, opset: int = 17) -> Path:
    """Write a synthetic pre-LN transformer stack to ``path`` (see the module docstring for the graph).

    Input ``hidden_states`` and output ``last_hidden_state``: float32 ``[batch, seq, hidden]``
    (``batch``, ``seq`` symbolic). Initializers (float32) are named after their place,
    ``layers.{i}.ln1.weight|bias``, ``layers.{i}.attn.out_proj.weight [hidden, hidden]|bias``,
    ``layers.{i}.ln2.*``, ``layers.{i}.mlp.fc1.weight [hidden, ffn]|bias``,
    ``layers.{i}.mlp.fc2.weight [ffn, hidden]|bias``, ``final_norm.*``, ``gelu.sqrt2|one|half``
    (scalars); nodes likewise (``layers.3.mlp.fc1.matmul``). Weight matrices are N(0, 1/fan_in),
    LayerNorm gammas 1 + N(0, 0.05^2), betas and biases N(0, 0.02^2); each layer draws from its
    own stream of ``seed``, so the values do not depend on ``external_data``.

    Args:
        path: the ``.onnx`` file to write (replaced atomically if it exists; its folder must exist).
        hidden: model width (channels). ``ffn``: MLP width, default ``4 * hidden``.
        layers: number of blocks; :func:`layers_for_size` picks it for a size in bytes.
        seed: weight seed.
        external_data: weights of 64 KiB or more go to ``<path name>.data`` beside the model
            (``model.onnx`` -> ``model.onnx.data``), each at a 64 KiB-aligned offset, referenced
            with ``location``/``offset``/``length``; the ``.onnx`` then holds only the graph and
            the small tensors. ``None`` (default): when the weights are >= 1.5 GiB.
        sparse: for fast, light tests of multi-GB models: each weight matrix is zero except
            ``max(2, 1 %)`` of its rows (random, N(0, 1/rows) so outputs keep their scale), and
            the zero bytes are left as file holes: a 2.1 GB model is written in seconds and uses
            a few MB of disk. Values are sparse, dtype and shape are the real ones (ONNX Runtime
            and onnxcompress load and allocate the full dense tensors).
        opset: ai.onnx opset, >= 17 (``LayerNormalization``).

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: a dimension is not a positive integer, ``opset`` is below 17 or above what
            the installed onnx knows, or inline weights (``external_data=False``) would make a
            protobuf of 2 GiB or more.
        IsADirectoryError: ``path`` (or, with external data, ``<path>.data``) is a directory.
        FileNotFoundError / OSError: the folder is missing or not writable, the disk is full.
            Nothing is left at ``path`` on failure (temporary files are removed).

    Memory: one weight tensor at a time (hidden 2048, ffn 8192: 64 MiB), plus the small tensors'
    protos with external data. The model is not checked here (``onnx.checker`` and an ONNX
    Runtime session on a multi-GB model cost what this avoids): see ``python -m onnxcompress.synthetic``.
    """
    ffn = _check_dims(hidden, ffn, layers)
    hidden, layers = int(hidden), int(layers)
    if not isinstance(opset, (int, np.integer)) or not 17 <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be between 17 (LayerNormalization) and {onnx.defs.onnx_opset_version()}, got {opset!r}")
    dest = Path(path)
    if dest.is_dir():
        raise IsADirectoryError(f"{dest}: is a directory")
    folder = dest.parent
    if external_data is None:
        external_data = weight_bytes(hidden, layers, ffn) >= AUTO_EXTERNAL_BYTES
    data_name = dest.name + ".data"
    if external_data and (folder / data_name).is_dir():
        raise IsADirectoryError(f"{folder / data_name}: is a directory")
    tmp_model = tmp_data = None
    try:
        tmp_model = _tmp(folder, dest.name)
        if external_data:
            tmp_data = _tmp(folder, data_name)
            _write_external(tmp_model, tmp_data, data_name, hidden, layers, ffn, int(seed), sparse, int(opset))
            _default_mode(tmp_data)
            os.replace(tmp_data, folder / data_name)
            tmp_data = None
        else:
            _write_inline(tmp_model, hidden, layers, ffn, int(seed), sparse, int(opset))
        _default_mode(tmp_model)
        os.replace(tmp_model, dest)
        tmp_model = None
    finally:
        for t in (tmp_model, tmp_data):
            if t:
                with contextlib.suppress(OSError):
                    os.unlink(t)
    return dest


def _main(argv=None) -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m onnxcompress.synthetic",
                                 description="Write a synthetic transformer stack, then check it "
                                             "(onnx.checker, an ONNX Runtime session, one run).")
    ap.add_argument("path")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparse", action="store_true")
    ap.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--no-check", action="store_true", help="only write")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    p = transformer_stack(args.path, hidden=args.hidden, layers=args.layers, ffn=args.ffn, seed=args.seed,
                          external_data=args.external_data, sparse=args.sparse, opset=args.opset)
    print(f"wrote {p} ({weight_bytes(args.hidden, args.layers, args.ffn) / 1e6:.1f} MB of weights) "
          f"in {time.perf_counter() - t0:.2f} s")
    if args.no_check:
        return 0
    import onnxruntime as ort

    onnx.checker.check_model(str(p), full_check=True)
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"hidden_states": real_input(args.hidden, seq=16)})[0]
    print(f"checker ok; ORT ok: last_hidden_state {list(y.shape)} mean {y.mean():.4f} std {y.std():.4f} "
          f"finite {bool(np.isfinite(y).all())}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
