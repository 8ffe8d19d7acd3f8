"""Digits CNN: channel pruning (least-squares repair only) vs pruning + distillation from the original.

    python scripts/bench_distill.py [--prune 0.5] [--epochs 60] [--lr 1e-3] [--out /tmp/bench_distill]

For each pruning ratio: `onnxcompress optimize models/digits_cnn.onnx --prune R --prune-mode channel
--calibration models/digits_calib.npz`, then `onnxcompress distill` of the pruned model from the original
on the unlabelled calibration inputs (256 rows), then static int8 of the distilled model; and the same in
one command (`optimize --prune R --prune-mode channel --distill EPOCHS --quantize static`). Accuracy is measured on the 450 held-out labelled test
images (models/digits_test.npz), never seen by pruning or distillation. Needs the [torch] extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODEL, CALIB, TEST = (ROOT / "models" / n for n in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"))


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split()) if "flags" in text else set()
    feats = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    import os
    return f"{name.group(1) if name else 'unknown'} ({os.cpu_count()} cores; {', '.join(feats) or 'no avx2'})"


def accuracy(path: Path) -> float:
    d = np.load(TEST)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((s.run(None, {s.get_inputs()[0].name: d["input"]})[0].argmax(1) == d["labels"]).mean() * 100)


def cli(*args) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxcompress.cli", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prune", type=float, nargs="+", default=[0.5])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads for distillation")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_distill"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch
    print(f"CPU: {cpu()}; torch {torch.__version__} (distill --threads {a.threads}), onnxruntime "
          f"{ort.__version__}")
    rows = [("original", None, accuracy(MODEL), None)]
    for r in a.prune:
        pruned, dist = a.out / f"pruned_{r}.onnx", a.out / f"distilled_{r}.onnx"
        rep_p, rep_d = a.out / f"pruned_{r}.json", a.out / f"distilled_{r}.json"
        state = a.out / f"distilled_{r}.onnx.distill"
        if state.exists():  # a fresh run every time (the bench measures the whole cost)
            import shutil
            shutil.rmtree(state)
        tp = cli("optimize", MODEL, "-o", pruned, "--prune", r, "--prune-mode", "channel", "--calibration", CALIB,
                 "--report", rep_p, "-q")
        macs = next(p["counts"] for p in json.loads(rep_p.read_text())["passes"] if p["name"] == "prune-channels")
        td = cli("distill", MODEL, pruned, "-o", dist, "--data", CALIB, "--epochs", a.epochs, "--lr", a.lr,
                 "--temperature", a.temperature, "--batch-size", a.batch_size, "--threads", a.threads, "--report", rep_d, "-q")
        d = json.loads(rep_d.read_text())
        removed = macs.get("macs_removed_pct")
        rows.append((f"pruned {r} (least squares)", removed, accuracy(pruned), tp))
        rows.append((f"pruned {r} + distilled ({a.epochs} ep)", removed, accuracy(dist), td))
        q = a.out / f"distilled_{r}_int8.onnx"
        tq = cli("optimize", dist, "-o", q, "--quantize", "static", "--calibration", CALIB, "--accept-degraded", "-q")
        rows.append(("  ... then static int8", removed, accuracy(q), td + tq))
        # the same in one run: the distill stage (trains on the calibration rows minus the 64 held
        # out for validation, torch at its default threads)
        one = a.out / f"one_run_{r}.onnx"
        to = cli("optimize", MODEL, "-o", one, "--prune", r, "--prune-mode", "channel", "--distill", a.epochs,
                 "--quantize", "static", "--calibration", CALIB, "-q")
        rows.append((f"one run: prune {r} + distill + int8", removed, accuracy(one), to))
        print(f"  prune {r}: loss {d['initial_loss']:.4f} -> {d['final_loss']:.4f}, train {d['train_seconds']} s, "
              f"export check {d['export_check']['max_rel_error']:.1e}")
    print(f"\n{'model':<36} {'MACs removed':>12} {'test acc %':>10} {'wall s':>8}")
    for name, removed, acc, secs in rows:
        print(f"{name:<36} {'-' if removed is None else f'{removed:.1f} %':>12} {acc:>10.2f} "
              f"{'-' if secs is None else f'{secs:.1f}':>8}")


if __name__ == "__main__":
    main()
