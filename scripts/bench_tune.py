"""tune against the best fixed recipe, per zoo model (issue "onnxcompress tune", done-when).

    python scripts/bench_tune.py [--only ppocr_cls silero_vad] [--trials 20] [--time-budget 1200] [--json out.json]

Per model of ``zoo_cache/`` (``scripts/fetch_zoo.py && scripts/zoo_data.py``), with the budget of
:data:`BUDGETS` (the README's task goal: ``--metric task``, or :data:`METRICS`'s, the most it may drop):

1. The validation data is split as ``tune`` splits it: the search half and a held-out half that
   no search sees (``onnxcompress.tune._prepare``, so both sides use the same split and metric).
2. Fixed recipes, as a user runs them: ``optimize --quantize dynamic|static|auto`` with the defaults
   (fidelity floor, fallback), calibration ``calib.npz``. A recipe that writes nothing (the floor)
   is listed as such.
3. ``tune`` with the budget, ``--trials`` and ``--time-budget``.
4. Every written model is scored on the held-out half (the budget's metric, drop against fp32) and
   timed interleaved with fp32, all of a model's candidates in ONE ``bench`` call (``--duration``
   s), so the speed-ups compare; the "best fixed" is the fastest fixed recipe within the budget.

Prints: model | budget | best fixed recipe (speed-up, drop, MB) | tune (speed-up, drop, MB) | tune
vs fixed | trials | minutes; with the CPU it ran on. Goal: tune at least as fast as the best fixed
recipe on 7/7 and >= 10 % faster on 3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcompress import OptimizeOptions, optimize  # noqa: E402
from onnxcompress.bench import benchmark  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402
from onnxcompress.tune import Budget, _prepare, measure, tune  # noqa: E402

#: per model: the most the task metric (``--metric task``: top-1 on decisive rows, decoded lines,
#: or mean cosine x 100) may drop, in its units — README's task goals
BUDGETS = {"efficientnet_lite0": 2.0, "minilm": 0.5, "ppocr_cls": 1.0, "ppocr_det": 1.0, "ppocr_rec": 3.0,
           "silero_vad": 0.5, "yolov8n": 5.0}
#: the metric per model (default ``task``): YOLOv8n's goal is its detections after NMS (``boxes``: F1
#: against fp32's x 100, at most 5 points below: about 95 % of detections kept)
METRICS = {"yolov8n": "boxes"}
FIXED = ("dynamic", "static", "auto")


def cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def score(s, budget: Budget, model: Path, path: Path) -> dict:
    """Held-out metric and drop, and size, of one written model (its speed-up: :func:`time_all`)."""
    metric = measure(budget, path, s.ref_final, s.final_feeds, s.final_labels)
    fp32 = measure(budget, model, s.ref_final, s.final_feeds, s.final_labels)
    return {"metric": metric, "drop": fp32 - metric, "path": str(path),
            "size_mb": (path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))) / 1e6}


def time_all(s, model: Path, rows: list[dict], duration: float) -> None:
    """Speed-up against fp32 of every written model, all timed in ONE interleaved bench call: two
    separate calls a minute apart read the same static YOLOv8n at 1.72x and 1.28x on a shared machine."""
    written = [r for r in rows if "path" in r]
    if not written:
        return
    g = benchmark([model, *[Path(r["path"]) for r in written]], data=s.bench_data, duration=duration, warmup=2,
                  memory=False).groups[0]
    for r, m in zip(written, g.models[1:]):
        r["speedup"] = m.speedup


def one(name: str, folder: Path, args, work: Path) -> dict:
    budget = Budget(metric=METRICS.get(name, "task"), max_drop=BUDGETS[name])
    model, calib, val = folder / "model.onnx", folder / "calib.npz", folder / "val.npz"
    t0 = time.perf_counter()
    st = work / "split"
    (st / "trials").mkdir(parents=True)
    s = _prepare(model, budget, str(calib), str(val), st, lambda m: None)
    row = {"model": name, "budget": f"{budget.metric} drop <= {budget.max_drop:g}", "fixed": {}}
    for mode in FIXED:
        out = work / f"{mode}.onnx"
        try:
            optimize(model, out, OptimizeOptions(quantize=mode, calibration=str(calib), latency=False))
            row["fixed"][mode] = score(s, budget, model, out)
        except OnnxCompressError as exc:
            row["fixed"][mode] = {"error": str(exc).splitlines()[0][:160]}
        print(f"  {name} {mode}: {row['fixed'][mode]}", flush=True)
    t1 = time.perf_counter()
    out = work / "tune.onnx"
    try:
        res = tune(model, out, budget, calibration=str(calib), validation=str(val), trials=args.trials,
                   time_budget_s=args.time_budget, state=work / "tune.state",
                   progress=lambda m: print(f"  {name} {m}", flush=True))
        row["tune"] = {**score(s, budget, model, out), "met": res.met,
                       "trials": len(res.trials), "chosen": res.chosen.options if res.chosen else None}
    except OnnxCompressError as exc:
        row["tune"] = {"error": str(exc).splitlines()[0][:160]}
    row["tune_minutes"] = round((time.perf_counter() - t1) / 60, 1)
    time_all(s, model, [*row["fixed"].values(), row["tune"]], args.duration)
    ok = {m: r for m, r in row["fixed"].items() if "error" not in r and r["drop"] <= budget.max_drop + 1e-9}
    row["best_fixed"] = max(ok, key=lambda m: ok[m].get("speedup") or 0.0) if ok else None
    row["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    return row


def main() -> int:
    import logging

    logging.getLogger("onnxcompress").setLevel(logging.ERROR)  # the passes' skip notes: in the reports
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "zoo_cache")
    ap.add_argument("--only", nargs="+", default=list(BUDGETS))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--time-budget", type=float, default=1200.0, help="seconds of tune per model")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of the interleaved timing per model")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    unknown = [n for n in args.only if n not in BUDGETS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(BUDGETS)}")
    rows = []
    for name in args.only:
        folder = args.cache / name
        if not (folder / "model.onnx").is_file():
            print(f"{name}: not fetched ({folder}); run scripts/fetch_zoo.py && scripts/zoo_data.py", file=sys.stderr)
            continue
        work = Path(tempfile.mkdtemp(prefix=f"bench-tune-{name}-"))
        try:
            rows.append(one(name, folder, args, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=1, default=str))

    def fmt(r: dict | None) -> str:
        if not r:
            return "-"
        if "error" in r:
            return "not written: " + r["error"][:60]
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        return f"{sp}, drop {r['drop']:.2f}, {r['size_mb']:.2f} MB"

    print(f"\n{cpu()}; --trials {args.trials}, --time-budget {args.time_budget:g} s; held-out half of val.npz\n")
    print("| model | budget | best fixed recipe | tune | tune vs fixed | trials | minutes |\n|---|---|---|---|---|---|---|")
    wins = ties = 0
    for r in rows:
        bf = r["fixed"].get(r["best_fixed"]) if r["best_fixed"] else None
        t = r.get("tune") or {}
        rel = "-"
        if bf and t.get("speedup") and bf.get("speedup") and "error" not in t and t["drop"] <= BUDGETS[r["model"]] + 1e-9:
            q = t["speedup"] / bf["speedup"]
            rel = f"{q:.2f}"
            wins += q >= 1.10
            ties += q >= 1.0
        print(f"| {r['model']} | {r['budget']} | {r['best_fixed'] or 'none'}: {fmt(bf)} | {fmt(t)} | {rel} | "
              f"{t.get('trials', '-')} | {r['tune_minutes']} |")
    print(f"\ntune at least as fast as the best fixed recipe (within the budget): {ties}/{len(rows)}; "
          f">= 10 % faster: {wins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
