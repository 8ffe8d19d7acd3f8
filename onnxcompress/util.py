"""Small helpers shared by the pipeline, ``--quantize auto`` and the benchmarks."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np


def compressed_size(paths: list[Path]) -> int:
    """zlib (level 6) size in bytes of the files together, streamed in 16 MiB chunks."""
    total = 0
    for p in paths:
        comp = zlib.compressobj(6)
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(16 << 20), b""):
                total += len(comp.compress(chunk))
        total += len(comp.flush())
    return total


def jsonable(obj):
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def plain_value(v) -> tuple[tuple, "np.ndarray | None"]:
    """A model output as ``(structure, numbers)`` for comparison.

    Tensors: ``(("tensor", shape), array)``; sequences: the structure of their elements and their
    numbers concatenated (1-D); an absent optional (``None``): ``(("none",), None)``; strings and
    other non-numeric tensors: their values in the structure and ``None`` for numbers (compared
    for equality). Two outputs compare only when their structures are equal.
    """
    if v is None:
        return ("none",), None
    if isinstance(v, (list, tuple)):
        parts = [plain_value(x) for x in v]
        key = ("seq", tuple(p[0] for p in parts))
        arrs = [p[1] for p in parts]
        if any(a is None for a in arrs):
            return key, None
        return key, (np.concatenate([a.ravel() for a in arrs]) if arrs else np.zeros(0))
    a = np.asarray(v)
    if a.dtype.kind in "OUSV":
        return ("values", a.shape, tuple(str(x) for x in a.ravel().tolist())), None
    return ("tensor", a.shape), a
