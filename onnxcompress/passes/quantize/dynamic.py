"""Dynamic int8 quantization of MatMul / Gemm weights.

Weights are stored int8 (per output column, symmetric) and activations are quantized at
run time to uint8 by ``DynamicQuantizeLinear``; the product runs in ``MatMulInteger``
(ONNX spec) and is rescaled by ``x_scale * w_scale``:

    x -> DynamicQuantizeLinear -> (xq, xs, xzp)
    MatMulInteger(xq, Wq, xzp, Wzp) -> Cast(float) -> Mul(xs * Ws) [-> Add(bias)]

ONNX Runtime's optimizer fuses this into its ``DynamicQuantizeMatMul`` kernel. Gemm is
handled with ``transB`` applied to the stored weight and ``alpha``/``beta`` folded into
the scale and the bias. Nodes inside ``If``/``Loop`` bodies are quantized too (their
weights are outer-scope initializers). Conv is not run in int8: ``ConvInteger`` is several
times slower than fp32 on ONNX Runtime's x86 CPU provider; its weights are stored int8 with
float compute by :mod:`.weight_only` instead (as are LSTM/GRU/RNN weights). Nodes in
the main graph pass a one-node SQNR check on recorded activations or stay in float.

A fused ``com.microsoft.Attention`` (see :mod:`onnxcompress.passes.transformer`) becomes
``com.microsoft.QAttention`` (ORT contrib op: uint8 input from ``DynamicQuantizeLinear``,
int8 QKV weight [D, 3*hidden] with one scale per column, float32 bias, int32 mask); its
SQNR check is that of the QKV projection ``x @ W``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..base import CompressionPass
from ...irutil import add_initializer, all_value_names, replace_node, subgraphs, unique_name
from ...progress import counted
from . import params
from .config import QuantizeConfig
from .policy import resolve_policy
from .calibrate import observe
from .sensitivity import sqnr_db
from .static import FLOAT, _attr, _is_const, integer_matmul


def fake_dynamic_quant(x: np.ndarray) -> np.ndarray:
    """Simulate ``DynamicQuantizeLinear`` + dequantize (uint8, range including 0)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale, zp = params.activation_params(lo, hi)
    return params.fake_quant_activation(x, float(scale), int(zp))


