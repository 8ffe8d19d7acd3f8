import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]


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
