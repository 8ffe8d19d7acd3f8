"""Train a small CNN on scikit-learn's 8x8 digits and export it to ONNX.

This produces the committed test artefacts that the ``onnxcompress`` test
suite and examples compress and validate:

``models/digits_cnn.onnx``
    The trained model, ONNX opset 17. One input ``input`` (float32,
    ``[batch, 1, 8, 8]``, symbolic batch dimension ``batch``) and one output
    ``logits`` (float32, ``[batch, 10]``). It is exported in eval mode
    *without* constant folding, so the BatchNormalization nodes stay in the
    graph (giving the compressor Conv+BN fusion work to do).
``models/digits_calib.npz``
    256 images from the training split under key ``input``
    (float32 ``[256, 1, 8, 8]``), for int8 calibration.
``models/digits_test.npz``
    All test-split images under ``input`` (float32 ``[N, 1, 8, 8]``) and
    their labels under ``labels`` (int64 ``[N]``).
``models/digits_cnn.json``
    Metadata: fp32 test accuracy measured with ONNX Runtime on the written
    file, test/calibration sizes, parameter count, opset, torch version and
    the command that produced it.

Input scaling: ``load_digits`` pixel values are integers 0..16; the model
expects them divided by 16, i.e. float32 in ``[0, 1]``. Both ``.npz`` files
are stored already scaled.

Split: ``train_test_split(test_size=0.25, random_state=0, stratify=labels)``.
All seeds are fixed and training runs single-threaded with deterministic
algorithms, so reruns give the same model.

Requires PyTorch (``pip install -e .[torch]``) in addition to onnx,
onnxruntime, numpy and scikit-learn.

Run from the repository root::

    python scripts/train_digits.py                 # writes into models/
    python scripts/train_digits.py --epochs 40 --out-dir /tmp/digits
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
OPSET = 17
N_CALIB = 256
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


def import_torch() -> Any:
    """Import and return the ``torch`` module, or exit with install advice."""
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        sys.exit(
            "train_digits.py needs PyTorch, which is not installed.\n"
            "Install the optional extra with:  pip install -e .[torch]"
        )
    return torch


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the digits data set, scale to [0, 1] and split it.

    Returns ``(x_train, x_test, y_train, y_test)`` with images as float32
    ``[N, 1, 8, 8]`` (pixel values divided by 16) and labels as int64 ``[N]``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=SEED, stratify=labels
    )
    return (
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.ascontiguousarray(x_test, dtype=np.float32),
        np.ascontiguousarray(y_train, dtype=np.int64),
        np.ascontiguousarray(y_test, dtype=np.int64),
    )


def build_model(torch: Any) -> Any:
    """Return the (untrained) digits CNN as a ``torch.nn.Sequential``.

    Conv(1->16)+BN+ReLU, Conv(16->32)+BN+ReLU, MaxPool 2,
    Conv(32->32)+BN+ReLU, Flatten, Linear(512->64)+ReLU, Dropout,
    Linear(64->10). All convolutions are 3x3 with padding 1.
    """
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(64, 10),
    )


def random_shift(torch: Any, x: Any, generator: Any) -> Any:
    """Shift each image in ``x`` by -1, 0 or +1 pixel in each axis (zero fill)."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(8)[None, :]  # [n, 8]
    cols = dx[:, None] + torch.arange(8)[None, :]  # [n, 8]
    idx_n = torch.arange(n)[:, None, None]
    out = padded[idx_n, 0, rows[:, :, None], cols[:, None, :]]  # [n, 8, 8]
    return out.unsqueeze(1)


