"""Paths a command reads and writes: nothing an input names is ever overwritten.

Rules (the same for the CLI and the Python API):

* an input (model, its external data, calibration/validation files, a recipe) must be a
  regular file — a FIFO or a device would block or never end (:func:`check_input_file`);
* an output (model, its ``.data``, ``--report``, ``--html``) is a new path or an existing
  regular file in a writable folder — never a FIFO, a device, a folder or a symbolic link (the
  atomic rename would replace the link: ``--html /dev/stdout`` would replace ``/dev/stdout``)
  (:func:`check_output_file`);
* every output differs from every input and from every other output, including through links
  (:func:`check_distinct`).

Each check runs before any work, so a bad path costs nothing and leaves nothing behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable, Mapping

from .errors import OnnxCompressError


class PathError(OnnxCompressError):
    """An input or output path that must not be used (see the module docstring)."""


#: what a file that is not a regular file is, by its ``stat`` type
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link"}


def file_kind(mode: int) -> str:
    """``"a FIFO"``, ``"a character device"``, ... for a ``st_mode`` (``"a special file"`` else)."""
    return KINDS.get(stat.S_IFMT(mode), "a special file")


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`Path` when it is an existing regular file (links followed).

    Raises:
        PathError: missing, or a folder, FIFO, device or socket.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise PathError(f"{what} {p}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise PathError(f"{what} {p}: {file_kind(st.st_mode)}, not a regular file; refusing to read it")
    return p


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output path that is an existing non-regular file or whose folder is missing or
    not writable. Returns the folder.

    Raises:
        PathError: naming the path and why.
    """
    p = Path(path)
    try:
        st = p.lstat()  # the path itself: a link is replaced by the write, not written through
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise PathError(f"{p}: cannot write the {what} there ({exc.strerror or exc})") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise PathError(f"{p}: cannot write the {what} there (a symbolic link: the write would replace the link; "
                        "give the real path)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise PathError(f"{p}: cannot write the {what} there ({file_kind(st.st_mode)}; outputs are regular files "
                        "or new paths)")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise PathError(f"{p}: cannot write the {what} there (its folder does not exist)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PathError(f"{p}: cannot write the {what} there (the folder {folder} is not writable)")
    return folder


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: equal once resolved, or the same inode (hard links)."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return False


def check_distinct(outputs: Mapping[str, str | os.PathLike | None],
                   inputs: Mapping[str, str | os.PathLike | None] | Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Every output differs from every input and from the other outputs.

    Args:
        outputs: label (``"--report"``) -> path (``None`` entries are ignored).
        inputs: label -> path, or (label, path) pairs.

    Raises:
        PathError: naming both.
    """
    outs = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    ins = [(k, Path(v)) for k, v in (inputs.items() if isinstance(inputs, Mapping) else inputs) if v is not None]
    for i, (lo, po) in enumerate(outs):
        for li, pi in ins:
            if same_file(po, pi):
                raise PathError(f"{po}: {lo} would overwrite the {li}; choose another path")
        for lo2, po2 in outs[i + 1:]:
            if same_file(po, po2):
                raise PathError(f"{po}: {lo} and {lo2} name the same file; give each its own path")
