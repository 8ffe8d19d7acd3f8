"""Repeat ``onnxcompress bench`` N times and report how stable the speed ratios are.

The acceptance check of issue 4: fp32 vs int8 ratios must agree within 10 % across
consecutive runs, and two byte-identical files must compare within 5 %.

    python scripts/bench_repeat.py zoo_cache/efficientnet_lite0/model.onnx /tmp/eff.int8.onnx \\
        --data zoo_cache/efficientnet_lite0/val.npz --repeat 3 --duration 15 [--json out.json]

Prints, per repeat, each model's p50 (ms) and its speed-up against the first model, then
the spread of the speed-ups across repeats ((max - min) / mean).
"""

from __future__ import annotations

import argparse
import json

from onnxcompress.bench import benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of timed runs per repeat")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for r in range(a.repeat):
        res = benchmark(a.models, data=a.data, duration=a.duration, threads=a.threads, memory=False)
        g = res.groups[0]
        rows.append({"repeat": r + 1, "rounds": g.rounds,
                     "models": [{"label": m.label, "p50_ms": m.latency.p50_ms, "speedup": m.speedup,
                                 "ratio_ci": m.latency_ratio_ci} for m in g.models], "notes": g.notes})
        print(f"run {r + 1} ({g.rounds} rounds): " + ", ".join(
            f"{m.label} p50 {m.latency.p50_ms:.3f} ms (x{m.speedup:.3f})" for m in g.models))
    for i, label in enumerate(rows[0]["models"][1:], start=1):
        s = [row["models"][i]["speedup"] for row in rows]
        spread = (max(s) - min(s)) / (sum(s) / len(s))
        print(f"{label['label']}: speed-ups {', '.join(f'{v:.3f}' for v in s)}; spread {100 * spread:.1f} %")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
