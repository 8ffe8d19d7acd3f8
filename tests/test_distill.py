"""Distillation (`[torch]` extra): a tiny student learns a tiny teacher; export, resume, bad input."""

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
from onnxcompress import distill as D  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402

try:
    D._onnx2torch()
except OnnxCompressError:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

K, H, C = 16, 32, 6


def _mlp(seed, hidden=H, scale=0.5, extra=None, opset=17):
    """x[batch, K] -> MatMul -> Add -> Relu -> MatMul -> Add -> logits[batch, C] (weights seeded)."""
    r = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((r.standard_normal((K, hidden)) * scale).astype(np.float32), "W1"),
             numpy_helper.from_array((r.standard_normal(hidden) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((r.standard_normal((hidden, C)) * scale).astype(np.float32), "W2"),
             numpy_helper.from_array((r.standard_normal(C) * 0.1).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
             helper.make_node("Add", ["h3", "b2"], ["logits" if extra is None else "z"])]
    if extra is not None:
        nodes.append(helper.make_node(extra, ["z"], ["logits"]))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.fixture
def setup(tmp_path):
    teacher, student = tmp_path / "teacher.onnx", tmp_path / "student.onnx"
    onnx.save(_mlp(0, scale=0.6), teacher)
    onnx.save(_mlp(1, hidden=24, scale=0.3), student)  # random init, narrower
    x = np.random.default_rng(2).standard_normal((512, K)).astype(np.float32)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, labels=np.argmax(x[:, :C], axis=1))
    return teacher, student, data, tmp_path


def _digest(p):
    import hashlib
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cuts_loss_tenfold_fast_and_exports_faithfully(setup):
    teacher, student, data, tmp = setup
    before = (_digest(teacher), _digest(student), _digest(data))
    events = []
    t0 = time.perf_counter()
    res = D.distill(teacher, student, tmp / "out.onnx", data, epochs=30, lr=1e-2, batch_size=64,
                    progress=events.append)
    seconds = time.perf_counter() - t0
    r = res.report
    assert seconds < 30, seconds
    assert r["loss_kinds"] == {"logits": "kl"}
    assert r["initial_loss"] / r["final_loss"] >= 10, (r["initial_loss"], r["final_loss"])
    assert (_digest(teacher), _digest(student), _digest(data)) == before  # inputs untouched
    assert {e.phase for e in events} >= {"teacher", "train", "epoch"}
    assert [e.epoch for e in events if e.phase == "epoch"] == list(range(1, 31))
    # the output: checked, opset 17, same I/O names, dynamic batch, ORT agrees with the module
    m = onnx.load(tmp / "out.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["logits"]
    sess = ort.InferenceSession(str(tmp / "out.onnx"))
    x = np.random.default_rng(9).standard_normal((5, K)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        ref = res.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # and it now agrees with the teacher far more often than chance
    t = ort.InferenceSession(str(teacher)).run(None, {"x": x})[0]
    x2 = np.random.default_rng(10).standard_normal((400, K)).astype(np.float32)
    agree = (sess.run(None, {"x": x2})[0].argmax(1) == ort.InferenceSession(str(teacher)).run(None, {"x": x2})[0]
             .argmax(1)).mean()
    assert agree > 0.8, agree
    assert t.shape == got.shape


def test_resume_continues_from_the_checkpoint(setup):
    teacher, student, data, tmp = setup
    kw = dict(lr=1e-2, batch_size=64)
    a = D.distill(teacher, student, tmp / "a.onnx", data, epochs=4, **kw).report
    b1 = D.distill(teacher, student, tmp / "b.onnx", data, epochs=2, **kw).report
    assert (tmp / "b.onnx.distill" / "checkpoint.pt").is_file()
    b2 = D.distill(teacher, student, tmp / "b.onnx", data, epochs=4, **kw).report
    assert b1["resumed_from_epoch"] is None and b2["resumed_from_epoch"] == 2
    assert b2["epochs_trained_now"] == 2 and len(b2["epoch_losses"]) == 4
    assert b2["epoch_losses"][:2] == b1["epoch_losses"]
    # same as training 4 epochs straight (shuffles seeded per epoch, optimizer state restored)
    np.testing.assert_allclose(b2["epoch_losses"], a["epoch_losses"], rtol=1e-5)
    np.testing.assert_allclose(b2["final_loss"], a["final_loss"], rtol=1e-5)
    # a checkpoint of another run is refused, not silently mixed
    with pytest.raises(D.DistillError, match="another run.*temperature"):
        D.distill(teacher, student, tmp / "b.onnx", data, epochs=5, temperature=2.0, **kw)
    # resume=False starts over in the same folder
    c = D.distill(teacher, student, tmp / "b.onnx", data, epochs=1, resume=False, temperature=2.0, **kw).report
    assert c["resumed_from_epoch"] is None and len(c["epoch_losses"]) == 1


def test_labels_mse_cosine_and_a_torch_module_student(setup):
    teacher, student, data, tmp = setup
    r = D.distill(teacher, student, tmp / "l.onnx", data, epochs=2, labels="labels", alpha=0.3).report
    assert r["labels"] == "labels" and r["alpha"] == 0.3
    for loss in ("mse", "cosine"):
        r = D.distill(teacher, student, tmp / f"{loss}.onnx", data, epochs=3, loss=loss, lr=1e-2).report
        assert r["loss_kinds"] == {"logits": loss} and r["final_loss"] < r["initial_loss"]
    net = torch.nn.Sequential(torch.nn.Linear(K, 20), torch.nn.ReLU(), torch.nn.Linear(20, C))
    w0 = net[0].weight.detach().clone()
    res = D.distill(teacher, net, tmp / "m.onnx", data, epochs=5, lr=1e-2)
    assert torch.equal(net[0].weight, w0)  # the caller's module is not trained in place
    assert res.report["final_loss"] < res.report["initial_loss"]
    m = onnx.load(tmp / "m.onnx")
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["logits"]
    x = np.ones((3, K), np.float32)
    assert ort.InferenceSession(str(tmp / "m.onnx")).run(None, {"x": x})[0].shape == (3, C)


def test_bad_paths_and_inputs_are_refused(setup):
    teacher, student, data, tmp = setup
    before = (_digest(teacher), _digest(student), _digest(data))
    for out, what in ((student, "student model"), (teacher, "teacher model"), (data, "distillation data")):
        with pytest.raises(OnnxCompressError, match=f"would overwrite the {what}"):
            D.distill(teacher, student, out, data, epochs=1)
    with pytest.raises(OnnxCompressError, match="no such file"):
        D.distill(teacher, tmp / "nope.onnx", tmp / "o.onnx", data, epochs=1)
    with pytest.raises(OnnxCompressError, match="folder does not exist"):
        D.distill(teacher, student, tmp / "no" / "o.onnx", data, epochs=1)
    with pytest.raises(OnnxCompressError, match="loss 'huber'"):
        D.distill(teacher, student, tmp / "o.onnx", data, loss="huber")
    with pytest.raises(OnnxCompressError, match="no array 'y'"):
        D.distill(teacher, student, tmp / "o.onnx", data, labels="y", epochs=1)
    (tmp / "file").write_text("x")
    with pytest.raises(OnnxCompressError, match="not a folder"):
        D.distill(teacher, student, tmp / "o2.onnx", data, state=tmp / "file", epochs=1)
    assert (_digest(teacher), _digest(student), _digest(data)) == before
    assert not (tmp / "o.onnx").exists()


def test_unconvertible_op_is_named(setup):
    teacher, _, data, tmp = setup
    bad = tmp / "hardmax.onnx"
    onnx.save(_mlp(3, extra="Hardmax"), bad)
    with pytest.raises(D.DistillError, match="cannot convert op.*Hardmax"):
        D.distill(teacher, bad, tmp / "o.onnx", data, epochs=1)


def test_cli(setup):
    from onnxcompress.cli import app

    teacher, student, data, tmp = setup
    runner = CliRunner()
    res = runner.invoke(app, ["distill", str(teacher), str(student), "-o", str(tmp / "c.onnx"), "--data", str(data),
                              "--epochs", "2", "--report", str(tmp / "r.json")])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (tmp / "c.onnx").is_file() and (tmp / "r.json").is_file()
    res = runner.invoke(app, ["distill", str(teacher), str(student), "-o", str(tmp / "c.onnx"), "--data", str(data),
                              "--epochs", "3"])
    assert res.exit_code == 0 and "resumed after epoch 2" in res.output, res.output
    res = runner.invoke(app, ["distill", str(teacher), str(student), "-o", str(student), "--data", str(data)])
    assert res.exit_code == 2 and "would overwrite the student model" in res.output
    res = runner.invoke(app, ["distill", str(teacher), str(student), "-o", str(tmp / "d.onnx"), "--data", str(data),
                              "--resume", str(tmp)])
    assert res.exit_code == 2 and "no checkpoint" in res.output


def _digits_accuracy(path) -> float:
    from pathlib import Path

    d = np.load(Path(__file__).resolve().parents[1] / "models" / "digits_test.npz")
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((s.run(None, {s.get_inputs()[0].name: d["input"]})[0].argmax(1) == d["labels"]).mean() * 100)


def test_optimize_prunes_distills_and_quantizes_in_one_run(tmp_path):
    """The `distill` stage: `optimize --prune 0.5 --prune-mode channel --distill N --quantize static`
    on the digits CNN trains the pruned model from the input (the teacher) on the calibration rows,
    then quantizes it. On the 450 labelled test images (never seen by pruning, distillation or
    calibration) it beats least-squares repair alone, and the recipe written for it replays."""
    from pathlib import Path

    from onnxcompress import OptimizeOptions, optimize
    from onnxcompress.recipe import from_options, loads, to_options

    root = Path(__file__).resolve().parents[1]
    model, calib = root / "models" / "digits_cnn.onnx", root / "models" / "digits_calib.npz"
    base = dict(prune=0.5, prune_mode="channel", calibration=str(calib), latency=False)
    optimize(model, tmp_path / "ls.onnx", OptimizeOptions(**base))
    opts = OptimizeOptions(**base, distill=20, quantize="static")
    res = optimize(model, tmp_path / "kd.onnx", opts)
    rep = next(p for p in res.report["passes"] if p["name"] == "distill")
    assert rep["changed"] and rep["counts"]["loss_ratio"] > 5 and rep["counts"]["epochs"] == 20
    names = [p["name"] for p in res.report["passes"]]
    assert names.index("prune-channels") < names.index("distill") < names.index("quantize-static")
    ls, kd = _digits_accuracy(tmp_path / "ls.onnx"), _digits_accuracy(tmp_path / "kd.onnx")
    assert kd > ls + 1.0, (ls, kd)
    # the stage is a recipe stage like any other: declared, written to TOML, planned back
    r = from_options(opts)
    assert [s.name for s in r.stages].count("distill") == 1
    again = loads(r.to_toml())
    assert again.stage("distill").config.epochs == 20 and to_options(again).distill == 20


def test_type_only_op_versions_convert():
    """GreaterOrEqual-16 / LessOrEqual-16 only widened the types (ONNX Changelog); onnx2torch 1.5
    registers version 12 only, so an opset-17 transformer export (all-MiniLM-L6-v2's attention
    mask) could not be converted. They convert, and compute what ONNX Runtime computes."""
    nodes = [helper.make_node("GreaterOrEqual", ["a", "b"], ["ge"]), helper.make_node("LessOrEqual", ["a", "b"], ["le"])]
    g = helper.make_graph(nodes, "cmp", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in "ab"],
                          [helper.make_tensor_value_info(n, TensorProto.BOOL, [4]) for n in ("ge", "le")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert D.unsupported_ops(m) == []
    a, b = np.array([1, 2, 3, 4], np.float32), np.array([2, 2, 2, 2], np.float32)
    got = D.onnx_to_torch(m)(torch.from_numpy(a), torch.from_numpy(b))
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a, "b": b})
    for x, y in zip(got, ref):
        np.testing.assert_array_equal(x.numpy(), y)


def test_distill_stage_keeps_free_axes_keeps_a_better_model_and_obeys_the_flag(tmp_path):
    """The distilled model takes every shape the model took (free height and width stay free); a
    distillation that does not lower the loss leaves the model as it was; `--distill N` beside a
    recipe sets the stage's epochs."""
    from onnxcompress import OptimizeOptions, optimize
    from onnxcompress.recipe import loads, override

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    model = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(model), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}}, opset_version=17, dynamo=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((48, 3, 16, 16)).astype(np.float32))
    res = optimize(model, tmp_path / "kd.onnx", OptimizeOptions(prune=0.5, prune_mode="channel", distill=2,
                                                               calibration=str(calib), latency=False))
    rep = next(p for p in res.report["passes"] if p["name"] == "distill")
    assert rep["changed"], rep
    dims = [d.dim_param or d.dim_value for d in onnx.load(tmp_path / "kd.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims
    y = ort.InferenceSession(str(tmp_path / "kd.onnx")).run(None, {"x": np.zeros((2, 3, 32, 24), np.float32)})[0]
    assert y.shape == (2, 5)
    # nothing to win back (no pruning: the loss starts near 0) and a learning rate that wrecks the
    # student: the model stays as it was
    rec = loads(f'[[stages]]\npass = "distill"\nepochs = 1\nlr = 1.0\n[data]\ncalibration = "{calib}"\n'
                '[output]\nlatency = false\n')
    res = optimize(model, tmp_path / "same.onnx", recipe=rec)
    rep = next(p for p in res.report["passes"] if p["name"] == "distill")
    assert not rep["changed"] and "did not lower the loss" in rep["skipped"][0]["reason"]
    assert "in its first epoch at lr 1, 0.1, 0.01" in rep["skipped"][0]["reason"]  # each tenth tried
    # a rate far too high for the pruned student: the first epoch is retried at a tenth of it until
    # the loss goes down, and training goes on at that rate
    rec = loads(f'[[stages]]\npass = "prune-channels"\nratio = 0.5\nrepair = false\n[[stages]]\npass = "distill"\n'
                f'epochs = 2\nlr = 1.0\n[data]\ncalibration = "{calib}"\n[output]\nlatency = false\n')
    res = optimize(model, tmp_path / "backoff.onnx", recipe=rec)
    rep = next(p for p in res.report["passes"] if p["name"] == "distill")
    assert rep["changed"] and rep["counts"]["lr_tried_first"][0] == 1.0, rep  # measured: 1, 0.1 tried; 0.01 trains
    assert rep["counts"]["lr"] == pytest.approx(1.0 / 10 ** len(rep["counts"]["lr_tried_first"]))
    assert rep["counts"]["epochs"] == 2 and rep["counts"]["final_loss"] < rep["counts"]["initial_loss"]
    r = override(loads('[[stages]]\npass = "distill"\nepochs = 2\nlr = 0.01\n'), {"distill": 5})
    assert r.stage("distill").config.epochs == 5 and r.stage("distill").config.lr == 0.01


def test_distill_stage_order_and_names():
    """A recipe that distils after int8 or after zero-making pruning is refused (training would
    need float weights / would fill the zeros again); the distilled nodes keep their names."""
    from onnxcompress.passes.distill_stage import _restore_names
    from onnxcompress.recipe import RecipeError, loads

    for first in ("quantize-dynamic", "prune-magnitude", "prune-nm"):
        extra = "\nsparsity = 0.5" if first == "prune-magnitude" else ""
        with pytest.raises(RecipeError, match="distill"):
            loads(f'[[stages]]\npass = "{first}"{extra}\n[[stages]]\npass = "distill"\n').check()
    loads('[[stages]]\npass = "prune-channels"\nratio = 0.5\n[[stages]]\npass = "distill"\n').check()
    import onnx_ir as ir

    old = ir.from_proto(_mlp(0))
    new = ir.from_proto(_mlp(1))
    for n, o in zip(new.graph, old.graph):
        o.name = f"/{o.op_type.lower()}"
        n.name = f"/{n.op_type.lower()}/{n.op_type}"
    assert _restore_names(old, new) == 3  # MatMul and Add twice: the second of each finds its name taken
    assert [n.name for n in new.graph][:2] == ["/matmul", "/add"]


def test_ragged_samples_train_in_groups_of_one_shape(tmp_path):
    """Sentences of different lengths cannot be stacked: the rows are grouped by shape, each batch
    comes from one group, and every group trains (no padding, nothing skipped). The teacher's
    per-token output keeps each group's length."""
    r = np.random.default_rng(5)

    def encoder(seed, hidden, scale):
        g = np.random.default_rng(seed)
        inits = [numpy_helper.from_array((g.standard_normal((K, hidden)) * scale).astype(np.float32), "W1"),
                 numpy_helper.from_array((g.standard_normal((hidden, C)) * scale).astype(np.float32), "W2"),
                 numpy_helper.from_array(np.array([1], np.int64), "ax")]  # ReduceMean-18 axes input
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h1"]),
                 helper.make_node("MatMul", ["h1", "W2"], ["tokens"]),
                 helper.make_node("ReduceMean", ["tokens", "ax"], ["pooled"], keepdims=0)]
        g_ = helper.make_graph(nodes, "enc",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
                               [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", C]),
                                helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", C])],
                               inits)
        m = helper.make_model(g_, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 8
        return m

    onnx.save(encoder(0, H, 0.6), tmp_path / "t.onnx")
    onnx.save(encoder(1, 24, 0.3), tmp_path / "s.onnx")
    lengths = [int(n) for n in r.integers(2, 9, 300)]
    lengths[0] = 11  # a length seen once: a group of one row trains too (no BatchNorm here)
    np.savez(tmp_path / "d.npz", **{f"{i}__x": r.standard_normal((1, n, K)).astype(np.float32)
                                     for i, n in enumerate(lengths)})
    res = D.distill(tmp_path / "t.onnx", tmp_path / "s.onnx", tmp_path / "out.onnx", tmp_path / "d.npz",
                    epochs=15, lr=0.01, batch_size=16)
    rep = res.report
    assert rep["rows"] == 300
    assert rep["initial_loss"] > 10 * rep["final_loss"], rep
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    tokens, pooled = sess.run(None, {"x": np.zeros((3, 13, K), np.float32)})  # a length it never saw
    assert tokens.shape == (3, 13, C) and pooled.shape == (3, C)

    # a torch.nn.Module student (no ONNX axes to copy): the axes that vary between groups stay free
    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(K, 24), torch.nn.Linear(24, C)

        def forward(self, x):
            t = self.b(torch.relu(self.a(x)))
            return t, t.mean(1)

    D.distill(tmp_path / "t.onnx", Student(), tmp_path / "mod.onnx", tmp_path / "d.npz", epochs=1, batch_size=16)
    sess = ort.InferenceSession(str(tmp_path / "mod.onnx"), providers=["CPUExecutionProvider"])
    for n in (2, 11, 13):
        assert sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, n, K), np.float32)})[0].shape == (2, n, C)

    # BatchNorm cannot train on one row: with it, a length seen once is left out of training
    bn = torch.nn.Sequential(torch.nn.Linear(K, C), torch.nn.Flatten(0, 1), torch.nn.BatchNorm1d(C))

    class BN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = bn

        def forward(self, x):
            t = self.net(x).reshape(x.shape[0], x.shape[1], C)
            return t, t.mean(1)

    D.distill(tmp_path / "t.onnx", BN(), tmp_path / "bn.onnx", tmp_path / "d.npz", epochs=1, batch_size=16,
              state=tmp_path / "bn_state")


