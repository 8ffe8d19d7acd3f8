"""Which mode ``--quantize auto`` picks for every zoo model, and why.

For each model in ``zoo_cache/`` (``scripts/fetch_zoo.py`` + ``scripts/zoo_data.py``) runs
``optimize(..., quantize="auto", calibration=calib.npz, validation=val.npz)`` and prints one
markdown row: the chosen mode, each candidate's worst-output cosine on the validation data and
its median latency from the interleaved timing (only candidates within 0.01 of the best cosine
are timed). About 3 minutes on 2 cores.

Usage::

    python scripts/auto_zoo.py [NAME ...] [--cache zoo_cache]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = ["efficientnet_lite0", "ppocr_det", "ppocr_rec", "ppocr_cls", "yolov8n", "silero_vad", "minilm"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=MODELS, metavar="NAME")
    ap.add_argument("--cache", type=Path, default=REPO / "zoo_cache")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from onnxcompress import OptimizeOptions, optimize

    print("| model | chosen | dynamic: worst cos / ms | static: worst cos / ms | why | s |")
    print("|---|---|---|---|---|---|")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            d = args.cache / name
            if not (d / "model.onnx").is_file():
                print(f"| {name} | not fetched | | | | |")
                continue
            t0 = time.perf_counter()
            try:
                res = optimize(d / "model.onnx", Path(tmp) / f"{name}.onnx",
                               OptimizeOptions(quantize="auto", calibration=d / "calib.npz", validation=d / "val.npz"))
            except Exception as exc:  # noqa: BLE001 - one bad model never stops the others
                bad += 1
                print(f"| {name} | error: {str(exc)[:120]} | | | | |")
                continue
            auto = res.report["auto"]
            cell = []
            for mode in ("dynamic", "static"):
                c = auto["candidates"].get(mode)
                cell.append("-" if c is None else
                            f"{c['fidelity']:.5f} / {c.get('latency_ms', '-')}" if c["passed"] else "failed")
            print(f"| {name} | {auto['chosen']} | {cell[0]} | {cell[1]} | {auto['why']} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
