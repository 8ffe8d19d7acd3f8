"""Figures for structured / N:M / unstructured pruning (issue 6).

    python scripts/bench_pruning.py                       # everything (digits + zoo), JSON to stdout
    python scripts/bench_pruning.py --only digits
    python scripts/bench_pruning.py --only zoo --models efficientnet_lite0 --ratios 0.1 0.2 0.3
    python scripts/bench_pruning.py --only storage        # 2:4 masks + unstructured 50 % + int8 on EfficientNet-Lite0

Latency: ONNX Runtime CPU, all graph optimizations on, runs of the two models interleaved
(A, B, A, B, ...) so that machine noise hits both alike; median of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcompress import OptimizeOptions, optimize  # noqa: E402
from onnxcompress.runtime import make_session  # noqa: E402

ZOO = ["efficientnet_lite0", "ppocr_det", "ppocr_rec", "ppocr_cls", "yolov8n"]


def interleaved_ms(path_a, path_b, feed, runs=50, warmup=5, threads=None):
    sa, sb = make_session(str(path_a), threads=threads), make_session(str(path_b), threads=threads)
    ins = {i.name for i in sa.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in ins}
    for _ in range(warmup):
        sa.run(None, feed)
        sb.run(None, feed)
    ta, tb = [], []
    for _ in range(runs):
        t0 = time.perf_counter(); sa.run(None, feed); ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); sb.run(None, feed); tb.append(time.perf_counter() - t0)
    a, b = float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3
    return {"reference_ms": round(a, 3), "candidate_ms": round(b, 3), "speedup": round(a / b, 3)}


def _prune_counts(rep):
    for p in rep["passes"]:
        if p["name"] == "prune-channels":
            return p
    return None


def _fid(rep):
    v = rep["validation"][0]
    outs = v["outputs"]
    return {"cosine_min": round(min(float(o["cosine"]) for o in outs), 5),
            "sqnr_db_min": round(min(float(o["sqnr_db"]) for o in outs), 2),
            "max_rel_err": round(max(float(o["max_rel_err"]) for o in outs), 4),
            "top1_agreement": next((o["top1_agreement"] for o in outs if o.get("top1_agreement") is not None), None),
            "accuracy_reference": v.get("accuracy_reference"), "accuracy_candidate": v.get("accuracy_candidate")}


def run_channel(model, out, calib, val, ratio, repair, **kw):
    t0 = time.time()
    res = optimize(model, out, OptimizeOptions(prune=ratio, prune_mode="channel", prune_repair=repair, calibration=calib,
                                               validation=val, latency=False, **kw))
    rep = res.report
    p = _prune_counts(rep)
    c = p["counts"] if p else {}
    return {"ratio": ratio, "repair": repair, "written": rep.get("written"), "seconds": round(time.time() - t0, 1),
            "reverted": p.get("reverted") if p else "no pass",
            "params_before": c.get("params_before"), "params_after": c.get("params_after"),
            "macs_before": c.get("macs_before"), "macs_after": c.get("macs_after"), "macs_removed_pct": c.get("macs_removed_pct"),
            "groups": c.get("groups"), "groups_pruned": c.get("groups_pruned"), "groups_blocked": c.get("groups_blocked"),
            "channels_removed": c.get("channels_removed"), "channels_total": c.get("channels_total"),
            "repair_info": c.get("repair"), "file_bytes": rep["after"].get("file_bytes"),
            "file_bytes_before": rep["before"].get("file_bytes"), **_fid(rep)}


def bench_digits(tmp: Path, ratio: float, round_to: int = 16, importance: str = "activation"):
    m = ROOT / "models" / "digits_cnn.onnx"
    calib, test = ROOT / "models" / "digits_calib.npz", ROOT / "models" / "digits_test.npz"
    out = {}
    x = np.load(test)["input"][:64].astype(np.float32)
    for repair in (True, False):
        p = tmp / f"digits_{repair}.onnx"
        r = run_channel(m, p, calib, test, ratio, repair, prune_round_to=round_to, prune_importance=importance)
        r.update(round_to=round_to, importance=importance)
        r["latency_batch64"] = interleaved_ms(m, p, {"input": x}, runs=300, warmup=20, threads=1)
        r["latency_batch64_default_threads"] = interleaved_ms(m, p, {"input": x}, runs=300, warmup=20)
        out["repair" if repair else "no_repair"] = r
    return out


def _first_feed(npz):
    d = np.load(npz)
    keys = sorted(d.files)
    k = keys[0]
    name = k.split("__", 1)[1] if "__" in k else k
    arr = d[k]
    return {name: arr if "__" in k else arr[:1]}


def bench_zoo(tmp: Path, models, ratios, max_calib=32, round_to=16):
    out = {}
    for name in models:
        d = ROOT / "zoo_cache" / name
        if not (d / "model.onnx").exists():
            out[name] = {"skipped": "not fetched"}
            continue
        rows = []
        feed = _first_feed(d / "val.npz")
        for ratio in ratios:
            for repair in (False, True):
                p = tmp / f"{name}_{ratio}_{repair}.onnx"
                try:
                    r = run_channel(d / "model.onnx", p, d / "calib.npz", d / "val.npz", ratio, repair,
                                    max_calibration_samples=max_calib, prune_round_to=round_to)
                    r["round_to"] = round_to
                    if r["written"]:
                        r["latency_batch1"] = interleaved_ms(d / "model.onnx", p, feed, runs=20, warmup=3)
                except Exception as exc:  # report, keep going
                    r = {"ratio": ratio, "repair": repair, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps({name: r}), file=sys.stderr, flush=True)
                rows.append(r)
        out[name] = rows
    return out


def bench_storage(tmp: Path):
    from onnxcompress.passes.prune_nm import storage_report, verify_nm
    from onnxcompress.model_io import load_model
    import onnx_ir as ir

    d = ROOT / "zoo_cache" / "efficientnet_lite0"
    src = d / "model.onnx"
    fp32 = src.read_bytes()
    res = {"fp32_bytes": len(fp32), "fp32_zlib_bytes": len(zlib.compress(fp32, 6))}
    # 2:4
    p = tmp / "lite0_24.onnx"
    r = optimize(src, p, OptimizeOptions(prune_mode="nm", prune_nm="2:4", calibration=d / "calib.npz",
                                         validation=d / "val.npz", latency=False, max_calibration_samples=32))
    pc = [x for x in r.report["passes"] if x["name"] == "prune-nm"][0]["counts"]
    m = load_model(p)
    checked = ok = 0
    for node in m.graph:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and node.inputs[1].const_value is not None:
            arr = node.inputs[1].const_value.numpy()
            if np.mean(arr == 0) >= 0.49:
                checked += 1
                ok += verify_nm(arr, node, 2, 4)
    res["nm_2_4"] = {"tensors_pruned": pc["tensors_pruned"], "masks_verified_in_pass": pc["masks_verified"],
                     "reverified_from_file": f"{ok}/{checked}", "achieved_sparsity": pc["achieved_sparsity"], **_fid(r.report)}
    # unstructured 50 % + static int8
    q = tmp / "lite0_u50_int8.onnx"
    r = optimize(src, q, OptimizeOptions(prune=0.5, prune_mode="unstructured", quantize="static", calibration=d / "calib.npz",
                                         validation=d / "val.npz", latency=False, max_calibration_samples=32))
    raw = q.read_bytes()
    z = len(zlib.compress(raw, 6))
    res["unstructured50_int8"] = {"bytes": len(raw), "zlib_bytes": z, "raw_ratio_vs_fp32": round(len(fp32) / len(raw), 2),
                                  "compressed_ratio_vs_fp32": round(len(fp32) / z, 2),
                                  "compressed_ratio_vs_fp32_zlib": round(res["fp32_zlib_bytes"] / z, 2),
                                  "storage_measured_after_pruning": r.report.get("pruning_storage"),
                                  "storage_final": storage_report(raw), **_fid(r.report)}
    # unstructured 50 % fp32 only, for reference
    u = tmp / "lite0_u50.onnx"
    optimize(src, u, OptimizeOptions(prune=0.5, prune_mode="unstructured", calibration=d / "calib.npz",
                                     validation=d / "val.npz", latency=False, max_calibration_samples=8))
    res["unstructured50_fp32_storage"] = storage_report(u.read_bytes())
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["digits", "zoo", "storage"], action="append")
    ap.add_argument("--models", nargs="*", default=ZOO)
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--digits-ratio", type=float, default=0.5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--round-to", type=int, default=16, help="zoo: kept channels a multiple of this (MLAS NCHWc blocks)")
    a = ap.parse_args()
    logging.getLogger("onnxcompress").setLevel(logging.ERROR)
    which = a.only or ["digits", "zoo", "storage"]
    res = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "digits" in which:
            res["digits"] = bench_digits(tmp, a.digits_ratio)
        if "storage" in which:
            res["storage"] = bench_storage(tmp)
        if "zoo" in which:
            res["zoo"] = bench_zoo(tmp, a.models, a.ratios, round_to=a.round_to)
    text = json.dumps(res, indent=1, default=str)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
