"""Static int8 quantization in QDQ form (ONNX QuantizeLinear / DequantizeLinear, opset >= 13).

Placement is chosen so that ONNX Runtime fuses node units into integer kernels
(QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...): every quantized compute node gets
``DQ`` on its activation input(s), a ``DQ`` on its int8 weight (per output channel on the
right axis: 0 for Conv and Gemm transB=1, 1 for ConvTranspose and Gemm transB=0, the last
axis for MatMul), an int32 bias (scale = input scale x weight scale) and a ``Q -> DQ`` on
its output (Conv/ConvTranspose always; MatMul/Gemm only where a quantization-aware op reads
it, since ORT runs them in int8 with a float output), placed after a directly following
Relu/Clip so the runtime folds the activation into the output range. Shape-only ops (Reshape, Flatten, MaxPool, ...) and
Add/Concat between quantized tensors are kept in the integer domain; linear ``Resize``
is not (it does not commute with quantization, shared/cases case11).

``HardSwish`` and ``HardSigmoid`` (MobileNetV3-style nets; the elementwise ``x·Clip(x+3,0,6)/6``
pattern becomes ``HardSwish`` in fusion) have no integer kernel in ONNX Runtime: between DQ and Q
they ran in float and made static int8 slower than fp32 (0.68-0.73x on a MobileNetV3-small
shape). They are written as integer glue instead (:func:`_integer_hard_activation`):
``HardSigmoid(x) = Clip(x + β/α, 0, 1/α)·α`` is a ``QLinearAdd`` whose output quantization
(scale ``(1/α)/255``, zero point 0) saturates exactly at the clip bounds, read back with scale
``1/255`` (so the ``·α`` costs nothing), and ``HardSwish(x) = x·HardSigmoid(x)`` adds a
``QLinearMul``: 0.87-1.06x of fp32 there, same fidelity (``scripts/exp_hardswish.py``; a lookup
table through ``Gather`` and float blocks were 3-4x slower).

Gemm ``alpha``/``beta`` are folded into B and C before quantizing. Nodes inside
``If``/``Loop`` bodies are not calibrated (ORT cannot expose subgraph tensors) and are not
run in int8: :mod:`.weight_only` stores their weights in int8 with float compute (named in
its report). Every chosen node passes a one-node SQNR check
(:mod:`.sensitivity`) or stays in float (sensitive-layer fallback).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..base import CompressionPass
from ...irutil import add_initializer, all_value_names, attr as _attr, replace_node, unique_name
from ...progress import counted
from . import calibrate, params
from .config import StaticQuantizeConfig
from .policy import resolve_policy
from .sensitivity import add_channel_rows, node_outputs, sqnr_db

COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ops ONNX Runtime runs on quantized tensors when Q/DQ surround them
GLUE = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Reshape", "Flatten",
        "Transpose", "Squeeze", "Unsqueeze", "Resize", "Pad", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Split")
#: glue rewritten into QLinearAdd (+ QLinearMul) after Q/DQ placement (see the module docstring)
HARD_ACT = ("HardSigmoid", "HardSwish")
#: data-movement glue: its outputs take the input's quantization range (values are a subset), so
#: ONNX Runtime runs it on uint8 with the Q/DQ pair dropped (equal scales are its condition)
SAME_RANGE_GLUE = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Split")
#: glue ops whose every input is data (the others read one activation and constant parameters)
MULTI_INPUT_GLUE = ("Add", "Concat", "Mul")
FUSED_ACT = ("Relu", "Clip")
FLOAT = ir.DataType.FLOAT


#: a Concat whose inputs' ranges differ by more than this stays float (``_split_heads``): the
#: smallest input would keep fewer than 4 of its 8 bits
CONCAT_RANGE_RATIO = 16.0

#: calibration samples the sequential bias correction runs (per corrected node)
SEQ_BIAS_SAMPLES = 16


def _is_const(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None and v.is_initializer() and not v.is_graph_input()


def weight_axis(node: ir.Node, w: np.ndarray) -> int:
    """Output-channel axis of a node's weight (see module docstring)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return w.ndim - 1


def is_depthwise(node: ir.Node, w: np.ndarray) -> bool:
    """One input and one output channel per group: ONNX Runtime's depthwise kernel (no int16 pair
    sums). A channel multiplier (``M = k * group``) runs as a GEMM over the kernel positions."""
    group = _attr(node, "group", 1)
    return node.op_type == "Conv" and group > 1 and w.shape[1] == 1 and w.shape[0] == group


