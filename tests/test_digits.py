"""End to end on a real trained model with real labelled data: the committed digits CNN
(sklearn load_digits, 450 held-out test images with labels)."""

import numpy as np
import onnx
import pytest

from conftest import VNNI_EXACT
from onnxcompress import OptimizeOptions, optimize


def _acc(res):
    v = res.report["validation"][0]
    return v["accuracy_reference"], v["accuracy_candidate"]


def test_static_int8_accuracy_and_size(digits, tmp_path):
    res = optimize(digits["model"], tmp_path / "q.onnx",
                   OptimizeOptions(quantize="static", calibration=digits["calib"], validation=digits["test"]))
    ref, cand = _acc(res)
    assert ref > 97.0
    assert abs(ref - cand) <= 0.5, (ref, cand)
    ratio = res.report["before"]["file_bytes"] / res.report["after"]["file_bytes"]
    assert ratio >= 3.5, ratio
    fused = [p for p in res.report["passes"] if p["name"] == "fold-batchnorm"][0]
    assert fused["counts"]["batchnorm_folded"] == 3
    assert res.report["validation"][0]["n_samples"] == 450


@pytest.mark.parametrize("target", ["avx2", "vnni"])
def test_static_int8_both_targets(digits, tmp_path, target):
    res = optimize(digits["model"], tmp_path / "q.onnx",
                   OptimizeOptions(quantize="static", target=target, calibration=digits["calib"],
                                   validation=digits["test"], calibration_method="percentile", latency=False))
    ref, cand = _acc(res)
    if target == "vnni" and not VNNI_EXACT:  # this CPU saturates a vnni model's products (conftest.CPU_TARGET)
        assert res.report["written"]
    else:
        assert abs(ref - cand) <= 0.5


def test_dynamic_int8(digits, tmp_path):
    res = optimize(digits["model"], tmp_path / "q.onnx",
                   OptimizeOptions(quantize="dynamic", calibration=digits["calib"], validation=digits["test"], latency=False))
    ref, cand = _acc(res)
    assert abs(ref - cand) <= 0.5
    skipped = [s["node"] for p in res.report["passes"] for s in p["skipped"]]
    assert len([s for s in skipped if "Conv" in s]) == 3  # convs named, left in float


def test_magnitude_pruning_50(digits, tmp_path):
    res = optimize(digits["model"], tmp_path / "p.onnx",
                   OptimizeOptions(prune=0.5, calibration=digits["calib"], validation=digits["test"], latency=False))
    ref, cand = _acc(res)
    assert abs(ref - cand) <= 1.0, (ref, cand)
    prune = [p for p in res.report["passes"] if p["name"] == "prune-magnitude"][0]
    assert abs(prune["counts"]["achieved_sparsity"] - 0.5) < 0.01
    assert res.report["after"]["compressed_bytes"] < 0.7 * res.report["before"]["compressed_bytes"]


def test_prune_then_quantize_and_fusion_only(digits, tmp_path):
    res = optimize(digits["model"], tmp_path / "pq.onnx",
                   OptimizeOptions(prune=0.5, quantize="static", calibration=digits["calib"], validation=digits["test"], latency=False))
    ref, cand = _acc(res)
    assert abs(ref - cand) <= 1.5
    res = optimize(digits["model"], tmp_path / "f.onnx", OptimizeOptions(calibration=digits["calib"], validation=digits["test"], latency=False))
    assert res.report["validation"][0]["outputs"][0]["max_rel_err"] < 1e-4
    assert res.report["after"]["n_nodes"] < res.report["before"]["n_nodes"]
    onnx.checker.check_model(onnx.load(tmp_path / "f.onnx"))


def test_gate_failure_writes_nothing(digits, tmp_path):
    from onnxcompress.errors import GateFailedError

    out = tmp_path / "q.onnx"
    with pytest.raises(GateFailedError, match="min-cosine"):
        optimize(digits["model"], out, OptimizeOptions(quantize="static", calibration=digits["calib"],
                                                       validation=digits["test"], min_cosine=0.99999999, latency=False,
                                                       fallback=False))
    assert not out.exists()


def test_fallback_keeps_worst_nodes_in_float_until_the_gate_holds(digits, tmp_path):
    opts = OptimizeOptions(quantize="static", calibration=digits["calib"], validation=digits["test"], latency=False)
    plain = optimize(digits["model"], tmp_path / "a.onnx", opts)
    cos = plain.report["validation"][0]["outputs"][0]["cosine"]
    target = 1 - (1 - cos) / 4  # a gate the all-int8 model misses
    opts.min_cosine = target
    res = optimize(digits["model"], tmp_path / "b.onnx", opts)
    fb = res.report["fallback"]
    assert fb["passed"] and fb["kept_in_float"], fb
    assert res.report["validation"][0]["outputs"][0]["cosine"] >= target
    sqnr = next(p for p in plain.report["passes"] if p["name"] == "quantize-static")["counts"]["node_sqnr_db"]
    assert fb["kept_in_float"][0] == min(sqnr, key=sqnr.get)  # the least int8-friendly node goes first


def test_fallback_rounds_reuse_the_per_node_checks_and_write_the_same_model(digits, tmp_path, monkeypatch):
    """The rounds re-quantize the same pre-int8 model on the same recordings: each node's one-node
    SQNR (and bias shift) is computed once per set of activation ranges (the first quantization's,
    and the min/max round's), and the written model is the one the rounds would write with every
    check recomputed."""
    from onnxcompress.passes.quantize import static as static_mod

    opts = OptimizeOptions(quantize="static", calibration=digits["calib"], validation=digits["test"], latency=False)
    plain = optimize(digits["model"], tmp_path / "a.onnx", opts)
    opts.min_cosine = 1 - (1 - plain.report["validation"][0]["outputs"][0]["cosine"]) / 4
    calls = []
    orig = static_mod.StaticQuantizePass._node_sqnr
    monkeypatch.setattr(static_mod.StaticQuantizePass, "_node_sqnr",
                        lambda self, node, *a: calls.append(node.name) or orig(self, node, *a))
    res = optimize(digits["model"], tmp_path / "b.onnx", opts)
    assert len(res.report["fallback"]["rounds"]) >= 1
    # once per node with auto's ranges, and once more in the min/max round (other ranges, another
    # figure); the node rounds reuse the first: never a third time
    from collections import Counter

    assert max(Counter(calls).values()) <= 2, calls
    monkeypatch.setattr(static_mod.StaticQuantizePass, "_node_sqnr_cached",
                        lambda self, node, *a: orig(self, node, *a))  # no memo: every round recomputes
    again = optimize(digits["model"], tmp_path / "c.onnx", opts)
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    assert again.report["fallback"]["kept_in_float"] == res.report["fallback"]["kept_in_float"]