def test_converter_fixes_flatten_at_the_last_axis_and_an_empty_optional_input():
    """onnx2torch 1.5 fails on ``Flatten`` with ``axis`` = rank (all-MiniLM-L6-v2's attention-mask
    path: ``[B, S]`` with axis 2 -> ``[B*S, 1]``) and on ``Clip(x, min, "")`` (an empty optional
    input looked up as a constant). Both convert and compute what ONNX Runtime computes."""
    nodes = [helper.make_node("Flatten", ["m"], ["f2"], axis=2), helper.make_node("Flatten", ["m"], ["f0"], axis=0),
             helper.make_node("Flatten", ["m"], ["f1"], axis=-1), helper.make_node("Flatten", ["x"], ["fx"], axis=1),
             helper.make_node("Clip", ["x", "lo", ""], ["c"]), helper.make_node("Clip", ["x", "", "lo"], ["c2"])]
    g = helper.make_graph(nodes, "f", [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["b", "s"]),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("f2", "f0", "f1", "fx", "c", "c2")],
                          [numpy_helper.from_array(np.array(0.5, np.float32), "lo")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    feeds = {"m": np.arange(6, dtype=np.float32).reshape(2, 3), "x": np.linspace(-1, 2, 5).astype(np.float32)}
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = D.onnx_to_torch(m)(*(torch.from_numpy(feeds[k]) for k in ("m", "x")))
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.numpy(), b)


