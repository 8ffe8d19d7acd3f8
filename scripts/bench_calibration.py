"""Calibration cost per method: wall time and peak memory, each in its own process.

The issue's budget: on EfficientNet-Lite0 with 64 calibration images, every calibration
method takes at most 1.5x the time of ``minmax`` and at most 0.5 GB peak memory, measured
with ``/usr/bin/time -v``.

Two measurements per method, each in a fresh child process run under ``/usr/bin/time -v``
(max resident set size, elapsed wall time):

* ``calibrate``: what static quantization spends on calibration: the model after our
  clean-up/fusion stage, every float tensor static quantization would observe (inputs and
  outputs of every node; a superset of what it needs), 64 samples through ONNX Runtime
  (optimizations off) with :func:`onnxcompress.passes.quantize.calibrate.observe`, then the
  range of every tensor with the method. ``calib s`` is that part alone (perf_counter wall
  time; ``calib CPU s`` its CPU time over all threads, steadier on a loaded machine);
  ``process s`` and ``peak MB`` include Python, imports and the model load.
* ``optimize`` (``--full``): the whole ``onnxcompress optimize --quantize static
  --calibration-method M --validation val.npz`` command on the whole calibration file, for context (it also runs
  the per-node checks, bias correction and validation, which do not depend on the method
  except through the ranges).

Each method runs ``--repeats`` times (default 3), interleaved across methods (minmax, percentile,
..., auto, minmax, ...), and the median is reported: one run per method in sequence moved the
ratios by +-0.1 with the machine's drift.

Usage::

    python scripts/bench_calibration.py [--model zoo_cache/efficientnet_lite0/model.onnx]
        [--calibration zoo_cache/efficientnet_lite0/calib.npz] [--samples 64] [--repeats 3] [--full]

Prints a markdown table; exit status 1 when a method misses the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
TIME_BUDGET = 1.5      # x minmax
MEMORY_BUDGET_MB = 500.0


def child(model: str, calibration: str, samples: int, method: str) -> None:
    """Calibrate ``model`` with ``method`` and print a JSON line with the timing."""
    import numpy as np
    import onnx
    import onnx_ir as ir

    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model
    from onnxcompress.passes.quantize.calibrate import observe

    m = load_model(model)
    typed = ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(m)))  # value types
    names = sorted({v.name for node in typed.graph for v in (*node.inputs, *node.outputs)
                    if v is not None and v.name and v.const_value is None
                    and v.dtype == ir.DataType.FLOAT})
    feeds = load_npz(calibration, input_specs(m))[0][:samples]
    t0, c0 = time.perf_counter(), time.process_time()
    stats, _ = observe(m, names, feeds, method=method)
    ranges = {n: s.range(method) for n, s in stats.items() if s.n}
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(np.isfinite(r).all() for r in ranges.values())
    print(json.dumps({"method": method, "calib_s": dt, "calib_cpu_s": cpu, "tensors": len(ranges), "samples": len(feeds)}))


def timed(cmd: list[str]) -> tuple[str, float, float]:
    """Run ``cmd`` under ``/usr/bin/time -v``: (stdout, wall s, peak RSS MB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        p = subprocess.run(["/usr/bin/time", "-v", "-o", tf.name, *cmd], capture_output=True, text=True,
                           cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
        rep = tf.read()
    rss_kb = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", rep).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", rep).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    return p.stdout, secs, rss_kb / 1024.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo_cache/efficientnet_lite0/model.onnx")
    ap.add_argument("--calibration", default="zoo_cache/efficientnet_lite0/calib.npz")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--full", action="store_true", help="also time the whole optimize command per method")
    ap.add_argument("--repeats", type=int, default=3,
                    help="child processes per method, interleaved across methods; the median is reported (default 3)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.model, args.calibration, args.samples, args.child)
        return 0
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs /usr/bin/time (GNU time: apt-get install time)")
    model = (ROOT / args.model).resolve()
    if not model.exists():
        raise SystemExit(f"{model} missing: run python scripts/fetch_zoo.py && python scripts/zoo_data.py")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fused = Path(tmp) / "fused.onnx"
        from onnxcompress import OptimizeOptions, optimize

        optimize(model, fused, OptimizeOptions(fuse=True))  # what the quantizer sees
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for rep in range(args.repeats):  # interleaved: the machine's drift hits every method alike
            for method in METHODS:
                out, wall, rss = timed([sys.executable, __file__, "--model", str(fused), "--calibration",
                                        str(ROOT / args.calibration), "--samples", str(args.samples),
                                        "--child", method])
                info = json.loads(out.strip().splitlines()[-1])
                runs[method].append({"calib_s": info["calib_s"], "calib_cpu_s": info["calib_cpu_s"], "process_s": wall,
                                     "peak_mb": rss, "tensors": info["tensors"], "samples": info["samples"]})
        for method in METHODS:
            rs = runs[method]
            row = {"method": method, "repeats": len(rs), "tensors": rs[0]["tensors"], "samples": rs[0]["samples"],
                   **{k: float(np.median([r[k] for r in rs])) for k in ("calib_s", "calib_cpu_s", "process_s")},
                   "peak_mb": max(r["peak_mb"] for r in rs)}
            if args.full:
                _, fwall, frss = timed([sys.executable, "-m", "onnxcompress.cli", "optimize", str(model),
                                        "-o", str(Path(tmp) / f"{method}.onnx"), "--quantize", "static",
                                        "--calibration", str(ROOT / args.calibration),
                                        "--calibration-method", method,
                                        "--validation", str(ROOT / args.calibration.replace("calib", "val"))])
                row.update(optimize_s=fwall, optimize_mb=frss)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    base, base_cpu = rows[0]["calib_s"], rows[0]["calib_cpu_s"]
    ok = True
    head = "| method | tensors × samples | calib s | × minmax | calib CPU s | × minmax | process s | peak MB |"
    sep = "|---|---|---|---|---|---|---|---|"
    if args.full:
        head += " optimize s | optimize peak MB |"
        sep += "---|---|"
    print(head)
    print(sep)
    for r in rows:
        ratio = r["calib_s"] / base
        ok &= ratio <= TIME_BUDGET and r["peak_mb"] <= MEMORY_BUDGET_MB
        line = (f"| {r['method']} | {r['tensors']} × {r['samples']} | {r['calib_s']:.2f} | {ratio:.2f} | "
                f"{r['calib_cpu_s']:.2f} | {r['calib_cpu_s'] / base_cpu:.2f} | "
                f"{r['process_s']:.2f} | {r['peak_mb']:.0f} |")
        if args.full:
            line += f" {r['optimize_s']:.1f} | {r['optimize_mb']:.0f} |"
        print(line)
    print(f"\n(median of {args.repeats} interleaved runs per method; peak MB: the largest)")
    print(f"\nbudget: each method ≤ {TIME_BUDGET}× minmax calibration time and ≤ {MEMORY_BUDGET_MB:.0f} MB "
          f"peak: {'met' if ok else 'MISSED'} (machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
