"""Model input/output: load lazily, check and write without copies of the weights, atomically.

The input file is never modified. Inline weights are read once, straight from the file into
arrays (:func:`_load_lean`); external data is memory-mapped, one map per file
(:func:`_map_external`). Nothing here serialises a whole model with its weights: a check or
an ONNX Runtime session sees a *skeleton* (the protobuf with every large main-graph
initializer replaced by an external-data stand-in, :func:`skeleton`) while the weights go to
ORT as buffers it reads in place (:func:`onnxcompress.runtime.make_session`), and the writer
streams one tensor at a time. So a model over protobuf's 2 GB limit is checked, run and
written like any other, and the tool holds one copy of the weights.

Outputs are written to a temporary file in the target folder and renamed into place only
after ``onnx.checker`` (at the written model's own opset and IR version) and an ONNX Runtime
session have accepted them, so a failed run leaves no partial output. A model with external
data is several renames (:func:`_swap_pair`): the earlier pair is moved away first and put
back if anything fails, so the old model is never found beside the new data.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from .errors import InvalidModelError, ModelLoadError, ModelWriteError
from .progress import counted, tick
from .skeleton import (BIG_TENSOR_BYTES, PLACEHOLDER, _BUFFER_DTYPES, _RAW_DTYPES, _detachable, _unused,  # noqa: F401
                       skeleton, skeleton_file, weight_buffer)

#: Protobuf's hard limit; larger models must keep their weights as external data.
PROTOBUF_LIMIT = 2 * 1024**3

#: tensors of at least 1 MiB start at a 64 KiB boundary of the data file, so ORT can map them
ALIGN_THRESHOLD, ALIGNMENT = 1 << 20, 1 << 16
#: external data files mapped at once (Python's mmap holds a descriptor each); models saved one
#: file per tensor have their later files read into memory instead
MAX_MAPPED_FILES = 64

#: arrays whose bytes are, unchanged, a region of an input file: ``id(array)`` -> ``(weak
#: reference, path, offset, file key, data address, nbytes)``; the writer copies those regions
#: file to file in the kernel (:func:`_emit`) instead of from memory. An entry dies with its array.
_SOURCES: dict[int, tuple] = {}
#: set (to anything but "" or "0") to write every weight from memory, never copying from an input file
NO_KERNEL_COPY_ENV = "ONNXCOMPRESS_NO_KERNEL_COPY"


def _file_key(st: os.stat_result) -> tuple[int, ...]:
    """What must not change between reading a file and copying from it: device, inode, size,
    mtime and ctime (a program can restore an mtime after rewriting a file, not a ctime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _frozen(arr: np.ndarray) -> np.ndarray:
    """The same memory as a view whose buffer is read-only, so that no one can set
    ``writeable`` back on (numpy allows that on an array that owns its memory)."""
    return np.frombuffer(memoryview(arr.reshape(-1).view(np.uint8)).toreadonly(), arr.dtype).reshape(arr.shape)


#: a file modified less than this long (ns) before it is read is never copied from: a rewrite in
#: the same tick of a coarse file clock (a kernel before 6.13 stamps files at its timer tick;
#: some filesystems at whole seconds) would keep its size, mtime and ctime
SETTLED_NS = 2_000_000_000


def _remember(arr: np.ndarray, path: str, offset: int, key: tuple) -> np.ndarray:
    """Record that ``arr`` holds the bytes of ``path`` at ``offset`` as ONNX stores them
    (little-endian, C order), unless the file was modified less than :data:`SETTLED_NS` ago
    (or in the future: a skewed clock); returns the array to keep: read-only for good
    (:func:`_frozen`), so the record stays true."""
    if not arr.flags.c_contiguous or arr.dtype.byteorder == ">" or not np.little_endian:
        return arr
    if arr.flags.writeable or arr.base is None:
        arr = _frozen(arr)
    if max(key[3], key[4]) > time.time_ns() - SETTLED_NS:
        return arr
    k = id(arr)

    def gone(ref, k=k):
        entry = _SOURCES.get(k)
        if entry is not None and entry[0] is ref:
            del _SOURCES[k]

    _SOURCES[k] = (weakref.ref(arr, gone), path, offset, key, arr.ctypes.data, arr.nbytes)
    return arr


def file_source(buf: np.ndarray) -> tuple[str, int, tuple] | None:
    """``(path, offset, file key)`` where the array's bytes lie in an input file, if the array is
    one that :func:`load_model` read or mapped (the same object, memory and size) and is still
    read-only; else ``None``."""
    entry = _SOURCES.get(id(buf))
    if (entry is None or entry[0]() is not buf or buf.flags.writeable or buf.ctypes.data != entry[4]
            or buf.nbytes != entry[5]):
        return None
    return entry[1], entry[2], entry[3]


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model into onnx-ir, its external data memory-mapped (read when a pass needs it).

    Args:
        path: path of a ``.onnx`` file; external data files are resolved relative to it.

    Returns:
        The model as an ``onnx_ir.Model``. Initializers kept as external data are read-only
        views of one memory map per data file; large inline weights are read once into
        read-only arrays (:func:`_load_lean`). Where each weight lies in its file is recorded,
        so that :func:`save_model` copies the unchanged ones file to file. The files must not
        change during the run: a change to a file read into memory is detected before copying
        (the weight is then written from memory), but external data is memory-mapped, so a
        change shows in the run's weights themselves, and a file truncated under the map ends
        the process (SIGBUS). The resolved paths of
        the external data files are in ``model.meta["onnxcompress.external_files"]``, the model's
        own in ``model.meta["onnxcompress.path"]`` (``api.optimize`` given the model refuses to
        write over either).

    Raises:
        ModelLoadError: the path is missing, is a directory or not a regular file, is not a
            valid ONNX protobuf, or names external data that does not exist, is not a regular
            file inside the model's folder, or is shorter than the tensor it should hold.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    if not p.is_file():
        raise ModelLoadError(f"{p}: not a regular file (a FIFO or a device?); expected an .onnx file")
    weights: dict[str, np.ndarray] = {}
    try:
        if p.suffix.lower() in _TEXT_SUFFIXES:  # text formats: onnx reads them by extension
            proto = onnx.load(str(p), load_external_data=False)
        else:
            proto = _load_lean(p, weights)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise ModelLoadError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{p}: not an ONNX model (no graph found)")
    try:
        files = _check_external_files(proto, p.parent)
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL in a location...
        raise ModelLoadError(f"{p}: bad external data reference ({type(exc).__name__}: {exc})") from None
    try:
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, p.parent)
        for name, arr in weights.items():
            v = model.graph.initializers[name]
            v.const_value = ir.Tensor(arr, name=name)
        _map_external(model)
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot convert to onnx-ir ({type(exc).__name__}: {exc})") from None
    model.meta["onnxcompress.external_files"] = files
    model.meta["onnxcompress.path"] = p.resolve()
    return model