def test_low_rank_then_distill_on_a_transformer_fuses_attention_after_training(tmp_path):
    """``optimize --low-rank R --distill N`` on a BERT layer with sentences of different lengths:
    the fuse stage before distillation leaves attention unfused (PyTorch cannot train
    com.microsoft.Attention), distillation trains on the ragged rows, and a fuse stage after it
    fuses the attention of the trained model."""
    from test_transformer import bert_layer, feeds

    from onnxcompress import OptimizeOptions, optimize
    from onnxcompress.recipe import from_options

    plan = from_options(OptimizeOptions(low_rank=0.3, distill=3))
    assert [s.name for s in plan.stages] == ["fuse", "low-rank", "distill", "fuse"]
    assert plan.stages[0].config.attention is False and plan.stages[3].config.attention is True
    assert from_options(OptimizeOptions(low_rank=0.3)).stages[0].config.attention is True
    from onnxcompress.recipe import builtin, override

    for r in (override(builtin("fuse"), {"distill": 3}), override(builtin("int8-dynamic"), {"distill": 3, "low_rank": 0.5})):
        fuses = [s.config.attention for s in r.stages if s.name == "fuse"]
        assert fuses == [False, True], r.stages  # re-planned from a recipe: the planner's setting, not the recipe's
    src = tmp_path / "bert.onnx"
    onnx.save(bert_layer(), src)
    np.savez(tmp_path / "c.npz", **{f"{i}__{k}": v for i, f in enumerate(feeds(48, seed=3)) for k, v in f.items()})
    plan = from_options(OptimizeOptions(low_rank=0.5, distill=4, calibration=str(tmp_path / "c.npz"), latency=False))
    plan.stages[1].config.min_size = 256  # the layer's 32x32 weights are under the default
    res = optimize(src, tmp_path / "kd.onnx", recipe=plan)
    passes = res.report["passes"]
    assert next(p for p in passes if p["name"] == "low-rank")["counts"]["layers_factorized"] >= 2
    kd = next(p for p in passes if p["name"] == "distill")
    assert kd["changed"] and kd["counts"]["rows"] >= 36, kd  # the rows not held out for its own check
    assert [p["counts"].get("attention_fused") for p in passes if p["name"] == "fuse-attention"] == [1], passes
    assert "Attention" in [n.op_type for n in onnx.load(tmp_path / "kd.onnx").graph.node]