class DynamicQuantizePass(CompressionPass):
    """Dynamic int8 quantization (see module docstring).

    Parameters: :class:`.config.QuantizeConfig`; nodes in ``context.scope`` and
    ``context.keep_float`` stay float.
    """

    name = "quantize-dynamic"
    checked = False
    Config = QuantizeConfig
    #: only ``com.microsoft.Attention`` nodes (see :class:`AttentionQuantizePass`)
    only_attention = False

    def apply(self, model: ir.Model) -> bool:
        c = self.config
        policy = resolve_policy(c.target)
        per_channel = c.per_channel
        min_sqnr = c.min_sqnr_db
        excl_nodes, excl_ops = self.context.scope.nodes, self.context.scope.op_types
        fallback_nodes = set(self.context.keep_float)
        taken = all_value_names(model)
        self.report.counts["target"] = policy.target

        chosen = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain == "com.microsoft" and node.op_type == "Attention":
                reason = _attention_unsupported(node)
                if node.name in excl_nodes or node.op_type in excl_ops:
                    self.report.skip(node.name, "excluded by the user")
                elif node.name in fallback_nodes:
                    self.report.skip(node.name, "kept in float by the sensitive-node fallback (a fidelity gate "
                                                "failed with it in int8)")
                elif reason:
                    self.report.skip(node.name, f"Attention not quantized: {reason}")
                else:
                    chosen.append(node)
                continue
            if self.only_attention or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in ("Conv", "ConvTranspose"):
                self.report.skip(node.name, f"{node.op_type} computes in float in dynamic mode (ConvInteger is slower "
                                            "than fp32 on ONNX Runtime's CPU provider); its weight is stored int8 by "
                                            "the weight-only pass (use --quantize static for int8 compute)",
                                  grouped=True)
                continue
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            if node.name in excl_nodes or node.op_type in excl_ops:
                self.report.skip(node.name, "excluded by the user")
                continue
            if node.name in fallback_nodes:
                self.report.skip(node.name, "kept in float by the sensitive-node fallback (a fidelity gate "
                                            "failed with it in int8)")
                continue
            w = node.inputs[1]
            if not _is_const(w):
                continue  # activation x activation: nothing to store in int8
            if node.inputs[0] is None or node.inputs[0].dtype not in (None, FLOAT) or w.dtype != FLOAT:
                self.report.skip(node.name, "not a float32 node")
                continue
            if w.const_value.numpy().ndim != 2:
                self.report.skip(node.name, f"weight of rank {w.const_value.numpy().ndim}; only rank-2 weights are quantized")
                continue
            if node.op_type == "Gemm" and _attr(node, "transA", 0):
                self.report.skip(node.name, "Gemm with transA=1 is not quantized")
                continue
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and not _is_const(node.inputs[2]):
                self.report.skip(node.name, "Gemm C is not a constant initializer")
                continue
            chosen.append(node)

        recorded = self._record(model, [n for n in chosen if n.graph is model.graph]) if min_sqnr is not None else []
        quantized, sqnrs, dql = [], {}, {}
        for node in counted(chosen, "quantizing weights", "nodes"):
            w, alpha = self._weight_kn(node)
            qmax = policy.weight_qmax(node.op_type, False)
            axis = 1 if per_channel else None
            pairs = policy.weight_pairs("MatMul", False, 1)  # w: [K, N]
            scale = params.weight_params(w, axis, qmax, pairs)
            q = params.quantize_weight(w, scale, axis, qmax, pairs)
            if node.graph is model.graph and recorded and min_sqnr is not None:
                s = self._sqnr(node, w, q, scale, axis, recorded)
                sqnrs[node.name] = round(s, 1)
                if s < min_sqnr:
                    self.report.skip(node.name, f"{node.op_type} output SQNR {s:.1f} dB with dynamic int8 is below "
                                                f"{min_sqnr:g} dB (activation outliers?); kept in float")
                    continue
            elif node.graph is not model.graph:
                self.report.counts.setdefault("quantized_in_subgraphs_unchecked", []).append(node.name)
            self._rewrite(model, node, q, scale * np.float32(alpha), axis, taken, dql)
            quantized.append(node.name)
        self.report.counts.update(nodes_quantized=len(quantized), node_sqnr_db=sqnrs,
                                  weight_bits=8, saturation_free_weights=policy.pair_safe)
        if quantized:
            for g in [model.graph, *subgraphs(model.graph)]:
                g.sort()
        return bool(quantized)

    @staticmethod
    def _weight_kn(node: ir.Node) -> tuple[np.ndarray, float]:
        """The weight as [K, N] float32 and Gemm's alpha (1 for MatMul)."""
        w = node.inputs[1].const_value.numpy().astype(np.float32, copy=False)
        if node.op_type == "Attention":  # [D, 3 * hidden], already [K, N]
            return w, 1.0
        if node.op_type == "Gemm":
            if _attr(node, "transB", 0):
                w = w.T.copy()
            return w, float(_attr(node, "alpha", 1.0))
        return w, 1.0

    def _record(self, model, nodes):
        if not nodes or not self.context.calibration:
            return []
        names = sorted({n.inputs[0].name for n in nodes})
        return observe(model, names, self.context.calibration, keep=2)[1]

    @staticmethod
    def _sqnr(node, w, q, scale, axis, recorded) -> float:
        """Worst output SQNR (dB) over the recorded samples of ``x @ w`` against
        ``DQ(Q(x)) @ (q * scale)``, computed as ``(DQ(Q(x)) @ q) * scale`` (per-column scales
        factor out of the product: no dequantized copy of the weight)."""
        # per-column scales broadcast over the last axis ([N]: a rank-1 input gives a rank-1 product)
        sb = np.float32(scale) if axis is None else scale.reshape(-1).astype(np.float32)
        qf = q.astype(np.float32)
        worst = float("inf")
        for rec in recorded:
            x = rec[node.inputs[0].name].astype(np.float32, copy=False)
            got = np.matmul(fake_dynamic_quant(x), qf)
            got *= sb
            worst = min(worst, sqnr_db(np.matmul(x, w), got))
        return worst

    def _rewrite(self, model, node, q, scale, axis, taken, dql) -> None:
        graph = node.graph
        main = model.graph
        x = node.inputs[0]
        name = node.name or node.outputs[0].name
        # one DynamicQuantizeLinear per activation tensor and graph
        key = (id(graph), x.name)
        if key not in dql:
            xq = ir.Value(name=unique_name(f"{x.name}_quantized", taken))
            xs = ir.Value(name=unique_name(f"{x.name}_scale", taken))
            xz = ir.Value(name=unique_name(f"{x.name}_zero_point", taken))
            graph.append(ir.Node("", "DynamicQuantizeLinear", [x], outputs=[xq, xs, xz],
                                 name=unique_name(f"{x.name}_DynamicQuantizeLinear", taken)))
            dql[key] = (xq, xs, xz)
        xq, xs, xz = dql[key]
        if node.op_type == "Attention":
            _rewrite_attention(model, node, xq, xs, xz, q, scale, axis, taken)
            return
        w_name = node.inputs[1].name
        wq_v = add_initializer(main, q, f"{w_name}_quantized", taken)
        # symmetric weights: one scalar zero point serves every column (MatMulInteger allows it)
        wz_v = add_initializer(main, np.zeros((), np.int8), f"{w_name}_zero_point", taken)
        ws_v = add_initializer(main, scale.astype(np.float32) if axis is not None else np.array(scale.reshape(()), np.float32),
                               f"{w_name}_scale", taken)
        s_all = ir.Value(name=unique_name(f"{name}_output_scale", taken))
        scale_mul = ir.Node("", "Mul", [xs, ws_v], outputs=[s_all], name=unique_name(f"{name}_scale_Mul", taken))
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        b_v = None
        if bias is not None:
            beta = float(_attr(node, "beta", 1.0))
            b = bias.const_value.numpy().astype(np.float32) * np.float32(beta)
            b_v = add_initializer(main, b, f"{bias.name}_beta" if beta != 1.0 else f"{bias.name}_bias", taken)
        nodes, y = integer_matmul(name, xq, xz, wq_v, wz_v, s_all, b_v, taken)
        graph.extend([scale_mul, *nodes])
        replace_node(graph, node, y)


