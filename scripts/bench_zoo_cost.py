"""The tool's own cost on the zoo: onnxcompress vs ONNX Runtime's quantizers, per model and mode.

For each zoo model (``zoo_cache/<name>/``: ``python scripts/fetch_zoo.py && python scripts/zoo_data.py``)
and each mode (``--modes static dynamic``), in one run, each tool in its own child process
measured by ``scripts/bench_scale.py``'s launcher (wall seconds and peak RSS from ``os.wait4``):

* ``ORT``: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel s8 weights, u8
  activations, MinMax, the model's ``calib.npz`` samples) or ``quantize_dynamic`` (s8 weights) —
  the settings ``scripts/bench_int8.py`` tries first;
* ``onnxcompress``: ``onnxcompress optimize MODEL -o OUT --quantize MODE --calibration calib.npz
  --validation val.npz --no-latency --report R`` — what a user runs, validation, default fidelity
  floor and its fallback included (ORT's tools do none of these). The report's per-stage cost
  says where the time went (``slowest`` column).

The issue's goal (``targets``): onnxcompress ≤ 1.5 × ORT's time and ≤ 1 GB peak RSS per model.
Fidelity is ``scripts/bench_int8.py``'s business; this script only says whether a run wrote its
model (exit 0) or refused it under the floor (exit 3: the time is still the time a user waits).

Run::

    python scripts/bench_zoo_cost.py [--only NAME ...] [--modes static dynamic] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import cpu_summary, onnxcompress_cli, run_child  # noqa: E402

GB = 1e9
TIME_RATIO = 1.5
PEAK_BYTES = 1 * GB


def worker(argv: list[str]) -> int:
    """``--worker ort MODE MODEL OUT CALIB``: ONNX Runtime's quantizer in this child process."""
    from bench_int8 import ort_dynamic, ort_pre_process, ort_static

    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model

    mode, model, out, calib = argv
    pre, _ = ort_pre_process(Path(model), Path(out).with_name("pre.onnx"))
    feeds = load_npz(calib, input_specs(load_model(model)))[0] if mode == "static" else None
    (ort_static if mode == "static" else ort_dynamic)(pre, Path(out), feeds, True, False)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "zoo_cache"))
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--modes", nargs="+", choices=["static", "dynamic"], default=["static", "dynamic"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker[1:])
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cache = Path(args.cache)
    names = sorted(p.name for p in cache.iterdir() if (p / "model.onnx").is_file()) if cache.is_dir() else []
    names = [n for n in names if not args.only or n in args.only]
    if not names:
        console.print(f"no zoo models in {cache}: python scripts/fetch_zoo.py && python scripts/zoo_data.py")
        return 2
    machine = cpu_summary()
    rows = []
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="bench-zoo-cost-") as tmp:
        for name in names:
            d = cache / name
            for mode in args.modes:
                work = Path(tmp) / name / mode
                work.mkdir(parents=True, exist_ok=True)
                ort = run_child(me + ["--worker", "ort", mode, str(d / "model.onnx"), str(work / "ort.onnx"),
                                      str(d / "calib.npz")], work, "ort", args.timeout)
                rep = work / "report.json"
                ox = run_child(onnxcompress_cli() + ["optimize", str(d / "model.onnx"), "-o", str(work / "ox.onnx"),
                                                     "--quantize", mode, "--calibration", str(d / "calib.npz"),
                                                     "--validation", str(d / "val.npz"), "--no-latency", "--report",
                                                     str(rep), "-q"], work, "ox", args.timeout)
                slowest = None
                try:
                    cost = json.loads(rep.read_text())["cost"]["stages"]
                    top = sorted(cost, key=lambda s: -s["seconds"])[:2]
                    slowest = ", ".join(f"{s['stage'][:28]} {s['seconds']:.1f} s" for s in top)
                except (OSError, ValueError, KeyError):
                    pass
                row = {"model": name, "mode": mode, "ort_s": ort["seconds"], "ort_peak_bytes": ort["peak_rss_bytes"],
                       "ort_rc": ort["rc"], "ort_stderr": ort["stderr_last"] if ort["rc"] else None, "ox_s": ox["seconds"], "ox_peak_bytes": ox["peak_rss_bytes"],
                       "ox_rc": ox["rc"], "ox_stderr": ox["stderr_last"], "slowest": slowest}
                row["ratio"] = round(ox["seconds"] / ort["seconds"], 2) if ort["rc"] == 0 and ort["seconds"] else None
                row["meets"] = (row["ratio"] is not None and row["ratio"] <= TIME_RATIO,
                                (ox["peak_rss_bytes"] or 0) <= PEAK_BYTES)
                rows.append(row)
                console.print(f"{name} {mode}: onnxcompress {ox['seconds']:.1f} s (exit {ox['rc']}), "
                              f"ORT {ort['seconds']:.1f} s (exit {ort['rc']})"
                              + (f": {ort['stderr_last']}" if ort["rc"] and ort["stderr_last"] else ""), highlight=False)
    t = Table(title=f"tool cost on the zoo — {machine['cpu']}, {machine['cpus']} CPUs")
    for c in ("model", "mode", "onnxcompress s", "ORT s", "× ORT", "peak GB ox / ORT", "exit ox", "targets",
              "slowest stages (onnxcompress)"):
        t.add_column(c)
    for r in rows:
        pk = lambda b: "-" if b is None else f"{b / GB:.2f}"  # noqa: E731
        t.add_row(r["model"], r["mode"], f"{r['ox_s']:.1f}", f"{r['ort_s']:.1f}" if r["ort_rc"] == 0 else
                  "failed" + (f": {r['ort_stderr'][:60]}" if r.get("ort_stderr") else ""),
                  "-" if r["ratio"] is None else f"{r['ratio']:.2f}", f"{pk(r['ox_peak_bytes'])} / {pk(r['ort_peak_bytes'])}",
                  str(r["ox_rc"]), f"time {'✔' if r['meets'][0] else '✘'} mem {'✔' if r['meets'][1] else '✘'}",
                  r["slowest"] or "-")
    console.print(t)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