class StaticQuantizePass(CompressionPass):
    """Calibrated static int8 QDQ quantization (see module docstring).

    Parameters: :class:`.config.StaticQuantizeConfig`. Nodes in ``context.scope`` (the user's
    exclusions) and ``context.keep_float`` (the fallback's) stay float; ``context.cache``, when a
    dict, keeps the calibration statistics for a re-run of the same model.
    """

    name = "quantize-static"
    checked = False
    Config = StaticQuantizeConfig

    def apply(self, model: ir.Model) -> bool:
        c = self.config
        samples = self.context.calibration
        if not samples:
            raise ValueError("static quantization needs calibration samples")
        method = c.calibration_method
        policy = resolve_policy(c.target)
        self._policy = policy
        per_channel = c.per_channel
        min_sqnr = c.min_sqnr_db
        excl_nodes, excl_ops = self.context.scope.nodes, self.context.scope.op_types
        self._fallback_nodes = set(self.context.keep_float)
        graph = model.graph
        taken = all_value_names(model)
        opset = model.opset_imports.get("", 13)
        self.report.counts.update(target=policy.target, calibration_method=method, calibration_samples=len(samples))

        self._report_subgraphs(model)
        chosen = self._choose(graph, excl_nodes, excl_ops, taken)
        if not chosen:
            return False

        # activation tensors: compute inputs and (post-activation) outputs, then glue
        act_t: dict[str, ir.Value] = {}
        for node in chosen:
            for v in self._act_inputs(node):
                act_t[v.name] = v
            out = self._output_point(node)
            act_t[out.name] = out
        glue = self._glue_nodes(graph, act_t)

        stats, recorded = self._calibrate(model, list(act_t), samples, method)
        ranges = {}
        for name in list(act_t):
            st = stats.get(name)
            if st is None or st.n == 0:
                self.report.skip(name, "tensor never observed during calibration; left in float")
                del act_t[name]
                continue
            ranges[name] = st.range(method, c.percentile)
        self._split_heads(graph, glue, ranges)
        for node in graph:  # topological: a chain of data-movement ops shares one range
            if node in glue and node.op_type == "HardSigmoid" and node.outputs[0].name in ranges:
                ranges[node.outputs[0].name] = (0.0, 1.0)  # its exact range: the rewrite's output scale 1/255
            if node in glue and node.op_type in SAME_RANGE_GLUE and node.inputs[0].name in ranges:
                for o in node.outputs:
                    if o.name in ranges:
                        ranges[o.name] = ranges[node.inputs[0].name]

        # sensitive-layer fallback: one-node SQNR check on recorded activations
        kept = []
        sqnrs = {}
        self._bias_shift: dict = {}
        check = "per-node SQNR check" if min_sqnr is not None and recorded else "choosing nodes"
        for node in counted(chosen, check, "nodes"):
            acts = self._act_inputs(node)
            if any(a.name not in ranges for a in acts):
                self.report.skip(node.name, "an input was not calibrated; left in float")
                continue
            if min_sqnr is not None and recorded:
                s = self._node_sqnr_cached(node, ranges, recorded, policy, per_channel, opset)
                sqnrs[node.name] = round(s, 1)
                if s < min_sqnr:
                    self.report.skip(node.name, f"{node.op_type} output SQNR {s:.1f} dB in int8 is below "
                                                f"{min_sqnr:g} dB (outliers?); kept in float")
                    continue
            kept.append(node)
        self.report.counts["node_sqnr_db"] = sqnrs
        if not kept:
            return False
        aware = set(kept) | glue
        glue_order = [n for n in graph if n in glue]  # iterate in graph order: names and files deterministic

        # sequential bias correction: the float model's per-channel output means, measured now
        seq = c.bias_correction and c.bias_correction_mode == "sequential"
        # (Gemm / MatMul+bias written as MatMulInteger on CPU targets keep the one-node correction)
        seq_targets = {n.outputs[0].name: (1 if n.op_type in ("Conv", "ConvTranspose") else -1)
                       for n in kept if len(n.inputs) > 2 and _is_const(n.inputs[2])
                       and not (policy.integer_gemm and self._gemm_hazard(n))}
        float_means = (calibrate.channel_means(model, seq_targets, samples[:SEQ_BIAS_SAMPLES])
                       if seq and seq_targets else {})
        self._qbias: dict = {}

        # which tensors get Q/DQ: those read by at least one quantization-aware node
        needed: dict[str, ir.Value] = {}
        outputs_of_kept = set()
        for node in kept:
            for v in self._act_inputs(node):
                needed[v.name] = v
            o = self._output_point(node)
            if o.name in ranges:
                needed[o.name] = o
                # Conv needs Q on its output to run as QLinearConv; MatMul/Gemm with DQ inputs
                # already run in int8 with a float output (MatMulIntegerToFloat, QGemm), and a
                # re-quantized MatMul output with outlier channels would only lose precision
                if node.op_type in ("Conv", "ConvTranspose") and not o.is_graph_output():
                    outputs_of_kept.add(o.name)
        for node in glue_order:
            if node.op_type in HARD_ACT and not node.outputs[0].is_graph_output():
                outputs_of_kept.add(node.outputs[0].name)  # its Q makes the rewrite's Mul/Add integer
            for v in node.inputs if node.op_type in MULTI_INPUT_GLUE else node.inputs[:1]:
                if v is not None and v.name in ranges:
                    needed[v.name] = v
            for o in _glue_outputs(node):
                if o.name in ranges and node not in self._float_out:
                    needed[o.name] = o

        qparams = {}
        zp_of: dict[int, ir.Value] = {}
        n_qdq = 0
        # the input scale of each node, by node, before its inputs are rewired to DQ outputs
        in_scale_of = {}
        for name, v in needed.items():
            lo, hi = ranges[name]
            scale, zp = params.activation_params(lo, hi)
            qparams[name] = (scale, zp)
            for u in v.uses():
                if u.node in kept and u.idx == 0:
                    in_scale_of[u.node] = scale
            # a quantized node's output is re-quantized for every consumer (so the runtime can
            # run the node itself in int8); other tensors only for quantization-aware consumers
            users = [(u.node, u.idx) for u in v.uses()
                     if u.node in aware or (name in outputs_of_kept and u.node.graph is graph)]
            if not users:
                continue
            s_v = add_initializer(graph, np.array(scale, np.float32), f"{name}_s", taken)
            # one uint8 zero-point initializer per value, shared (at most 256; a file-size saving)
            z_v = zp_of.get(int(zp))
            if z_v is None:
                z_v = zp_of[int(zp)] = add_initializer(graph, np.array(zp, np.uint8), f"zero_point_u8_{int(zp)}", taken)
            q_out = ir.Value(name=unique_name(f"{name}_q", taken))
            dq_out = ir.Value(name=unique_name(f"{name}_dq", taken), type=v.type, shape=v.shape)
            qn = ir.Node("", "QuantizeLinear", [v, s_v, z_v], outputs=[q_out], name=unique_name(f"{name}_Q", taken))
            dqn = ir.Node("", "DequantizeLinear", [q_out, s_v, z_v], outputs=[dq_out], name=unique_name(f"{name}_DQ", taken))
            graph.extend([qn, dqn])
            for user, idx in users:
                user.replace_input_with(idx, dq_out)
            n_qdq += 1

        for node in glue_order:  # exact uint8 DequantizeLinear for a glue Mul/Add's constant scalar
            if node.op_type not in ("Mul", "Add"):
                continue
            for i, v in enumerate(node.inputs):
                c = _scalar_const(v)
                if c is None:
                    continue
                cv = v.const_value.numpy()
                sc, zp, q = _u8_constant(c)
                if abs(float(np.float32(np.float32(sc) * np.float32(q - zp))) - c) > 1e-6 * abs(c):
                    continue  # not representable to float32 rounding: leave it (the node then runs in float)
                q_v = add_initializer(graph, np.full(cv.shape, q, np.uint8), f"{v.name}_q", taken)
                s_v = add_initializer(graph, np.array(sc, np.float32), f"{v.name}_qs", taken)
                z_v = add_initializer(graph, np.array(zp, np.uint8), f"{v.name}_qzp", taken)
                out = ir.Value(name=unique_name(f"{v.name}_dq", taken), type=v.type, shape=v.shape)
                graph.append(ir.Node("", "DequantizeLinear", [q_v, s_v, z_v], outputs=[out],
                                     name=unique_name(f"{v.name}_DQ", taken)))
                node.replace_input_with(i, out)

        hard = [n for n in glue_order if n.op_type in HARD_ACT]
        n_hard = sum(_integer_hard_activation(graph, n, taken, zp_of) for n in hard)
        if hard:
            self.report.counts["hard_activations_integer"] = n_hard

        n_w = 0
        bits = {}
        for node in counted(kept, "quantizing weights", "nodes"):
            if self._quantize_weight(graph, node, in_scale_of.get(node), policy, per_channel, taken, bits):
                n_w += 1
        graph.sort()
        if float_means:
            self._sequential_bias_correction(model, kept, seq_targets, float_means, samples)
        self.report.counts.update(nodes_quantized=len(kept), activation_qdq_pairs=n_qdq,
                                  weights_quantized=n_w, weight_bits=bits, saturation_free_weights=policy.pair_safe,
                                  ops_quantized=sorted({n.op_type for n in kept}))
        return True

    # -- selection ---------------------------------------------------------------------
    def _report_subgraphs(self, model: ir.Model) -> None:
        for node in model.graph:
            graphs = [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
            graphs += [g for a in node.attributes.values() if a.type == ir.AttributeType.GRAPHS for g in a.value]
            n = sum(1 for g in graphs for sub in ir.traversal.RecursiveGraphIterator(g) if sub.op_type in COMPUTE)
            if n:
                self.report.skip(node.name, f"{n} Conv/Gemm/MatMul node(s) inside the subgraphs of {node.op_type} "
                                            "are not calibrated by static quantization: they compute in float, "
                                            "with int8 weights from the weight-only pass")

    def _choose(self, graph: ir.Graph, excl_nodes, excl_ops, taken) -> list[ir.Node]:
        chosen = []
        for node in graph:
            if node.op_type not in COMPUTE or node.domain not in ("", "ai.onnx"):
                continue
            if node.name in excl_nodes or node.op_type in excl_ops:
                self.report.skip(node.name, "excluded by the user")
                continue
            if node.name in self._fallback_nodes:
                self.report.skip(node.name, "kept in float by the sensitive-node fallback (a fidelity gate "
                                            "failed with it in int8)")
                continue
            if any(v is not None and v.dtype not in (None, FLOAT) for v in node.inputs[:2]):
                self.report.skip(node.name, "not a float32 node")
                continue
            if any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                   for v in node.inputs):
                self.report.skip(node.name, "already quantized (an input comes from DequantizeLinear)")
                continue
            if node.op_type in ("Conv", "ConvTranspose") and not _is_const(node.inputs[1]):
                self.report.skip(node.name, "weight is not a constant initializer")
                continue
            if node.op_type in self._policy.float_compute_ops:
                self.report.skip(node.name, f"{node.op_type} computes in float on target {self._policy.target} (no "
                                            "integer kernel: a Q/DQ one would dequantize its weight at every run); "
                                            "its weight is stored int8 by the weight-only pass")
                continue
            if node.op_type == "Gemm":
                if _attr(node, "transA", 0):
                    self.report.skip(node.name, "Gemm with transA=1 is not quantized")
                    continue
                if not _is_const(node.inputs[1]):
                    self.report.skip(node.name, "Gemm B is not a constant initializer")
                    continue
            if node.op_type == "MatMul" and _is_const(node.inputs[0]):
                self.report.skip(node.name, "MatMul with a constant first input is not quantized")
                continue
            if len(node.inputs) > 2 and node.inputs[2] is not None and not _is_const(node.inputs[2]):
                self.report.skip(node.name, "bias is not a constant initializer")
                continue
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                b = node.inputs[2].const_value.numpy()
                n_out = node.inputs[1].const_value.numpy().shape[0 if _attr(node, "transB", 0) else 1]
                if b.shape not in ((n_out,), (1, n_out)):
                    self.report.skip(node.name, f"Gemm C of shape {list(b.shape)} is not a per-column bias")
                    continue
            if node.op_type == "Gemm":
                self._fold_gemm_scalars(graph, node, taken)  # exact in float: harmless if the node stays float
            chosen.append(node)
        return chosen

    def _fold_gemm_scalars(self, graph, node, taken) -> bool:
        """Fold alpha into B and beta into C (C made 1-D [N]), then set alpha = beta = 1."""
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and c.const_value.numpy().ndim == 2:
            flat = c.const_value.numpy().reshape(-1).astype(np.float32) * np.float32(beta)
            node.replace_input_with(2, add_initializer(graph, flat, f"{c.name}_1d", taken))
            beta_done = True
        else:
            beta_done = False
        if alpha == 1.0 and (beta == 1.0 or beta_done):
            if beta_done and beta != 1.0:
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            return True
        w = node.inputs[1]
        new_b = add_initializer(graph, (w.const_value.numpy() * np.float32(alpha)).astype(np.float32), f"{w.name}_alpha", taken)
        node.replace_input_with(1, new_b)
        if len(node.inputs) > 2 and node.inputs[2] is not None and not beta_done:
            c = node.inputs[2]
            new_c = add_initializer(graph, (c.const_value.numpy() * np.float32(beta)).astype(np.float32), f"{c.name}_beta", taken)
            node.replace_input_with(2, new_c)
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        self.report.counts.setdefault("gemm_alpha_beta_folded", []).append(node.name)
        return True

    @staticmethod
    def _act_inputs(node: ir.Node) -> list[ir.Value]:
        if node.op_type == "MatMul" and not _is_const(node.inputs[1]):
            return [node.inputs[0], node.inputs[1]]
        return [node.inputs[0]]

    @staticmethod
    def _output_point(node: ir.Node) -> ir.Value:
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) == 1 and not out.is_graph_output():
            nxt = uses[0].node
            if nxt.op_type in FUSED_ACT and nxt.graph is node.graph and nxt.outputs[0].dtype in (None, FLOAT):
                if nxt.op_type == "Relu" or _clip_lower_bound_zero(nxt):
                    return nxt.outputs[0]
        return out

    @staticmethod
    def _glue_nodes(graph: ir.Graph, act_t: dict[str, ir.Value]) -> set[ir.Node]:
        glue = set()
        for node in graph:  # topological order: propagate forward
            if node.op_type not in GLUE or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Resize" and _attr(node, "mode", "nearest") != "nearest":
                continue
            data = node.inputs if node.op_type in MULTI_INPUT_GLUE else node.inputs[:1]
            if node.op_type in ("Mul", "Add") and len(node.inputs) == 2 and all(v is not None for v in node.inputs):
                # an activation times / plus a constant scalar (PP-LCNetV3's affine blocks before a
                # padded conv): the constant gets an exact uint8 DequantizeLinear (QLinearMul/QLinearAdd)
                consts = [i for i, v in enumerate(node.inputs) if _scalar_const(v) is not None]
                if len(consts) == 1 and node.inputs[1 - consts[0]].name in act_t:
                    data = [node.inputs[1 - consts[0]]]
            if not data or any(v is None or v.name not in act_t for v in data):
                continue
            outs = _glue_outputs(node)
            if any(o.dtype not in (None, FLOAT) for o in outs):
                continue
            if node.op_type == "Split" and any(o.is_graph_output() for o in outs):
                continue  # ORT runs Split on uint8 only when every output is quantized
            glue.add(node)
            for o in outs:
                act_t[o.name] = o
        return glue

    def _split_heads(self, graph: ir.Graph, glue: set[ir.Node], ranges: dict) -> None:
        """A ``Concat`` whose inputs' calibrated ranges differ by more than
        :data:`CONCAT_RANGE_RATIO` keeps a float output (``self._float_out``): one uint8 scale for
        all of them would crush the small-range parts (a detector's class scores in [0, 1] beside
        box coordinates in pixels, in one output tensor). Its inputs keep their Q/DQ (their
        producers still run in integer); the glue after it is dropped. Only a Concat that reaches
        a graph output through data movement (an output head) and whose output would be
        re-quantized (a glue consumer: a Concat that *is* the graph output never was)."""
        self._float_out: set[ir.Node] = set()
        for node in [n for n in graph if n in glue and n.op_type == "Concat" and _reaches_output(n.outputs[0])
                     and any(u.node in glue for u in n.outputs[0].uses())]:
            spans = [(ranges[v.name][1] - ranges[v.name][0], v.name) for v in node.inputs
                     if v is not None and v.name in ranges]
            if len(spans) < 2 or min(spans)[0] <= 0:
                continue
            (small, a), (large, b) = min(spans), max(spans)
            if large / small > CONCAT_RANGE_RATIO:
                self._float_out.add(node)
                stack = [u.node for u in node.outputs[0].uses() if u.node in glue]
                while stack:  # the glue after it: its Q/DQ would crush the same way
                    n = stack.pop()
                    glue.discard(n)
                    stack += [u.node for o in n.outputs for u in o.uses() if u.node in glue]
                self.report.skip(node.name, f"Concat output kept in float: its inputs' ranges differ "
                                            f"{large / small:.0f}x ({a}: {small:.3g}, {b}: {large:.3g}); one int8 "
                                            "scale would crush the smaller")
                self.report.counts["concat_kept_float"] = self.report.counts.get("concat_kept_float", 0) + 1

    # -- calibration -------------------------------------------------------------------
    def _calibrate(self, model, names, samples, method):
        """Statistics of ``names`` over ``samples`` and the first two samples' values.

        ``context.cache`` (a dict), when given, keeps both per tensor so a
        re-quantization of the same model (sensitive-node fallback) does not run the
        calibration data again.
        """
        cache = self.context.cache
        # statistics gathered for ``auto`` hold every method's (its histograms and min/max): the
        # fallback's min/max round reads its ranges from them without running the data again
        if cache is not None and cache.get("method") in (method, "auto") and all(n in cache["stats"] for n in names):
            # the recorded samples as they are (mappings that open one memory map per lookup): a
            # dict of every value would map them all at once and keep each page read resident
            return {n: cache["stats"][n] for n in names}, cache["recorded"]

        # one pass over the data: statistics of every sample, values of the first two (per-node check)
        stats, recorded = calibrate.observe(model, names, samples, keep=2, method=method)
        if cache is not None:
            cache.update(method=method, stats=stats, recorded=recorded)
        return stats, recorded

    # -- per-node check ----------------------------------------------------------------
    def _node_sqnr_cached(self, node, ranges, recorded, policy, per_channel, opset) -> float:
        """:meth:`_node_sqnr`, remembered in ``context.cache`` across re-runs of the stage on the
        same recorded samples (the fallback's rounds re-quantize the same pre-int8 model: every
        node's one-node SQNR and bias shift are the same, and were a third of each round's time
        on PP-OCRv4 det). The key holds everything the figure depends on: the node's inputs (by
        name; the rounds share the weight tensors), its attributes, its activation ranges, the
        target and the settings; a new recording starts a new memo."""
        cache = self.context.cache
        if cache is None:
            return self._node_sqnr(node, ranges, recorded, policy, per_channel, opset)
        if cache.get("node_sqnr_recorded") is not recorded:
            cache["node_sqnr_recorded"], cache["node_sqnr"] = recorded, {}
        acts = sorted(v.name for v in self._act_inputs(node))
        key = (node.name, node.op_type, tuple(v.name if v is not None else None for v in node.inputs),
               tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items())),
               tuple((a, tuple(map(float, ranges[a]))) for a in acts), policy, per_channel, opset,
               bool(self.config.bias_correction))
        memo = cache["node_sqnr"]
        if key not in memo:
            s = self._node_sqnr(node, ranges, recorded, policy, per_channel, opset)
            memo[key] = (s, self._bias_shift.get(node))
        s, shift = memo[key]
        if shift is not None:
            self._bias_shift[node] = shift
        return s

    def _node_sqnr(self, node, ranges, recorded, policy, per_channel, opset) -> float:
        """Worst one-node SQNR (dB) over the recorded samples; also records the mean output
        shift per channel for empirical bias correction (Nagel et al. 2019, sec. 4.2)."""
        attrs = {k: a.value for k, a in node.attributes.items()}
        acts = {v.name for v in self._act_inputs(node)}
        # the weight's int8 round trip is the same for every sample: compute it once
        wq = None
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name not in acts:
            w = node.inputs[1].const_value.numpy()
            axis = weight_axis(node, w) if per_channel else None
            qmax = policy.weight_qmax(node.op_type, is_depthwise(node, w))
            pairs = policy.weight_pairs(node.op_type, is_depthwise(node, w), weight_axis(node, w))
            s = params.weight_params(w, axis, qmax, pairs)
            q = params.quantize_weight(w, s, axis, qmax, pairs).astype(np.float32)
            sb = s if axis is None else s.reshape([-1 if k == axis else 1 for k in range(w.ndim)])
            wq = (q * sb).astype(np.float32)
        worst = float("inf")
        # the bias shift's running per-channel sum (float32, rows added in the order np.mean(axis=0)
        # of all samples' rows adds them: the same value, without holding every sample's difference)
        has_bias = len(node.inputs) > 2 and _is_const(node.inputs[2])
        want = bool(self.config.bias_correction and has_bias)
        ch_axis = 1 if node.op_type in ("Conv", "ConvTranspose") else -1
        n_ch = node.inputs[2].const_value.numpy().size if want else 0
        acc, count = None, 0
        for rec in recorded:
            f_in, q_in, mask = [], [], []
            for i, v in enumerate(node.inputs):
                if v is None:
                    f_in.append(None); q_in.append(None); mask.append(False)
                    continue
                if v.name in acts:
                    x = rec[v.name]
                    scale, zp = params.activation_params(*ranges[v.name])
                    f_in.append(x); q_in.append(params.fake_quant_activation(x, float(scale), int(zp))); mask.append(False)
                else:
                    w = v.const_value.numpy()
                    f_in.append(w); mask.append(True)
                    q_in.append(wq if i == 1 else w)
            ref, got = node_outputs(node.op_type, attrs, f_in, q_in, mask, max(opset, 13))
            del f_in, q_in
            worst = min(worst, sqnr_db(ref, got))
            if want and ref.ndim >= 2 and ref.shape[ch_axis] == n_ch:
                acc, rows = add_channel_rows(acc, ref, got, ch_axis)
                count += rows
            del ref, got
        if acc is not None and count >= 64:  # enough positions per channel for a stable mean
            self._bias_shift[node] = (acc / count).astype(np.float32)
        return worst

    # -- weights -----------------------------------------------------------------------
    def _quantize_weight(self, graph, node, in_scale, policy, per_channel, taken, bits) -> bool:
        wv = node.inputs[1]
        if not _is_const(wv):
            return False  # activation x activation MatMul: both inputs are Q/DQ'd activations
        if policy.integer_gemm and self._gemm_hazard(node) and self._gemm_integer(graph, node, policy, per_channel,
                                                                                  taken, bits):
            return True
        w = wv.const_value.numpy().astype(np.float32)
        axis = weight_axis(node, w) if per_channel and w.ndim >= 1 else None
        qmax = policy.weight_qmax(node.op_type, is_depthwise(node, w))
        pairs = policy.weight_pairs(node.op_type, is_depthwise(node, w), weight_axis(node, w))
        bits[node.name] = 8
        scale = params.weight_params(w, axis, qmax, pairs)
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
        b = None
        if bias_v is not None and in_scale is not None:
            b = bias_v.const_value.numpy().astype(np.float32)
            shift = self._bias_shift.get(node)
            if shift is not None and shift.shape == b.reshape(-1).shape:
                b = (b.reshape(-1) + shift).reshape(b.shape)
                self.report.counts["bias_corrected"] = self.report.counts.get("bias_corrected", 0) + 1
            # keep the int32 bias in range: widen the weight scale where needed
            need = np.abs(b.astype(np.float64)) / (float(in_scale) * (2**31 - 1))
            if axis is None:
                scale = np.maximum(scale, np.float32(need.max()))
            else:
                n_ch = w.shape[axis]
                per = need.reshape(-1, n_ch).max(0) if need.size != n_ch else need
                scale = np.maximum(scale, per.astype(np.float32))
        q = params.quantize_weight(w, scale, axis, qmax, pairs)
        # symmetric: the zero point input is omitted (ONNX default 0 of the int8 type)
        q_v = add_initializer(graph, q, f"{wv.name}_q", taken)
        s_v = add_initializer(graph, scale if axis is not None else np.array(scale.reshape(()), np.float32), f"{wv.name}_s", taken)
        dq_out = ir.Value(name=unique_name(f"{wv.name}_dq", taken), type=wv.type, shape=wv.shape)
        attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
        dqn = ir.Node("", "DequantizeLinear", [q_v, s_v], attributes=attrs, outputs=[dq_out],
                      name=unique_name(f"{wv.name}_DQ", taken))
        graph.append(dqn)
        node.replace_input_with(1, dq_out)
        if b is not None:
            w_scale_per_out = scale
            if axis is not None and node.op_type == "ConvTranspose" and _attr(node, "group", 1) > 1:
                w_scale_per_out = np.tile(scale, _attr(node, "group", 1))
            if axis is None:
                w_scale_per_out = np.full(b.shape, scale, np.float32)
            qb, bs = params.quantize_bias(b, float(in_scale), w_scale_per_out)
            qb_v = add_initializer(graph, qb, f"{bias_v.name}_q", taken)
            bs_v = add_initializer(graph, bs, f"{bias_v.name}_s", taken)
            bdq_out = ir.Value(name=unique_name(f"{bias_v.name}_dq", taken), type=bias_v.type, shape=bias_v.shape)
            bdq = ir.Node("", "DequantizeLinear", [qb_v, bs_v], attributes=[ir.AttrInt64("axis", 0)],
                          outputs=[bdq_out], name=unique_name(f"{bias_v.name}_DQ", taken))
            graph.append(bdq)
            node.replace_input_with(2, bdq_out)
            self._qbias[node] = (qb_v, bs)
        return True

    @staticmethod
    def _gemm_hazard(node: ir.Node) -> bool:
        """A Gemm, or a MatMul that ONNX Runtime would fuse with its bias ``Add`` into a Gemm
        (input A of rank 2 or unknown rank, one consumer: an ``Add`` of a constant)."""
        if node.op_type == "Gemm":
            return True
        if node.op_type != "MatMul":
            return False
        a, out = node.inputs[0], node.outputs[0]
        uses = out.uses()
        return (a is not None and (a.shape is None or len(a.shape) == 2) and len(uses) == 1
                and not out.is_graph_output() and uses[0].node.op_type == "Add"
                and any(_is_const(v) for v in uses[0].node.inputs if v is not out))

    def _gemm_integer(self, graph, node, policy, per_channel, taken, bits) -> bool:
        """``Gemm(DQ(Q(A)), B, C)`` -> ``MatMulInteger(Q(A), Bq) -> Cast -> Mul(a_s * b_s) -> Add(C)``
        (a ``MatMul`` the same without the ``Add``; its own bias ``Add`` stays).

        ONNX Runtime's CPU provider has no Q/DQ ``Gemm`` fusion: a Q/DQ Gemm (and a Q/DQ MatMul
        whose bias ``Add`` it fuses into a Gemm first) runs in float with its weight dequantized
        at every run (see :mod:`.policy`). Standard ONNX ops only
        (``MatMulInteger`` spec: ``(A - a_zp) x (B - b_zp)`` in int32); weights symmetric int8
        per output column (``qmax`` of the target), bias in float with the bias correction
        shift. Needs alpha = beta = 1 (folded before), transA = 0 and the A input read through
        a ``DequantizeLinear`` of a ``QuantizeLinear`` with constant scale and zero point;
        returns False (QDQ form kept) otherwise.
        """
        dq = node.inputs[0].producer() if node.inputs[0] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or not all(_is_const(v) for v in dq.inputs[1:3]):
            return False
        if _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) != 1.0 or float(_attr(node, "beta", 1.0)) != 1.0:
            return False
        a_q, a_s, a_zp = dq.inputs[0], float(dq.inputs[1].const_value.numpy()), dq.inputs[2]
        w = node.inputs[1].const_value.numpy().astype(np.float32)
        if w.ndim != 2:
            return False
        if _attr(node, "transB", 0):
            w = w.T
        axis = 1 if per_channel else None
        qmax = policy.weight_qmax(node.op_type, False)
        pairs = policy.weight_pairs("MatMul", False, 1)  # w is [K, N] here
        bits[node.name] = 8
        scale = params.weight_params(w, axis, qmax, pairs)
        q = params.quantize_weight(w, scale, axis, qmax, pairs)
        n_out = w.shape[1]
        col = (np.float64(a_s) * np.broadcast_to(scale.astype(np.float64), (n_out,))).astype(np.float32)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        b = c.const_value.numpy().astype(np.float32).reshape(-1) if c is not None else None
        shift = self._bias_shift.get(node)
        if shift is not None and b is not None and shift.shape == b.shape:
            b = b + shift
            self.report.counts["bias_corrected"] = self.report.counts.get("bias_corrected", 0) + 1
        name = node.name or "gemm"
        q_v = add_initializer(graph, q, f"{node.inputs[1].name}_q", taken)
        wz_v = add_initializer(graph, np.array(0, np.int8), f"{node.inputs[1].name}_zp", taken)
        s_v = add_initializer(graph, col, f"{name}_scale", taken)
        b_v = add_initializer(graph, b.astype(np.float32), f"{c.name}_f", taken) if b is not None else None
        nodes, y = integer_matmul(name, a_q, a_zp, q_v, wz_v, s_v, b_v, taken)
        graph.extend(nodes)
        replace_node(graph, node, y)
        self.report.counts.setdefault("gemm_as_integer", []).append(name)
        return True

    # -- sequential bias correction ----------------------------------------------------
    def _sequential_bias_correction(self, model, kept, targets, float_means, samples) -> None:
        """Correct the int32 biases for the mean output shift the int8 model really has.

        The per-node correction (:meth:`_node_sqnr`) sees float inputs, so the shift that
        accumulates through many int8 layers stays. Here, node by node in graph order, the Q/DQ
        model runs on calibration samples up to the node (ONNX semantics of Q/DQ, ORT
        optimizations off) and its bias moves by (float mean - int8 mean) per output channel
        (in int32 steps of the bias scale), so every node is corrected with its upstream already corrected
        (empirical bias correction, Nagel et al. 2019, "Data-Free Quantization", sec. 4.2,
        applied sequentially as AIMET does). Correcting all nodes at once diverges (PP-OCRv4
        rec: relative residual 0.09 -> 4.6 -> 105 in three rounds), and so did two nodes at a
        time (0.13 -> 0.45): BatchNorm-folded layers amplify an upstream shift.

        Cost: about two forward passes of :data:`SEQ_BIAS_SAMPLES` samples, segment by segment,
        each corrected node run again with its new bias before later segments read it
        (:func:`~onnxcompress.passes.quantize.calibrate.sequential_shift`: the same biases as
        one model per node run from the start), plus two runs for the residuals; memory: the
        values carried between segments for those samples. Until 0.2 a cut model per node ran
        from the start (PicoDet layout: 459 s); a graph with subgraphs still takes that way.
        Reported as ``bias_correction_nodes`` and ``bias_correction_residual`` (sum over nodes of
        mean squared shift / mean squared output, on those samples, before and after).
        """
        order = [n for n in model.graph if n in self._qbias and n.outputs[0].name in float_means]
        if not order:
            return
        sub = samples[:SEQ_BIAS_SAMPLES]

        def residual(q_means):
            tot = 0.0
            for n in order:
                f, q = float_means[n.outputs[0].name], q_means.get(n.outputs[0].name)
                if q is not None and q.shape == f.shape:
                    tot += float(np.mean((f - q) ** 2) / (np.mean(f * f) + 1e-12))
            return float(f"{tot:.3g}")

        all_names = {n.outputs[0].name: targets[n.outputs[0].name] for n in order}
        before = residual(calibrate.channel_means(model, all_names, sub))
        node_of = {n.outputs[0].name: n for n in order}

        def shift(name, q):
            """Move ``name``'s producer's int32 bias by the whole steps nearest to the float
            model's mean minus ``q`` (the int8 mean)."""
            node, f = node_of[name], float_means[name]
            qb_v, bs = self._qbias[node]
            if q.shape != f.shape or bs.size != f.size:
                return None
            old = qb_v.const_value.numpy().astype(np.int64)
            step = np.round((f - q) / bs.astype(np.float64).reshape(-1)).astype(np.int64)
            new = np.clip(old + step.reshape(old.shape), -(2**31) + 1, 2**31 - 1).astype(np.int32)
            qb_v.const_value = ir.tensor(new, name=qb_v.name)

        try:
            calibrate.sequential_shift(model, all_names, sub, shift)
        except calibrate.NotSegmentable:  # subgraphs: one cut model per node, each run from the start
            for node in counted(order, "bias correction", "nodes"):
                name = node.outputs[0].name
                q = calibrate.channel_means(calibrate._cut(model, [name]), {name: targets[name]}, sub).get(name)
                if q is not None:
                    shift(name, q)
        after = residual(calibrate.channel_means(model, all_names, sub))
        self.report.counts.update(bias_correction_nodes=len(order),
                                  bias_correction_residual=[round(before, 6), after])


