"""`onnxcompress export`: a PyTorch module to ONNX, checked against PyTorch in ONNX Runtime
(at the sample batch and another), written atomically; bad factories are one-line errors."""

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from onnxcompress.cli import app  # noqa: E402
from onnxcompress.export import ExportError, export  # noqa: E402

runner = CliRunner()

NET = textwrap.dedent('''
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.c(x)).mean((2, 3)))

    class Baked(Net):  # int() freezes the traced batch size into a Reshape constant
        def forward(self, x):
            y = torch.relu(self.c(x))
            return self.fc(y.reshape(int(y.shape[0]), 8, -1).mean(-1))

    def build():
        torch.manual_seed(0)
        return Net()

    def baked():
        torch.manual_seed(0)
        return Baked()

    class Flat(Net):  # collapses the batch: fine at batch 1, wrong at any other
        def forward(self, x):
            return torch.relu(self.c(x)).view(1, -1)

    def flat():
        return Flat()

    def exits():
        import sys
        sys.exit(0)

    def not_a_module():
        return 3

    def raises():
        raise RuntimeError("no weights here")
''')


@pytest.fixture
def netdir(tmp_path, monkeypatch):
    (tmp_path / "exportnet.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    monkeypatch.delitem(sys.modules, "exportnet", raising=False)  # each test imports its own copy
    return tmp_path


def test_export_round_trips_a_module_at_any_batch(netdir):
    from exportnet import build

    net = build()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    res = export(net, [x], netdir / "net.onnx", input_names=["image"], output_names=["logits"])
    onnx.checker.check_model(onnx.load(str(netdir / "net.onnx")))
    r = res.report
    assert r["exporter"] == "torchscript" and r["opset"] == 17 and r["dynamic_batch_checked_at"] == 6
    assert r["outputs"][0]["name"] == "logits" and r["outputs"][0]["max_rel_error"] <= 1e-4
    sess = ort.InferenceSession(str(netdir / "net.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # the batch axis is symbolic and right
        xb = np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
        with torch.no_grad():
            want = net(torch.from_numpy(xb)).numpy()
        np.testing.assert_allclose(sess.run(None, {"image": xb})[0], want, rtol=1e-4, atol=1e-5)
    assert not list(netdir.glob(".onnxcompress-export-*"))  # no temporary left


def test_a_baked_batch_is_refused_and_nothing_written(netdir):
    from exportnet import baked

    x = np.ones((1, 3, 16, 16), np.float32)
    with pytest.raises(ExportError, match="--static-batch"):
        export(baked(), [x], netdir / "b.onnx")
    assert not (netdir / "b.onnx").exists()
    res = export(baked(), [x], netdir / "b.onnx", dynamic_batch=False)
    assert res.report["dynamic_batch_checked_at"] is None and (netdir / "b.onnx").is_file()


def test_cli_export_and_its_errors(netdir):
    res = runner.invoke(app, ["export", "exportnet:build", "-o", "n.onnx", "--input-shape", "1,3,16,16",
                              "--report", "r.json"])
    assert res.exit_code == 0, res.output
    assert "ONNX Runtime matches PyTorch" in res.output and (netdir / "n.onnx").is_file()
    assert json.loads((netdir / "r.json").read_text())["inputs"][0]["shape"] == [1, 3, 16, 16]
    np.savez(netdir / "x.npz", x=np.zeros((4, 3, 16, 16), np.float32))
    before = (netdir / "x.npz").read_bytes()
    res = runner.invoke(app, ["export", "exportnet:build", "-o", "d.onnx", "--data", "x.npz", "-q"])
    assert res.exit_code == 0, res.output
    assert (netdir / "x.npz").read_bytes() == before
    for args, needle in ((["exportnet:not_a_module"], "not a torch.nn.Module"),
                         (["exportnet:raises"], "no weights here"),
                         (["nosuchmodule:build"], "cannot import"),
                         (["exportnet"], "module:function"),
                         (["exportnet:baked"], "--static-batch"),
                         (["exportnet:flat"], "does not follow the batch"),
                         (["exportnet:exits"], "sys.exit(0)"),
                         (["./exportnet.py:build"], "import name"),
                         (["exportnet:build", "--input-dtype", "bogus"], "--input-dtype"),
                         (["exportnet:build", "--rtol", "nan"], "--rtol"),
                         (["exportnet:build", "--opset", "99"], "knows default-domain opsets 7 to"),
                         (["exportnet:build", "--input-shape", "2,5"], "the module on the samples")):
        res = runner.invoke(app, ["export", *args, "-o", "e.onnx", "--input-shape", "1,3,16,16"])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and needle in res.output, res.output
        assert not (netdir / "e.onnx").exists()
    res = runner.invoke(app, ["export", "exportnet:build", "-o", "e.onnx"])
    assert res.exit_code == 2 and "--input-shape" in res.output
    src = (netdir / "exportnet.py").read_bytes()
    for out in ("exportnet.py", "missing/e.onnx"):  # the factory's own source; a folder that is not there
        res = runner.invoke(app, ["export", "exportnet:build", "-o", out, "--input-shape", "1,3,16,16"])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert (netdir / "exportnet.py").read_bytes() == src
    res = runner.invoke(app, ["export", "exportnet:build", "-o", "x.npz", "--data", "x.npz"])
    assert res.exit_code == 2 and (netdir / "x.npz").read_bytes() == before
