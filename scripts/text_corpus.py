"""Large unlabelled English corpora, offline (after one ``pip download``), for calibrating and
distilling text models such as all-MiniLM-L6-v2:

* ``news``: the Lee corpus of 299 Australian news articles (Lee, Pincombe & Welsh 2005) and 200
  movie-review sentences (Pang & Lee), both shipped as test data inside the ``gensim`` wheel on
  PyPI; the wheel is downloaded once (``pip download --no-deps``, about 28 MB, into
  ``--cache``) and the two files are read from the zip, nothing is installed. About 2,700
  sentences of general English.
* ``stdlib``: the Python standard library's own documentation (``pydoc_data.topics``) and its
  modules' docstrings (read with ``ast``; nothing is imported or run): about 11,500 sentences of
  technical English, always present.

Both are a *different source* from the zoo's MiniLM sentences (``scripts/sentences.txt``,
written for this project), so a model calibrated or distilled on them and validated on the zoo's
``val.npz`` is judged on text it never saw.

    python scripts/text_corpus.py --source news -n 2500 -o news.npz

writes ``N`` tokenized sentences in the ragged ``.npz`` layout of ``--calibration``
(``<i>__input_ids`` / ``<i>__attention_mask`` / ``<i>__token_type_ids``, int64 ``[1, len]``),
picked at random (``--seed``) from the unique sentences, truncated at 128 tokens.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sysconfig
from pathlib import Path

import numpy as np

from onnxcompress.model_io import write_atomic

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SPLIT_NEWS = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def _sentences(text: str) -> list[str]:
    """Prose sentences of 6-40 words from ``text``; code blocks and doctest paragraphs dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if ">>>" in para or any(line.startswith(("    ", "\t")) for line in lines[1:]):
            continue
        for s in _SPLIT.split(" ".join(para.split())):
            words = s.split()
            if 6 <= len(words) <= 40 and s[-1] in ".!?" and sum(c.isalpha() or c == " " for c in s) / len(s) > 0.92:
                out.append(s)
    return out


GENSIM = "gensim==4.4.0"
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "zoo_cache" / "_text"
NEWS_FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/pang_lee_polarity.cor")


def news_sentences(cache: Path) -> list[str]:
    """Unique sentences of the Lee news corpus and the Pang & Lee review sentences, from the gensim
    wheel (downloaded into ``cache`` when missing). Raises ``RuntimeError`` when pip cannot get it."""
    import subprocess
    import sys
    import zipfile

    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("gensim-4.4.0-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                            "-d", str(cache), GENSIM], capture_output=True, text=True)
        wheels = sorted(cache.glob("gensim-4.4.0-*.whl"))
        if r.returncode or not wheels:
            raise RuntimeError(f"pip download {GENSIM} failed: {r.stderr.strip()[-300:]}")
    out: list[str] = []
    with zipfile.ZipFile(wheels[0]) as z:
        lee = z.read(NEWS_FILES[0]).decode("utf-8", "replace")
        for s in _SPLIT_NEWS.split(" ".join(lee.split())):
            if 5 <= len(s.split()) <= 60:
                out.append(s)
        for line in z.read(NEWS_FILES[1]).decode("utf-8", "replace").splitlines():
            line = line.split(" ", 1)[-1].strip() if line.startswith("__label__") else line.strip()
            if len(line.split()) >= 5:
                out.append(line)
    return list(dict.fromkeys(out))


def sentences() -> list[str]:
    """Unique sentences, in a fixed order (help topics first, then docstrings by file path)."""
    import pydoc_data.topics as topics

    found = _sentences("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    std = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(std.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(f.relative_to(std).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found += _sentences(doc)
    return list(dict.fromkeys(found))


def tokenized(tokenizer_dir: str | Path, n: int, seed: int = 0, source: str = "stdlib",
              cache: Path | None = None) -> tuple[list[dict], list[str]]:
    """``n`` random sentences of ``source`` tokenized as the zoo's MiniLM data (``[1, len]`` int64
    per input)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    pool = news_sentences(cache or DEFAULT_CACHE) if source == "news" else sentences()
    pick = np.random.default_rng(seed).permutation(len(pool))[:n]
    texts = [pool[i] for i in sorted(pick)]
    feeds = []
    for t in texts:
        e = tok(t, truncation=True, max_length=128, return_tensors="np")
        feeds.append({k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return feeds, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "zoo_cache/minilm/tokenizer"))
    ap.add_argument("-n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", choices=("news", "stdlib"), default="news")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the gensim wheel is kept")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    out = Path(a.output)
    if a.n < 1:
        ap.error("-n must be at least 1")
    if a.seed < 0:
        ap.error("--seed must be 0 or more")
    if out.suffix != ".npz" or out.is_dir():
        ap.error(f"-o {out}: give a new file name ending in .npz")
    if out.exists():
        ap.error(f"-o {out}: exists; give a new file name (nothing is overwritten)")
    if not out.parent.is_dir():
        ap.error(f"-o {out}: the folder {out.parent} does not exist")
    if not (Path(a.tokenizer) / "tokenizer_config.json").is_file():
        ap.error(f"--tokenizer {a.tokenizer}: no saved tokenizer there (scripts/fetch_zoo.py --only minilm makes one)")
    try:
        feeds, texts = tokenized(a.tokenizer, a.n, a.seed, a.source, a.cache)
    except (RuntimeError, OSError) as exc:
        raise SystemExit(f"text_corpus: {exc}") from None
    if len(feeds) < a.n:
        print(f"note: the {a.source} corpus has {len(feeds)} unique sentences; all of them are written")
    flat = {f"{i}__{k}": v for i, s in enumerate(feeds) for k, v in s.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **flat)
    try:
        write_atomic(out, buf.getvalue())  # a private temporary file renamed into place
    except OSError as exc:
        raise SystemExit(f"text_corpus: cannot write {out} ({exc.strerror or exc})") from None
    lens = [f["input_ids"].shape[1] for f in feeds]
    print(f"{len(feeds)} sentences, {sum(lens)} tokens (lengths {min(lens)}-{max(lens)}) -> {a.output}")


if __name__ == "__main__":
    main()
