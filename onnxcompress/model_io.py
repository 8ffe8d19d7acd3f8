"""Model input/output: load with external data, check, and write atomically.

The input file is never modified. Outputs are written to a temporary file in the target
folder and renamed into place only after ``onnx.checker`` (at the written model's own
opset and IR version) and an ONNX Runtime session have accepted them, so a failed run
leaves no partial output.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from .errors import InvalidModelError, ModelLoadError, ModelWriteError

#: Protobuf's hard limit; larger models must keep their weights as external data.
PROTOBUF_LIMIT = 2 * 1024**3


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (with its external data) into onnx-ir.

    Args:
        path: path of a ``.onnx`` file; external data files are resolved relative to it.

    Returns:
        The model as an ``onnx_ir.Model``; external tensors are read eagerly so that the
        model no longer depends on the input folder.

    Raises:
        ModelLoadError: the path is missing, is a directory, is not a valid ONNX protobuf,
            or names an external data file that does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise ModelLoadError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{p}: not an ONNX model (no graph found)")
    _check_external_files(proto, p.parent)
    try:
        onnx.load_external_data_for_model(proto, str(p.parent))
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot read external data ({exc})") from None
    try:
        return ir.from_proto(proto)
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot convert to onnx-ir ({type(exc).__name__}: {exc})") from None


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files (resolved paths) that the model at ``path`` refers to."""
    p = Path(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:
        return []
    files = set()
    for t in _all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc and (p.parent / loc).is_file():
                files.add((p.parent / loc).resolve())
    return sorted(files)


def _check_external_files(proto: onnx.ModelProto, base: Path) -> None:
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if not loc or not target.is_file():
            raise ModelLoadError(
                f"initializer '{tensor.name}' keeps its data in '{loc}', "
                f"which does not exist next to the model ({base})"
            )


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
    """Serialize an onnx-ir model to a ``ModelProto`` (weights inline).

    Intermediate ``value_info`` (shape annotations of inner tensors) is dropped: runtimes
    re-infer it, and stale entries after a rewrite can only mislead them.
    """
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    return proto


_TEMP_DIRS: list[str] = []
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _TEMP_DIRS])


def to_bytes(model: ir.Model | onnx.ModelProto) -> bytes | str:
    """Serialize a model for an ONNX Runtime session or ``onnx.checker``.

    Returns:
        protobuf bytes; for a model at or over protobuf's 2 GB limit, the path of a private
        temporary copy written with external data (removed at exit), which ORT and the
        checker accept in place of bytes.
    """
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    if proto.ByteSize() < PROTOBUF_LIMIT:
        return proto.SerializeToString()
    folder = tempfile.mkdtemp(prefix="onnxcompress-")
    _TEMP_DIRS.append(folder)
    path = os.path.join(folder, "model.onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # saving with external data rewrites the tensors of its argument
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return path


def check_model(model: ir.Model | onnx.ModelProto, *, runtime: bool = True) -> None:
    """Check a model with ``onnx.checker`` at its own opset/IR version, then load it in ORT.

    Raises:
        InvalidModelError: with the checker's or ONNX Runtime's message.
    """
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    data = to_bytes(proto)
    try:
        onnx.checker.check_model(proto if isinstance(data, bytes) else data, full_check=False)
    except Exception as exc:
        raise InvalidModelError(f"onnx.checker rejected the model: {exc}") from None
    if runtime:
        from .runtime import make_session

        try:
            make_session(data, optimize=True)
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
    dest = Path(path)
    for prot in protect:
        if dest.resolve() == Path(prot).resolve():
            raise ModelWriteError(f"{dest}: output path is the input model (or its data); refusing to overwrite it")
    if dest.is_dir():
        raise ModelWriteError(f"{dest}: is a directory")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise ModelWriteError(f"{folder}: output folder does not exist")
    protected = {Path(p).resolve() for p in protect}
    data_path = (folder / (dest.name + ".data")).resolve()
    if external_data is not False and data_path in protected:
        raise ModelWriteError(f"{dest}: its external data file {data_path.name} would overwrite the input's "
                              "weights; choose another output name")
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
    """Write a model atomically, after checking it.

    Args:
        model: the model to write.
        path: destination ``.onnx`` path.
        external_data: store initializers in ``<name>.data`` beside the model; ``None``
            chooses it when the model is over 2 GB.
        protect: paths that must never be overwritten (the input model).
        check: run :func:`check_model` first.
        runtime_check: include the ONNX Runtime load in the check (off only for models with
            custom ops ORT does not know, which the caller has reported).

    Returns:
        The size in bytes of the written files (model plus external data).

    Raises:
        ModelWriteError: destination equals a protected path, its folder is missing or not
            writable, or the disk is full; nothing is left at ``path`` in that case.
        InvalidModelError: the model failed the checks; nothing is written.
    """
    dest = Path(path)
    folder = check_output_path(dest, protect, external_data)
    proto = to_proto(model)
    if check:
        check_model(proto, runtime=runtime_check)
    if external_data is None:
        external_data = proto.ByteSize() >= PROTOBUF_LIMIT
    tmp_model = tmp_data = None
    data_name = dest.name + ".data"
    try:
        fd, tmp_model = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        if external_data:
            fd, tmp_data = tempfile.mkstemp(prefix="." + data_name + ".", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(tmp_data)  # a unique name only: onnx >= 1.16 refuses to write into an existing file
            # onnx writes external data at `location` relative to the model's folder: write it
            # under a temporary name, then rename both.
            onnx.save_model(
                proto, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                location=Path(tmp_data).name, size_threshold=1024,
            )
            if not os.path.exists(tmp_data):  # no tensor reached the threshold: an empty data file
                open(tmp_data, "wb").close()
            # point the tensors at the final data file name
            final = onnx.load(tmp_model, load_external_data=False)
            for t in _all_tensors(final.graph):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            with open(tmp_model, "wb") as f:
                f.write(final.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            _default_mode(tmp_data)
            os.replace(tmp_data, folder / data_name)
            tmp_data = None
        else:
            with open(tmp_model, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        _default_mode(tmp_model)
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


def _default_mode(path: str) -> None:
    """Give a temp file (mkstemp: 0600) the permissions a plain new file would have (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def model_size_bytes(model: ir.Model | onnx.ModelProto) -> int:
    """Size in bytes of the serialized model with weights inline."""
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    return proto.ByteSize()
