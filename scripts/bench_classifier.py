"""Benchmark a classifier side by side: fp32 vs onnxcompress int8 vs ONNX Runtime's own
``quantize_static`` (QDQ, per-channel), in one run, on the same held-out inputs.

Fidelity against fp32 (ORT optimizations ON for every model, as deployed):
  * top-1 agreement on the *decisive* samples, where fp32's top-1 softmax probability >= 0.3
    (their count is printed): ambiguous crops flip under half a pixel of noise;
  * mean KL(fp32 || int8) of the softmax over all samples.
Latency: median ms per model at batch 1, 2 threads, timed interleaved (A B C A B C ...) so
machine drift hits all alike; size in bytes.

Run (after scripts/fetch_zoo.py and scripts/zoo_data.py):

    python scripts/bench_classifier.py --model zoo_cache/efficientnet_lite0 [--rounds 200]

Writes ``<model dir>/bench.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcompress import OptimizeOptions, optimize
from onnxcompress.data import input_specs, load_npz
from onnxcompress.model_io import load_model


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def session(path, threads=2):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_quantize_static(src: Path, dst: Path, calib: list[dict]) -> None:
    """ONNX Runtime's quantizer, its recommended CPU setting: QDQ, per-channel, s8 weights, u8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("zoo_cache/efficientnet_lite0"))
    ap.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    ap.add_argument("--method", default="minmax", help="onnxcompress calibration method")
    args = ap.parse_args()
    d = args.model
    src, cal, val = d / "model.onnx", d / "calib.npz", d / "val.npz"
    specs = input_specs(load_model(src))
    calib, _ = load_npz(cal, specs)
    valid, _ = load_npz(val, specs)
    tmp = Path(tempfile.mkdtemp())
    ours = tmp / "onnxcompress.int8.onnx"
    t0 = time.perf_counter()
    optimize(src, ours, OptimizeOptions(quantize="static", calibration=cal, validation=val,
                                        calibration_method=args.method, latency=False,
                                        accept_degraded=True))
    t_ours = time.perf_counter() - t0
    theirs = tmp / "ort.int8.onnx"
    t0 = time.perf_counter()
    ort_quantize_static(src, theirs, calib)
    t_theirs = time.perf_counter() - t0
    models = {"fp32": src, "onnxcompress int8": ours, "ORT quantize_static": theirs}
    sess = {k: session(p) for k, p in models.items()}
    name = sess["fp32"].get_inputs()[0].name
    logits = {k: np.concatenate([s.run(None, f)[0] for f in valid]) for k, s in sess.items()}
    p32 = softmax(logits["fp32"].astype(np.float64))
    decisive = p32.max(-1) >= 0.3
    feed = valid[0]
    for s in sess.values():
        for _ in range(10):
            s.run(None, feed)
    times = {k: [] for k in sess}
    for _ in range(args.rounds):
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    rows = []
    base_ms = float(np.median(times["fp32"]))
    for k in models:
        p = softmax(logits[k].astype(np.float64))
        kl = float(np.mean(np.sum(p32 * (np.log(p32 + 1e-12) - np.log(p + 1e-12)), -1)))
        agree = float(np.mean(p.argmax(-1)[decisive] == p32.argmax(-1)[decisive]) * 100)
        ms = float(np.median(times[k]))
        rows.append({"model": k, "bytes": models[k].stat().st_size, "agree_decisive_pct": agree, "kl": kl,
                     "median_ms": ms, "speedup_vs_fp32": base_ms / ms})
    out = {"model_dir": str(d), "n_val": len(valid), "n_decisive": int(decisive.sum()), "rows": rows,
           "quantize_seconds": {"onnxcompress": round(t_ours, 1), "ort": round(t_theirs, 1)},
           "input": name, "rounds": args.rounds, "threads": 2}
    (d / "bench.json").write_text(json.dumps(out, indent=2))
    print(f"{d.name}: {len(valid)} held-out samples, {int(decisive.sum())} decisive (fp32 top-1 p >= 0.3)")
    print(f"| model | size | x smaller | top-1 agree (decisive) | KL(fp32||q) | median ms | speed vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bytes'] / 1e6:.2f} MB | {rows[0]['bytes'] / r['bytes']:.2f} | "
              f"{r['agree_decisive_pct']:.1f} % | {r['kl']:.3f} | {r['median_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x |")


if __name__ == "__main__":
    main()
