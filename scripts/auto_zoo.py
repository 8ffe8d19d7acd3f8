"""Which mode ``--quantize auto`` picks for every zoo model, and why.

For each model in ``zoo_cache/`` (``scripts/fetch_zoo.py`` + ``scripts/zoo_data.py``) runs
``optimize(..., quantize="auto", calibration=calib.npz, validation=val.npz)`` and prints one
markdown row: the chosen mode and, per candidate, whether it keeps the answers (the task
criterion: the default fidelity floor, as no gate is set), its floor value and worst-output
cosine on the validation data, and its median latency from the interleaved timing (only the
candidates that keep the answers are timed). About 5 minutes on 2 cores.

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

    print("| model | chosen | dynamic: keeps answers, floor value, worst cos / ms | static: the same | why | s |")
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
            floor_vals = {m: _floor_value(res.report, m, auto) for m in ("dynamic", "static")}
            for m, v in floor_vals.items():
                if m in auto["candidates"]:
                    auto["candidates"][m]["floor_value"] = v
            cell = []
            for mode in ("dynamic", "static"):
                c = auto["candidates"].get(mode)
                cell.append("-" if c is None else _cell(c) if c["passed"] else
                            "refused: " + (c.get("error") or "failed")[:90])
            print(f"| {name} | {auto['chosen']} | {cell[0]} | {cell[1]} | {auto['why']} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
    return 1 if bad else 0


def _floor_value(report: dict, mode: str, auto: dict) -> str:
    """The chosen candidate's floor rows (only its report is kept); '' for the other."""
    if mode != auto.get("chosen"):
        return ""
    return ", ".join(f"{g['gate'].replace('floor-', '')} {g['value']:.4g}" for g in report.get("gates", [])
                     if g.get("floor"))


def _cell(c: dict) -> str:
    keeps = "yes" if c.get("keeps_answers") else "no"
    fv = f" ({c['floor_value']})" if c.get("floor_value") else ""
    return f"{keeps}{fv}, {c['fidelity']:.5f} / {c.get('latency_ms', '-')}"


if __name__ == "__main__":
    sys.exit(main())
