"""Unstructured magnitude pruning of weights (Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks").

The smallest-magnitude entries of Conv/ConvTranspose/Gemm/MatMul weights are set to zero,
per tensor (``scope="layer"``) or with one global threshold over all eligible tensors
(``scope="global"``). Zeros shrink the *compressed* file; ONNX Runtime's dense kernels run
no faster (the report says so). Structured channel pruning is a separate technique.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..params import Param
from .base import CompressionPass

PRUNABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")

SPARSITY = Param("sparsity", 0.5, "Share of weights set to zero (unstructured magnitude pruning).", kind="float",
                 low=0.0, high=1.0, high_open=True, search=(0.1, 0.9))
SCOPE = Param("scope", "global", "global (one magnitude threshold over all weights) or layer (each tensor to the "
              "target).", kind="str", choices=("global", "layer"), flag="--prune-scope", search=("global", "layer"))
MIN_SIZE = Param("min_size", 64, "Weights with fewer elements stay dense.", kind="int", low=1)
SKIP_FIRST_LAST = Param("skip_first_last", False, "Keep the first and last layer dense.", kind="bool",
                        flag="--prune-skip-first-last", search=(False, True))


@dataclass
class MagnitudePruneConfig:
    sparsity: float = SPARSITY.field()
    scope: str = SCOPE.field()
    min_size: int = MIN_SIZE.field()
    skip_first_last: bool = SKIP_FIRST_LAST.field()


class MagnitudePrunePass(CompressionPass):
    """Magnitude pruning to a target sparsity.

    Parameters: :class:`MagnitudePruneConfig`; nodes in ``context.scope`` are left dense.
    """

    name = "prune-magnitude"
    checked = False
    Config = MagnitudePruneConfig

    def apply(self, model: ir.Model) -> bool:
        c = self.config
        sparsity, scope, min_size = c.sparsity, c.scope, c.min_size
        nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type in PRUNABLE and n.domain in ("", "ai.onnx")]
        if c.skip_first_last and len(nodes) >= 2:
            for n in (nodes[0], nodes[-1]):
                self.report.skip(n.name, "first/last layer kept dense (skip_first_last)")
            nodes = nodes[1:-1]
        targets: dict[str, ir.Value] = {}
        for n in nodes:
            if self.context.scope.excludes(n):
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
        total = zeros = zeroed = 0
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
            newly = int(np.count_nonzero(arr[mask]))  # weights this pass really zeroes (not already 0)
            arr[mask] = 0  # arr is a copy: the model keeps its tensor unless a weight changed
            per_tensor[name] = round(float(np.mean(arr == 0)), 4)
            if newly:
                v.const_value = ir.tensor(arr, name=name)
                zeroed += newly
            total += arr.size
            zeros += int(np.sum(arr == 0))
        self.report.counts.update(
            tensors_pruned=len(targets), target_sparsity=sparsity, scope=scope,
            achieved_sparsity=round(zeros / max(total, 1), 4), sparsity_per_tensor=per_tensor,
            weights_zeroed=zeroed,
            note="unstructured zeros shrink the compressed file, not ONNX Runtime latency (dense kernels)",
        )
        # changed only where a weight became zero: a ratio too small for one weight, or weights that
        # are already that sparse, change no answer (the default floor then still judges int8)
        return zeroed > 0
