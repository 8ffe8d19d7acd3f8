"""The tool's own cost: one copy of the weights, models over 2 GB end to end, checks without copies.

The > 2 GB test writes a sparse synthetic transformer (file holes: a few MB of disk for 2 GiB of
weights, written in well under a second) and runs fuse and dynamic int8 in a child process under
an address-space cap, measuring the child's peak RSS with ``os.wait4``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import graphs as G
from onnxcompress import model_io
from onnxcompress.api import OptimizeOptions, optimize
from onnxcompress.errors import ModelLoadError, ModelWriteError
from onnxcompress.passes.base import CompressionPass, PassContext, run_passes, snapshot
from onnxcompress.passes.fusion import FoldBatchNormPass
from onnxcompress.runtime import make_session
from onnxcompress.synthetic import real_input, transformer_stack, weight_bytes

ROOT = Path(__file__).resolve().parents[1]


def _bytes(model: ir.Model) -> bytes:
    return model_io.to_proto(model).SerializeToString()


class _Breaks(CompressionPass):
    """A checked rewrite that changes the outputs (scales the first float initializer read by a
    node), so the runner must revert it."""

    name = "breaks"

    def apply(self, model):
        v = next(v for v in model.graph.initializers.values() if v.const_value.numpy().dtype == np.float32
                 and v.const_value.numpy().size > 1)
        v.const_value = ir.tensor(v.const_value.numpy() * 3.0, name=v.name)
        model.graph.append(ir.Node("", "Identity", [v], name="extra_identity"))
        return True


class _EditsInPlace(CompressionPass):
    """A pass that edits a shared tensor in place: the snapshot's tensors are read-only, so it
    raises and is reverted instead of corrupting the snapshot."""

    name = "edits-in-place"

    def apply(self, model):
        v = next(v for v in model.graph.initializers.values() if v.const_value.numpy().size > 1)
        v.const_value.numpy()[...] = 0.0
        return True


def test_reverted_pass_leaves_model_byte_identical_without_a_copy(tmp_path):
    m = G.conv_bn_relu()
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    onnx.save(m, tmp_path / "m.onnx")
    model = model_io.load_model(tmp_path / "m.onnx")
    before = _bytes(model)
    tensors = {n: id(v.const_value) for n, v in model.graph.initializers.items()}
    for bad in (_Breaks(), _EditsInPlace()):
        model, reps = run_passes(model, [bad], [x])
        assert reps[0].reverted and not reps[0].changed, reps[0]
        assert _bytes(model) == before
        # the revert target shared the tensors (no copy of the weights was made)
        assert {n: id(v.const_value) for n, v in model.graph.initializers.items()} == tensors


def test_batch_check_reverts_only_the_culprit(tmp_path):
    """Checked passes are verified together; when the batch misses its tolerance it is replayed
    pass by pass, and only the pass that moved the outputs is reverted."""
    m = G.conv_bn_relu()
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    model = ir.from_proto(m)
    ctx = PassContext()
    model, reps = run_passes(model, [FoldBatchNormPass(ctx), _Breaks(ctx)], [x])
    by = {r.name: r for r in reps}
    assert by["fold-batchnorm"].changed and not by["fold-batchnorm"].reverted
    assert by["breaks"].reverted and "relative" in by["breaks"].reverted
    out = model_io.to_proto(model)
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    np.testing.assert_allclose(G.run(out, x)["y"], G.run(m, x)["y"], rtol=1e-4, atol=1e-5)


def test_snapshot_shares_tensors_and_freezes_them():
    model = ir.from_proto(G.mlp())
    snap = snapshot(model)
    for name, v in model.graph.initializers.items():
        assert snap.graph.initializers[name].const_value is v.const_value
        with pytest.raises(ValueError):
            v.const_value.numpy()[...] = 1.0


@pytest.mark.parametrize("external", [False, True])
def test_lean_load_and_streamed_write_round_trip(tmp_path, external):
    m = G.mlp(k=64, n=32)
    src = tmp_path / "src.onnx"
    saved = onnx.ModelProto()
    saved.CopyFrom(m)  # onnx.save with external data rewrites its argument
    onnx.save(saved, src, save_as_external_data=external, location="src.onnx.data", size_threshold=1024)
    model = model_io.load_model(src)
    ref = onnx.load(src)  # onnx's own loader, weights inline
    for t in ref.graph.initializer:
        np.testing.assert_array_equal(model.graph.initializers[t.name].const_value.numpy(),
                                      onnx.numpy_helper.to_array(t))
    for ext in (False, True):
        out = tmp_path / f"out_{ext}.onnx"
        size = model_io.save_model(model, out, external_data=ext)
        assert size == out.stat().st_size + ((tmp_path / f"out_{ext}.onnx.data").stat().st_size if ext else 0)
        if not ext:  # self-contained: no reference to the input's data file
            assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in onnx.load(out).graph.initializer)
            assert abs(model_io.model_size_bytes(model) - size) <= 8
        onnx.checker.check_model(str(out), full_check=True)
        feeds = {"x": np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)}
        np.testing.assert_array_equal(G.run(str(out), feeds)["y"], G.run(m, feeds)["y"])


def test_rewriting_an_external_data_output_never_pairs_the_old_model_with_the_new_data(tmp_path, monkeypatch):
    """``OUT`` and ``OUT.data`` are several renames (``model_io._swap_pair``): the earlier pair is
    moved away before either new file is renamed in, so nobody (and no run killed in between)
    finds the old model beside the new data; a failure at any rename (or Ctrl-C) puts the earlier
    pair back byte for byte and leaves no temporary file."""
    import onnxcompress.model_io as mio

    out, data = tmp_path / "out.onnx", tmp_path / "out.onnx.data"
    first = ir.from_proto(G.mlp(k=64, n=32))
    model_io.save_model(first, out, external_data=True)
    new = ir.from_proto(G.mlp(k=64, n=32))
    real_replace = mio.os.replace
    seen = []

    def watch(src, dst):
        if Path(dst) in (data, out) and not str(src).endswith(".old"):
            seen.append((Path(dst).name, os.path.lexists(out), os.path.lexists(data)))
        return real_replace(src, dst)

    monkeypatch.setattr(mio.os, "replace", watch)
    model_io.save_model(new, out, external_data=True)
    # the new data went in with neither earlier file in place, the model after it
    assert seen == [("out.onnx.data", False, False), ("out.onnx", False, True)], seen
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    np.testing.assert_allclose(G.run(str(out), feeds)["y"], G.run(ir.to_proto(new), feeds)["y"], rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    before = (out.read_bytes(), data.read_bytes())

    for step, exc in [(0, OSError(28, "No space left on device")), (1, OSError(28, "No space left on device")),
                      (2, OSError(5, "Input/output error")), (3, OSError(5, "Input/output error")),
                      (2, KeyboardInterrupt())]:
        calls = []

        def fail(src, dst, step=step, exc=exc, calls=calls):
            calls.append(dst)
            if len(calls) == step + 1:  # renames: hide OUT, hide OUT.data, data in, model in
                raise exc
            return real_replace(src, dst)

        monkeypatch.setattr(mio.os, "replace", fail)
        with pytest.raises(ModelWriteError if isinstance(exc, OSError) else KeyboardInterrupt):
            model_io.save_model(first, out, external_data=True)
        assert (out.read_bytes(), data.read_bytes()) == before, step  # the earlier pair, as it was
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"], step

    def undo_fails(src, dst, calls=[]):
        calls.append(dst)
        if len(calls) in (4, 7):  # the model rename fails, then putting the earlier model back too
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(mio.os, "replace", undo_fails)
    with pytest.raises(ModelWriteError, match="kept as .*out.onnx.*old"):
        model_io.save_model(first, out, external_data=True)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx.") and p.name.endswith(".old")
            and not p.name.startswith(".out.onnx.data.")]
    assert len(kept) == 1 and kept[0].read_bytes() == before[0]  # the earlier model is not deleted


@pytest.mark.parametrize("external", [False, True])
def test_unchanged_weights_are_copied_from_the_input_file_byte_for_byte(tmp_path, monkeypatch, external):
    """The writer copies a weight that is still the input file's bytes file to file
    (``os.copy_file_range``); the result is the same bytes as writing from memory, a changed
    weight is written from memory, and an input modified after loading is not copied from."""
    m = G.mlp(k=256, n=128)
    src = tmp_path / "src.onnx"
    saved = onnx.ModelProto()
    saved.CopyFrom(m)  # onnx.save with external data rewrites its argument
    onnx.save(saved, src, save_as_external_data=external, location="src.onnx.data", size_threshold=1024)
    fresh = model_io.load_model(src)  # just written: a coarse file clock could hide a rewrite, no copy
    assert all(model_io.file_source(v.const_value.numpy()) is None for v in fresh.graph.initializers.values())
    monkeypatch.setattr(model_io, "SETTLED_NS", 0)  # (instead of waiting 2 s)
    model = model_io.load_model(src)
    name = next(n for n, v in model.graph.initializers.items() if v.const_value.nbytes >= 4096)
    assert model_io.file_source(model.graph.initializers[name].const_value.numpy()) is not None
    changed = next(n for n, v in model.graph.initializers.items() if n != name and v.const_value.nbytes >= 1024)
    v = model.graph.initializers[changed]
    v.const_value = ir.Tensor(v.const_value.numpy() * 2, name=changed)  # a pass's rewrite: a new array

    copied = []
    real = os.copy_file_range

    def spy(*args):
        copied.append(args[2])
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", spy, raising=False)
    for ext in (False, True):
        model_io.save_model(model, tmp_path / f"kernel_{ext}.onnx", external_data=ext)
    n_kernel = len(copied)
    monkeypatch.setattr(model_io, "file_source", lambda buf: None)
    for ext in (False, True):
        model_io.save_model(model, tmp_path / f"memory_{ext}.onnx", external_data=ext)
    assert len(copied) == n_kernel and n_kernel >= 2  # the memory path never copies
    for ext in (False, True):
        for suffix in (".onnx", ".onnx.data") if ext else (".onnx",):
            kernel = (tmp_path / f"kernel_{ext}{suffix}").read_bytes()
            memory = (tmp_path / f"memory_{ext}{suffix}").read_bytes()  # (the .onnx names its .data file)
            assert kernel == memory.replace(f"memory_{ext}".encode(), f"kernel_{ext}".encode())
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)}
    out = G.run(str(tmp_path / "kernel_False.onnx"), feeds)["y"]
    assert not np.array_equal(out, G.run(m, feeds)["y"])  # the changed weight is in the file
    monkeypatch.undo()
    monkeypatch.setattr(model_io, "SETTLED_NS", 0)

    # the weights stay read-only for good: no one can edit them behind the record
    arr = model.graph.initializers[name].const_value.numpy()
    with pytest.raises(ValueError):
        arr.flags.writeable = True

    # the input is rewritten in place after loading, at the same size and with its mtime put
    # back (as cp -p or rsync -t do): nothing is copied from it, the loaded weights are written
    data = tmp_path / ("src.onnx.data" if external else "src.onnx")
    before = data.read_bytes()
    model2 = model_io.load_model(src)
    st = data.stat()
    time.sleep(0.01)
    with open(data, "r+b") as f:
        f.write(bytes(len(before)))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    copied.clear()
    monkeypatch.setattr(os, "copy_file_range", spy, raising=False)
    model_io.save_model(model2, tmp_path / "after_change.onnx", check=False)
    assert copied == []
    if not external:  # (external data is memory-mapped: the run sees the file as it is)
        np.testing.assert_array_equal(G.run(str(tmp_path / "after_change.onnx"), feeds)["y"], G.run(m, feeds)["y"])
    data.write_bytes(before)

    # the input changes while the output is written: the output is written again from memory
    model3 = model_io.load_model(src)
    calls = []

    def change_then_copy(*args):
        if not calls:
            with open(data, "r+b") as f:
                f.write(bytes(16))
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", change_then_copy, raising=False)
    model_io.save_model(model3, tmp_path / "during.onnx", check=False)
    assert calls
    if not external:
        np.testing.assert_array_equal(G.run(str(tmp_path / "during.onnx"), feeds)["y"], G.run(m, feeds)["y"])


def test_sympy_is_executed_only_when_used(tmp_path):
    """onnx-ir imports SymPy eagerly; the command line defers it (start-up), and SymPy still works;
    a plain ``import onnxcompress`` (a library user) leaves the import system as it is."""
    code = textwrap.dedent("""
        import sys
        import onnxcompress
        assert "sympy" not in sys.modules or type(sys.modules["sympy"]).__name__ == "module"
        from onnxcompress.cli import app
        try:
            app(["optimize", sys.argv[1], "-o", sys.argv[2], "--no-latency"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        assert type(sys.modules["sympy"]).__name__ == "_Deferred", type(sys.modules["sympy"])
        import onnx_ir as ir
        d = ir.SymbolicDim("N")
        assert str(d * 2 + 1) == "2*N + 1" and str(ir.SymbolicDim("max(N, 3)")._expr) == "Max(3, N)"
        import sympy
        assert type(sys.modules["sympy"]).__name__ == "module" and sympy.Integer(2) + 1 == 3
        import onnx_ir._symbolic_shapes
        assert str(onnx_ir._symbolic_shapes.parse_symbolic_expression("N+1")) == "N + 1"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "models" / "digits_cnn.onnx"), str(tmp_path / "o.onnx")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_session_reads_weights_in_place_and_reports_extra_outputs(tmp_path):
    m = G.mlp()
    onnx.save(m, tmp_path / "m.onnx")
    model = model_io.load_model(tmp_path / "m.onnx")
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)}
    for optimize_ in (False, True):
        sess = make_session(model, optimize=optimize_, extra_outputs=["h0"] if not optimize_ else ())
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        np.testing.assert_allclose(out["y"], G.run(m, feeds)["y"], rtol=1e-5, atol=1e-6)
        if not optimize_:
            assert "h0" in out
        # the buffers ORT reads are the model's own arrays
        ptrs = {v.data_ptr() for v in sess.onnxcompress_weights[1]}
        assert model.graph.initializers["W1"].const_value.numpy().ctypes.data in ptrs


