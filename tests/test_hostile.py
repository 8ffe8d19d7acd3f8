"""Nothing an input names is overwritten, nothing blocks: outputs equal to inputs or to each
other, FIFOs as inputs or outputs, a zip bomb in a calibration file (issue "Any input, a clear
answer, nothing lost"). FIFOs are made in a temp folder, never the system's devices."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxcompress import OptimizeOptions, optimize
from onnxcompress.cli import app
from onnxcompress.errors import OnnxCompressError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def work(tmp_path):
    for f in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"):
        shutil.copy(ROOT / "models" / f, tmp_path / f)
    return tmp_path


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    text = res.output
    assert "Traceback" not in text, text
    return res


@pytest.mark.parametrize("flags, needle", [
    (["--report", "{m}"], "--report would overwrite the input model"),
    (["--html", "{m}"], "--html would overwrite the input model"),
    (["--report", "{c}", "--calibration", "{c}"], "--report would overwrite the calibration data"),
    (["--report", "{v}", "--validation", "{v}"], "--report would overwrite the validation data"),
    (["--report", "{o}"], "-o and --report name the same file"),
    (["--report", "{r}", "--html", "{r}"], "name the same file"),
    (["--report", "{link}", "--calibration", "{c}"], "--report would overwrite the calibration data"),
])
def test_outputs_never_overwrite_inputs_or_each_other(work, flags, needle):
    before = _digest(work)
    os.link(work / "digits_calib.npz", work / "hard.npz")
    names = {"m": work / "digits_cnn.onnx", "c": work / "digits_calib.npz", "v": work / "digits_test.npz",
             "o": work / "q.onnx", "r": work / "r.json", "link": work / "hard.npz"}
    args = [a.format(**names) for a in flags]
    res = _run("optimize", names["m"], "-o", names["o"], "--quantize", "dynamic", "-q", *args)
    assert res.exit_code == 2 and needle in res.output, res.output
    after = _digest(work)
    after.pop("hard.npz")
    assert after == before  # nothing written, nothing changed


def test_output_model_equal_to_calibration_is_refused(work):
    c = work / "digits_calib.npz"
    before = c.read_bytes()
    res = _run("optimize", work / "digits_cnn.onnx", "-o", c, "--quantize", "static", "--calibration", c, "-q")
    assert res.exit_code == 2 and "-o would overwrite the calibration data" in res.output
    assert c.read_bytes() == before
    with pytest.raises(OnnxCompressError, match="refusing to overwrite"):  # the Python API too
        optimize(work / "digits_cnn.onnx", c, OptimizeOptions(quantize="static", calibration=c))
    assert c.read_bytes() == before


def test_fifos_are_refused_as_inputs_and_outputs(work):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    m = work / "digits_cnn.onnx"
    for args, needle in (
            (["optimize", m, "-o", fifo], "a FIFO; outputs are regular files or new paths"),
            (["optimize", m, "-o", work / "q.onnx", "--report", fifo], "a FIFO; outputs are regular files"),
            (["optimize", m, "-o", work / "q.onnx", "--quantize", "static", "--calibration", fifo], "a FIFO, not a regular"),
            (["optimize", m, "-o", work / "q.onnx", "--validation", fifo], "a FIFO, not a regular"),
            (["optimize", m, "-o", work / "q.onnx", "--recipe", fifo], "a FIFO, not a regular"),
            (["optimize", fifo, "-o", work / "q.onnx"], "not a regular file"),
            (["inspect", fifo], "not a regular file")):
        res = _run(*args)
        assert res.exit_code == 2 and needle in res.output, (args, res.output)
        assert fifo.exists() and not fifo.is_file()  # still the FIFO
    assert not (work / "q.onnx").exists()


def _npz_with_junk(path: Path, junk_bytes: int, key: str = "junk") -> None:
    """The digits calibration arrays plus one highly compressible array of ``junk_bytes`` zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with np.load(ROOT / "models" / "digits_calib.npz") as d:
            for k in d.files:
                buf = io.BytesIO()
                np.save(buf, d[k])
                zf.writestr(k + ".npy", buf.getvalue())
        hdr = io.BytesIO()
        np.lib.format.write_array_header_1_0(hdr, {"descr": "|u1", "fortran_order": False, "shape": (junk_bytes,)})
        with zf.open(key + ".npy", "w", force_zip64=True) as f:
            f.write(hdr.getvalue())
            chunk = bytes(16 << 20)
            for _ in range(junk_bytes // len(chunk)):
                f.write(chunk)


def test_ignored_npz_keys_are_never_decompressed(work, monkeypatch):
    """A 512 MiB ignored array (a few hundred KB zipped) is not read: calibration works as without it."""
    import onnxcompress.data as data

    bomb = work / "bomb.npz"
    _npz_with_junk(bomb, 512 << 20)
    assert bomb.stat().st_size < 2 << 20
    read = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, k: read.append(k) or real(self, k))
    specs = data.input_specs(__import__("onnxcompress.model_io", fromlist=["x"]).load_model(work / "digits_cnn.onnx"))
    samples, extras = data.load_npz(bomb, specs)
    assert "junk" not in read and samples
    # a used array declaring more than the memory bound is refused before it is read
    monkeypatch.setattr(data, "max_data_bytes", lambda: 1 << 10)
    with pytest.raises(OnnxCompressError, match="declare"):
        data.load_npz(work / "digits_calib.npz", specs)


