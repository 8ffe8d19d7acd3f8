"""Run onnxcompress on the real-model zoo and tabulate the results.

For every zoo model (``<cache>/<name>/model.onnx`` with ``calib.npz`` and ``val.npz``, see
``scripts/fetch_zoo.py`` and ``scripts/zoo_data.py``) and every recipe:

* ``fuse``    -- clean-up and fusion only (outputs should not move);
* ``dynamic`` -- ``quantize="dynamic"``;
* ``static``  -- ``quantize="static"``, default calibration method;

it calls :func:`onnxcompress.optimize` (calibration = ``calib.npz``, validation =
``val.npz``), writes the optimized model to a temporary folder, and records file size,
node count, worst max_rel_err / min cosine over outputs, top-1 agreement, median latency,
quantized and skipped nodes, reverted passes and wall time. A failure of one (model,
recipe) is recorded and the rest still run.

Usage::

    python scripts/zoo_results.py                               # all models, all recipes
    python scripts/zoo_results.py --only ppocr_cls silero_vad --recipes fuse,static
    python scripts/zoo_results.py --cache zoo_cache --out zoo_cache/results

Writes ``zoo_results.json`` and ``zoo_results.md`` into ``--out`` (default
``<cache>/results``) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = ("efficientnet_lite0", "ppocr_det", "ppocr_rec", "ppocr_cls", "yolov8n", "silero_vad", "minilm")
RECIPES = ("fuse", "dynamic", "static")


def options_for(recipe: str, mdir: Path):
    from onnxcompress import OptimizeOptions

    # the table measures every mode's fidelity itself: a model below the default floor is written
    common = dict(calibration=str(mdir / "calib.npz"), validation=str(mdir / "val.npz"), accept_degraded=True)
    if recipe == "fuse":
        return OptimizeOptions(fuse=True, **common)
    if recipe in ("dynamic", "static"):
        return OptimizeOptions(fuse=True, quantize=recipe, **common)
    raise ValueError(f"unknown recipe {recipe!r}")


def _num(x):
    """JSON-safe float (the report writes inf/nan as strings)."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return x


def summarize_report(rep: dict) -> dict:
    """The numbers we tabulate, out of one ``optimize`` report."""
    before, after = rep.get("before", {}), rep.get("after", {})
    row: dict = {}
    fb = before.get("file_bytes") or before.get("size_bytes")
    fa = after.get("file_bytes") or after.get("size_bytes")
    row.update(bytes_before=fb, bytes_after=fa, size_ratio=(fb / fa if fb and fa else None),
               nodes_before=before.get("n_nodes"), nodes_after=after.get("n_nodes"))
    val = (rep.get("validation") or [{}])[0]
    outs = val.get("outputs", [])
    rel = [_num(o["max_rel_err"]) for o in outs]
    cos = [_num(o["cosine"]) for o in outs]
    top1 = [o["top1_agreement"] for o in outs if o.get("top1_agreement") is not None]
    row.update(max_rel_err=max(rel) if rel else None, min_cosine=min(cos) if cos else None,
               top1_agreement=min(top1) if top1 else None,
               per_output={o["name"]: {k: _num(o[k]) for k in ("max_rel_err", "cosine", "sqnr_db", "top1_agreement")}
                           for o in outs},
               accuracy_reference=val.get("accuracy_reference"), accuracy_candidate=val.get("accuracy_candidate"))
    lr, lc = val.get("latency_ms_reference"), val.get("latency_ms_candidate")
    row.update(latency_ms_before=lr, latency_ms_after=lc, speedup=(lr / lc if lr and lc else None))
    n_q, skipped, reverted = 0, [], []
    for p in rep.get("passes", []):
        if p["name"].startswith("quantize"):
            n_q += int(p["counts"].get("nodes_quantized", 0) or 0)
            skipped += p.get("skipped", [])
        if p.get("reverted"):
            reverted.append({"pass": p["name"], "why": p["reverted"]})
    row.update(nodes_quantized=n_q, n_skipped=len(skipped), skipped_first=skipped[:5], skipped=skipped,
               reverted=reverted, notes=rep.get("notes", []), opset_upgrade=rep.get("opset_upgrade"),
               passes=[{k: p.get(k) for k in ("name", "changed", "counts", "reverted", "max_rel_err")}
                       for p in rep.get("passes", [])])
    return row


