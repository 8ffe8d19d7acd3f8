"""Int8 side by side on every zoo model: fp32 vs ONNX Runtime's quantizers vs onnxcompress (vs NNCF).

For each zoo model (``zoo_cache/<name>/model.onnx`` with ``calib.npz`` / ``val.npz`` /
``data.json``, built by ``scripts/fetch_zoo.py`` and ``scripts/zoo_data.py``) it builds, in one run:

* ``fp32``            -- the model as fetched;
* ``ORT static``      -- ``onnxruntime.quantization.quantize_static`` after ``quant_pre_process``:
  QDQ, s8 weights / u8 activations, MinMax, calibrated on ``calib.npz``; the 4 combinations of
  ``per_channel`` x ``reduce_range`` are tried and the one with the best fidelity on the held-out
  data is kept (optimistic for ORT: it is selected on the very data it is scored on);
* ``ORT dynamic``     -- ``quantize_dynamic`` (s8 weights) after ``quant_pre_process``, best of the same 4;
* ``onnxcompress static`` / ``onnxcompress dynamic`` -- ``optimize`` with default options
  (``quantize="static"|"dynamic"``, calibration ``calib.npz``, validation ``val.npz``);
* ``NNCF``            -- ``nncf.quantize`` with its defaults (``model_type=TRANSFORMER`` for MiniLM),
  only if ``import nncf`` works (it is an optional dependency of this benchmark only).

A quantizer that crashes is reported as ``crash: <message>`` and the rest still run.

Fidelity is measured against fp32 on the held-out ``val.npz`` (never used to calibrate), every
model run by ONNX Runtime with graph optimizations ON and 2 intra-op threads, as deployed:

* efficientnet_lite0: top-1 agreement on the *decisive* crops (fp32 top-1 prob >= 0.3; count
  given) and mean KL(fp32 || q) of the softmax over all crops;
* ppocr_det: the real rapidocr-onnxruntime pipeline (det -> cls -> rec) on the rendered val pages
  (regenerated bit-exactly from ``zoo_data.py``'s seed), only the det model swapped: share of the
  fp32 pipeline's recognised lines that come back unchanged (and ground-truth lines recovered);
* ppocr_rec: CTC greedy decode of the val text lines (charset from the model's metadata):
  share of lines unchanged vs fp32 and read exactly vs the ground truth; plus the rapidocr
  pipeline on the val pages with only the rec model swapped;
* ppocr_cls: 0/180 label agreement with fp32 (and accuracy vs the true rotation);
* yolov8n: share of fp32 (class, anchor) detections with score > 0.25 that are still > 0.25
  with the same top class;
* minilm: mean (and min) cosine of ``sentence_embedding`` over the val sentences;
* silero_vad: share of speech/non-speech decisions (prob > 0.5) unchanged over the val chunks
  (each chunk fed with the recurrent state the fp32 model saw).

Size: file MB and x smaller than fp32. Latency: median ms at batch 1 (the val sample of median
size), all variants of one model timed INTERLEAVED in turns (a block of runs of A after one untimed
switch run, then of B, ...; the block is ~250 ms of fp32 runs, 2 to 10 runs; ``--rounds`` turns,
capped by ``--latency-budget`` seconds per model, at least 3 turns), ratio = fp32 ms / variant ms (> 1 is faster). Run-by-run interleaving (A B C A B C) timed
the previous session's spinning threads and cold caches: see :func:`latency`.
Quantization wall time: seconds to produce the file (ORT: ``quant_pre_process`` + the kept
combination; onnxcompress: the whole ``optimize`` call, including its own validation).

Run (after scripts/fetch_zoo.py and scripts/zoo_data.py)::

    python scripts/bench_int8.py [--only efficientnet_lite0 minilm ...] [--rounds 20]

``--val-set other`` validates PP-OCRv4 rec, PP-OCR cls and MiniLM on data from another source
than their calibration (``scripts/zoo_other.py``: news text, OCR lines in other fonts; the zoo's
own val sets come from the calibration's generator) and writes ``bench_int8_other.json`` / ``.md``.

Writes ``zoo_cache/results/bench_int8.json`` and ``bench_int8.md`` (one markdown table, one row
per model x variant, plus a line with the machine: CPU, ISA flags, onnxruntime version, threads)
and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcompress.bench import MAX_BLOCK, interleave_block

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
MODELS = ["efficientnet_lite0", "ppocr_det", "ppocr_rec", "ppocr_cls", "yolov8n", "silero_vad", "minilm"]
#: models with a validation set from another source than their calibration (scripts/zoo_other.py)
OTHER_SET = ["ppocr_rec", "ppocr_cls", "minilm", "ppocr_det"]
THREADS = 2
#: at most this many timed runs of one variant in a row per turn (see :func:`latency`)
BLOCK = MAX_BLOCK


# ----------------------------------------------------------------------------- helpers


def session(path, threads: int = THREADS) -> ort.InferenceSession:
    """A CPU session as deployed: all graph optimizations on, ``threads`` intra-op threads."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def short(exc: BaseException, n: int = 160) -> str:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return msg[:n] + ("…" if len(msg) > n else "")


