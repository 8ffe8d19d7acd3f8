"""Unstructured magnitude pruning of weights (Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks").

The smallest-magnitude entries of Conv/ConvTranspose/Gemm/MatMul weights are set to zero,
per tensor (``scope="layer"``) or with one global threshold over all eligible tensors
(``scope="global"``). Zeros shrink the *compressed* file; ONNX Runtime's dense kernels run
no faster (the report says so). Structured channel pruning is a separate technique.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import CompressionPass

PRUNABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class MagnitudePrunePass(CompressionPass):
    """Magnitude pruning to a target sparsity.

    Context options: ``sparsity`` (0..1), ``scope`` (``layer``|``global``), ``exclude_nodes``,
    ``exclude_op_types``, ``min_size`` (tensors with fewer elements stay dense; default 64),
    ``skip_first_last`` (keep the first and last prunable layer dense; default False).
    """

    name = "prune-magnitude"
    checked = False

    def apply(self, model: ir.Model) -> bool:
        o = self.context.options
        sparsity = float(o.get("sparsity", 0.0))
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        scope = o.get("scope", "layer")
        min_size = int(o.get("min_size", 64))
        excl_nodes, excl_ops = set(o.get("exclude_nodes", ())), set(o.get("exclude_op_types", ()))
        nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type in PRUNABLE and n.domain in ("", "ai.onnx")]
        if o.get("skip_first_last") and len(nodes) >= 2:
            for n in (nodes[0], nodes[-1]):
                self.report.skip(n.name, "first/last layer kept dense (skip_first_last)")
            nodes = nodes[1:-1]
        targets: dict[str, ir.Value] = {}
        for n in nodes:
            if n.name in excl_nodes or n.op_type in excl_ops:
                self.report.skip(n.name, "excluded by the user")
                continue
            w = n.inputs[1] if len(n.inputs) > 1 else None
            if w is None or w.const_value is None or w.is_graph_input():
                continue
            arr = w.const_value.numpy()
            if arr.dtype.kind != "f":
                continue
            if arr.size < min_size:
                self.report.skip(n.name, f"weight has {arr.size} elements (< min_size {min_size}); kept dense")
                continue
            targets[w.name] = w
        if sparsity == 0.0 or not targets:
            self.report.counts["tensors_pruned"] = 0
            return False
        thresholds = {}
        if scope == "global":
            mags = np.concatenate([np.abs(v.const_value.numpy()).ravel() for v in targets.values()])
            k = int(sparsity * mags.size)
            t = np.partition(mags, k - 1)[k - 1] if k > 0 else -1.0
            thresholds = {name: t for name in targets}
        per_tensor = {}
        total = zeros = 0
        for name, v in targets.items():
            arr = v.const_value.numpy().copy()
            if scope == "global":
                mask = np.abs(arr) <= thresholds[name]
            else:
                k = int(sparsity * arr.size)
                mask = np.zeros(arr.shape, bool)
                if k > 0:
                    idx = np.argpartition(np.abs(arr).ravel(), k - 1)[:k]
                    mask.ravel()[idx] = True
            arr[mask] = 0
            v.const_value = ir.tensor(arr, name=name)
            per_tensor[name] = round(float(np.mean(arr == 0)), 4)
            total += arr.size
            zeros += int(np.sum(arr == 0))
        self.report.counts.update(
            tensors_pruned=len(targets), target_sparsity=sparsity, scope=scope,
            achieved_sparsity=round(zeros / max(total, 1), 4), sparsity_per_tensor=per_tensor,
            note="unstructured zeros shrink the compressed file, not ONNX Runtime latency (dense kernels)",
        )
        return True
