"""Build real calibration and held-out validation data for the model zoo.

Run after ``scripts/fetch_zoo.py``::

    python scripts/zoo_data.py                      # every model found in the cache
    python scripts/zoo_data.py --only minilm ppocr_rec
    python scripts/zoo_data.py --cache /tmp/zoo --no-rapidocr-check

For every model ``<cache>/<name>/model.onnx`` it writes ``calib.npz``,
``val.npz`` and ``data.json`` next to it.  The cache defaults to
``$ONNXCOMPRESS_ZOO`` or ``<repo>/zoo_cache``.

npz format (the project's feed format):

* fixed-shape samples: one key per model input, the array's first axis indexes
  samples (it is also the model's batch axis): ``x[i:i+1]`` is sample i's feed;
* ragged samples: keys ``<i>__<input name>`` per sample i, each value the full
  feed of that input for that sample (with its own batch dim of 1, or the exact
  shape the model wants, e.g. a scalar ``sr``).

Calibration and validation samples always come from disjoint sources
(different photos, sentences, text lines, pages or utterances).  Everything is
seeded, so reruns give identical files.

Data needs: numpy, onnxruntime, pillow, scikit-image, scikit-learn, scipy; the
OCR cross-check needs ``rapidocr-onnxruntime`` (optional); the VAD data needs
Debian's ``espeak-ng`` (``apt-get install -y espeak-ng``); MiniLM needs
``transformers`` (for the saved tokenizer).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SENTENCES = Path(__file__).resolve().parent / "sentences.txt"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf", "DejaVuSerifCondensed-Bold.ttf",
         "DejaVuSans-Oblique.ttf"]
MODELS = ["efficientnet_lite0", "ppocr_det", "ppocr_rec", "ppocr_cls", "yolov8n", "silero_vad", "minilm"]


# ----------------------------------------------------------------------------- helpers


def default_cache() -> Path:
    """Return the cache folder: ``$ONNXCOMPRESS_ZOO`` or ``<repo>/zoo_cache``."""
    env = os.environ.get("ONNXCOMPRESS_ZOO")
    return Path(env) if env else REPO / "zoo_cache"


def session(path: Path):
    """A CPU onnxruntime session for ``path``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def save_fixed(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save fixed-shape samples: ``{input_name: array[n_samples, ...]}``."""
    n = {len(a) for a in arrays.values()}
    assert len(n) == 1, f"inconsistent sample counts {n}"
    np.savez_compressed(path, **arrays)


def save_ragged(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    """Save ragged samples as ``<i>__<input>`` keys (each value the full feed)."""
    flat = {f"{i}__{k}": v for i, s in enumerate(samples) for k, v in s.items()}
    np.savez_compressed(path, **flat)


def load_sentences(path: Path = SENTENCES) -> dict:
    """Parse sentences.txt into {'calib': [...], 'val': [...], 'pairs': [(a, b), ...]}."""
    out = {"calib": [], "val": [], "pairs": []}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#@"):
            section = line[2:].strip()
            continue
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("||")]
        out[section].extend(parts)
        if len(parts) == 2:
            out["pairs"].append((parts[0], parts[1]))
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def write_json(path: Path, obj: dict) -> None:
    """Write pretty JSON."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=float) + "\n")


def resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear resize of an HxWxC uint8 image with Pillow."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((int(w), int(h)), Image.BILINEAR))


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Grey/bool/RGBA/float image -> HxWx3 uint8 RGB."""
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


# ----------------------------------------------------------------------------- EfficientNet


def photos(names: list[str]) -> dict[str, np.ndarray]:
    """Load colour photos by name from skimage.data / sklearn sample images (offline)."""
    from skimage import data

    out = {}
    sk = None
    for n in names:
        if n in ("china", "flower"):
            if sk is None:
                from sklearn.datasets import load_sample_images

                ds = load_sample_images()
                sk = {Path(f).stem.split(".")[0]: im for f, im in zip(ds.filenames, ds.images)}
            out[n] = to_rgb(sk[n])
        else:
            img = getattr(data, n)()
            out[n] = to_rgb(img[0] if isinstance(img, tuple) else img)  # stereo_*: (left, right, disp)
    return out


def random_resized_crop(rng, img: np.ndarray, size: int = 224, scale=(0.25, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision-style RandomResizedCrop + random horizontal flip."""
    h, w = img.shape[:2]
    for _ in range(20):
        area = h * w * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw = ch = min(h, w)
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    crop = resize(img[y0:y0 + ch, x0:x0 + cw], size, size)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop


def effnet_pre(rgb: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite preprocessing: (x - 127) / 128, HWC uint8 -> CHW float32."""
    return ((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


EFF_CALIB = ["astronaut", "coffee", "china", "hubble_deep_field", "coins", "camera", "stereo_motorcycle",
             "brick"]
EFF_VAL = ["chelsea", "rocket", "flower", "immunohistochemistry", "retina", "colorwheel", "moon", "clock",
           "gravel", "page"]


def build_efficientnet(d: Path, rng) -> dict:
    """64 calib crops from EFF_CALIB photos, 240 val crops from the other photos (EFF_VAL)."""
    calib_p, val_p = photos(EFF_CALIB), photos(EFF_VAL)
    calib = [effnet_pre(random_resized_crop(rng, calib_p[n])) for n in EFF_CALIB for _ in range(8)]
    val_src = [n for n in EFF_VAL for _ in range(24)]
    val = [effnet_pre(random_resized_crop(rng, val_p[n])) for n in val_src]
    save_fixed(d / "calib.npz", {"input": np.stack(calib)})
    save_fixed(d / "val.npz", {"input": np.stack(val)})
    sess = session(d / "model.onnx")
    xv = np.stack(val)
    probs = np.concatenate([softmax(sess.run(None, {"input": xv[i:i + 32]})[0]) for i in range(0, len(xv), 32)])
    top1 = probs.argmax(1)
    decisive = int((probs.max(1) >= 0.3).sum())
    cat = [int(t) for t, n in zip(top1, val_src) if n == "chelsea"]
    n_cat = sum(281 <= t <= 285 for t in cat)
    sanity = {"val_decisive_top1_ge_0.3": decisive, "val_crops": len(val),
              "chelsea_crops_top1_cat_281_285": f"{n_cat}/{len(cat)}",
              "rocket_crops_top1_space_shuttle_812_or_missile_657_744": 
                  f"{sum(int(t) in (812, 657, 744) for t, n in zip(top1, val_src) if n == 'rocket')}/24"}
    return {"calib": len(calib), "val": len(val), "format": "fixed: input [N,3,224,224] float32",
            "sources": {"calib": EFF_CALIB, "val": EFF_VAL,
                        "from": "skimage.data (grey ones -> RGB) and sklearn load_sample_images"},
            "preprocessing": "RandomResizedCrop(224, scale 0.25-1, ratio 3/4-4/3, bilinear) + random hflip; "
                             "RGB (x-127)/128; NCHW float32",
            "crops_per_photo": {"calib": 8, "val": 24}, "sanity": sanity}


# ----------------------------------------------------------------------------- OCR rendering


def _font(name: str, size: int):
    """A Pillow TrueType font from the DejaVu folder."""
    from PIL import ImageFont

    return ImageFont.truetype(str(FONT_DIR / name), size)


def make_lines(rng, sentences: list[str], n: int) -> list[str]:
    """n short English text lines (2-7 word windows of sentences, some with numbers)."""
    words = [s.split() for s in sentences]
    lines = []
    extras = ["Invoice {a}-{b}: ${c}.{d:02d}", "Room {a}, floor {e}", "Call {a} {b} {c} before {e}:30",
              "Total: {c}.{d:02d} EUR", "Order #{a}{b} shipped {e}/{f}/2024", "Page {e} of {a}"]
    while len(lines) < n:
        if rng.random() < 0.2:
            t = extras[rng.integers(len(extras))].format(
                a=rng.integers(100, 999), b=rng.integers(10, 99), c=rng.integers(1, 500),
                d=rng.integers(0, 99), e=rng.integers(1, 12), f=rng.integers(1, 28))
        else:
            ws = words[rng.integers(len(words))]
            k = int(rng.integers(2, 8))
            s = int(rng.integers(0, max(1, len(ws) - k + 1)))
            t = " ".join(ws[s:s + k])
        if t and t not in lines:
            lines.append(t)
    return lines


def render_line(rng, text: str) -> np.ndarray:
    """Render one text line (RGB uint8) in a random DejaVu font/size/colour with light noise."""
    from PIL import Image, ImageDraw

    font = _font(FONTS[rng.integers(len(FONTS))], int(rng.integers(24, 42)))
    l, t, r, b = font.getbbox(text)
    mx, my = int(rng.integers(4, 14)), int(rng.integers(3, 10))
    bg = tuple(int(v) for v in rng.integers(205, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 80, 3))
    img = Image.new("RGB", (r - l + 2 * mx, b - t + 2 * my), bg)
    ImageDraw.Draw(img).text((mx - l, my - t), text, font=font, fill=fg)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (img.height, img.width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_page(rng, lines: list[str], size: tuple[int, int]):
    """Render a page (H, W) with several text lines; returns (RGB uint8, [(text, box)])."""
    from PIL import Image, ImageDraw

    h, w = size
    bg = np.array(rng.integers(215, 256, 3), dtype=np.float32)
    grad = np.linspace(0, rng.uniform(-25, 5), h)[:, None, None]
    base = np.clip(bg + grad + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # a coloured header band
        c = tuple(int(v) for v in rng.integers(120, 230, 3))
        draw.rectangle([0, 0, w, int(rng.integers(40, 90))], fill=c)
    gt = []
    y = int(rng.integers(20, 60))
    two_cols = w > h and rng.random() < 0.6
    cols = [(30, w // 2 - 20), (w // 2 + 10, w - 30)] if two_cols else [(30, w - 30)]
    col = 0
    for text in lines:
        font = _font(FONTS[rng.integers(len(FONTS))], int(rng.integers(20, 38)))
        x0, x1 = cols[col]
        while font.getlength(text) > x1 - x0 and " " in text:
            text = text.rsplit(" ", 1)[0]
        l, t, r, b = font.getbbox(text)
        if y + (b - t) > h - 20:
            if col + 1 < len(cols):
                col, y = col + 1, int(rng.integers(20, 60))
                continue
            break
        x = x0 + int(rng.integers(0, max(1, (x1 - x0) - (r - l))))
        fg = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((x - l, y - t), text, font=font, fill=fg)
        gt.append((text, (x, y, x + r - l, y + b - t)))
        y += (b - t) + int(rng.integers(12, 40))
    return np.asarray(img), gt


def det_pre(bgr: np.ndarray, limit_side_len: int = 736) -> np.ndarray:
    """RapidOCR DetPreProcess (limit_type 'min'): resize to multiples of 32, (x/255-0.5)/0.5, NCHW."""
    import cv2

    h, w = bgr.shape[:2]
    ratio = float(limit_side_len) / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh, rw = int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)
    img = cv2.resize(bgr, (rw, rh)).astype(np.float32)
    img = (img / 255.0 - 0.5) / 0.5
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def rec_pre(bgr: np.ndarray, img_h: int = 48, img_w: int = 320) -> np.ndarray:
    """RapidOCR rec resize_norm_img for a batch of one: height 48, width max(320, 48*w/h), pad."""
    import cv2

    h, w = bgr.shape[:2]
    max_wh = max(img_w / img_h, w / h)
    width = int(img_h * max_wh)
    rw = min(width, int(math.ceil(img_h * w / h)))
    x = cv2.resize(bgr, (rw, img_h)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, img_h, width), np.float32)
    out[:, :, :rw] = (x - 0.5) / 0.5
    return out[None]


def cls_pre(bgr: np.ndarray, img_h: int = 48, img_w: int = 192) -> np.ndarray:
    """RapidOCR cls resize_norm_img: 3x48x192, aspect kept up to 192 px wide, zero pad."""
    import cv2

    h, w = bgr.shape[:2]
    rw = min(img_w, int(math.ceil(img_h * w / h)))
    x = cv2.resize(bgr, (rw, img_h)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, img_h, img_w), np.float32)
    out[:, :, :rw] = (x - 0.5) / 0.5
    return out


def ctc_decode(probs: np.ndarray, chars: list[str]) -> str:
    """Greedy CTC decode of [T, C] probabilities (class 0 = blank, repeats merged)."""
    idx = probs.argmax(-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0:
            out.append(chars[i])
        prev = i
    return "".join(out)


def rec_charset(model: Path) -> list[str]:
    """CTC classes of the PP-OCR rec model: blank + ONNX 'character' metadata + space."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    keys = {p.key: p.value for p in m.metadata_props}["character"].splitlines()
    return ["blank"] + keys + [" "]


def ocr_texts(rng):
    """Disjoint calib/val text lines (from calib/val sentences) for rec and cls."""
    s = load_sentences()
    return make_lines(rng, s["calib"], 32), make_lines(rng, s["val"], 48), s


def build_ppocr_rec(d: Path, rng, rapid_check: bool) -> dict:
    """Rendered text lines -> rec feeds (ragged width); sanity = CTC greedy exact-match rate."""
    calib_t, val_t, _ = ocr_texts(rng)
    calib_img = [render_line(rng, t) for t in calib_t]
    val_img = [render_line(rng, t) for t in val_t]
    bgr = lambda im: np.ascontiguousarray(im[..., ::-1])  # noqa: E731 (RapidOCR works on BGR)
    save_ragged(d / "calib.npz", [{"x": rec_pre(bgr(im))} for im in calib_img])
    val_x = [rec_pre(bgr(im)) for im in val_img]
    save_ragged(d / "val.npz", [{"x": x} for x in val_x])
    chars = rec_charset(d / "model.onnx")
    sess = session(d / "model.onnx")
    got = [ctc_decode(sess.run(None, {"x": x})[0][0], chars) for x in val_x]
    ok = sum(g.strip() == t for g, t in zip(got, val_t))
    errors = [(t, g) for g, t in zip(got, val_t) if g.strip() != t][:8]
    sanity = {"val_lines_read_exactly_ctc_greedy": f"{ok}/{len(val_t)}", "val_exact_rate": ok / len(val_t),
              "char_error_rate": _cer(got, val_t), "examples_wrong": errors}
    if rapid_check:
        sanity["rapidocr_pipeline_rec_only"] = _rapid_rec_check(val_img + calib_img, val_t + calib_t)
    widths = sorted({x.shape[-1] for x in val_x})
    return {"calib": len(calib_t), "val": len(val_t),
            "format": "ragged: <i>__x [1,3,48,W] float32, W = max(320, ceil(48*w/h))",
            "sources": {"calib": "2-7 word windows of the calib sentences + invoice/number lines",
                        "val": "windows of the val sentences (disjoint) + other number lines",
                        "fonts": FONTS, "render": "Pillow, DejaVu TTF 24-41 px, light bg, dark ink, noise"},
            "preprocessing": "BGR, RapidOCR rec resize_norm_img (height 48, keep aspect, pad to >=320), "
                             "(x/255-0.5)/0.5", "val_widths": [widths[0], widths[-1]],
            "texts": {"calib": calib_t, "val": val_t}, "sanity": sanity}


def _cer(got: list[str], want: list[str]) -> float:
    """Character error rate (Levenshtein / reference length)."""
    def lev(a, b):
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    return round(sum(lev(g.strip(), w) for g, w in zip(got, want)) / sum(len(w) for w in want), 4)


def _rapid_rec_check(images: list[np.ndarray], texts: list[str]):
    """Read the rendered lines with the real rapidocr-onnxruntime pipeline (rec only)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        return "skipped: rapidocr-onnxruntime not installed"
    eng = RapidOCR()
    ok = 0
    for im, t in zip(images, texts):
        res, _ = eng(np.ascontiguousarray(im[..., ::-1]), use_det=False, use_cls=False, use_rec=True)
        ok += bool(res) and res[0][0].strip() == t
    return f"{ok}/{len(texts)} lines read exactly (calib+val)"


def build_ppocr_cls(d: Path, rng, rapid_check: bool) -> dict:
    """Rendered lines (25% rotated 180 deg) -> fixed [N,3,48,192]; sanity = orientation accuracy."""
    calib_t, val_t, _ = ocr_texts(rng)
    out = {}
    for split, texts in (("calib", calib_t), ("val", val_t)):
        xs, labels = [], []
        for t in texts:
            im = render_line(rng, t)[..., ::-1]
            rot = rng.random() < 0.25
            if rot:
                im = im[::-1, ::-1]
            xs.append(cls_pre(np.ascontiguousarray(im)))
            labels.append(180 if rot else 0)
        save_fixed(d / f"{split}.npz", {"x": np.stack(xs)})
        out[split] = (np.stack(xs), np.array(labels))
    sess = session(d / "model.onnx")
    xv, yv = out["val"]
    pred = np.where(sess.run(None, {"x": xv})[0].argmax(1) == 1, 180, 0)
    acc = float((pred == yv).mean())
    return {"calib": len(calib_t), "val": len(val_t), "format": "fixed: x [N,3,48,192] float32",
            "sources": "same kind of rendered lines as ppocr_rec (calib/val disjoint); ~25% rotated 180 deg",
            "preprocessing": "BGR, RapidOCR cls resize_norm_img 48x192, (x/255-0.5)/0.5",
            "val_labels_deg": yv.tolist(), "calib_labels_deg": out["calib"][1].tolist(),
            "sanity": {"val_orientation_accuracy": round(acc, 4),
                       "val_rotated": int((yv == 180).sum())}}


PAGE_SIZES = [(736, 736), (736, 992), (992, 736), (800, 800)]


def build_ppocr_det(d: Path, rng, rapid_check: bool) -> dict:
    """8 calib + 8 val rendered pages (ragged <i>__x); sanity = GT-line recall of the DB prob map."""
    s = load_sentences()
    split_lines = {"calib": make_lines(rng, s["calib"], 200), "val": make_lines(rng, s["val"], 200)}
    sess = session(d / "model.onnx")
    info, pages_rgb = {}, {}
    for split in ("calib", "val"):
        samples, gts, pages = [], [], []
        pool = split_lines[split]
        for i in range(8):
            size = PAGE_SIZES[(i + (split == "val")) % len(PAGE_SIZES)]
            k = int(rng.integers(8, 20))
            start = int(rng.integers(0, len(pool) - k))
            # Pages get longer lines: join two windows.
            texts = [pool[start + j] + " " + pool[(start + j + 100) % len(pool)] if rng.random() < 0.5
                     else pool[start + j] for j in range(k)]
            rgb, gt = render_page(rng, texts, size)
            samples.append({"x": det_pre(np.ascontiguousarray(rgb[..., ::-1]))})
            gts.append(gt)
            pages.append(rgb)
        save_ragged(d / f"{split}.npz", samples)
        info[split] = (samples, gts)
        pages_rgb[split] = pages
    hit = tot = 0
    for smp, gt in zip(*info["val"]):
        prob = sess.run(None, {"x": smp["x"]})[0][0, 0]
        for _, (x0, y0, x1, y1) in gt:
            tot += 1
            hit += (prob[y0:y1, x0:x1] > 0.3).mean() > 0.25
    sanity = {"val_gt_lines_found_by_prob_map_gt_0.3": f"{hit}/{tot}"}
    if rapid_check:
        sanity["rapidocr_full_pipeline_val_pages"] = _rapid_page_check(pages_rgb["val"], info["val"][1])
    shapes = [list(smp["x"].shape) for smp in info["val"][0]]
    return {"calib": 8, "val": 8, "format": "ragged: <i>__x [1,3,H,W] float32 (H, W multiples of 32)",
            "sources": "Pillow-rendered pages (DejaVu fonts, 1-2 columns, header band, gradient bg), "
                       "lines from calib/val sentences respectively",
            "page_sizes": PAGE_SIZES, "val_shapes": shapes,
            "preprocessing": "BGR, RapidOCR DetPreProcess(limit_side_len=736, limit_type='min'), "
                             "(x/255-0.5)/0.5",
            "val_page_texts": [[t for t, _ in g] for g in info["val"][1]], "sanity": sanity}


def _rapid_page_check(pages: list[np.ndarray], gts) -> str:
    """Full RapidOCR (det+cls+rec) on the val pages: how many GT lines come back verbatim."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        return "skipped: rapidocr-onnxruntime not installed"
    eng = RapidOCR()
    ok = tot = 0
    for rgb, gt in zip(pages, gts):
        res, _ = eng(np.ascontiguousarray(rgb[..., ::-1]))
        found = {r[1].strip() for r in (res or [])}
        joined = " ".join(r[1].strip() for r in (res or []))
        for text, _ in gt:
            tot += 1
            ok += text in found or text in joined
    return f"{ok}/{tot} page lines recovered verbatim"


# ----------------------------------------------------------------------------- YOLO (NudeNet)


def lfw_montage(faces: np.ndarray, grid: int = 5) -> np.ndarray:
    """Tile grey 25x25 LFW faces (float 0..1) into an RGB uint8 montage, each face upscaled x4."""
    tiles = [resize((f * 255).astype(np.uint8), 100, 100) for f in faces[: grid * grid]]
    rows = [np.concatenate(tiles[r * grid:(r + 1) * grid], 1) for r in range(grid)]
    return to_rgb(np.concatenate(rows, 0))


def letterbox_nudenet(rgb: np.ndarray, size: int) -> np.ndarray:
    """NudeNet _read_image: pad right/bottom to a square (black), resize to size, /255, RGB NCHW."""
    import cv2

    h, w = rgb.shape[:2]
    m = max(h, w)
    pad = cv2.copyMakeBorder(rgb, 0, m - h, 0, m - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    img = cv2.resize(pad, (size, size)).astype(np.float32) / 255.0
    return img.transpose(2, 0, 1)


def person_crop(rng, img: np.ndarray) -> np.ndarray:
    """Random crop keeping 50-100% of each side, random horizontal flip."""
    h, w = img.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    c = img[y0:y0 + ch, x0:x0 + cw]
    return c[:, ::-1] if rng.random() < 0.5 else c


def nms_count(out: np.ndarray, thr: float = 0.25, iou: float = 0.45) -> list[int]:
    """YOLOv8 [22, A] output -> class ids kept after greedy NMS with score >= thr."""
    o = out.T
    scores = o[:, 4:].max(1)
    keep = np.where(scores >= thr)[0]
    boxes = np.stack([o[keep, 0] - o[keep, 2] / 2, o[keep, 1] - o[keep, 3] / 2,
                      o[keep, 0] + o[keep, 2] / 2, o[keep, 1] + o[keep, 3] / 2], 1)
    order = np.argsort(-scores[keep])
    chosen = []
    while len(order):
        i = order[0]
        chosen.append(keep[i])
        xx0 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy0 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx1 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy1 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx1 - xx0, 0, None) * np.clip(yy1 - yy0, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        ious = inter / (area(boxes[i]) + area(boxes[order[1:]]) - inter + 1e-9)
        order = order[1:][ious < iou]
    return [int(o[k, 4:].argmax()) for k in chosen]


def metadata_names(meta: dict[str, str]) -> dict:
    """The class names in a model's metadata (``names``: ultralytics writes a dict literal such
    as ``{0: 'person'}``), parsed with ``ast.literal_eval`` -- never ``eval``: the metadata comes
    from a downloaded file, and a literal cannot run code. ``{}`` when absent.

    Raises:
        ValueError: ``names`` is not a Python literal dict.
    """
    if "names" not in meta:
        return {}
    text = meta["names"]
    try:
        names = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"model metadata 'names' is not a Python literal ({type(exc).__name__}): {text[:120]!r}") from None
    if not isinstance(names, dict):
        raise ValueError(f"model metadata 'names' must be a dict literal, got {type(names).__name__}: {text[:120]!r}")
    return names


def build_yolov8n(d: Path, rng) -> dict:
    """People photos letterboxed to the model size: 16 calib (camera, LFW A, ...), 32 val (astronaut, LFW B, ...)."""
    import onnx
    from skimage import data

    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    size = int(json.loads(meta.get("imgsz", "[320, 320]"))[0])
    names = metadata_names(meta)
    lfw = data.lfw_subset()
    calib_src = ([("camera", to_rgb(data.camera()))] * 8 + [("lfw_0-99", lfw_montage(lfw[i * 25:(i + 1) * 25]))
                                                              for i in range(4)]
                 + [("chelsea", to_rgb(data.chelsea()))] * 2 + [("coffee", to_rgb(data.coffee()))] * 2)
    val_src = ([("astronaut", to_rgb(data.astronaut()))] * 22
               + [("lfw_100-199", lfw_montage(lfw[100 + i * 25:100 + (i + 1) * 25])) for i in range(4)]
               + [(n, im) for n, im in photos(["rocket", "china", "flower"]).items()] * 2)
    out = {}
    for split, src in (("calib", calib_src), ("val", val_src)):
        xs = []
        for j, (name, im) in enumerate(src):
            im = im if name.startswith("lfw") or j % 4 == 0 else person_crop(rng, im)
            xs.append(letterbox_nudenet(np.ascontiguousarray(im), size))
        out[split] = np.stack(xs).astype(np.float32)
        save_fixed(d / f"{split}.npz", {"images": out[split]})
    sess = session(d / "model.onnx")
    dets = [nms_count(sess.run(None, {"images": out["val"][i:i + 1]})[0][0]) for i in range(len(out["val"]))]
    from collections import Counter

    cls_counts = Counter(names.get(c, c) for ds in dets for c in ds)
    return {"calib": len(calib_src), "val": len(val_src),
            "format": f"fixed: images [N,3,{size},{size}] float32",
            "sources": {"calib": "skimage camera (cameraman, 6 random crops+flips, 2 full), LFW faces 0-99 "
                                 "(4 montages of 5x5, x4 upscaled), chelsea, coffee (negatives)",
                        "val": "skimage astronaut (crops+flips), LFW faces 100-199 (4 montages), "
                               "rocket/china/flower (negatives)"},
            "preprocessing": f"NudeNet _read_image: pad right/bottom to square (black), resize {size}x{size}, "
                             "RGB /255, NCHW",
            "sanity": {"val_detections_score_ge_0.25_after_nms": int(sum(map(len, dets))),
                       "val_images_with_a_detection": int(sum(bool(x) for x in dets)),
                       "val_classes": dict(cls_counts)}}


# ----------------------------------------------------------------------------- Silero VAD


VAD_VOICES = {"calib": ["en-us", "en-gb+f3", "en-gb-scotland", "en-us+m3"],
              "val": ["en-gb", "en-us+f2", "en-029", "en-gb-x-rp+f4", "en-us+m7", "en-gb-x-gbclan"]}


def espeak(text: str, voice: str, speed: int, pitch: int, tmp: Path) -> np.ndarray:
    """Synthesize text with espeak-ng and return float32 audio resampled to 16 kHz."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng not found: apt-get update && apt-get install -y espeak-ng")
    wav = tmp / "u.wav"
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                   check=True, capture_output=True)
    sr, a = wavfile.read(wav)
    a = a.astype(np.float32) / 32768.0
    g = math.gcd(16000, sr)
    return resample_poly(a, 16000 // g, sr // g).astype(np.float32)


def noise(rng, n: int, kind: str) -> np.ndarray:
    """White, pink-ish (integrated) or hum+white noise, unit RMS."""
    if kind == "white":
        x = rng.normal(0, 1, n)
    elif kind == "pink":
        x = np.cumsum(rng.normal(0, 1, n))
        x = x - np.convolve(x, np.ones(400) / 400, mode="same")
    else:
        t = np.arange(n) / 16000
        x = np.sin(2 * np.pi * 50 * t) + 0.5 * np.sin(2 * np.pi * 150 * t) + 0.3 * rng.normal(0, 1, n)
    x = x.astype(np.float32)
    return x / (np.sqrt((x ** 2).mean()) + 1e-9)


def vad_run(sess, audio: np.ndarray, clean: np.ndarray):
    """Run Silero sequentially like OnnxWrapper (64-sample context); return feeds, probs, speech mask."""
    feeds, probs, speech = [], [], []
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros((1, 64), np.float32)
    sr = np.array(16000, dtype=np.int64)
    ref = np.sqrt((clean ** 2).mean()) + 1e-9 if clean.any() else 1.0
    for i in range(0, len(audio) - 511, 512):
        x = np.concatenate([ctx, audio[None, i:i + 512]], 1).astype(np.float32)
        feeds.append({"input": x, "state": state.copy(), "sr": sr.copy()})
        out, state = sess.run(None, {"input": x, "state": state, "sr": sr})
        probs.append(float(out[0, 0]))
        speech.append(bool(clean.any()) and float(np.sqrt((clean[i:i + 512] ** 2).mean())) > 0.3 * ref)
        ctx = x[:, -64:]
    return feeds, probs, speech


def build_silero_vad(d: Path, rng) -> dict:
    """espeak-ng utterances + noise at 16 kHz, fed sequentially; calib/val from different sentences/voices."""
    s = load_sentences()
    sess = session(d / "model.onnx")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, n_utt, stride in (("calib", 4, 3), ("val", 6, 2)):
            pool = s[split]
            idx = rng.choice(len(pool), n_utt, replace=False)
            streams = []
            for k, i in enumerate(idx):
                voice = VAD_VOICES[split][k % len(VAD_VOICES[split])]
                sp = espeak(pool[i], voice, int(rng.integers(130, 190)), int(rng.integers(30, 70)), Path(tmp))
                sp = sp / (np.abs(sp).max() + 1e-9) * rng.uniform(0.3, 0.8)
                lead, tail = int(rng.uniform(0.3, 0.8) * 16000), int(rng.uniform(0.3, 0.6) * 16000)
                clean = np.concatenate([np.zeros(lead), sp, np.zeros(tail)]).astype(np.float32)
                snr = rng.uniform(10, 25)
                rms = np.sqrt((sp ** 2).mean())
                kind = ["white", "pink", "hum"][k % 3]
                audio = clean + noise(rng, len(clean), kind) * rms / 10 ** (snr / 20)
                streams.append((f"{voice} '{pool[i][:40]}...' {kind} SNR {snr:.0f} dB", audio, clean))
            for kind in (["white", "hum"] if split == "calib" else ["pink", "white", "hum"]):
                n = int(2.0 * 16000)
                streams.append((f"noise only ({kind})", noise(rng, n, kind) * rng.uniform(0.005, 0.05),
                                np.zeros(n, np.float32)))
            feeds, probs, speech, noise_only = [], [], [], []
            for desc, audio, clean in streams:
                f, p, sm = vad_run(sess, audio, clean)
                sel = range(0, len(f), stride)
                feeds += [f[j] for j in sel]
                probs += [p[j] for j in sel]
                speech += [sm[j] for j in sel]
                noise_only += [desc.startswith("noise only")] * len(sel)
            save_ragged(d / f"{split}.npz", feeds)
            res[split] = {"streams": [x[0] for x in streams], "n": len(feeds), "probs": np.array(probs),
                          "speech": np.array(speech), "noise_only": np.array(noise_only)}
    v = res["val"]
    sanity = {"val_mean_prob_speech_chunks": round(float(v["probs"][v["speech"]].mean()), 3),
              "val_mean_prob_noise_only_chunks": round(float(v["probs"][v["noise_only"]].mean()), 3),
              "val_mean_prob_nonspeech_chunks_in_utterances": round(
                  float(v["probs"][~v["speech"] & ~v["noise_only"]].mean()), 3),
              "val_speech_chunks": int(v["speech"].sum()), "val_noise_only_chunks": int(v["noise_only"].sum())}
    return {"calib": res["calib"]["n"], "val": v["n"],
            "format": "ragged: <i>__input [1,576] float32 (64 context + 512 new samples), <i>__state [2,1,128] "
                      "float32, <i>__sr int64 scalar (16000)",
            "sources": {"calib": res["calib"]["streams"], "val": v["streams"]},
            "preprocessing": "espeak-ng wav resampled to 16 kHz, peak 0.3-0.8, noise at 10-25 dB SNR, "
                             "fp32 model run sequentially (state + 64-sample context as silero_vad.OnnxWrapper); "
                             "every 3rd (calib) / 2nd (val) chunk kept with the state it actually saw",
            "val_speech_mask": v["speech"].astype(int).tolist(), "val_noise_only_mask":
                v["noise_only"].astype(int).tolist(), "sanity": sanity}


# ----------------------------------------------------------------------------- MiniLM


def build_minilm(d: Path, rng) -> dict:
    """Tokenize the calib/val sentences (ragged [1, len] per sentence); sanity = paraphrase cosine."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"), local_files_only=True)
    s = load_sentences()
    feeds = {}
    for split in ("calib", "val"):
        feeds[split] = []
        for sent in s[split]:
            e = tok(sent, truncation=True, max_length=128, return_tensors="np")
            feeds[split].append({k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
        save_ragged(d / f"{split}.npz", feeds[split])
    sess = session(d / "model.onnx")
    outs = [o.name for o in sess.get_outputs()]

    def embed(f):
        r = sess.run(None, f)
        if "sentence_embedding" in outs:
            return r[outs.index("sentence_embedding")][0]
        h = r[0][0]
        v = h.mean(0)
        return v / np.linalg.norm(v)

    emb = {t: embed(f) for t, f in zip(s["val"], feeds["val"])}
    para = [float(emb[a] @ emb[b]) for a, b in s["pairs"]]
    keys = list(emb)
    rand = []
    for _ in range(200):
        i, j = rng.choice(len(keys), 2, replace=False)
        if (keys[i], keys[j]) not in s["pairs"] and (keys[j], keys[i]) not in s["pairs"]:
            rand.append(float(emb[keys[i]] @ emb[keys[j]]))
    lens = [f["input_ids"].shape[1] for f in feeds["val"] + feeds["calib"]]
    return {"calib": len(feeds["calib"]), "val": len(feeds["val"]),
            "format": "ragged: <i>__input_ids / <i>__attention_mask / <i>__token_type_ids int64 [1, len]",
            "sources": "scripts/sentences.txt (written for this project): '#@ calib' and '#@ val' sections; "
                       f"{len(s['pairs'])} paraphrase pairs in val",
            "preprocessing": "saved BertTokenizer (uncased), [CLS] ... [SEP], truncation at 128",
            "token_lengths": [min(lens), max(lens)],
            "sanity": {"val_mean_cos_paraphrase_pairs": round(float(np.mean(para)), 3),
                       "val_mean_cos_random_pairs": round(float(np.mean(rand)), 3),
                       "val_pairs": len(para)}}


# ----------------------------------------------------------------------------- driver


def build(name: str, cache: Path, rapid_check: bool = True) -> dict:
    """Build calib.npz / val.npz / data.json for one model; returns the data.json dict."""
    d = cache / name
    seed = 1234 + MODELS.index(name)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    if name == "efficientnet_lite0":
        info = build_efficientnet(d, rng)
    elif name == "ppocr_rec":
        info = build_ppocr_rec(d, rng, rapid_check)
    elif name == "ppocr_cls":
        info = build_ppocr_cls(d, rng, rapid_check)
    elif name == "ppocr_det":
        info = build_ppocr_det(d, rng, rapid_check)
    elif name == "yolov8n":
        info = build_yolov8n(d, rng)
    elif name == "silero_vad":
        info = build_silero_vad(d, rng)
    elif name == "minilm":
        info = build_minilm(d, rng)
    else:
        raise KeyError(name)
    info = {"model": name, "seed": seed, **info, "built_in_s": round(time.time() - t0, 1),
            "files": {"calib": "calib.npz", "val": "val.npz"},
            "disjoint": "calib and val samples come from different source photos/sentences/lines/pages/utterances"}
    write_json(d / "data.json", info)
    return info


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="cache folder (default: $ONNXCOMPRESS_ZOO or <repo>/zoo_cache)")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=MODELS, help="only these models")
    ap.add_argument("--no-rapidocr-check", action="store_true",
                    help="skip the cross-check through the rapidocr-onnxruntime pipeline")
    args = ap.parse_args(argv)
    cache = args.cache.resolve()
    rows, failed = [], False
    t0 = time.time()
    for name in args.only or MODELS:
        if not (cache / name / "model.onnx").is_file():
            print(f"[{name}] no model in {cache / name}; run scripts/fetch_zoo.py first -- skipped")
            rows.append((name, "-", "-", "model missing"))
            continue
        print(f"[{name}] building data ...", flush=True)
        try:
            info = build(name, cache, rapid_check=not args.no_rapidocr_check)
        except Exception as exc:  # report and keep going
            failed = True
            print(f"    FAILED: {type(exc).__name__}: {exc}")
            rows.append((name, "-", "-", f"failed: {exc}"))
            continue
        sanity = json.dumps({k: v for k, v in info["sanity"].items() if k != "examples_wrong"},
                            ensure_ascii=False)
        print(f"    calib {info['calib']}  val {info['val']}  ({info['built_in_s']} s)  {sanity}", flush=True)
        rows.append((name, str(info["calib"]), str(info["val"]), sanity))
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"zoo data in {cache}")
        for c in ("model", "calib", "val", "sanity (fp32, onnxruntime)"):
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*r)
        Console(width=200).print(t)
    except ImportError:
        for r in rows:
            print("  ".join(r))
    print(f"done in {time.time() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