def _map_external(model: ir.Model) -> None:
    """Give every external tensor an in-memory or mapped value, so nothing refers to the input's
    folder afterwards: initializers of a buffer dtype get a read-only view into *one* memory map
    per data file (onnx-ir's ``ExternalTensor`` maps the whole file once per tensor: a 2 GB file
    with 500 tensors would reserve 1 TB of address space, which an ``RLIMIT_AS`` cap refuses);
    other dtypes (bfloat16, float8, int4, strings), tensors in node attributes, tensors at an
    offset their dtype cannot be aligned to, and files past :data:`MAX_MAPPED_FILES` are read
    into memory.

    Raises:
        ValueError: a tensor's data lies past the end of its file, or its shape is negative."""
    import mmap

    maps: dict[str, mmap.mmap] = {}
    keys: dict[str, tuple] = {}

    def value_of(t: ir.ExternalTensor, name: str) -> ir.TensorProtocol:
        dims = [int(d) for d in t.shape.numpy()]
        if any(d < 0 for d in dims):
            raise ValueError(f"tensor '{name}': negative dimension in {dims}")
        if t.dtype not in _BUFFER_DTYPES:
            return ir.Tensor(np.array(t.numpy()), dtype=t.dtype, name=name)
        path = os.path.realpath(t.path)
        npdt = np.dtype(t.dtype.numpy()).newbyteorder("<")
        off, count = int(t.offset or 0), int(np.prod(dims, dtype=np.int64))
        if path not in maps and len(maps) < MAX_MAPPED_FILES:
            with open(path, "rb") as f:
                keys[path] = _file_key(os.fstat(f.fileno()))
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if keys[path][2] else b""
        if path in maps:
            if off + count * npdt.itemsize > len(maps[path]):
                raise ValueError(f"tensor '{name}': its data lies past the end of {t.location}")
            arr = np.frombuffer(maps[path], npdt, count, off).reshape(dims)
            if off % npdt.itemsize or not npdt.isnative:
                arr = arr.astype(npdt.newbyteorder("="))  # an aligned, native copy
            key = keys[path]
        else:
            arr = np.empty(dims, npdt)
            with open(path, "rb") as f:
                key = _file_key(os.fstat(f.fileno()))
                f.seek(off)
                if f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != arr.nbytes:
                    raise ValueError(f"tensor '{name}': its data lies past the end of {t.location}")
            if not npdt.isnative:
                arr = arr.astype(npdt.newbyteorder("="))
        if npdt.isnative:
            arr = _remember(arr, path, off, key)
        return ir.Tensor(arr, name=name)

    from .irutil import subgraphs

    graphs = (model.graph, *subgraphs(model.graph))
    for g in graphs:
        for v in g.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                v.const_value = value_of(v.const_value, v.name)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, a in list(node.attributes.items()):
            if a.type == ir.AttributeType.TENSOR and isinstance(a.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, value_of(a.value, a.value.name or name))
            elif a.type == ir.AttributeType.TENSORS and any(isinstance(t, ir.ExternalTensor) for t in a.value):
                node.attributes[name] = ir.AttrTensors(name, [value_of(t, t.name or name) if isinstance(t, ir.ExternalTensor)
                                                              else t for t in a.value])