def machine_info() -> dict:
    name, flags = platform.processor() or "?", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("?", "", "x86_64"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    info = {"cpu": name, "isa": isa, "cpus": os.cpu_count(), "onnxruntime": ort.__version__, "threads": THREADS,
            "python": platform.python_version()}
    with contextlib.suppress(Exception):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def feed_size(feed: dict) -> int:
    return sum(int(np.asarray(v).size) for v in feed.values())


# ----------------------------------------------------------------------------- quantizers


class _Reader:
    """ORT CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def ort_pre_process(src: Path, dst: Path) -> tuple[Path, str | None]:
    """``quant_pre_process``; on failure the raw model is quantized and the crash is noted."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return dst, None
    except Exception as exc:  # noqa: BLE001
        return src, f"quant_pre_process crash: {short(exc)} (quantized the raw model)"


def ort_static(pre: Path, dst: Path, calib, per_channel: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    quantize_static(str(pre), str(dst), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def ort_dynamic(pre: Path, dst: Path, calib, per_channel: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(pre), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8)


def nncf_quantize(src: Path, dst: Path, calib, name: str) -> None:
    import nncf
    import onnx

    model = onnx.load(str(src))
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if name == "minilm" else {}
    q = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib), **kw)
    onnx.save(q, str(dst))


# ----------------------------------------------------------------------------- tasks (fidelity)


class Task:
    """Fidelity of a model vs fp32 on the val data. ``evaluate`` returns a dict with ``score`` (a tuple,
    higher is better, used to pick ORT's best combination), ``text`` (for the table) and numbers."""

    def __init__(self, name: str, d: Path, val: list[dict], info: dict | None = None):
        self.name, self.d, self.val = name, d, val
        self.info = info if info is not None else json.loads((d / "data.json").read_text())
        self.ref = None
        self.needs_final = False  # True: evaluate(final=True) measures more than the screening run

    batch = 1  # fixed-shape tasks run the val set in batches (same numbers, less wall time)

    def outputs(self, path) -> list[list[np.ndarray]]:
        s = session(path)
        if self.batch == 1:
            return [s.run(None, f) for f in self.val]
        out = []
        for i in range(0, len(self.val), self.batch):
            chunk = self.val[i:i + self.batch]
            res = s.run(None, {k: np.concatenate([f[k] for f in chunk]) for k in chunk[0]})
            out += [[r[j:j + 1] for r in res] for j in range(len(chunk))]
        return out

    def prepare(self, fp32: Path) -> None:
        self.ref = self.outputs(fp32)

    def evaluate(self, path: Path, final: bool = True) -> dict:
        raise NotImplementedError


class Classifier(Task):
    batch = 16

    def prepare(self, fp32):
        super().prepare(fp32)
        self.p32 = softmax(np.concatenate([o[0] for o in self.ref]).astype(np.float64))
        self.decisive = self.p32.max(-1) >= 0.3

    def evaluate(self, path, final=True):
        p = softmax(np.concatenate([o[0] for o in self.outputs(path)]).astype(np.float64))
        kl = float(np.mean(np.sum(self.p32 * (np.log(self.p32 + 1e-12) - np.log(p + 1e-12)), -1)))
        dec = self.decisive
        agree = float(np.mean(p.argmax(-1)[dec] == self.p32.argmax(-1)[dec]) * 100)
        return {"top1_agree_decisive_pct": agree, "n_decisive": int(dec.sum()), "kl": kl,
                "score": (agree, -kl), "text": f"top-1 {agree:.1f} % of {int(dec.sum())} decisive, KL {kl:.3f}"}


class OrtCls(Task):
    batch = 16

    def prepare(self, fp32):
        super().prepare(fp32)
        self.l32 = np.concatenate([o[0] for o in self.ref]).argmax(-1)
        self.truth = np.array(self.info["val_labels_deg"]) == 180

    def evaluate(self, path, final=True):
        lab = np.concatenate([o[0] for o in self.outputs(path)]).argmax(-1)
        agree = float(np.mean(lab == self.l32) * 100)
        acc = float(np.mean((lab == 1) == self.truth) * 100)
        return {"label_agree_pct": agree, "accuracy_pct": acc, "n": len(lab), "score": (agree, acc),
                "text": f"labels {agree:.1f} % of {len(lab)} (acc {acc:.1f} %)"}


class Yolo(Task):
    batch = 16

    def prepare(self, fp32):
        super().prepare(fp32)
        self.dets = []
        for o in self.ref:
            sc = o[0][0, 4:]  # [classes, anchors]
            anchors = np.where(sc.max(0) > 0.25)[0]
            self.dets.append((anchors, sc[:, anchors].argmax(0)))
        self.n = int(sum(len(a) for a, _ in self.dets))

    def evaluate(self, path, final=True):
        kept = 0
        for (anchors, cls), o in zip(self.dets, self.outputs(path)):
            sc = o[0][0, 4:][:, anchors]
            kept += int(np.sum((sc[cls, np.arange(len(anchors))] > 0.25) & (sc.argmax(0) == cls)))
        pct = kept / max(self.n, 1) * 100
        return {"detections_kept_pct": pct, "kept": kept, "n_detections": self.n, "score": (pct,),
                "text": f"{pct:.1f} % of {self.n} detections kept"}


class MiniLM(Task):
    def idx(self, path):
        return [o.name for o in session(path).get_outputs()].index("sentence_embedding")

    def prepare(self, fp32):
        super().prepare(fp32)
        i = self.idx(fp32)
        self.e32 = np.stack([o[i][0] for o in self.ref]).astype(np.float64)

    def evaluate(self, path, final=True):
        i = self.idx(path)
        e = np.stack([o[i][0] for o in self.outputs(path)]).astype(np.float64)
        cos = np.sum(e * self.e32, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(self.e32, axis=1) + 1e-12)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n": len(cos),
                "score": (float(cos.mean()), float(cos.min())),
                "text": f"cos mean {cos.mean():.4f}, min {cos.min():.4f} ({len(cos)} sentences)"}


