"""The real pretrained zoo (scripts/fetch_zoo.py + scripts/zoo_data.py): fusion must keep
every model's outputs within 1e-4 relative, and int8 must write a valid model.
Skipped when the zoo is not fetched (CI has no copy: third-party weights are never committed)."""

import os
from pathlib import Path

import onnx
import pytest

from onnxcompress import OptimizeOptions, optimize

ZOO = Path(os.environ.get("ONNXCOMPRESS_ZOO", Path(__file__).resolve().parents[1] / "zoo_cache"))
MODELS = ["efficientnet_lite0", "ppocr_det", "ppocr_rec", "ppocr_cls", "yolov8n", "silero_vad", "minilm"]


def _have(name):
    d = ZOO / name
    return all((d / f).exists() for f in ("model.onnx", "calib.npz", "val.npz"))


@pytest.mark.zoo
@pytest.mark.parametrize("name", MODELS)
def test_zoo_fusion_exact(name, tmp_path):
    if not _have(name):
        pytest.skip(f"{name} not fetched (python scripts/fetch_zoo.py && python scripts/zoo_data.py)")
    d = ZOO / name
    res = optimize(d / "model.onnx", tmp_path / "f.onnx",
                   OptimizeOptions(calibration=d / "calib.npz", validation=d / "val.npz", latency=False,
                                   max_calibration_samples=8))
    assert all(o["max_rel_err"] <= 1e-4 for o in res.report["validation"][0]["outputs"])
    assert not any(p["reverted"] for p in res.report["passes"])
    assert res.report["after"]["n_nodes"] <= res.report["before"]["n_nodes"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr_cls", "efficientnet_lite0"])
def test_zoo_static_valid(name, tmp_path):
    if not _have(name):
        pytest.skip(f"{name} not fetched")
    d = ZOO / name
    out = tmp_path / "q.onnx"
    res = optimize(d / "model.onnx", out, OptimizeOptions(quantize="static", calibration=d / "calib.npz",
                                                          validation=d / "val.npz", latency=False,
                                                          max_calibration_samples=16))
    onnx.checker.check_model(onnx.load(out))
    assert res.report["after"]["int8_initializers"] > 0
    assert min(o["cosine"] for o in res.report["validation"][0]["outputs"]) > 0.8