#: file extensions onnx reads as text (``onnx.load`` picks the format from them)
_TEXT_SUFFIXES = (".onnxtxt", ".textproto", ".txtpb", ".json")


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """Yield ``(field number, wire type, field start, payload start, field end)`` of the
    protobuf message in ``buf[start:end]`` (encoding spec: varint, I64, LEN, I32)."""
    pos = start
    while pos < end:
        f0 = pos
        key, pos = _read_varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError(f"invalid protobuf field number 0 at byte {f0}")
        if wt == 0:
            _, pos = _read_varint(buf, pos, end)
            yield num, wt, f0, pos, pos
            continue
        if wt == 1:
            p0, pos = pos, pos + 8
        elif wt == 2:
            n, p0 = _read_varint(buf, pos, end)
            pos = p0 + n
        elif wt == 5:
            p0, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if pos > end:
            raise ValueError("truncated protobuf field")
        yield num, wt, f0, p0, pos


def _load_lean(path: Path, weights: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """Parse a model file without holding its bytes twice: the main graph's large ``raw_data``
    initializers are read straight from the file into aligned numpy arrays (``weights``, by
    name) and left out of the parsed protobuf (the skeleton), so peak memory is one copy of the
    weights plus the graph, and ``Tensor.numpy()`` later returns those arrays without a copy.
    Anything unusual (no graph, data held elsewhere, other dtypes) stays in the protobuf as is.
    ``weights=None``: the large inline tensors are dropped unread (a graph-only view, e.g. to
    list external data files). Raises ``ValueError`` / protobuf's ``DecodeError`` on a
    malformed file."""
    import mmap

    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if size == 0:
            raise ValueError("empty file")
        source = (os.path.realpath(path), _file_key(st))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                body = _lean_body(buf, size, f, weights, source)
            finally:
                buf.release()
    return onnx.load_model_from_string(body)


def _lean_body(buf: memoryview, size: int, f, weights: dict[str, np.ndarray] | None,
               source: tuple[str, tuple] | None = None) -> bytes:
    """The model's bytes with the main graph's large raw initializers stripped (see :func:`_load_lean`)."""
    graph = None
    for num, wt, f0, p0, end in _fields(buf, 0, size):
        if num == 7 and wt == 2:
            graph = (f0, p0, end)
    if graph is None:  # nothing to strip: let protobuf parse (and judge) it
        return bytes(buf)
    body = bytearray()
    for num, wt, f0, p0, end in _fields(buf, 0, size):
        if (f0, p0, end) != graph:
            body += buf[f0:end]
    pieces = []
    for num, wt, f0, p0, end in _fields(buf, graph[1], graph[2]):
        lean = _strip_raw(buf, p0, end, f, weights, source) if num == 5 and wt == 2 else None
        pieces.append(bytes(buf[f0:end]) if lean is None else _GRAPH_INITIALIZER + _varint(len(lean)) + lean)
    body += _MODEL_GRAPH + _varint(sum(len(x) for x in pieces))
    for piece in pieces:
        body += piece
    return bytes(body)


def _strip_raw(buf, start: int, end: int, f, weights: dict[str, np.ndarray] | None,
               source: tuple[str, tuple] | None = None) -> bytes | None:
    """A TensorProto in ``buf[start:end]`` without its ``raw_data`` field, the data read into
    ``weights[name]``; ``None`` when it is not a plain large raw tensor of a buffer dtype.
    ``source``: the file's ``(path, key)``, to record where the bytes came from (:func:`_remember`)."""
    name, dtype, dims, raw, other = None, None, [], None, False
    keep = []
    for num, wt, f0, p0, fend in _fields(buf, start, end):
        if num == 9 and wt == 2:
            raw = (f0, p0, fend)
            continue
        keep.append((f0, fend))
        if num == 8 and wt == 2:
            name = bytes(buf[p0:fend]).decode("utf-8", "replace")
        elif num == 2 and wt == 0:
            dtype = _read_varint(buf, f0 + 1, fend)[0]
        elif num == 1:
            if wt == 0:
                dims.append(_read_varint(buf, f0 + 1, fend)[0])
            elif wt != 2:
                other = True
            else:  # packed
                pos = p0
                while pos < fend:
                    d, pos = _read_varint(buf, pos, fend)
                    dims.append(d)
        elif num in (14, 13, 4, 5, 6, 7, 10, 11, 3, 12):  # external data, typed data, segment...
            other = True
    if raw is None or other or name is None or not name or dtype is None or (weights is not None and name in weights):
        return None
    try:
        dt = ir.DataType(dtype)
    except ValueError:
        return None
    nbytes = raw[2] - raw[1]
    if dt not in _BUFFER_DTYPES or nbytes < BIG_TENSOR_BYTES:
        return None
    npdt = np.dtype(dt.numpy()).newbyteorder("<")
    if any(d >= 1 << 63 for d in dims):  # a negative int64 dim (two's complement varint)
        raise ValueError(f"initializer '{name}': negative dimension")
    if int(np.prod(dims, dtype=object)) * npdt.itemsize != nbytes:
        raise ValueError(f"initializer '{name}': raw_data holds {nbytes} bytes, its shape {dims} needs "
                         f"{int(np.prod(dims, dtype=object)) * npdt.itemsize}")
    if weights is None:
        return b"".join(bytes(buf[f0:fend]) for f0, fend in keep)
    arr = np.empty(dims, dtype=npdt)
    f.seek(raw[1])
    if f.readinto(memoryview(arr).cast("B")) != nbytes:
        raise ValueError(f"initializer '{name}': file ends inside its data")
    if npdt.isnative:
        weights[name] = _remember(arr, source[0], raw[1], source[1]) if source is not None else arr
    else:
        weights[name] = arr.astype(npdt.newbyteorder("="))
    out = bytearray()
    for f0, fend in keep:
        out += buf[f0:fend]
    return bytes(out)


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files (resolved paths) that the model at ``path`` refers to."""
    p = Path(path)
    try:
        proto = _load_lean(p, None)  # the graph only: inline weights are skipped, not read
    except Exception:
        return []
    files = set()
    for t in _all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc and (p.parent / loc).is_file():
                files.add((p.parent / loc).resolve())
    return sorted(files)


def _check_external_files(proto: onnx.ModelProto, base: Path) -> list[Path]:
    """Refuse external data a hostile or broken model could abuse; return the files used.

    Each location must be a regular file inside ``base`` (no ``..`` escape, no FIFO or device),
    and ``offset + length`` must lie within it."""
    files: dict[Path, int] = {}
    root = base.resolve()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        # outside the folder first: whether an outside path exists is none of a model's business
        if loc and root not in target.parents:
            raise ModelLoadError(f"initializer '{tensor.name}' keeps its data in '{loc}', outside the model's "
                                 f"folder ({base}); refusing to read it")
        if not loc or not target.is_file():
            raise ModelLoadError(
                f"initializer '{tensor.name}' keeps its data in '{loc}', "
                f"which does not exist next to the model ({base}) as a regular file"
            )
        size = files.setdefault(target, target.stat().st_size)
        try:
            offset, length = int(info.get("offset", 0) or 0), int(info.get("length", -1) or -1)
        except ValueError:
            raise ModelLoadError(f"initializer '{tensor.name}': external data offset/length are not integers") from None
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise ModelLoadError(f"initializer '{tensor.name}': external data at offset {offset}, length {length} "
                                 f"lies past the end of '{loc}' ({size} bytes)")
    return sorted(files)


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize an onnx-ir model to a ``ModelProto`` with its weights inline (a full copy:
    only for small models and tests; the pipeline uses :func:`skeleton`).

    Intermediate ``value_info`` (shape annotations of inner tensors) is dropped: runtimes
    re-infer it, and stale entries after a rewrite can only mislead them.
    """
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    return proto


def check_model(model: ir.Model | onnx.ModelProto, *, runtime: bool = True) -> None:
    """Check a model with ``onnx.checker`` at its own opset/IR version, then load it in ORT.

    The checker reads the model's :func:`skeleton` (its large weights stand-ins for external
    data) from a private temporary folder, so no copy of the weights is made and a model over
    2 GB is checked like any other; ORT loads it without graph optimizations and reads the
    weights in place (:func:`onnxcompress.runtime.make_session`) — the optimized load is
    validation's (``api.optimize`` runs the candidate optimized before writing).

    Raises:
        InvalidModelError: with the checker's or ONNX Runtime's message.
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    with skeleton_file(model) as (path, _):
        try:
            onnx.checker.check_model(path, full_check=False)
        except Exception as exc:
            raise InvalidModelError(f"onnx.checker rejected the model: {exc}") from None
    if runtime:
        from .runtime import make_session

        try:  # a load without optimizations (no copy of the weights); validation runs it optimized
            make_session(model, optimize=False)
        except Exception as exc:
            raise InvalidModelError(f"ONNX Runtime refused to load the model: {exc}") from None


def check_output_path(path: str | os.PathLike, protect: tuple[str | os.PathLike, ...] = (),
                      external_data: bool | None = None) -> Path:
    """Refuse an output path before any work is done on it.

    Returns:
        The output's folder.

    Raises:
        ModelWriteError: ``path`` is a protected path (the input model or its data), a directory,
            or in a missing folder; or its ``<name>.data`` file (unless ``external_data`` is
            ``False``) would overwrite a protected path.
    """
    from .paths import PathError, check_output_file, same_file

    dest = Path(path)
    for prot in protect:
        if same_file(dest, prot):
            raise ModelWriteError(f"{dest}: output path is an input (the model, its data or the calibration/"
                                  "validation data); refusing to overwrite it")
    if dest.is_dir():
        raise ModelWriteError(f"{dest}: is a directory")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise ModelWriteError(f"{folder}: output folder does not exist")
    data_path = folder / (dest.name + ".data")
    try:
        check_output_file(dest, "model")
        if external_data is not False:
            check_output_file(data_path, "model's external data")
    except PathError as exc:
        raise ModelWriteError(str(exc)) from None
    if external_data is not False and any(same_file(data_path, p) for p in protect):
        raise ModelWriteError(f"{dest}: its external data file {data_path.name} would overwrite an input "
                              "(the model's weights or its data); choose another output name")
    return folder


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
    check: bool = True,
    runtime_check: bool = True,
) -> int:
    """Write a model atomically, after checking it, one tensor at a time.

    Args:
        model: the model to write (unchanged).
        path: destination ``.onnx`` path.
        external_data: store initializers of >= 1 KB in ``<name>.data`` beside the model
            (tensors of >= 1 MiB at 64 KiB offsets, so ORT can map them); ``None`` chooses it
            when the model is over 2 GB.
        protect: paths that must never be overwritten (the input model).
        check: run :func:`check_model` first.
        runtime_check: include the ONNX Runtime load in the check (off only for models with
            custom ops ORT does not know, which the caller has reported).

    Returns:
        The size in bytes of the written files (model plus external data).

    Raises:
        ModelWriteError: destination equals a protected path, its folder is missing or not
            writable, the disk is full, or a model over 2 GB was asked to be written inline;
            nothing is left at ``path`` in that case.
        InvalidModelError: the model failed the checks; nothing is written.
    """
    dest = Path(path)
    folder = check_output_path(dest, protect, external_data)
    inline = model_size_bytes(model)
    if external_data is False and inline >= PROTOBUF_LIMIT:
        raise ModelWriteError(f"{dest}: the model is {inline / 1024**3:.2f} GB, over protobuf's 2 GB limit for one "
                              "file; write it with --external-data")
    if check:
        check_model(model, runtime=runtime_check)
    if external_data is None:
        external_data = inline >= PROTOBUF_LIMIT
    tmp_model = tmp_data = None
    data_name = dest.name + ".data"
    try:
        fd, tmp_model = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        if external_data:
            fd, tmp_data = tempfile.mkstemp(prefix="." + data_name + ".", suffix=".tmp", dir=folder)
            os.close(fd)
        _write(model, tmp_model, folder, data_name, external_data=external_data, data_path=tmp_data)
        _default_mode(tmp_model)
        if tmp_data:
            _default_mode(tmp_data)
            _swap_pair(dest, tmp_model, folder / data_name, tmp_data, folder)
            tmp_data = None
        else:
            os.replace(tmp_model, dest)
        tmp_model = None
    except OSError as exc:
        raise ModelWriteError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    finally:
        for t in (tmp_model, tmp_data):
            if t:
                with contextlib.suppress(OSError):
                    os.unlink(t)
    size = dest.stat().st_size
    if external_data:
        size += (folder / data_name).stat().st_size
    return size


def _hide(path: Path, folder: Path) -> str | None:
    """Rename an existing ``path`` to a fresh hidden name in ``folder`` (returned); ``None`` when
    ``path`` does not exist."""
    if not os.path.lexists(path):
        return None
    fd, hidden = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".old", dir=folder)
    os.close(fd)
    try:
        os.replace(path, hidden)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(hidden)
        raise
    return hidden


def _swap_pair(dest: Path, new_model: str, data: Path, new_data: str, folder: Path) -> None:
    """Put a model and its external data file in place as one step as far as renames allow.

    Order: an earlier ``dest`` and ``data`` are moved to hidden names, then the new data and
    the new model are renamed in, then the hidden ones are removed. So whoever opens ``dest``
    during the switch finds no model rather than the old model beside the new data (whose
    offsets would not match: wrong weights that load), and a run killed in between leaves no
    model at ``dest`` (plus hidden ``.old`` / ``.tmp`` files), never a mismatched pair. Any
    failure (an ``OSError``, Ctrl-C) before the end undoes the renames done so far, so the
    earlier pair is back as it was; if undoing fails too, the error names where the earlier
    files are kept. (A reader that had read ``dest`` *before* the switch and opens ``data``
    after it still gets the new data: only a data file name unique to each write would close
    that.)

    Raises:
        OSError: a rename failed (after the undo).
    """
    done: list[tuple[str, str]] = []  # (from, to) renames, undone in reverse on failure
    hidden: list[str] = []
    try:
        for path in (dest, data):
            h = _hide(path, folder)
            if h is not None:
                hidden.append(h)
                done.append((str(path), h))
        os.replace(new_data, data)
        done.append((new_data, str(data)))
        os.replace(new_model, dest)
        done.append((new_model, str(dest)))
    except BaseException as exc:
        failed = None
        for src, dst in reversed(done):
            try:
                os.replace(dst, src)
            except OSError as undo:
                failed = failed or undo
        kept = [h for h in hidden if os.path.lexists(h)]  # earlier files not back in place
        if failed is not None and kept:
            raise OSError(failed.errno, f"{getattr(exc, 'strerror', None) or exc}; putting the earlier files back "
                                        f"failed too ({failed.strerror or failed}): they are kept as "
                                        f"{', '.join(kept)}") from exc
        raise
    for h in hidden:
        with contextlib.suppress(OSError):
            os.unlink(h)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


#: protobuf tags (field number << 3 | length-delimited): ModelProto.graph = 7, GraphProto.initializer = 5
_MODEL_GRAPH, _GRAPH_INITIALIZER = bytes([7 << 3 | 2]), bytes([5 << 3 | 2])
#: TensorProto.raw_data = 9, length-delimited
_RAW_DATA = bytes([9 << 3 | 2])


def _initializer_entry(name: str, tensor: ir.TensorProtocol) -> tuple[bytes, np.ndarray]:
    """``GraphProto.initializer`` entry of one tensor as ``(header, data)``: the field's tag and
    length, the TensorProto's name / dtype / dims, and the ``raw_data`` field's tag and length;
    ``data`` is the tensor's bytes (a view, not a copy) that follow. Written in order they are
    the serialized entry; the data is always ``raw_data``, whatever it was read from."""
    buf = weight_buffer(tensor)
    head = onnx.TensorProto(name=name, data_type=int(tensor.dtype),
                            dims=[int(d) for d in tensor.shape.numpy()]).SerializeToString()
    raw_head = _RAW_DATA + _varint(buf.nbytes)
    tlen = len(head) + len(raw_head) + buf.nbytes
    return _GRAPH_INITIALIZER + _varint(tlen) + head + raw_head, buf


def _le_bytes(buf: np.ndarray) -> memoryview:
    """The array's bytes, little-endian (ONNX's order), as a flat view where no swap is needed
    (any dtype, ml_dtypes' bfloat16 / float8 included)."""
    if buf.dtype.byteorder == ">":
        buf = buf.astype(buf.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))