def integer_matmul(name: str, xq: ir.Value, xz: ir.Value, wq: ir.Value, wz: ir.Value, scale: ir.Value,
                   bias: ir.Value | None, taken: set[str]) -> tuple[list[ir.Node], ir.Value]:
    """``MatMulInteger(xq, wq, xz, wz) -> Cast(float) -> Mul(scale) [-> Add(bias)]`` (standard ONNX
    ops; ``MatMulInteger`` spec: ``(x - xz) (w - wz)`` in int32). ``scale`` is ``x_scale * w_scale``
    per output column [N] or scalar, a constant or a run-time value (dynamic mode); ``bias`` [N]
    float. Returns the new nodes (not yet in a graph) and the float output."""
    y_int = ir.Value(name=unique_name(f"{name}_int32", taken))
    y_f = ir.Value(name=unique_name(f"{name}_int32_cast", taken))
    nodes = [ir.Node("", "MatMulInteger", [xq, wq, xz, wz], outputs=[y_int], name=unique_name(f"{name}_MatMulInteger", taken)),
             ir.Node("", "Cast", [y_int], attributes=[ir.AttrInt64("to", FLOAT.value)], outputs=[y_f],
                     name=unique_name(f"{name}_Cast", taken))]
    if bias is None:
        nodes.append(ir.Node("", "Mul", [y_f, scale], name=unique_name(f"{name}_Mul", taken)))
    else:
        y_mm = ir.Value(name=unique_name(f"{name}_matmul", taken))
        nodes.append(ir.Node("", "Mul", [y_f, scale], outputs=[y_mm], name=unique_name(f"{name}_Mul", taken)))
        nodes.append(ir.Node("", "Add", [y_mm, bias], name=unique_name(f"{name}_Add", taken)))
    return nodes, nodes[-1].outputs[0]


