"""Small helpers shared by the pipeline, ``--quantize auto`` and the benchmarks."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np


#: bytes per independently compressed block of :func:`compressed_size`
ZLIB_BLOCK = 16 << 20


def compressed_size(paths: list[Path]) -> int:
    """zlib (level 6) size in bytes of the files, each compressed in blocks of
    :data:`ZLIB_BLOCK` bytes, the blocks compressed in parallel (zlib releases the GIL; a block
    restarts zlib's 32 KiB window, which changes the total by a few bytes per block). About
    30 MB/s per core on float weights. Memory: up to one block per worker plus the one being read."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    def blocks():
        for p in paths:
            with open(p, "rb") as f:
                yield from iter(lambda: f.read(ZLIB_BLOCK), b"")

    def size(block: bytes) -> int:
        return len(zlib.compress(block, 6))

    workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        # map() would read every block up front: submit a window of `workers` blocks at a time
        total, pending = 0, []
        for b in blocks():
            pending.append(pool.submit(size, b))
            del b
            if len(pending) >= workers:
                total += pending.pop(0).result()
        return total + sum(f.result() for f in pending)


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