def _open_unchanged(path: str, key: tuple) -> int:
    """A read-only descriptor of ``path`` if it is still the regular file that was read
    (:func:`_file_key`), else -1. Opened without following a link, blocking or taking a terminal."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return -1
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and _file_key(st) == key:
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


def _kernel_copy() -> bool:
    return hasattr(os, "copy_file_range") and os.environ.get(NO_KERNEL_COPY_ENV, "") in ("", "0")


def _emit(f, buf: np.ndarray, fds: dict[tuple, int] | None) -> None:
    """Append one tensor's bytes to ``f`` (a binary file open for writing).

    Bytes that are an unchanged region of an input file (:func:`file_source`: a weight as
    :func:`load_model` read or mapped it, the file not modified since) are copied file to file
    by the kernel (``os.copy_file_range``, Linux): nothing passes through this process's memory,
    and on a filesystem that shares blocks (XFS, Btrfs) nothing is copied at all. Anything else,
    where the kernel or filesystem cannot, with ``fds=None``, or with the environment variable
    :data:`NO_KERNEL_COPY_ENV` set, is written from memory. ``fds``: descriptors of the input
    files opened so far by ``(path, key)`` (-1: not usable), closed by the caller."""
    src = file_source(buf) if fds is not None else None
    done = 0
    if src is not None:
        path, offset, key = src
        if (path, key) not in fds:
            fds[path, key] = _open_unchanged(path, key)
        fd = fds[path, key]
        if fd >= 0:
            f.flush()
            try:
                while done < buf.nbytes:
                    n = os.copy_file_range(fd, f.fileno(), buf.nbytes - done, offset + done)
                    if n <= 0:  # the file ends early (changed under us): the rest from memory
                        break
                    done += n
            except OSError:  # EXDEV, EOPNOTSUPP, ENOSYS...: from memory, for this file from now on
                fds[path, key] = -1
                os.close(fd)
    if done < buf.nbytes:
        f.write(_le_bytes(buf)[done:])


class _SourceChanged(Exception):
    """An input file copied from changed while the output was written."""


def _write(model: ir.Model, path: str | os.PathLike, folder: str | os.PathLike, data_name: str, *,
           external_data: bool, data_path: str | os.PathLike | None = None) -> None:
    """Stream ``model`` to ``path``: its skeleton, then the large tensors one at a time — appended
    as protobuf chunks (inline) or to ``data_path`` (default ``folder/data_name``) with the
    skeleton pointing at ``data_name``; a weight unchanged from the input file is copied from it
    by the kernel (:func:`_emit`). Every input file copied from is checked again once all is
    written; if one changed meanwhile, the whole output is written again from memory. Peak
    extra memory: one tensor's bytes."""
    fds: dict[tuple, int] = {}
    try:
        _write_streams(model, path, folder, data_name, external_data, data_path, fds if _kernel_copy() else None)
        for (_, key), fd in fds.items():
            if fd >= 0 and _file_key(os.fstat(fd)) != key:
                raise _SourceChanged
    except _SourceChanged:
        _write_streams(model, path, folder, data_name, external_data, data_path, None)
    finally:
        for fd in fds.values():
            if fd >= 0:
                os.close(fd)