class Vad(Task):
    def prepare(self, fp32):
        super().prepare(fp32)
        self.p32 = np.array([float(o[0].ravel()[0]) for o in self.ref])

    def evaluate(self, path, final=True):
        p = np.array([float(o[0].ravel()[0]) for o in self.outputs(path)])
        same = float(np.mean((p > 0.5) == (self.p32 > 0.5)) * 100)
        mad = float(np.mean(np.abs(p - self.p32)))
        return {"decisions_unchanged_pct": same, "n": len(p), "mean_abs_prob_diff": mad, "score": (same, -mad),
                "text": f"decisions {same:.1f} % of {len(p)} unchanged, mean abs dp {mad:.3f}"}


def val_pages() -> tuple[list[np.ndarray], list[list[str]]]:
    """The ppocr_det val pages (RGB) and their ground-truth lines, regenerated exactly as zoo_data.py did."""
    import zoo_data as zd

    rng = np.random.default_rng(1234 + zd.MODELS.index("ppocr_det"))
    s = zd.load_sentences()
    lines = {"calib": zd.make_lines(rng, s["calib"], 200), "val": zd.make_lines(rng, s["val"], 200)}
    pages, gts = [], []
    for split in ("calib", "val"):
        pool = lines[split]
        for i in range(8):
            size = zd.PAGE_SIZES[(i + (split == "val")) % len(zd.PAGE_SIZES)]
            k = int(rng.integers(8, 20))
            start = int(rng.integers(0, len(pool) - k))
            texts = [pool[start + j] + " " + pool[(start + j + 100) % len(pool)] if rng.random() < 0.5
                     else pool[start + j] for j in range(k)]
            rgb, gt = zd.render_page(rng, texts, size)
            if split == "val":
                pages.append(rgb)
                gts.append([t for t, _ in gt])
    return pages, gts