def _u8_constant(c: float) -> tuple[np.float32, int, int]:
    """``(scale, zero_point, q)`` of a uint8 ``DequantizeLinear`` meant to give the scalar ``c``:
    ``q - zero_point`` is 255 (c > 0), -255 (c < 0) or 0 (c == 0, scale 1). The caller checks that
    ``scale·(q - zero_point)`` is ``c`` to the precision it needs."""
    if c > 0:
        return np.float32(c / 255.0), 0, 255
    if c < 0:
        return np.float32(-c / 255.0), 255, 0
    return np.float32(1.0), 0, 0


def _integer_hard_activation(graph: ir.Graph, node: ir.Node, taken: set[str], zp_of: dict) -> bool:
    """Rewrite a Q/DQ-wrapped ``HardSigmoid`` / ``HardSwish`` (its input read through a
    ``DequantizeLinear`` with constant scale and zero point, its output re-quantized) into
    standard ops ONNX Runtime fuses into integer kernels (ONNX operator spec: ``HardSigmoid(x) =
    max(0, min(1, αx + β))``, ``HardSwish(x) = x·HardSigmoid_{α=1/6, β=1/2}(x)``)::

        t = Add(DQ(x_q), DQ(c_q))                  # c = β/α, an exact uint8 constant   -> QLinearAdd
        h = DQ(Q(t, (1/α)/255, 0), 1/255, 0)       # saturation = the clip; ·α = the scale ratio
        HardSigmoid: h                             (its consumer's Q(1/255, 0) matches: dropped)
        HardSwish:   Mul(DQ'(x_q), h)              # a second DQ of x (one consumer each) -> QLinearMul

    Returns False (node left as it is: float between DQ and Q) when the input is not such a DQ,
    ``α <= 0``, or ``β/α`` is not exactly representable as a uint8 constant.
    """
    dq = node.inputs[0].producer() if node.inputs[0] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 3 \
            or not all(_is_const(v) for v in dq.inputs[1:3]):
        return False
    if node.op_type == "HardSwish":
        alpha, beta = 1.0 / 6.0, 0.5
    else:
        alpha, beta = float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
    if not alpha > 0:
        return False
    c = np.float32(beta / alpha)
    sc, cz, cq = _u8_constant(c)
    if np.float32(sc * np.float32(cq - cz)) != c:
        return False
    name = node.name or node.op_type
    x = node.inputs[0]
    cq_v = add_initializer(graph, np.array(cq, np.uint8), f"{name}_c_q", taken)
    cs_v = add_initializer(graph, np.array(sc, np.float32), f"{name}_c_s", taken)
    cz_v = add_initializer(graph, np.array(cz, np.uint8), f"{name}_c_zp", taken)
    z0 = zp_of.get(0)
    if z0 is None:
        z0 = zp_of[0] = add_initializer(graph, np.array(0, np.uint8), "zero_point_u8_0", taken)
    c_v = ir.Value(name=unique_name(f"{name}_c", taken))
    t = ir.Value(name=unique_name(f"{name}_shifted", taken))
    t_q = ir.Value(name=unique_name(f"{name}_shifted_q", taken))
    h = ir.Value(name=unique_name(f"{name}_hsig", taken))
    ts_v = add_initializer(graph, np.array(np.float32(1.0 / alpha) / np.float32(255.0), np.float32), f"{name}_clip_s", taken)
    hs_v = add_initializer(graph, np.array(np.float32(1.0) / np.float32(255.0), np.float32), f"{name}_hsig_s", taken)
    nodes = [ir.Node("", "DequantizeLinear", [cq_v, cs_v, cz_v], outputs=[c_v], name=unique_name(f"{name}_c_DQ", taken)),
             ir.Node("", "Add", [x, c_v], outputs=[t], name=unique_name(f"{name}_Add", taken)),
             ir.Node("", "QuantizeLinear", [t, ts_v, z0], outputs=[t_q], name=unique_name(f"{name}_clip_Q", taken)),
             ir.Node("", "DequantizeLinear", [t_q, hs_v, z0], outputs=[h], name=unique_name(f"{name}_hsig_DQ", taken))]
    y = h
    if node.op_type == "HardSwish":
        xm = ir.Value(name=unique_name(f"{x.name}_dq2", taken), type=x.type, shape=x.shape)
        y = ir.Value(name=unique_name(f"{name}_mul", taken))
        nodes += [ir.Node("", "DequantizeLinear", list(dq.inputs), attributes=list(dq.attributes.values()),
                          outputs=[xm], name=unique_name(f"{dq.name}_2", taken)),
                  ir.Node("", "Mul", [xm, h], outputs=[y], name=unique_name(f"{name}_Mul", taken))]
    graph.extend(nodes)
    replace_node(graph, node, y)
    return True


def _reaches_output(v: ir.Value, depth: int = 8) -> bool:
    """Whether ``v`` is a graph output or reaches one through data-movement ops only."""
    if v.is_graph_output():
        return True
    if depth == 0:
        return False
    return any(u.node.op_type in (*SAME_RANGE_GLUE, "Concat", "Identity")
               and any(_reaches_output(o, depth - 1) for o in u.node.outputs) for u in v.uses())


def _glue_outputs(node: ir.Node) -> list[ir.Value]:
    """The outputs of a glue node that carry data (every output of a Split, else the first)."""
    return list(node.outputs) if node.op_type == "Split" else list(node.outputs[:1])


def _scalar_const(v: ir.Value | None) -> float | None:
    """The value of a float constant with one element (any rank), else None."""
    if v is None or not _is_const(v) or v.dtype != FLOAT:
        return None
    a = v.const_value.numpy()
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _clip_lower_bound_zero(node: ir.Node) -> bool:
    """A Clip whose lower bound is a constant 0 (ReLU6): the runtime folds it into Q."""
    lo = None
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        lo = float(node.inputs[1].const_value.numpy())
    elif "min" in node.attributes:
        lo = float(node.attributes["min"].value)
    return lo is not None and lo == 0.0
