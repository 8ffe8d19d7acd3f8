"""EfficientNet-Lite0: channel pruning, then distillation from the original on unlabelled photo crops.

    python scripts/bench_distill_lite0.py [--prune 0.4] [--crops 768] [--epochs 10] [--lr 1e-3]
        [--out /tmp/bench_distill_lite0]

Issue "knowledge distillation and efficient architectures", done-when: 40 % channel pruning +
distillation recovers at least half of the top-1 agreement that pruning lost, within 30 CPU-minutes.

Per ratio: ``onnxcompress optimize zoo_cache/efficientnet_lite0/model.onnx --prune R --prune-mode channel
--calibration calib.npz`` (least-squares repair on the zoo's 64 calibration crops), then ``onnxcompress
distill`` of the pruned model from the original on ``--crops`` new random crops (``scripts/zoo_data.py``'s
RandomResizedCrop + flip, another seed) of the *calibration* photos (astronaut, coffee, china, ...;
unlabelled: the teacher's logits are the targets). Top-1 agreement with fp32 is measured on the zoo's
240 validation crops of ten *other* photos (chelsea, rocket, flower, ...) — data from a different source
than anything pruning or distillation saw — and, to show what the student learned, on the training
crops themselves. Needs the zoo (``python scripts/fetch_zoo.py && python scripts/zoo_data.py``) and
the [torch] extra. Prints the CPU, the wall and CPU seconds of each step, and the latency ratio of
each model against fp32 (``onnxcompress bench``'s interleaved timing, batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
ZOO = ROOT / "zoo_cache" / "efficientnet_lite0"


def crops(n: int, seed: int, path: Path) -> None:
    """``n`` crops of the calibration photos (another seed than the zoo's) as ``{"input": [n,3,224,224]}``."""
    from zoo_data import EFF_CALIB, effnet_pre, photos, random_resized_crop

    rng = np.random.default_rng(seed)
    p = photos(EFF_CALIB)
    x = np.stack([effnet_pre(random_resized_crop(rng, p[EFF_CALIB[i % len(EFF_CALIB)]])) for i in range(n)])
    np.savez(path, input=x)


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 40]})[0] for i in range(0, len(x), 40)])


def cli(*args) -> tuple[float, float]:
    """Run the CLI; ``(wall s, CPU s of the child)``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxcompress.cli", *map(str, args)], check=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prune", type=float, nargs="+", default=[0.4])
    ap.add_argument("--crops", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_distill_lite0"))
    a = ap.parse_args()
    if not (ZOO / "model.onnx").is_file():
        sys.exit("needs the zoo: python scripts/fetch_zoo.py && python scripts/zoo_data.py")
    from bench_distill import cpu

    from onnxcompress.bench import benchmark

    a.out.mkdir(parents=True, exist_ok=True)
    model = ZOO / "model.onnx"
    train = a.out / f"train_{a.crops}.npz"
    if not train.is_file():
        crops(a.crops, 777, train)
    val = np.load(ZOO / "val.npz")["input"]
    seen = np.load(train)["input"][:240]
    t_val, t_seen = logits(model, val).argmax(1), logits(model, seen).argmax(1)

    def agree(path: Path) -> tuple[float, float]:
        return (float(100 * np.mean(logits(path, val).argmax(1) == t_val)),
                float(100 * np.mean(logits(path, seen).argmax(1) == t_seen)))

    print(f"CPU: {cpu()}; onnxruntime {ort.__version__}; {os.cpu_count()} logical CPUs")
    rows = []
    for r in a.prune:
        pruned, dist = a.out / f"pruned_{r}.onnx", a.out / f"distilled_{r}.onnx"
        rep = a.out / f"pruned_{r}.json"
        state = dist.with_name(dist.name + ".distill")
        if state.exists():
            import shutil
            shutil.rmtree(state)
        wp, cp = cli("optimize", model, "-o", pruned, "--prune", r, "--prune-mode", "channel", "--calibration",
                     ZOO / "calib.npz", "--no-latency", "--report", rep, "-q")
        macs = next(p["counts"] for p in json.loads(rep.read_text())["passes"] if p["name"] == "prune-channels")
        wd, cd = cli("distill", model, pruned, "-o", dist, "--data", train, "--epochs", a.epochs, "--lr", a.lr,
                     "--batch-size", a.batch_size, "-q")
        g = benchmark([model, pruned, dist], data=ZOO / "val.npz", duration=20, warmup=2, memory=False).groups[0]
        speed = {pruned.name: g.models[1].speedup, dist.name: g.models[2].speedup}
        rows.append((f"pruned {r} (least squares)", macs.get("macs_removed_pct"), *agree(pruned),
                     speed.get(pruned.name), wp, cp))
        rows.append((f"  + distilled {a.epochs} ep on {a.crops} crops", macs.get("macs_removed_pct"), *agree(dist),
                     speed.get(dist.name), wd, cd))
    print(f"\n{'model':<40} {'MACs removed':>12} {'top-1 agr. val %':>16} {'on train crops %':>16} "
          f"{'speed-up':>8} {'wall s':>7} {'CPU s':>7}")
    for name, removed, v, t, sp, w, c in rows:
        print(f"{name:<40} {removed if removed is not None else '-':>12} {v:>16.1f} {t:>16.1f} "
              f"{sp if sp is None else f'{sp:.2f}':>8} {w:>7.1f} {c:>7.1f}")


if __name__ == "__main__":
    main()