class AttentionQuantizePass(DynamicQuantizePass):
    """Only the ``com.microsoft.Attention`` -> ``QAttention`` part of the dynamic pass, for
    static mode (QDQ has no form ONNX Runtime fuses into an int8 attention kernel; the fused
    Attention's QKV weight, 3 x hidden x hidden, would otherwise stay float32)."""

    name = "quantize-attention"
    needs = (frozenset({"Attention"}),)
    only_attention = True


def _attention_unsupported(node: ir.Node) -> str | None:
    """Why a ``com.microsoft.Attention`` node cannot become ``QAttention`` (``None`` if it can).

    QAttention (ORT contrib op, CPU kernel ``contrib_ops/cpu/quantization/attention_quant.cc``)
    takes input [B, S, D] uint8, weight [D, 3*hidden] int8, bias [3*hidden] float32 and an
    optional int32 ``mask_index``; it has no past/present state in our use, no
    ``qkv_hidden_sizes``, no attention bias and no ``unidirectional`` mask.
    """
    ins = list(node.inputs)
    if len(ins) < 3 or not _is_const(ins[1]) or not _is_const(ins[2]):
        return "weight or bias is not a constant initializer"
    if ins[0] is None or ins[0].dtype not in (None, FLOAT) or ins[1].dtype != FLOAT:
        return "not a float32 node"
    if ins[1].const_value.numpy().ndim != 2:
        return "weight is not rank 2"
    if any(v is not None for v in ins[4:]) or len(node.outputs) > 1:
        return "past/present state or attention bias inputs"
    for a in ("qkv_hidden_sizes", "unidirectional", "do_rotary", "past_present_share_buffer"):
        at = node.attributes.get(a)
        if at is not None and (at.value if not isinstance(at.value, (list, tuple)) else len(at.value)):
            return f"attribute {a} is set"
    if len(ins) > 3 and ins[3] is not None and ins[3].dtype not in (None, ir.DataType.INT32):
        return "mask_index is not int32"
    return None


def _rewrite_attention(model, node, xq, xs, xz, q, scale, axis, taken) -> None:
    """``Attention(x, W, b, mask)`` -> ``QAttention(xq, Wq, b, xs, Ws, mask, xz)``.

    ``Ws`` is one scale per column of W ([3*hidden], float32) or a scalar (per tensor); the
    weight zero point is omitted (0, symmetric int8). Attributes ``num_heads``, ``scale`` and
    ``mask_filter_value`` are carried over.
    """
    main = model.graph
    w_name = node.inputs[1].name
    wq_v = add_initializer(main, q, f"{w_name}_quantized", taken)
    ws = scale.astype(np.float32) if axis is not None else np.array(scale.reshape(()), np.float32)
    ws_v = add_initializer(main, ws, f"{w_name}_scale", taken)
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    keep = [a for a in node.attributes.values() if a.name in ("num_heads", "scale", "mask_filter_value")]
    name = node.name or node.outputs[0].name
    new = ir.Node("com.microsoft", "QAttention", [xq, wq_v, node.inputs[2], xs, ws_v, mask, xz],
                  attributes=keep, name=unique_name(f"{name}_quant", taken))
    node.graph.append(new)
    replace_node(node.graph, node, new.outputs[0])