class OcrPipeline:
    """rapidocr-onnxruntime (det -> cls -> rec) on the val pages with one model swapped."""

    def __init__(self, cache: Path, other: bool = False):
        from rapidocr_onnxruntime import RapidOCR  # noqa: F401 (fail early if missing)

        self.cache = cache
        if other:  # scripts/zoo_other.py's pages, another source
            from zoo_other import other_pages

            self.pages, self.gts = other_pages(cache)
        else:
            self.pages, self.gts = val_pages()
            want = json.loads((cache / "ppocr_det" / "data.json").read_text())["val_page_texts"]
            if self.gts != want:
                raise RuntimeError("regenerated val pages differ from ppocr_det/data.json")
        self.keys = cache / "ppocr_rec" / "keys.txt"
        self.ref = self.read()

    def read(self, det: Path | None = None, rec: Path | None = None) -> list[list[str]]:
        from rapidocr_onnxruntime import RapidOCR

        det = det or self.cache / "ppocr_det" / "model.onnx"
        rec = rec or self.cache / "ppocr_rec" / "model.onnx"
        kw = dict(det_model_path=str(det), rec_model_path=str(rec),
                  cls_model_path=str(self.cache / "ppocr_cls" / "model.onnx"), intra_op_num_threads=THREADS)
        if not has_charset(rec):
            kw["rec_keys_path"] = str(self.keys)
        eng = RapidOCR(**kw)
        out = []
        for rgb in self.pages:
            res, _ = eng(np.ascontiguousarray(rgb[..., ::-1]))
            out.append([r[1].strip() for r in (res or [])])
        return out

    def compare(self, got: list[list[str]]) -> dict:
        same = sum(sum((Counter(a) & Counter(b)).values()) for a, b in zip(self.ref, got))
        n = sum(map(len, self.ref))
        gt_ok = sum(sum(t in set(g) or t in " ".join(g) for t in gt) for gt, g in zip(self.gts, got))
        n_gt = sum(map(len, self.gts))
        return {"pipeline_lines_unchanged": same, "pipeline_lines_fp32": n, "pipeline_gt_recovered": gt_ok,
                "pipeline_gt_lines": n_gt}


