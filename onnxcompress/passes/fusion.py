"""Fusion passes: BatchNormalization folding and MatMul+Add -> Gemm.

BatchNorm folding (Conv, ConvTranspose with groups, Gemm) uses onnxscript's rules
(``_fuse_batchnorm``): with ``s = gamma / sqrt(var + eps)`` (the node's own ``epsilon``),
``W' = W * s`` along the output-channel axis and ``B' = (B - mean) * s + beta``. Before
matching, weights and biases shared with other nodes are cloned so the fold cannot corrupt
another consumer (shared/cases case01).

MatMul+Add -> Gemm (ONNX ``Gemm`` spec: ``Y = alpha*A'*B' + beta*C``, A and B rank 2, C
unidirectionally broadcastable to (M, N)) is applied only where it is legal: float types,
rank-2 operands and a bias that cannot broadcast the result to a larger shape (case06).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules.common._fuse_batchnorm import rules as bn_rules
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import MatMulAddToGemm
from onnxscript.rewriter.rules.common import fuse_pad_into_conv_rule, normalize_pad_format_conv_rule

import onnx_ir.passes.common as common

from ..irutil import all_value_names, clone_initializer
from .base import CompressionPass

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def infer_shapes(model: ir.Model) -> None:
    """Annotate value shapes (ONNX shape inference via onnx-ir); best effort."""
    try:
        common.ShapeInferencePass()(model)
    except Exception:  # custom ops, > 2 GB: rules then refuse for lack of shapes
        pass


class FoldBatchNormPass(CompressionPass):
    """Fold BatchNormalization into the preceding Conv / ConvTranspose / Gemm."""

    name = "fold-batchnorm"
    #: exact in real arithmetic; float32 rounding of the folded weights moves deep nets' outputs
    #: by more than the default 1e-4 on some inputs (PP-OCRv4 rec: 2.3e-4 relative on one
    #: rendered line), while a wrong fold moves them by O(1)
    rtol = 1e-3

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        taken = all_value_names(model)
        cloned = 0
        for node in list(graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            x = node.inputs[0]
            prod = x.producer() if x is not None else None
            if prod is None or prod.op_type not in ("Conv", "ConvTranspose", "Gemm"):
                continue
            if len(x.uses()) != 1 or x.is_graph_output():
                self.report.skip(node.name or prod.name, f"output of {prod.op_type} '{prod.name}' has other consumers")
                continue
            for idx in (1, 2):
                if idx >= len(prod.inputs) or prod.inputs[idx] is None:
                    continue
                w = prod.inputs[idx]
                if w.const_value is None or not w.is_initializer() or w.is_graph_input():
                    continue
                if len({u.node for u in w.uses()}) > 1:
                    prod.replace_input_with(idx, clone_initializer(graph, w, taken))
                    cloned += 1
        count = RewriteRuleSet(list(bn_rules.rules)).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        self.report.counts["batchnorm_folded"] = int(count)
        self.report.counts["shared_weights_cloned"] = cloned
        for node in graph:
            if node.op_type == "BatchNormalization":
                self.report.skip(node.name, "no foldable Conv/ConvTranspose/Gemm producer with constant weights")
        return bool(count or cloned)


class _StrictMatMulAddToGemm(MatMulAddToGemm):
    """``Add(MatMul(a, b), c) -> Gemm(a, b, c)`` only where Gemm computes the same thing."""

    def check(self, context, input_a, input_b, input_c=None, **_):
        result = MatchResult()
        for v, what in ((input_a, "A"), (input_b, "B")):
            if v.shape is None or len(v.shape) != 2:
                return result.fail(f"MatMul input {what} is not known to be rank 2")
            if v.dtype not in _FLOAT_TYPES:
                return result.fail(f"MatMul input {what} is not a float type")
        if input_c is None or input_c.const_value is None:
            return result.fail("the added tensor is not a constant bias")
        if input_c.shape is None:
            return result.fail("bias shape unknown")
        c_shape = list(input_c.shape)
        if len(c_shape) > 2:
            return result.fail(f"bias of rank {len(c_shape)} would broadcast the output beyond rank 2")
        n = input_b.shape[1]
        m = input_a.shape[0]
        want = [m, n][-len(c_shape):] if c_shape else []
        for have, full in zip(c_shape, want):
            if have == 1:
                continue
            if not (isinstance(have, int) and isinstance(full, int) and have == full):
                if not (str(have) == str(full)):
                    return result.fail(f"bias shape {c_shape} not provably broadcastable to [M, N] = [{m}, {n}]")
        return result


class MatMulAddToGemmPass(CompressionPass):
    """Fuse MatMul + Add into Gemm where legal (see module docstring)."""

    name = "matmul-add-to-gemm"

    def apply(self, model: ir.Model) -> bool:
        infer_shapes(model)
        count = RewriteRuleSet([_StrictMatMulAddToGemm().rule()]).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        self.report.counts["gemm_fused"] = int(count)
        return bool(count)


class FusePadIntoConvPass(CompressionPass):
    """Fold a constant zero ``Pad`` of the spatial axes into the following Conv's ``pads``
    (onnxscript's ``fuse_pad_into_conv`` rule; exporters emit such Pads for TF-style "same"
    padding). A Pad between Conv layers also blocks int8 kernel fusion in ONNX Runtime."""

    name = "fuse-pad-into-conv"

    def apply(self, model: ir.Model) -> bool:
        infer_shapes(model)
        count = RewriteRuleSet([normalize_pad_format_conv_rule, fuse_pad_into_conv_rule]).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        self.report.counts["pads_fused"] = int(count)
        return bool(count)