def test_hostile_external_data_is_refused(tmp_path):
    m = G.mlp(k=64, n=32)
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=1024)
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    cases = {"escape": ("../outside.data", None), "fifo": ("pipe.data", None), "short": ("m.data", 1 << 30)}
    (tmp_path.parent / "outside.data").write_bytes(b"\0" * (1 << 16))
    os.mkfifo(tmp_path / "pipe.data")
    for what, (loc, offset) in cases.items():
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        t = next(t for t in p.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        for e in t.external_data:
            if e.key == "location":
                e.value = loc
            if e.key == "offset" and offset is not None:
                e.value = str(offset)
        path = tmp_path / f"{what}.onnx"
        path.write_bytes(p.SerializeToString())
        with pytest.raises(ModelLoadError):
            model_io.load_model(path)


def test_report_states_cost_per_stage(tmp_path):
    res = optimize(ROOT / "models/digits_cnn.onnx", tmp_path / "q.onnx",
                   OptimizeOptions(quantize="dynamic", validation=ROOT / "models/digits_test.npz"))
    cost = res.report["cost"]
    names = [st["stage"] for st in cost["stages"]]
    assert names[0] == "loading model" and any("quantization" in n for n in names) and names[-1].startswith("writing")
    assert all(st["seconds"] >= 0 and st["peak_rss_mb"] > 0 for st in cost["stages"])
    assert cost["peak_rss_mb"] >= max(st["peak_rss_mb"] for st in cost["stages"]) * 0.99


#: the child that runs one mode under an address-space cap and prints its report's cost
_CHILD = textwrap.dedent("""
    import json, resource, sys
    cap = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from onnxcompress.api import OptimizeOptions, optimize
    res = optimize(sys.argv[1], sys.argv[2], OptimizeOptions(
        quantize=None if sys.argv[3] == "fuse" else sys.argv[3], validation=sys.argv[5], latency=False))
    print(json.dumps({"cost": res.report["cost"], "bytes": res.report["after"]["file_bytes"]}))
""")


@pytest.mark.slow
def test_model_over_2gb_fuse_and_dynamic_in_bounded_memory(tmp_path):
    hidden, layers = 1024, 57
    size = weight_bytes(hidden, layers)
    assert size > 2 * 1024**3
    src = transformer_stack(tmp_path / "big.onnx", hidden=hidden, layers=layers, sparse=True, external_data=True)
    np.savez(tmp_path / "val.npz", hidden_states=np.stack([real_input(hidden, seq=16, seed=s)[0] for s in (5, 6)]))
    cap = int(3 * size + (4 << 30))  # address space: maps of the data file + runtimes; RSS is checked below
    ref_sess = make_session(str(src), optimize=False)
    x = real_input(hidden, seq=16, seed=7)
    ref = ref_sess.run(None, {"hidden_states": x})[0]
    del ref_sess
    for mode, rss_limit, cos_min in (("fuse", 1.5 * size + (512 << 20), 0.99999),
                                     ("dynamic", 1.5 * size + (512 << 20), 0.99)):
        out = tmp_path / f"{mode}.onnx"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out), mode, str(cap),
                                 str(tmp_path / "val.npz")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
        assert os.waitstatus_to_exitcode(status) == 0, stderr[-3000:]
        peak = usage.ru_maxrss * 1024
        assert peak <= rss_limit, f"{mode}: peak RSS {peak / 2**30:.2f} GiB over {rss_limit / 2**30:.2f} GiB"
        info = json.loads(stdout.strip().splitlines()[-1])
        assert [s["stage"] for s in info["cost"]["stages"]][0] == "loading model"
        sess = make_session(str(out), optimize=True)
        got = sess.run(None, {"hidden_states": x})[0]
        del sess
        cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cos >= cos_min, (mode, cos)
        if mode == "fuse":  # over 2 GB: written with external data, beside the output
            assert (tmp_path / "fuse.onnx.data").is_file()
            (tmp_path / "fuse.onnx.data").unlink()
        else:
            assert info["bytes"] < size / 3  # int8 weights: a quarter of the float ones, inline
        out.unlink()


