import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]


def _cpu_target() -> str:
    from onnxcompress.runtime import cpu_features

    f = cpu_features()
    return "vnni" if f.vnni or f.arch in ("aarch64", "arm64") else "avx2"


#: the int8 target whose models ONNX Runtime computes on this CPU as on their target. Without VNNI
#: (AVX2, AVX-512 without VNNI) its u8s8 kernels add neighbouring products in int16 (vpmaddubsw),
#: which saturates on full-range 8-bit weights: a model written for ``--target vnni`` loses accuracy
#: *here* that it keeps on a VNNI CPU. Tests of a rewrite's fidelity quantize for this target;
#: tests of the vnni form itself check its fidelity only where ``VNNI_EXACT``.
CPU_TARGET = _cpu_target()
VNNI_EXACT = CPU_TARGET == "vnni"


@pytest.fixture
def digits():
    """The committed digits CNN and its data."""
    return {"model": ROOT / "models" / "digits_cnn.onnx", "calib": ROOT / "models" / "digits_calib.npz",
            "test": ROOT / "models" / "digits_test.npz"}


def save(m, path, **feeds):
    import onnx
    onnx.save(m, str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(1)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def screenshot(tmp_path):
    """``screenshot(html_path) -> png path``: the page rendered by headless Chromium; where
    Chromium is missing it returns ``None`` and checks nothing (the rest of the test still runs;
    ``tests/test_bench.py``'s Chromium test shows the skip)."""
    import subprocess

    if not CHROMIUM.exists():
        return lambda page: None

    def shot(page: Path) -> Path:
        png = tmp_path / (page.stem + ".png")
        proc = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,2400", f"--screenshot={png}",
             page.resolve().as_uri()], capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        return png

    return shot
