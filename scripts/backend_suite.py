"""The ONNX project's own backend test models through onnxcompress (fusion, no data; and dynamic
int8 where it applies), beside ONNX Runtime, counting every outcome.

Models: the node tests regenerated from the installed ``onnx`` package's test-case code
(``onnx.backend.test.case.node.collect_testcases``) and the simple / PyTorch-converted /
PyTorch-operator models shipped in its ``backend/test/data``. Only models ONNX Runtime runs on
their own test inputs count. For each, ``optimize(model, None)`` (no data: random inputs) must
give one of: **pass** (a valid model whose outputs on the test inputs equal the original's within
1e-3 relative, exactly for non-float outputs; int8: cosine >= 0.99 or within 5 % of the largest
magnitude), or a **refusal** (one line, an
``OnnxCompressError``). Anything else is a failure: **traceback** (any other exception),
**wrong** outputs, **invalid** file (``onnx.checker`` or ORT refuses the result).

    python scripts/backend_suite.py [--only SUBSTR] [--int8] [--limit N] [--json out.json]

Exit 1 when any traceback, wrong output or invalid file was seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

INT8_OPS = {"Conv", "MatMul", "Gemm", "LSTM", "GRU"}


def _cases():
    """(name, model, inputs dict) for every backend model with a test data set."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in node.collect_testcases(None):
            if c.model is None or not c.data_sets:
                continue
            ins = c.data_sets[0][0]
            names = [i.name for i in c.model.graph.input if i.name not in {t.name for t in c.model.graph.initializer}]
            if len(ins) != len(names):
                continue
            yield c.name, c.model, dict(zip(names, ins))
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    for kind in ("simple", "pytorch-converted", "pytorch-operator"):
        for d in sorted((root / kind).iterdir()):
            m, ds = d / "model.onnx", d / "test_data_set_0"
            if not m.exists() or not ds.is_dir():
                continue
            model = onnx.load(str(m))
            init = {t.name for t in model.graph.initializer}
            names = [i.name for i in model.graph.input if i.name not in init]
            arrays = []
            for k in range(len(names)):
                t = onnx.TensorProto()
                p = ds / f"input_{k}.pb"
                if not p.exists():
                    break
                t.ParseFromString(p.read_bytes())
                arrays.append(numpy_helper.to_array(t))
            if len(arrays) == len(names):
                yield f"{kind}/{d.name}", model, dict(zip(names, arrays))


def _run(model: onnx.ModelProto, feeds: dict):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _same(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        with np.errstate(invalid="ignore"):
            return _close(a, b)
    return bool(np.array_equal(a, b))


def _close(a, b) -> bool:
    """Equal within 1e-3 of the largest finite magnitude; NaN where both are NaN, infinities equal."""
    kind = np.complex128 if a.dtype.kind == "c" else np.float64
    a64, b64 = a.astype(kind), b.astype(a.dtype).astype(kind)
    both_nan = np.isnan(a64) & np.isnan(b64)
    scale = max(float(np.max(np.abs(np.nan_to_num(a64[~both_nan], posinf=0, neginf=0)), initial=0.0)), 1e-6)
    return bool(np.all(both_nan | (np.abs(a64 - b64) <= 1e-3 * scale) | (a64 == b64)))


class _Timeout(Exception):
    pass


def _one(name, model, feeds, *, int8: bool, timeout: float) -> tuple[str, str]:
    from onnxcompress import OptimizeOptions, optimize
    from onnxcompress.errors import OnnxCompressError
    from onnxcompress.model_io import to_proto

    try:
        ref = _run(model, feeds)
    except Exception:
        return "skip", "ONNX Runtime cannot run the original"
    def _alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(timeout))
    try:
        opts = OptimizeOptions(latency=False, quantize="dynamic" if int8 else None)
        res = optimize(model, None, opts)
        out = to_proto(res.model)
    except OnnxCompressError as exc:
        msg = str(exc).strip()
        return ("refusal" if "\n" not in msg else "traceback"), msg.splitlines()[0][:300]
    except _Timeout:
        return "timeout", f"over {timeout:g} s"
    except Exception as exc:
        return "traceback", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} @ " + \
            traceback.extract_tb(exc.__traceback__)[-1].filename.split("site-packages/")[-1].split("/work/main/")[-1] \
            + f":{traceback.extract_tb(exc.__traceback__)[-1].lineno}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    try:
        onnx.checker.check_model(out)
        got = _run(out, feeds)
    except Exception as exc:
        return "invalid", str(exc).splitlines()[0][:300]
    same = _near_int8 if int8 else _same
    if len(got) != len(ref) or not all(map(same, ref, got)):
        return "wrong", "outputs differ from the original's on the test inputs"
    return "pass", ""


def _near_int8(a, b) -> bool:
    """int8 is lossy: float outputs need cosine >= 0.99 (or max error <= 5 % of the largest
    magnitude, for near-constant outputs); everything else must be equal as after fusion."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype.kind == "f" and a.shape == b.shape:
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        if not (np.all(np.isfinite(a64)) and np.all(np.isfinite(b64))):
            return _same(a, b)
        scale = max(float(np.abs(a64).max(initial=0.0)), 1e-6)
        if float(np.abs(a64 - b64).max(initial=0.0)) <= 0.05 * scale:
            return True
        na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
        return bool(na > 0 and nb > 0 and np.dot(a64, b64) / (na * nb) >= 0.99)
    return _same(a, b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run models whose name contains this")
    ap.add_argument("--int8", action="store_true", help="also dynamic int8 on models with Conv/MatMul/Gemm/LSTM/GRU")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    logging.getLogger("onnxcompress").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    rows, t0 = [], time.time()
    for i, (name, model, feeds) in enumerate(_cases()):
        if a.only and a.only not in name:
            continue
        if a.limit and len(rows) >= a.limit:
            break
        kinds = [False] + ([True] if a.int8 and {n.op_type for n in model.graph.node} & INT8_OPS else [])
        for int8 in kinds:
            status, why = _one(name, model, feeds, int8=int8, timeout=a.timeout)
            rows.append({"model": name, "mode": "int8-dynamic" if int8 else "fuse", "status": status, "why": why})
            if status not in ("pass", "skip", "refusal"):
                print(f"{status:9s} {rows[-1]['mode']:12s} {name}: {why}", flush=True)
    counts = Counter((r["mode"], r["status"]) for r in rows)
    print(f"\n{len(rows)} runs in {time.time() - t0:.0f} s")
    for mode in ("fuse", "int8-dynamic"):
        c = {s: n for (m, s), n in counts.items() if m == mode}
        if c:
            print(f"{mode}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    causes = Counter(r["why"].split(" @ ")[-1] for r in rows if r["status"] == "traceback")
    for cause, n in causes.most_common(15):
        print(f"  {n:4d} {cause}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    bad = sum(n for (m, s), n in counts.items() if s in ("traceback", "wrong", "invalid", "timeout"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