def test_external_tensors_of_any_dtype_and_in_attributes_are_loaded(tmp_path):
    """bfloat16 external initializers (the usual dtype of large LLM exports) and a Constant's
    external value no longer refer to the input folder after loading: the output is checked and
    written like any other, also with external data."""
    import ml_dtypes

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 64])
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    wt = helper.make_tensor("Wb", onnx.TensorProto.BFLOAT16, [64, 64], w.view(np.uint16).tobytes(), raw=True)
    c = onnx.numpy_helper.from_array(np.ones((2, 64), np.float32) * 0.5, "c")
    nodes = [helper.make_node("Cast", ["Wb"], ["W"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Constant", [], ["cv"], value=c),
             helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "cv"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [wt]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0, convert_attribute=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    ref = G.run(str(tmp_path / "m.onnx"), feeds)["y"]
    for ext in (False, True):
        res = optimize(tmp_path / "m.onnx", tmp_path / f"o{ext}.onnx", OptimizeOptions(external_data=ext, latency=False))
        assert res.passed
        np.testing.assert_allclose(G.run(str(tmp_path / f"o{ext}.onnx"), feeds)["y"], ref, rtol=1e-5, atol=1e-5)


def test_many_external_files_and_corrupt_bytes(tmp_path):
    """One file per tensor beyond the mapped-files cap loads (read, not mapped); a file of zeros
    is refused at once (protobuf has no field 0) instead of being scanned byte by byte."""
    k = model_io.MAX_MAPPED_FILES + 6
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])
    inits, nodes, prev = [], [], "x"
    for i in range(k):
        inits.append(onnx.numpy_helper.from_array(np.full((16, 16), 1.0 / 16, np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        prev = f"h{i}"
    y = helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [1, 16])
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    model = model_io.load_model(tmp_path / "m.onnx")
    feeds = {"x": np.ones((1, 16), np.float32)}
    out = make_session(model, optimize=False).run(None, feeds)[0]
    np.testing.assert_allclose(out, G.run(str(tmp_path / "m.onnx"), feeds)[prev], rtol=1e-6)
    (tmp_path / "zeros.onnx").write_bytes(b"\0" * (8 << 20))
    with pytest.raises(ModelLoadError, match="field number 0"):
        model_io.load_model(tmp_path / "zeros.onnx")


def _residual_cnn(seed=0):
    """x -> Conv -> Relu (r1) -> Conv -> Relu (r2) -> Add(r2, r1) -> Conv -> y, plus a Mul of x
    read only by the last node (a value carried past two segments)."""
    rng = np.random.default_rng(seed)
    w = [helper.make_tensor(f"w{i}", onnx.TensorProto.FLOAT, [8, 8, 3, 3],
                            rng.standard_normal((8, 8, 3, 3)).astype(np.float32).ravel() * 0.2) for i in range(3)]
    nodes = [helper.make_node("Mul", ["x", "x"], ["xx"], name="sq"),
             helper.make_node("Conv", ["x", "w0"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w1"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Add", ["r2", "r1"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "w2"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c3", "xx"], ["y"], name="out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 16, 16])], w)
    return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _assert_segments_equal_one_session(model, names, samples, budget):
    """``iter_outputs`` at ``budget`` (several chunks) gives every name once per sample, each value
    equal to a one-session run's."""
    from onnxcompress.passes.quantize import calibrate as C

    one = {(k, n): v for k, outs in C.iter_outputs(model, names, samples) for n, v in outs.items()}
    seg = {(k, n): v for k, outs in C.iter_outputs(model, names, samples, budget=budget) for n, v in outs.items()}
    assert set(one) == set(seg) == {(k, n) for k in range(len(samples)) for n in names}
    for key in one:
        np.testing.assert_array_equal(one[key], seg[key])


def test_recording_in_segments_equals_one_session():
    """Calibration reads values in chunks: with several chunks the graph runs as consecutive
    segments (one forward pass per sample); every value equals a one-session run's exactly."""
    from onnxcompress.passes.quantize import calibrate as C

    model = _residual_cnn()
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(3)]
    names = ["x", "xx", "c1", "r1", "c2", "r2", "s", "c3"]
    # one value per chunk (8 x 16 x 16 floats): seven segments, r1 and xx carried past segments
    _assert_segments_equal_one_session(model, names, samples, budget=8 * 16 * 16 * 4)
    order = [n for k, outs in C.iter_outputs(model, names, samples, budget=8 * 16 * 16 * 4) for n in outs if n == "r1"]
    assert len(order) == 3  # once per sample
    # the model is untouched: same nodes, same outputs
    assert [n.name for n in model.graph] == ["sq", "conv1", "relu1", "conv2", "relu2", "add", "conv3", "out"]
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_recording_in_segments_carries_any_tensor_and_keeps_a_nodes_outputs_together():
    """Segments hand over untyped int64 values (a Shape read two segments later), record both
    outputs of a Split whose outputs fall in two chunks, and return initializers by value;
    everything equals a one-session run."""
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [8, 8, 1, 1], np.eye(8, dtype=np.float32).ravel())
    nodes = [helper.make_node("Shape", ["x"], ["shp"], name="shape"),
             helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"),
             helper.make_node("Split", ["c1"], ["a", "b"], name="split", axis=1, num_outputs=2),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Concat", ["ra", "rb"], ["cat"], name="cat", axis=1),
             helper.make_node("Reshape", ["cat", "shp"], ["y"], name="reshape")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    for v in (v for n in model.graph for v in n.outputs):
        v.type, v.shape = None, None  # as after a failed shape inference
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(2)]
    names = ["w", "x", "c1", "b", "a", "ra", "rb", "cat"]
    _assert_segments_equal_one_session(model, names, samples, budget=4 * 8 * 8 * 4)


def test_reference_sessions_run_without_the_arena_deployed_ones_with_it():
    """References and checks (optimizations off) run without ORT's memory arena, whose high mark
    stayed held after the session was gone; sessions as deployed (and timed) keep it."""
    from onnxcompress.runtime import make_session

    m = ir.from_proto(G.mlp())
    assert make_session(m, optimize=False).get_session_options().enable_cpu_mem_arena is False
    assert make_session(m, optimize=True).get_session_options().enable_cpu_mem_arena is True
    assert make_session(m, optimize=False, arena=True).get_session_options().enable_cpu_mem_arena is True


def test_reference_session_runs_optimized_within_its_copy_budget(monkeypatch):
    """A reference runs at ORT_ENABLE_ALL (NCHWc conv kernels want their weights' values: copied
    into ORT's graph up to REFERENCE_COPY_BYTES); over that budget it runs unoptimized, without a
    copy. Both give the unoptimized outputs within float rounding."""
    from onnxcompress import runtime
    from onnxcompress.runtime import reference_session, run_samples

    m = ir.from_proto(G.conv_bn_relu(c_in=16, c_out=32))  # a 32x16x3x3 weight: 18 KB, read in place
    x = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    feeds = [{m.graph.inputs[0].name: x}]
    plain = run_samples(make_session(m, optimize=False), feeds)[0]
    fast = reference_session(m)
    assert fast.onnxcompress_level == "all"
    assert fast.get_session_options().enable_cpu_mem_arena is False
    monkeypatch.setattr(runtime, "REFERENCE_COPY_BYTES", 1024)
    lean = reference_session(m)
    assert lean.onnxcompress_level == "disable"
    for sess in (fast, lean):
        got = run_samples(sess, feeds)[0]
        for k, v in plain.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-5)
