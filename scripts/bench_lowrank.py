"""Figures for low-rank factorization on all-MiniLM-L6-v2 (issue 16, item 1).

    python scripts/bench_lowrank.py                          # targets 0.25 0.3, float and dynamic int8
    python scripts/bench_lowrank.py --targets 0.1 0.25 --no-int8

Each run is the command line ``onnxcompress optimize zoo_cache/minilm/model.onnx -o OUT
--low-rank T [--quantize dynamic] --calibration calib.npz --validation val.npz`` through the
Python API: fuse, then the ``low-rank`` stage with ``target_ratio = T`` (share of the MACs of
the FFN and attention projections removed, whitened by the calibration sentences), then int8.
Printed per run: the share of projection MACs removed (the pass's report), the validation
report's ``mean_cosine`` and worst cosine of ``sentence_embedding`` on the held-out sentences
(``val.npz``), and the seconds the run took. The CPU's int8 flags come first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcompress import OptimizeOptions, optimize  # noqa: E402


def cpu() -> str:
    flags: set[str] = set()
    name = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name == "?":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{name}; avx2={'avx2' in flags} avx512_vnni={'avx512_vnni' in flags} avx_vnni={'avx_vnni' in flags}"


def one(folder: Path, target: float | None, quantize: str | None, out: Path) -> dict:
    t0 = time.perf_counter()
    res = optimize(folder / "model.onnx", out, OptimizeOptions(
        low_rank=target, quantize=quantize, calibration=str(folder / "calib.npz"),
        validation=str(folder / "val.npz"), latency=False))
    rep = res.report
    lr = next((p for p in rep["passes"] if p["name"] == "low-rank"), None)
    emb = next(o for o in rep["validation"][0]["outputs"] if o["name"] == "sentence_embedding")
    c = lr["counts"] if lr else {}
    return {"target": target, "quantize": quantize, "layers_factorized": c.get("layers_factorized", 0),
            "projection_macs_removed_pct": c.get("macs_removed_pct", 0.0), "mean_layer_rel_err": c.get("mean_rel_err"),
            "mean_cosine": round(emb["mean_cosine"], 5), "min_cosine": round(emb["cosine"], 5),
            "size_mb": round(out.stat().st_size / 1e6, 2), "seconds": round(time.perf_counter() - t0, 1),
            "ranks": {d["node"].split("/")[3] + "/" + "/".join(d["node"].split("/")[4:-1]): d["rank"]
                      for d in c.get("layers", [])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(ROOT / "zoo_cache" / "minilm"))
    ap.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.3])
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also the int8-only run (no factorization)")
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    folder = Path(a.folder)
    print("CPU:", cpu(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(t, None) for t in a.targets] + ([] if a.no_int8 else [(t, "dynamic") for t in a.targets])
        if a.baseline:
            runs.insert(0, (None, "dynamic"))
        for i, (t, q) in enumerate(runs):
            print(json.dumps(one(folder, t, q, Path(tmp) / f"{i}.onnx")), flush=True)


if __name__ == "__main__":
    main()