def _write_streams(model: ir.Model, path, folder, data_name: str, external_data: bool, data_path,
                   fds: dict[tuple, int] | None) -> None:
    if not external_data:
        # the canonical layout (one `graph` field, every reader parses it): the skeleton's fields,
        # then the graph field whose length counts the entries streamed after its own payload
        proto, weights = skeleton(model)
        keep = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                or {e.key: e.value for e in t.external_data}.get("location") != PLACEHOLDER]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        graph = proto.graph.SerializeToString()
        proto.ClearField("graph")
        entries = [_initializer_entry(name, t) for name, t in weights]
        glen = len(graph) + sum(len(h) + b.nbytes for h, b in entries)
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
            f.write(_MODEL_GRAPH + _varint(glen))
            f.write(graph)
            del graph
            for k, (head, buf) in enumerate(entries):
                f.write(head)
                _emit(f, buf, fds)
                tick("writing", k + 1, len(entries), "tensors")
            f.flush()
            os.fsync(f.fileno())
        return
    offsets: dict[str, int] = {}
    pos = 0
    with open(data_path or os.path.join(folder, data_name), "wb") as f:
        for v in counted(list(_detachable(model)), "writing", "tensors"):
            buf = weight_buffer(v.const_value)
            if buf.nbytes >= ALIGN_THRESHOLD and pos % ALIGNMENT:
                f.write(b"\0" * (ALIGNMENT - pos % ALIGNMENT))
                pos += ALIGNMENT - pos % ALIGNMENT
            offsets[v.name] = pos
            _emit(f, buf, fds)
            pos += buf.nbytes
        f.flush()
        os.fsync(f.fileno())
    proto, _ = skeleton(model, location=data_name, offsets=offsets)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _default_mode(path: str) -> None:
    """Give a temp file (mkstemp: 0600) the permissions a plain new file would have (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a small file (a report, a recipe, a state file) atomically: a private temporary file
    in the same folder, given a plain file's permissions, renamed over ``path`` — never written
    through a link, never left half-written.

    Raises:
        OSError: the folder cannot be written (nothing is left behind).
    """
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".tmp", dir=dest.parent if str(dest.parent) else ".")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        _default_mode(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_size_bytes(model: ir.Model | onnx.ModelProto) -> int:
    """Size in bytes of the model serialized with its weights inline, computed from its skeleton
    and its tensors' sizes (nothing of the weights is serialized): what :func:`save_model` writes
    without external data, to within a few bytes."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    proto, weights = skeleton(model)
    size = proto.ByteSize()
    for name, t in weights:
        head = onnx.TensorProto(name=name, data_type=int(t.dtype), dims=[int(d) for d in t.shape.numpy()])
        tlen = head.ByteSize() + 1 + len(_varint(t.nbytes)) + t.nbytes
        size += 1 + len(_varint(tlen)) + tlen - _standin_size(name, t)
    return size


def _standin_size(name: str, t: ir.TensorProtocol) -> int:
    """Bytes the external-data stand-in of one tensor takes in the skeleton's graph."""
    sp = ir.serde.serialize_tensor(ir.ExternalTensor(PLACEHOLDER, 0, t.nbytes, t.dtype, shape=t.shape, name=name))
    n = sp.ByteSize()
    return 1 + len(_varint(n)) + n
