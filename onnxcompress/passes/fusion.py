"""Fusion passes: BatchNormalization folding, scalar affine folding into Conv, HardSwish, and
MatMul+Add -> Gemm.

BatchNorm folding (Conv, ConvTranspose with groups, Gemm) uses onnxscript's rules
(``_fuse_batchnorm``): with ``s = gamma / sqrt(var + eps)`` (the node's own ``epsilon``),
``W' = W * s`` along the output-channel axis and ``B' = (B - mean) * s + beta``. Before
matching, weights and biases shared with other nodes are cloned so the fold cannot corrupt
another consumer (shared/cases case01).

MatMul+Add -> Gemm (ONNX ``Gemm`` spec: ``Y = alpha*A'*B' + beta*C``, A and B rank 2, C
unidirectionally broadcastable to (M, N)) is applied only where it is legal: float types,
rank-2 operands and a bias that cannot broadcast the result to a larger shape (case06).

Scalar affine folding (onnxscript's ``_fuse_conv_affine``): ``Conv(x) * a + b -> Conv'`` with
``W' = a W``, ``B' = a B + b`` (exact), and ``Conv(x * a + b)`` for convolutions without padding
(``W' = a W``, ``B' = B + b * sum(W)``; with zero padding the border would differ, so not
there). PaddleOCR's PP-LCNetV3 "learnable affine blocks" are such scalar ``Mul`` + ``Add``
pairs after every convolution (PP-OCRv4 det: 86 Mul, 89 Add).

Bias folding: ``Add(Conv(x, W[, B]), c)`` with a constant ``c`` that adds one value per output
channel (shape ``[1, C, 1, 1]``, ``[C, 1, 1]`` or a single value; ONNX broadcasting) becomes
``Conv(x, W, B + c)`` (exact); the same for ``ConvTranspose``. Paddle exports ConvTranspose and
its bias as two nodes (PP-OCRv4 det's head: ``ConvTranspose -> Add -> BatchNormalization``), which
also kept the BatchNormalization from folding.

HardSwish (``x * Clip(x + 3, 0, 6) / 6``, MobileNetV3 / PP-LCNet): four elementwise ops become
``HardSwish`` (opset >= 14, onnxscript's ``fuse_hardswish_rules``) or ``Mul(x, HardSigmoid(x,
alpha=1/6, beta=0.5))`` below opset 14 (ONNX ``HardSigmoid``: ``max(0, min(1, alpha x + beta))``);
ONNX Runtime runs HardSwish as HardSigmoid + Mul anyway: 1.7 ms instead of 3.0 ms on a
[1, 64, 240, 240] tensor here.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet, pattern
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules.common._fuse_batchnorm import rules as bn_rules
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import MatMulAddToGemm
from onnxscript.rewriter.rules.common import (
    fuse_hardswish_rules,
    fuse_pad_into_conv_rule,
    normalize_pad_format_conv_rule,
)
from onnxscript.rewriter.rules.common._fuse_conv_affine import AffineConvFusion, ConvAffineFusion
from onnxscript.rewriter.rules.common._fuse_hardswish import HardSwishFusion

import onnx_ir.passes.common as common

from ..irutil import all_value_names, clone_initializer, unique_name
from .base import CompressionPass

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def infer_shapes(model: ir.Model) -> None:
    """Annotate value shapes (ONNX shape inference via onnx-ir); best effort."""
    try:
        common.ShapeInferencePass()(model)
    except Exception:  # custom ops, > 2 GB: rules then refuse for lack of shapes
        pass


class _ConvBiasAdd(pattern.RewriteRuleClassBase):
    """``Add(Conv(x, W[, B]), c) -> Conv(x, W, B + c)`` for a per-channel or single-value constant."""

    def __init__(self, op_type: str):
        super().__init__(f"{op_type}BiasAdd", remove_nodes=True)
        self.op_type = op_type

    def pattern(self, op, x, w, c):
        conv = getattr(op, self.op_type)(x, w, _allow_other_inputs=True, _allow_other_attributes=True,
                                         _outputs=["conv_out"])
        return op.Add(conv, c)

    def check(self, context, x, w, c, conv_out):
        result = MatchResult()
        node = conv_out.producer()
        if node.domain not in ("", "ai.onnx"):
            return result.fail("not an ONNX Conv")
        if c.const_value is None or w.const_value is None or len(w.const_value.shape) < 3:
            return result.fail("needs a constant addend and a constant weight")
        wshape = w.const_value.shape
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is None:
            return result.fail("the Conv's bias is not constant")
        if conv_out.is_graph_output() or len(conv_out.uses()) != 1:
            return result.fail("the Conv output has other consumers")
        if c.const_value.dtype != w.const_value.dtype:
            return result.fail("the addend's type differs from the weight's")
        if c.const_value.dtype not in _FLOAT_TYPES:
            return result.fail("not a float convolution")
        channels = self._channels(node, w)
        rank = len(wshape)  # the output's rank too: [N, C, spatial...]
        cshape = list(c.const_value.shape)
        if len(cshape) > rank:
            return result.fail("the addend's rank exceeds the output's (it would broadcast the output)")
        full = [1] * (rank - len(cshape)) + cshape
        if not (int(np.prod(cshape, dtype=np.int64)) == 1
                or (full[0] == 1 and full[1] == channels and all(d == 1 for d in full[2:]))):
            return result.fail(f"the addend {cshape} is not one value per output channel")
        return result

    def _channels(self, node, w) -> int:
        """Output channels: ``W`` is ``[M, C/group, k...]`` (Conv) or ``[C, M/group, k...]`` (ConvTranspose)."""
        shape = w.const_value.shape
        return shape[0] if self.op_type == "Conv" else shape[1] * node.attributes.get_int("group", 1)

    def rewrite(self, op, x, w, c, conv_out):
        node = conv_out.producer()
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        channels = self._channels(node, w)
        add = np.broadcast_to(c.const_value.numpy().reshape(-1), (channels,))
        old = bias.const_value.numpy() if bias is not None else np.zeros(channels, add.dtype)
        new = (old.astype(np.float64) + add).astype(old.dtype)
        name = _new_name(self, bias if bias is not None else w, "bias")
        return getattr(op, self.op_type)(x, w, op.initializer(ir.tensor(new), name), **node.attributes)


class ConvBiasPass(CompressionPass):
    """Fold a per-channel constant ``Add`` after Conv / ConvTranspose into its bias (see the
    module docstring). Exact up to float rounding of the bias."""

    name = "fold-conv-bias"
    needs = (frozenset({"Conv", "ConvTranspose"}), frozenset({"Add"}))
    #: exact in real arithmetic; float16 rounding of the summed bias moves outputs by ~5e-4
    rtol = 1e-3

    def apply(self, model: ir.Model) -> bool:
        taken = all_value_names(model)
        _ConvBiasAdd.taken = taken  # new initializer names stay unique in the model
        rules = [_ConvBiasAdd.rule(op_type) for op_type in ("Conv", "ConvTranspose")]
        count = RewriteRuleSet(rules, commute=True).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        self.report.counts["bias_folded"] = int(count)
        return bool(count)


class FoldBatchNormPass(CompressionPass):
    """Fold BatchNormalization into the preceding Conv / ConvTranspose / Gemm."""

    name = "fold-batchnorm"
    needs = (frozenset({"BatchNormalization"}),)
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
    needs = (frozenset({"MatMul"}), frozenset({"Add"}))

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
    needs = (frozenset({"Conv"}),)  # also normalizes a Conv's auto_pad without a Pad

    def apply(self, model: ir.Model) -> bool:
        infer_shapes(model)
        count = RewriteRuleSet([normalize_pad_format_conv_rule, fuse_pad_into_conv_rule]).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        self.report.counts["pads_fused"] = int(count)
        return bool(count)


def _new_name(rule, v, what: str) -> str:
    """A short name for a rewritten initializer, unique in the model: the original's name with
    ``_<what>`` (a second fold of the same tensor does not grow it again), ``_1``, ``_2``... if taken."""
    base = v.name or "w"
    suffix = f"_{what}"
    base = base.split(suffix)[0] + suffix
    return unique_name(base, rule.taken)


class _AffineFold:
    """What both affine rules add to onnxscript's: a rank guard (a singleton ``[1,1,1,1,1]`` scale
    after a 2-D Conv would broadcast its output to rank 5) and short names unique in the model
    (onnxscript named the new initializers ``<weight>_scaled``: a weight shared by two folded
    convolutions lost one of them). Subclasses give :meth:`folded` (new weight, new bias)."""

    def check(self, context, x, w, b, scale, offset, conv_out):
        result = super().check(context, x, w, b, scale, offset, conv_out)
        r = w.const_value.numpy().ndim if w.const_value is not None else 0
        if result and not all(v.shape is not None and len(v.shape) <= r for v in (scale, offset)):
            return result.fail("scale/offset rank exceeds the Conv's")
        return result

    def rewrite(self, op, x, w, b, scale, offset, conv_out):
        a, c = scale.const_value.numpy().reshape(-1)[0], offset.const_value.numpy().reshape(-1)[0]  # singletons
        wv, bv = w.const_value.numpy(), b.const_value.numpy()
        new_w, new_b = self.folded(wv, bv, a, c)
        return op.Conv(x, op.initializer(ir.tensor(new_w.astype(wv.dtype)), _new_name(self, w, "affine")),
                       op.initializer(ir.tensor(new_b.astype(bv.dtype)), _new_name(self, b, "affine")),
                       **conv_out.producer().attributes)


class _ConvAffine(_AffineFold, ConvAffineFusion):
    """``Conv(x, W, B) * a + b -> Conv(x, a W, a B + b)``."""

    @staticmethod
    def folded(w, bias, a, c):
        return w * a, bias * a + c


class _AffineConv(_AffineFold, AffineConvFusion):
    """``Conv(x * a + b, W, B) -> Conv(x, a W, B + b sum(W))`` (unpadded convolutions only)."""

    @staticmethod
    def folded(w, bias, a, c):
        return w * a, bias + np.sum(w * c, axis=(1, 2, 3))


class ConvAffinePass(CompressionPass):
    """Fold scalar ``Mul`` + ``Add`` after a Conv (always) or before an unpadded Conv into its
    weight and bias (see module docstring). Output equal within ``rtol``."""

    name = "fold-conv-affine"
    needs = (frozenset({"Conv"}), frozenset({"Mul", "Add"}))
    #: exact in real arithmetic; float16 rounding of the folded weights alone moves outputs by
    #: ~5e-4 relative (as for BatchNorm folding)
    rtol = 1e-3

    def apply(self, model: ir.Model) -> bool:
        taken = all_value_names(model)
        rules = []
        for cls in (_ConvAffine, _AffineConv):
            cls.taken = taken  # the rules are built from the class (``rule()``): names shared through it
            rules.append(cls.rule())
        count = RewriteRuleSet(rules, commute=True).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        self.report.counts["affine_folded"] = int(count)
        return bool(count)


class _HardSwishAsHardSigmoidMul(HardSwishFusion):
    """``x * Clip(x + 3, 0, 6) / 6 -> Mul(x, HardSigmoid(x, 1/6, 0.5))`` (HardSwish needs opset 14)."""

    def rewrite(self, op, x, clip_min, clip_max, bias, divisor):
        return op.Mul(x, op.HardSigmoid(x, alpha=1.0 / 6.0, beta=0.5))


class HardSwishPass(CompressionPass):
    """Fuse decomposed HardSwish / HardSigmoid (see module docstring)."""

    name = "fuse-hardswish"
    needs = (frozenset({"Clip", "HardSigmoid"}),)

    def apply(self, model: ir.Model) -> bool:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset >= 14:
            rules = fuse_hardswish_rules()
        else:
            rules = RewriteRuleSet([_HardSwishAsHardSigmoidMul().rule()], commute=True)
        count = rules.apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        self.report.counts["hardswish_fused"] = int(count)
        return bool(count)