def has_charset(path: Path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return any(p.key == "character" for p in m.metadata_props)


class OcrDet(Task):
    def __init__(self, name, d, val, pipe: OcrPipeline):
        super().__init__(name, d, val)
        self.pipe = pipe

    def prepare(self, fp32):
        pass  # the fp32 pipeline run is the reference

    def evaluate(self, path, final=True):
        fp32 = Path(path).resolve() == (self.d / "model.onnx").resolve()
        r = self.pipe.compare(self.pipe.ref if fp32 else self.pipe.read(det=path))
        pct = r["pipeline_lines_unchanged"] / max(r["pipeline_lines_fp32"], 1) * 100
        return {**r, "lines_unchanged_pct": pct, "score": (pct, r["pipeline_gt_recovered"]),
                "text": f"{r['pipeline_lines_unchanged']}/{r['pipeline_lines_fp32']} page lines unchanged "
                        f"(GT {r['pipeline_gt_recovered']}/{r['pipeline_gt_lines']})"}


class OcrRec(Task):
    def __init__(self, name, d, val, pipe: OcrPipeline | None, info: dict | None = None):
        super().__init__(name, d, val, info)
        self.pipe = pipe
        import zoo_data as zd

        self.chars = zd.rec_charset(d / "model.onnx")
        self.decode = zd.ctc_decode
        self.truth = self.info["texts"]["val"]
        self.needs_final = pipe is not None

    def prepare(self, fp32):
        super().prepare(fp32)
        self.t32 = [self.decode(o[0][0], self.chars).strip() for o in self.ref]

    def evaluate(self, path, final=True):
        got = [self.decode(o[0][0], self.chars).strip() for o in self.outputs(path)]
        same = sum(a == b for a, b in zip(got, self.t32))
        gt = sum(a == b for a, b in zip(got, self.truth))
        n = len(got)
        out = {"lines_unchanged": same, "lines_exact_vs_gt": gt, "n_lines": n,
               "lines_unchanged_pct": same / n * 100, "score": (same / n * 100, gt)}
        text = f"{same}/{n} lines unchanged (GT {gt}/{n})"
        if final and self.pipe is not None:
            r = self.pipe.compare(self.pipe.read(rec=path))
            out.update(r)
            text += f"; pipeline {r['pipeline_lines_unchanged']}/{r['pipeline_lines_fp32']} page lines"
        out["text"] = text
        return out


# ----------------------------------------------------------------------------- one model


def latency(paths: dict[str, Path], feed: dict, rounds: int, budget_s: float, block: int | None = None) -> tuple[dict, int, int]:
    """Median ms per variant, interleaved in turns: A x ``block``, B x ``block``, ... (each turn after
    one untimed switch run), ``rounds`` turns; stops early (after at least 3 complete turns) once
    ``budget_s`` seconds are spent. Returns (median ms per variant, turns done, block).

    ``block`` (default) = :func:`onnxcompress.bench.interleave_block` of the first variant's run time
    (about 250 ms of runs, 2 to 10):
    a slow model (PP-OCR det, ~100 ms) alternates every few runs, so the machine's drift over
    seconds hits every variant alike; a fast one runs 10 in a row.

    Run-by-run interleaving (A B C A B C) measured the previous session's still-spinning intra-op
    threads and cold caches on this 2-core machine more than the models: MiniLM fp32 17.9 ms run
    by run against 7.1 ms in blocks of 10, its int8 10.2 against 2.0 ms (6 sessions)."""
    sess = {k: session(p) for k, p in paths.items()}
    for s in sess.values():  # warm-up
        for _ in range(5):
            s.run(None, feed)
    if block is None:
        first = next(iter(sess.values()))
        t = time.perf_counter()
        first.run(None, feed)
        one_ms = (time.perf_counter() - t) * 1e3
        block = interleave_block(one_ms)
    times = {k: [] for k in sess}
    start, done = time.perf_counter(), 0
    for _ in range(rounds):
        for k, s in sess.items():
            s.run(None, feed)  # switch run, untimed
            for _ in range(block):
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
        done += 1
        if done >= 3 and time.perf_counter() - start > budget_s:
            break
    return {k: float(np.median(v)) for k, v in times.items()}, done, block


def make_task(name: str, d: Path, val: list[dict], cache: Path, pipe_holder: dict, info: dict | None = None) -> Task:
    if info is not None:  # another source's set (scripts/zoo_other.py): rec without the zoo's page pipeline
        if name == "ppocr_det":
            return OcrDet(name, d, val, OcrPipeline(cache, other=True))
        if name == "ppocr_rec":
            return OcrRec(name, d, val, None, info)
        return {"ppocr_cls": OrtCls, "minilm": MiniLM}[name](name, d, val, info)
    if name in ("ppocr_det", "ppocr_rec"):
        if "pipe" not in pipe_holder:
            try:
                pipe_holder["pipe"] = OcrPipeline(cache)
            except Exception as exc:  # noqa: BLE001
                pipe_holder["pipe"] = None
                pipe_holder["error"] = short(exc)
        if name == "ppocr_det":
            if pipe_holder["pipe"] is None:
                raise RuntimeError(f"rapidocr pipeline unavailable: {pipe_holder.get('error')}")
            return OcrDet(name, d, val, pipe_holder["pipe"])
        return OcrRec(name, d, val, pipe_holder["pipe"])
    return {"efficientnet_lite0": Classifier, "ppocr_cls": OrtCls, "yolov8n": Yolo, "minilm": MiniLM,
            "silero_vad": Vad}[name](name, d, val)


def bench_model(name: str, cache: Path, tmp: Path, args, pipe_holder: dict) -> dict:
    from onnxcompress import OptimizeOptions, optimize
    from onnxcompress.data import input_specs, load_npz
    from onnxcompress.model_io import load_model

    t_model = time.perf_counter()
    d = cache / name
    src, cal, valp = d / "model.onnx", d / "calib.npz", d / "val.npz"
    info = None
    if args.val_set == "other":
        valp = d / "other" / "val.npz"
        if not valp.exists():
            raise RuntimeError(f"{valp} is missing: run scripts/zoo_other.py (models: {', '.join(OTHER_SET)})")
        info = json.loads((d / "other" / "data.json").read_text())
    specs = input_specs(load_model(src))
    calib, _ = load_npz(cal, specs)
    val, _ = load_npz(valp, specs, what="validation")
    task = make_task(name, d, val, cache, pipe_holder, info)
    task.prepare(src)
    work = tmp / name
    work.mkdir(parents=True, exist_ok=True)
    variants: dict[str, dict] = {"fp32": {"path": src, "quant_s": None, "setting": "-"}}
    log = lambda s: print(f"  [{name}] {s}", flush=True)  # noqa: E731

    # ---- ONNX Runtime: best of per_channel x reduce_range
    t0 = time.perf_counter()
    pre, pre_note = ort_pre_process(src, work / "pre.onnx")
    t_pre = time.perf_counter() - t0
    for kind, fn in (("static", ort_static), ("dynamic", ort_dynamic)):
        tries = []
        for pc in (True, False):
            for rr in (False, True):
                setting = f"per_channel={int(pc)} reduce_range={int(rr)}"
                dst = work / f"ort_{kind}_pc{int(pc)}_rr{int(rr)}.onnx"
                t0 = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        fn(pre, dst, calib, pc, rr)
                    q_s = time.perf_counter() - t0 + t_pre
                    m = task.evaluate(dst, final=False)
                    tries.append({"setting": setting, "path": dst, "quant_s": q_s, "metrics": m})
                    log(f"ORT {kind} {setting}: {m['text']} ({q_s:.1f} s)")
                except Exception as exc:  # noqa: BLE001
                    tries.append({"setting": setting, "error": f"crash: {short(exc)}",
                                  "quant_s": time.perf_counter() - t0 + t_pre})
                    log(f"ORT {kind} {setting}: crash: {short(exc)}")
        ok = [t for t in tries if "error" not in t]
        entry: dict = {"tries": [{k: (v if k != "metrics" else {kk: vv for kk, vv in v.items() if kk != "score"})
                                  for k, v in t.items() if k != "path"} for t in tries]}
        if pre_note:
            entry["note"] = pre_note
        if ok:
            best = max(ok, key=lambda t: t["metrics"]["score"])
            entry.update(path=best["path"], quant_s=best["quant_s"], setting=best["setting"], metrics=best["metrics"])
        else:
            entry.update(error=tries[0]["error"], setting="all 4 crashed")
        variants[f"ORT {kind}"] = entry

    # ---- onnxcompress defaults
    for kind in ("static", "dynamic"):
        dst = work / f"onnxcompress_{kind}.onnx"
        t0 = time.perf_counter()
        setting = "defaults" if args.target == "auto" else f"--target {args.target}"
        try:
            res = optimize(src, dst, OptimizeOptions(quantize=kind, calibration=cal, validation=valp, latency=False,
                                                     target=args.target, accept_degraded=True))
            entry = {"path": dst, "quant_s": time.perf_counter() - t0, "setting": setting}
            with contextlib.suppress(Exception):
                n_q = sum(int(p["counts"].get("nodes_quantized", 0) or 0) for p in res.report.get("passes", [])
                          if p["name"].startswith("quantize"))
                entry["nodes_quantized"] = n_q
                entry["notes"] = res.report.get("notes", [])[:5]
        except Exception as exc:  # noqa: BLE001
            entry = {"error": f"crash: {short(exc)}", "quant_s": time.perf_counter() - t0, "setting": setting,
                     "traceback": traceback.format_exc()[-2000:]}
        variants[f"onnxcompress {kind}"] = entry
        log(f"onnxcompress {kind}: {'ok' if 'path' in entry else entry['error']} ({entry['quant_s']:.1f} s)")

    # ---- NNCF (optional)
    if args.nncf:
        dst = work / "nncf.onnx"
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                nncf_quantize(src, dst, calib, name)
            entry = {"path": dst, "quant_s": time.perf_counter() - t0,
                     "setting": "defaults" + (", model_type=TRANSFORMER" if name == "minilm" else "")}
        except Exception as exc:  # noqa: BLE001
            entry = {"error": f"crash: {short(exc)}", "quant_s": time.perf_counter() - t0, "setting": "defaults"}
        variants["NNCF"] = entry
        log(f"NNCF: {'ok' if 'path' in entry else entry['error']} ({entry['quant_s']:.1f} s)")

    phases = {"quantize_and_screen_s": round(time.perf_counter() - t_model, 1)}
    t_phase = time.perf_counter()
    # ---- fidelity of the kept variants
    for k, v in variants.items():
        if "path" not in v:
            continue
        if "metrics" in v and not task.needs_final:
            log(f"{k}: {v['metrics']['text']}")
            continue
        try:
            v["metrics"] = task.evaluate(v["path"], final=True)
        except Exception as exc:  # noqa: BLE001
            v["error"] = f"crash at run time: {short(exc)}"
            v.pop("path")
        else:
            log(f"{k}: {v['metrics']['text']}")

    # ---- size and interleaved latency
    feed_i = int(np.argsort([feed_size(f) for f in val])[len(val) // 2])
    paths = {k: v["path"] for k, v in variants.items() if "path" in v}
    phases["evaluate_s"] = round(time.perf_counter() - t_phase, 1)
    t_phase = time.perf_counter()
    ms, rounds, block = latency(paths, val[feed_i], args.rounds, args.latency_budget)
    phases["latency_s"] = round(time.perf_counter() - t_phase, 1)
    log(f"phases: {phases}")
    base_bytes, base_ms = src.stat().st_size, ms["fp32"]
    rows = []
    for k, v in variants.items():
        row = {"model": name, "variant": k, "setting": v.get("setting"), "error": v.get("error"),
               "quant_s": None if v.get("quant_s") is None else round(v["quant_s"], 1)}
        for extra in ("note", "tries", "nodes_quantized", "notes"):
            if extra in v:
                row[extra] = v[extra]
        if "path" in v:
            b = v["path"].stat().st_size
            row.update(bytes=b, mb=round(b / 1e6, 2), x_smaller=round(base_bytes / b, 2),
                       median_ms=round(ms[k], 3), speed_vs_fp32=round(base_ms / ms[k], 2),
                       fidelity=v["metrics"]["text"],
                       metrics={kk: vv for kk, vv in v["metrics"].items() if kk not in ("score", "text")})
        rows.append(row)
    return {"model": name, "n_calib": len(calib), "n_val": len(val), "latency_sample": feed_i,
            "latency_feed_shapes": {k: list(np.shape(a)) for k, a in val[feed_i].items()},
            "rounds": rounds, "block": block, "rows": rows, "phases": phases, "seconds": round(time.perf_counter() - t_model, 1)}


# ----------------------------------------------------------------------------- report


def markdown(results: list[dict], machine: dict, nncf_line: str) -> str:
    head = ["model", "variant", "setting", "fidelity vs fp32 (held-out)", "MB", "× smaller", "median ms",
            "× vs fp32", "quant s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        if "error" in res:
            out.append(f"| {res['model']} | **benchmark failed**: {res['error'].replace('|', '/')} |" + " |" * 7)
            continue
        for r in res["rows"]:
            cells = [r["model"], r["variant"], str(r.get("setting") or "-").replace("|", "/")]
            if r.get("error"):
                cells += [r["error"].replace("|", "/"), "-", "-", "-", "-"]
            else:
                cells += [r["fidelity"].replace("|", "/"), f"{r['mb']:.2f}", f"{r['x_smaller']:.2f}", f"{r['median_ms']:.2f}",
                          f"{r['speed_vs_fp32']:.2f}"]
            cells.append("-" if r.get("quant_s") is None else f"{r['quant_s']:.1f}")
            out.append("| " + " | ".join(cells) + " |")
    rounds = ", ".join(f"{r['model']} {r['rounds']} x {r.get('block', BLOCK)}" for r in results if "rounds" in r)
    out.append("")
    out.append(f"Machine: {machine['cpu']} ({machine['cpus']} CPUs; ISA: {', '.join(machine['isa']) or 'none'}; "
               f"load avg at start {machine.get('load_avg')}), onnxruntime {machine['onnxruntime']}, "
               f"{machine['threads']} intra-op threads, ORT_ENABLE_ALL, batch 1. Latency: median over interleaved "
               f"turns, each a block of runs per variant after one untimed switch run (turns x block: {rounds}). {nncf_line}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=MODELS, help="only these models")
    ap.add_argument("--val-set", choices=("zoo", "other"), default="zoo",
                    help="validation data: the zoo's val.npz, or the other-source set of scripts/zoo_other.py "
                         f"(<model>/other/val.npz; models {', '.join(OTHER_SET)}; calibration stays the zoo's)")
    ap.add_argument("--rounds", type=int, default=20,
                    help=f"interleaved timing turns of up to {BLOCK} runs per variant (default 20)")
    ap.add_argument("--latency-budget", type=float, default=45.0,
                    help="stop timing a model after this many seconds (complete turns only, at least 3)")
    ap.add_argument("--cache", type=Path, default=REPO / "zoo_cache")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default <cache>/results)")
    ap.add_argument("--no-nncf", dest="nncf", action="store_false", help="skip NNCF even if installed")
    ap.add_argument("--target", default="auto",
                    help="onnxcompress --target (default auto: this CPU). --target avx2 on a VNNI machine gives the "
                         "fidelity an AVX2-only CPU computes (saturation-free weights); its latency is this machine's")
    ap.add_argument("--keep", type=Path, default=None, help="keep the quantized models in this folder")
    args = ap.parse_args(argv)
    cache = args.cache.resolve()
    out_dir = args.out or cache / "results"
    nncf_line = "NNCF not installed."
    if args.nncf:
        try:
            import nncf

            nncf_line = f"NNCF {nncf.__version__} (nncf.quantize defaults)."
        except Exception:  # noqa: BLE001
            args.nncf = False
    else:
        nncf_line = "NNCF skipped (--no-nncf)."
    machine = machine_info()
    print(f"machine: {json.dumps(machine)}; {nncf_line}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_int8_"))
    results, pipe_holder = [], {}
    t_all = time.perf_counter()
    try:
        names = args.only or (OTHER_SET if args.val_set == "other" else MODELS)
        for name in names:
            print(f"[{name}]", flush=True)
            try:
                res = bench_model(name, cache, tmp, args, pipe_holder)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                res = {"model": name, "error": short(exc, 300)}
            print(f"  [{name}] done in {res.get('seconds', '?')} s", flush=True)
            results.append(res)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for f in (tmp / name).glob("*.onnx"):
                    shutil.copy2(f, args.keep / f"{name}.{f.name}")
            shutil.rmtree(tmp / name, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = round(time.perf_counter() - t_all, 1)
    md = markdown(results, machine, nncf_line)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_int8" if args.val_set == "zoo" else "bench_int8_other"
    if args.val_set == "other":
        md += ("\nValidation: the other-source sets of scripts/zoo_other.py (news text; OCR lines in Liberation "
               "fonts), calibration the zoo's calib.npz.\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"machine": machine, "nncf": nncf_line, "rounds_requested": args.rounds, "total_seconds": total,
         "val_set": args.val_set, "results": results},
        indent=2, default=lambda o: str(o) if isinstance(o, Path) else float(o)) + "\n")
    (out_dir / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"total {total} s; wrote {out_dir / f'{stem}.json'} and {out_dir / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