def train(
    torch: Any,
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> None:
    """Train ``model`` in place with Adam, cosine LR decay and random shifts.

    Prints the loss and the PyTorch test accuracy every few epochs.
    """
    gen = torch.Generator().manual_seed(SEED)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = xt.shape[0]
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb = random_shift(torch, xt[idx], gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if epoch == 1 or epoch % 5 == 0 or epoch == epochs:
            acc = torch_accuracy(torch, model, x_test, y_test)
            print(f"epoch {epoch:3d}  loss {total / n:.4f}  torch test acc {acc:.4f}")


def torch_accuracy(torch: Any, model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Return the accuracy of ``model`` (put in eval mode) on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def export_onnx(torch: Any, model: Any, path: Path) -> None:
    """Export ``model`` to ``path`` as ONNX, keeping BatchNormalization nodes.

    Uses the TorchScript exporter (``dynamo=False``) in eval mode
    (``TrainingMode.EVAL``: inference-mode BatchNormalization, Dropout
    dropped) with ``do_constant_folding=False``; without constant folding
    the exporter does not fuse BatchNorm into the preceding Conv, which is
    exactly the optimisation the compressor should do instead.
    """
    model.eval()
    dummy = torch.zeros(1, 1, 8, 8, dtype=torch.float32)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True;
        # it is used on purpose here, so silence the notice.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _export(torch, model, dummy, path)


def _export(torch: Any, model: Any, dummy: Any, path: Path) -> None:
    """Call ``torch.onnx.export`` with this script's fixed settings."""
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
        export_params=True,
    )


def check_onnx(path: Path) -> collections.Counter:
    """Run ``onnx.checker`` on ``path`` and return its op-type histogram."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert [i.name for i in graph.input] == [INPUT_NAME], graph.input
    assert [o.name for o in graph.output] == [OUTPUT_NAME], graph.output
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == BATCH_DIM and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    odims = graph.output[0].type.tensor_type.shape.dim
    assert odims[0].dim_param == BATCH_DIM and odims[1].dim_value == 10
    return collections.Counter(node.op_type for node in graph.node)


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Return the accuracy of the ONNX model at ``path`` run with ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    return float((logits.argmax(axis=1) == y).mean())


def command_line() -> str:
    """Return the command used to run this script, with a repo-relative path."""
    script = sys.argv[0]
    try:
        script = os.path.relpath(script)
    except ValueError:  # different drive on Windows
        pass
    return "python " + shlex.join([script.replace(os.sep, "/"), *sys.argv[1:]])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(
        description="Train a small CNN on sklearn digits and export it to ONNX."
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path("models"),
        help="directory for the .onnx/.npz/.json artefacts (default: models)",
    )
    parser.add_argument(
        "--epochs", type=int, default=40, help="training epochs (default: 40)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, export and verify the model; write all artefacts. Returns 0."""
    args = parse_args(argv)
    torch = import_torch()
    t0 = time.perf_counter()

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    x_train, x_test, y_train, y_test = load_data()
    print(f"train {len(x_train)}  test {len(x_test)}")

    model = build_model(torch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")
    train(torch, model, x_train, y_train, x_test, y_test, epochs=args.epochs)

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits_cnn.onnx"
    export_onnx(torch, model, onnx_path)
    hist = check_onnx(onnx_path)
    print("onnx.checker: OK")
    print("op histogram:", dict(sorted(hist.items())))
    missing = {"BatchNormalization", "Conv", "Relu", "MaxPool"} - set(hist)
    if missing or not ("Gemm" in hist or {"MatMul", "Add"} <= set(hist)):
        sys.exit(f"exported graph lacks expected ops: {sorted(missing) or 'Gemm/MatMul+Add'}")

    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(x_train), size=N_CALIB, replace=False))
    calib = np.ascontiguousarray(x_train[calib_idx], dtype=np.float32)
    np.savez_compressed(out / "digits_calib.npz", input=calib)
    np.savez_compressed(out / "digits_test.npz", input=x_test, labels=y_test)

    acc = ort_accuracy(onnx_path, x_test, y_test)
    meta = {
        "test_accuracy": round(acc, 6),
        "n_test": int(len(x_test)),
        "n_calib": int(len(calib)),
        "params": int(n_params),
        "opset": OPSET,
        "torch_version": torch.__version__,
        "command": command_line(),
    }
    (out / "digits_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")

    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz", "digits_cnn.json"):
        print(f"wrote {out / name}  ({(out / name).stat().st_size} bytes)")
    print(f"fp32 test accuracy (onnxruntime): {acc:.4f}  ({len(x_test)} images)")
    print(f"elapsed: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
