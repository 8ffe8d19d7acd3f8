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
