"""Byte identity of the CLI's outputs across a refactor: write models for many flag sets (fuse,
dynamic, static, auto, every prune mode, a gate with fallback) on the digits CNN and a generated
transformer stack, and print the sha256 of each output.

    python scripts/bytecheck_cli.py OUT_DIR [CASE ...] > before.txt    # on the old checkout
    python scripts/bytecheck_cli.py OUT_DIR [CASE ...] > after.txt     # on the new one
    diff before.txt after.txt

Hashes depend on the CPU (``--target auto``) and the onnxruntime version: compare on one machine.
"""
import hashlib
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner
from onnxcompress.cli import app
from onnxcompress.synthetic import transformer_stack, real_input

out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
ROOT = Path(__file__).resolve().parents[1]
M, C, V = (str(ROOT / "models" / f) for f in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"))
tr = out / "tr.onnx"
if not tr.exists():
    transformer_stack(tr, hidden=64, layers=2, seed=3)
    x = real_input(64, seq=16, batch=1, seed=1)
    import onnx
    name = onnx.load(str(tr)).graph.input[0].name
    np.savez(out / "tr_calib.npz", **{name: np.concatenate([real_input(64, seq=16, batch=1, seed=s) for s in range(8)])})
TC = str(out / "tr_calib.npz")
cases = {
 "d_fuse": [M], "d_dyn": [M, "--quantize", "dynamic"],
 "d_static": [M, "--quantize", "static", "--calibration", C, "--validation", V],
 "d_auto": [M, "--quantize", "auto", "--calibration", C, "--validation", V],
 "d_prune_u": [M, "--prune", "0.5", "--calibration", C],
 "d_prune_c": [M, "--prune", "0.3", "--prune-mode", "channel", "--calibration", C, "--validation", V],
 "d_prune_nm": [M, "--prune-mode", "nm", "--calibration", C],
 "d_prune_static": [M, "--prune", "0.3", "--prune-mode", "channel", "--quantize", "static", "--calibration", C],
 "d_static_avx2": [M, "--quantize", "static", "--calibration", C, "--target", "avx2", "--per-tensor", "--calibration-method", "percentile"],
 "d_gate_fb": [M, "--quantize", "static", "--calibration", C, "--validation", V, "--min-cosine", "0.99998"],
 "t_fuse": [str(tr)], "t_dyn": [str(tr), "--quantize", "dynamic"],
 "t_static": [str(tr), "--quantize", "static", "--calibration", TC],
 "t_prune_u": [str(tr), "--prune", "0.4", "--prune-scope", "layer"],
 "t_nm": [str(tr), "--prune-mode", "nm", "--prune-nm", "1:4"],
}
only = sys.argv[2:] or list(cases)
r = CliRunner()
for k in only:
    o = out / f"{k}.onnx"
    res = r.invoke(app, ["optimize", *cases[k], "-o", str(o), "-q", "--no-latency"])
    h = hashlib.sha256(o.read_bytes()).hexdigest()[:16] if o.exists() else f"exit{res.exit_code}:{(res.output or '')[-200:]!r}"
    print(k, h, flush=True)
