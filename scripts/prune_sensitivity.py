"""Per-group channel-pruning sensitivity of a zoo model, every group (what ``tune`` measures for
its largest groups before the search, :func:`onnxcompress.tune._prune_sensitivity`).

    python scripts/prune_sensitivity.py efficientnet_lite0 [--ratio 0.25] [--metric task] [--json out.json]

For the model in ``zoo_cache/NAME/`` (``scripts/fetch_zoo.py && scripts/zoo_data.py``): one
channel-pruning run at ``--ratio`` lists the dependency groups; then each group is pruned alone at
that ratio (every other group at 0, least-squares repair on ``calib.npz`` included) and the
budget's metric (``tune --metric``'s built-ins) is measured on the whole ``val.npz`` against fp32.
Prints: drop | share of the model's MACs | layers | channels | group (a root layer), largest MACs
first, then all groups pruned together. No timing: it can share the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcompress.api import OptimizeOptions, optimize  # noqa: E402
from onnxcompress.data import input_specs, load_npz  # noqa: E402
from onnxcompress.model_io import load_model  # noqa: E402
from onnxcompress.runtime import run_reference  # noqa: E402
from onnxcompress.tune import Budget, measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="zoo model folder under --cache")
    ap.add_argument("--cache", type=Path, default=ROOT / "zoo_cache")
    ap.add_argument("--ratio", type=float, default=0.25, help="share of each group's channels removed")
    ap.add_argument("--metric", default="task", help="task, top1, boxes, cosine, ... (tune's built-ins)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    logging.getLogger("onnxcompress").setLevel(logging.ERROR)
    z = a.cache / a.name
    model = z / "model.onnx"
    val, _ = load_npz(z / "val.npz", input_specs(load_model(model)), what="validation")
    _, ref = run_reference(str(model), val)
    budget = Budget(metric=a.metric)
    fp32 = measure(budget, model, ref, val, None)
    base = OptimizeOptions(calibration=str(z / "calib.npz"), validation=None, latency=False, fallback=False,
                           accept_degraded=True, prune_mode="channel", prune=a.ratio)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="prune-sensitivity-"))
    out = tmp / "pruned.onnx"
    res = optimize(model, out, base)
    counts = next(p["counts"] for p in res.report["passes"] if p["name"] == "prune-channels")
    groups = sorted((d for d in counts["groups_detail"] if d["kept"] < d["channels"]), key=lambda d: -d["macs"])
    total = counts["macs_before"] or 1
    every = fp32 - measure(budget, out, ref, val, None)
    rows = []
    print(f"{a.name}: {len(groups)} groups, each pruned alone at {a.ratio:.0%}; {a.metric} of fp32 {fp32:.4g}, "
          f"{len(val)} validation samples")
    print(f"{'drop':>8} {'MACs':>6} {'layers':>6} {'channels':>8}  group")
    for d in groups:
        others = {g["roots"][0]: 0.0 for g in groups if g is not d}
        optimize(model, out, replace(base, prune_ratios=others))
        drop = fp32 - measure(budget, out, ref, val, None)
        rows.append({"group": d["roots"][0], "drop": drop, "macs_share": d["macs"] / total, "layers": len(d["roots"]),
                     "channels": d["channels"]})
        print(f"{drop:8.2f} {d['macs'] / total:6.1%} {len(d['roots']):6d} {d['channels']:8d}  {d['roots'][0]}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"all {len(groups)} groups together at {a.ratio:.0%}: drop {every:.2f}; "
          f"{sum(1 for r in rows if r['drop'] <= 0)} group(s) alone lose nothing; {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"model": a.name, "ratio": a.ratio, "metric": a.metric, "fp32": fp32,
                                      "all_groups_drop": every, "groups": rows}, indent=1))


if __name__ == "__main__":
    main()