def test_state_folder_keeps_the_users_files_and_nan_outputs_are_named(setup):
    """A new teacher cache deletes only the cache files its index lists, never the user's files
    that happen to share a prefix (hostile test: input_ids.npy, teacher_logits.npy were deleted);
    a teacher whose outputs are NaN on the data is named as such, not blamed on the learning rate."""
    teacher, student, data, tmp = setup
    state = tmp / "st"
    state.mkdir()
    mine = ["input_ids.npy", "teacher_logits.npy", "order_2024.npy", "input_0.npy"]
    for name in mine:
        np.save(state / name, np.arange(3))
    D.distill(teacher, student, tmp / "a.onnx", data, epochs=1, state=state)
    x = np.random.default_rng(9).standard_normal((64, K)).astype(np.float32)
    np.savez(tmp / "other.npz", x=x)
    with pytest.raises(OnnxCompressError, match="another run"):  # a new cache for other data, then refused
        D.distill(teacher, student, tmp / "b.onnx", tmp / "other.npz", epochs=1, state=state)
    for name in mine:
        np.testing.assert_array_equal(np.load(state / name), np.arange(3))
    m = _mlp(0, extra="Log")  # log of negative scores: NaN
    onnx.save(m, tmp / "nan.onnx")
    with pytest.raises(OnnxCompressError, match="before any training.*not finite"):
        D.distill(tmp / "nan.onnx", student, tmp / "c.onnx", data, epochs=1, state=tmp / "st2")