def run_one(name: str, recipe: str, cache: Path, tmp: Path) -> dict:
    from onnxcompress import optimize
    from onnxcompress.errors import GateFailedError

    mdir = cache / name
    row = {"model": name, "recipe": recipe, "ok": False, "error": None}
    t0 = time.perf_counter()
    try:
        res = optimize(mdir / "model.onnx", tmp / f"{name}.{recipe}.onnx", options_for(recipe, mdir))
        row.update(summarize_report(res.report))
        row["ok"] = True
    except GateFailedError as exc:  # no gates set here, but keep the report if it happens
        row["error"] = f"GateFailedError: {exc}"
        row.update(summarize_report(getattr(exc, "report", {})))
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the rest
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _f(x, fmt="{:.3g}"):
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return fmt.format(x)


def markdown(rows: list[dict]) -> str:
    head = ["model", "recipe", "MB before→after", "× smaller", "nodes", "max rel err", "min cos", "top-1 %",
            "ms before→after", "× faster", "quantized", "skipped", "reverted", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.get("ok") and r.get("bytes_before") is None:
            lines.append(f"| {r['model']} | {r['recipe']} | **FAILED**: {r['error'][:160].replace('|', '/')} "
                         + "| " * (len(head) - 3) + f"| {r['wall_s']} |")
            continue
        mb = lambda b: _f(b / 1e6 if b else None, "{:.2f}")  # noqa: E731
        skipped = str(r["n_skipped"])
        if r["n_skipped"]:
            reasons = sorted({s["reason"][:50] for s in r["skipped"]})
            skipped += " (" + "; ".join(reasons[:2]).replace("|", "/") + (" …" if len(reasons) > 2 else "") + ")"
        rev = ", ".join(x["pass"] for x in r["reverted"]) or "-"
        lines.append("| " + " | ".join([
            r["model"], r["recipe"] + ("" if r["ok"] else " (FAILED)"),
            f"{mb(r['bytes_before'])}→{mb(r['bytes_after'])}", _f(r["size_ratio"], "{:.2f}"),
            f"{r['nodes_before']}→{r['nodes_after']}", _f(r["max_rel_err"]), _f(r["min_cosine"], "{:.5f}"),
            _f(r["top1_agreement"], "{:.1f}"),
            f"{_f(r['latency_ms_before'], '{:.2f}')}→{_f(r['latency_ms_after'], '{:.2f}')}",
            _f(r["speedup"], "{:.2f}"), str(r["nodes_quantized"]), skipped, rev, str(r["wall_s"])]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=list(MODELS), metavar="NAME")
    ap.add_argument("--cache", type=Path, default=REPO / "zoo_cache")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma list of fuse,dynamic,static")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default <cache>/results)")
    args = ap.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        ap.error(f"unknown recipe(s) {bad}; choose from {RECIPES}")
    out = args.out or args.cache / "results"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo_results_") as td:
        for name in args.only:
            if not (args.cache / name / "model.onnx").exists():
                print(f"{name}: no {args.cache / name / 'model.onnx'}; skipped", file=sys.stderr)
                continue
            for recipe in recipes:
                print(f"[{time.strftime('%H:%M:%S')}] {name} / {recipe} ...", file=sys.stderr, flush=True)
                row = run_one(name, recipe, args.cache, Path(td))
                print(f"    {'ok' if row['ok'] else row['error'][:200]} ({row['wall_s']} s)", file=sys.stderr, flush=True)
                rows.append(row)
                # write as we go so a long run can be inspected
                (out / "zoo_results.json").write_text(json.dumps(rows, indent=1, default=str))
    md = markdown(rows)
    (out / "zoo_results.md").write_text(md)
    (out / "zoo_results.json").write_text(json.dumps(rows, indent=1, default=str))
    print(md)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
