"""A large unlabelled English corpus, offline: sentences from the Python standard library's own
documentation (``pydoc_data.topics``, the language reference's help topics) and from the
docstrings of its modules (read with ``ast``; nothing is imported or run).

It is a *different source* from the zoo's MiniLM sentences (``scripts/sentences.txt``, general
English written for this project): technical prose, so a model distilled or calibrated on it and
validated on the zoo's sentences is judged on text it never saw, of another kind.

    python scripts/text_corpus.py --tokenizer zoo_cache/minilm/tokenizer -n 4000 -o corpus.npz

writes ``N`` tokenized sentences in the ragged ``.npz`` layout of ``--calibration``
(``<i>__input_ids`` / ``<i>__attention_mask`` / ``<i>__token_type_ids``, int64 ``[1, len]``),
picked at random (``--seed``) from the unique sentences, truncated at 128 tokens.
"""

from __future__ import annotations

import argparse
import ast
import re
import sysconfig
from pathlib import Path

import numpy as np

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


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


def tokenized(tokenizer_dir: str | Path, n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """``n`` random sentences tokenized as the zoo's MiniLM data (``[1, len]`` int64 per input)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    pool = sentences()
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
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    feeds, texts = tokenized(a.tokenizer, a.n, a.seed)
    flat = {f"{i}__{k}": v for i, s in enumerate(feeds) for k, v in s.items()}
    np.savez_compressed(a.output, **flat)
    lens = [f["input_ids"].shape[1] for f in feeds]
    print(f"{len(feeds)} sentences, {sum(lens)} tokens (lengths {min(lens)}-{max(lens)}) -> {a.output}")


if __name__ == "__main__":
    main()
