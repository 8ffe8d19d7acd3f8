"""Validation sets from *another source* than the zoo's calibration data (issue 18), for the zoo
models whose own ``val.npz`` comes from the same generator as their ``calib.npz``.

The zoo's text models are calibrated and validated on disjoint lines of one generator: sentences
written for this project (``scripts/sentences.txt``), rendered in DejaVu fonts. A quantizer tuned
there can still lose on other text in other typefaces. This script writes, beside each model's own
data, ``zoo_cache/<model>/other/val.npz`` and ``other/data.json`` (texts, labels, sources):

* ``ppocr_rec``: 60 text lines of the news corpus (``scripts/text_corpus.py``: the Lee corpus and
  movie-review sentences inside the ``gensim`` wheel) plus the zoo's number-line templates,
  rendered in the **Liberation** fonts (Sans, Serif, Mono, Sans Narrow; Debian's
  ``fonts-liberation``) instead of DejaVu, preprocessed as RapidOCR does;
* ``ppocr_cls``: the same kind of lines (another 60), about a quarter rotated 180 degrees;
* ``minilm``: 80 news sentences, tokenized as the zoo's MiniLM data;
* ``ppocr_det``: 8 pages of news lines in the Liberation fonts (``other/pages.npz`` keeps the
  RGB pages for the rapidocr pipeline, ``other/val.npz`` the det inputs).

Models calibrated on the zoo's ``calib.npz`` and validated on these are judged on data that
no step of the tool or of its tuning has seen. ``python scripts/bench_int8.py --val-set other``
reads them (det is judged by the rapidocr pipeline on these pages; rec's page pipeline, on the
zoo's pages, is not run then).

Run after ``scripts/fetch_zoo.py`` and ``scripts/zoo_data.py``::

    python scripts/zoo_other.py [--only ppocr_rec minilm ...]

Needs the Liberation fonts (``apt-get install fonts-liberation``) for the OCR sets and one
``pip download`` of the gensim wheel (about 28 MB, into ``zoo_cache/_text``) for the news text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_corpus as tc  # noqa: E402
import zoo_data as zd  # noqa: E402

LIBERATION = Path("/usr/share/fonts/truetype/liberation")
MODELS = ["ppocr_rec", "ppocr_cls", "minilm", "ppocr_det"]
SEED = 20261207
N_LINES, N_SENTENCES, N_PAGES = 60, 80, 8


def _liberation() -> list[str]:
    fonts = sorted(p.name for p in LIBERATION.glob("Liberation*.ttf"))
    if not fonts:
        raise SystemExit(f"no Liberation fonts in {LIBERATION}: apt-get install fonts-liberation")
    return fonts


def _liberated(fn, *args):
    """``fn(*args)`` (a zoo_data renderer) with the Liberation fonts in place of DejaVu."""
    old = zd.FONT_DIR, zd.FONTS
    zd.FONT_DIR, zd.FONTS = LIBERATION, _liberation()
    try:
        return fn(*args)
    finally:
        zd.FONT_DIR, zd.FONTS = old


def _render_lines(rng, texts: list[str]) -> list[np.ndarray]:
    return [_liberated(zd.render_line, rng, t) for t in texts]


def other_pages(cache: Path) -> tuple[list[np.ndarray], list[list[str]]]:
    """The ppocr_det other-source pages (RGB uint8) and their lines, as :func:`build` wrote them."""
    d = cache / "ppocr_det" / "other"
    z = np.load(d / "pages.npz")
    pages = [z[f"{i}__rgb"] for i in range(len(z.files))]
    return pages, json.loads((d / "data.json").read_text())["val_page_texts"]


def build(name: str, cache: Path, news: list[str]) -> dict:
    d = cache / name
    if not (d / "model.onnx").exists():
        raise SystemExit(f"{d / 'model.onnx'} is missing: run scripts/fetch_zoo.py first")
    out = d / "other"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(SEED + MODELS.index(name))
    src = {"text": "news corpus (scripts/text_corpus.py --source news: Lee corpus + movie reviews, gensim wheel)"}
    if name == "ppocr_rec":
        texts = zd.make_lines(rng, news, N_LINES)
        imgs = _render_lines(rng, texts)
        zd.save_ragged(out / "val.npz", [{"x": zd.rec_pre(np.ascontiguousarray(im[..., ::-1]))} for im in imgs])
        info = {"texts": {"val": texts}, "format": "ragged: <i>__x [1,3,48,W] float32"}
        src["render"] = "Pillow, Liberation TTF 24-41 px (zoo: DejaVu), light bg, dark ink, noise"
    elif name == "ppocr_cls":
        texts = zd.make_lines(rng, news, N_LINES)
        xs, labels = [], []
        for im in _render_lines(rng, texts):
            im = im[..., ::-1]
            rot = rng.random() < 0.25
            if rot:
                im = im[::-1, ::-1]
            xs.append(zd.cls_pre(np.ascontiguousarray(im)))
            labels.append(180 if rot else 0)
        zd.save_fixed(out / "val.npz", {"x": np.stack(xs)})
        info = {"texts": {"val": texts}, "val_labels_deg": labels, "format": "fixed: x [N,3,48,192] float32"}
        src["render"] = "as ppocr_rec's other set; about 25 % rotated 180 deg"
    elif name == "ppocr_det":
        pool = zd.make_lines(rng, news, 200)
        samples, pages, page_texts = [], [], []
        for i in range(N_PAGES):
            k = int(rng.integers(8, 20))
            start = int(rng.integers(0, len(pool) - k))
            lines = [pool[start + j] + " " + pool[(start + j + 100) % len(pool)] if rng.random() < 0.5
                     else pool[start + j] for j in range(k)]
            rgb, gt = _liberated(zd.render_page, rng, lines, zd.PAGE_SIZES[i % len(zd.PAGE_SIZES)])
            samples.append({"x": zd.det_pre(np.ascontiguousarray(rgb[..., ::-1]))})
            pages.append({"rgb": rgb})
            page_texts.append([t for t, _ in gt])
        zd.save_ragged(out / "val.npz", samples)
        zd.save_ragged(out / "pages.npz", pages)
        texts = [t for p in page_texts for t in p]
        info = {"val_page_texts": page_texts, "format": "ragged: <i>__x [1,3,H,W] float32; pages.npz: <i>__rgb"}
        src["render"] = "zoo_data.render_page in Liberation TTF (zoo: DejaVu), news lines"
    else:
        feeds, texts = tc.tokenized(d / "tokenizer", N_SENTENCES, seed=SEED, source="news", cache=cache / "_text")
        zd.save_ragged(out / "val.npz", feeds)
        info = {"texts": {"val": texts}, "format": "ragged: <i>__input_ids/attention_mask/token_type_ids [1, len]"}
    info.update(model=name, seed=SEED, val=len(texts), sources={"val": src, "calib": "the zoo's calib.npz"})
    (out / "data.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=zd.default_cache())
    ap.add_argument("--only", nargs="+", choices=MODELS, metavar="NAME", help=f"only these ({', '.join(MODELS)})")
    args = ap.parse_args(argv)
    news = tc.news_sentences(args.cache / "_text")
    for name in args.only or MODELS:
        info = build(name, args.cache, news)
        print(f"{name}: {info['val']} lines -> {args.cache / name / 'other' / 'val.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