def test_external_data_outside_the_folder_is_refused_whether_or_not_it_exists(work):
    """A model cannot learn whether an outside path exists: the same refusal either way."""
    import onnx

    msgs = []
    for loc in ("../../../../etc/hostname", "../../no/such/file.data"):
        m = onnx.load(str(work / "digits_cnn.onnx"))
        t = m.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value=loc)
        p = work / "ext.onnx"
        p.write_bytes(m.SerializeToString())
        res = _run("inspect", p)
        assert res.exit_code == 2 and "outside the model's folder" in res.output, res.output
        msgs.append(res.output.replace(loc, "LOC"))
    assert msgs[0] == msgs[1]


def test_a_killed_auto_run_leaves_nothing_behind_next_time(work):
    stale = work / ".onnxcompress-auto-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "dynamic.onnx").write_bytes(b"x")
    res = _run("optimize", work / "digits_cnn.onnx", "-o", work / "q.onnx", "--quantize", "auto", "-q", "--no-latency")
    assert res.exit_code == 0, res.output
    assert not stale.exists() and not list(work.glob(".onnxcompress-auto-*"))


def test_unreadable_tensor_and_unsupported_opset_are_one_line_refusals(work):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.raw_data = w.raw_data[:10]  # fewer bytes than its shape needs
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(work / "bad.onnx"))
    for cmd in (["inspect", work / "bad.onnx"], ["optimize", work / "bad.onnx", "-o", work / "b2.onnx"]):
        res = _run(*cmd)
        assert res.exit_code == 2 and "raw_data size" in res.output, res.output
    # the newest opset onnx knows, beyond what ONNX Runtime implements for QuantizeLinear
    m = onnx.load(str(work / "digits_cnn.onnx"))
    m.opset_import[0].version = onnx.defs.onnx_opset_version()
    m.ir_version = onnx.IR_VERSION
    onnx.save(m, str(work / "new.onnx"))
    res = _run("optimize", work / "new.onnx", "-o", work / "n2.onnx", "--quantize", "static", "--calibration",
               work / "digits_calib.npz", "-q")
    assert res.exit_code in (0, 2), res.output
    assert res.exit_code == 0 or len(res.output.strip().splitlines()) == 1


def test_empty_output_path_is_a_one_line_error(work):
    res = _run("optimize", work / "digits_cnn.onnx", "-o", "")
    assert res.exit_code == 2 and "give an output file path" in res.output


def test_symlinked_outputs_are_refused(work):
    """A rename onto a link replaces the link (``--html /dev/stdout`` would replace /dev/stdout): refused."""
    target = work / "target.json"
    link = work / "link.json"
    link.symlink_to(target)
    for flag in ("--report", "--html", "-o"):
        args = ["optimize", work / "digits_cnn.onnx", "-q"] + (["-o", link] if flag == "-o" else
                                                               ["-o", work / "q.onnx", flag, link])
        res = _run(*args)
        assert res.exit_code == 2 and "symbolic link" in res.output, (flag, res.output)
        assert link.is_symlink() and not target.exists()


def test_api_given_a_loaded_model_never_writes_over_the_files_it_was_read_from(work):
    """``optimize(load_model(p), out)``: the model was read from ``p`` and its external data is
    memory-mapped from ``p.data``; writing over either would destroy the input (the mapped weights
    change under the run, the model on disk points into a new layout)."""
    import onnx

    from onnxcompress.model_io import load_model

    m = onnx.load(work / "digits_cnn.onnx")
    onnx.save(m, work / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=64)
    before = _digest(work)
    for target in ("ext.onnx", "ext.onnx.data"):
        model = load_model(work / "ext.onnx")
        with pytest.raises(OnnxCompressError, match="input"):
            optimize(model, work / target, OptimizeOptions(latency=False))
    model = load_model(work / "ext.onnx")
    with pytest.raises(OnnxCompressError, match="input"):  # its .data would land on the input's
        optimize(model, work / "ext.onnx", OptimizeOptions(latency=False, external_data=True))
    assert _digest(work) == before
    optimize(load_model(work / "ext.onnx"), work / "new.onnx", OptimizeOptions(latency=False))
    assert (work / "new.onnx").is_file() and _digest(work)["ext.onnx.data"] == before["ext.onnx.data"]


def test_input_model_with_non_finite_outputs_on_the_validation_data_is_called_out(work):
    """Sqrt of negative values: the input model's own answers are NaN on some samples; the result
    compares equal there (NaN with NaN), which the report must not pass off as fidelity."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), work / "sqrt.onnx")
    rng = np.random.default_rng(0)
    xs = [np.abs(rng.standard_normal((1, 4))).astype(np.float32) for _ in range(4)]
    xs[1][0, 2] = -1.0
    np.savez(work / "val.npz", **{f"{i}__x": x for i, x in enumerate(xs)})
    res = optimize(work / "sqrt.onnx", work / "o.onnx", OptimizeOptions(validation=str(work / "val.npz"), latency=False))
    assert res.report["validation"][0]["nonfinite_reference"] == {"y": 1}
    assert any("not finite" in n and "'y' on 1 of 4" in n for n in res.report["notes"]), res.report["notes"]
    np.savez(work / "clean.npz", **{f"{i}__x": np.abs(x) for i, x in enumerate(xs)})
    clean = optimize(work / "sqrt.onnx", None, OptimizeOptions(validation=str(work / "clean.npz"), latency=False))
    assert not clean.report["validation"][0]["nonfinite_reference"]
    assert not any("not finite" in n for n in clean.report["notes"])
