"""Weight-only int8: int8 storage, float compute, for weights the integer passes leave in float.

A chosen node's constant float32 weight ``W`` is replaced by

    Mul(Cast(Wq int8, to=FLOAT), scale float32)  ->  W'

with one symmetric scale per output channel (``scale`` shaped like ``W`` with 1 on the
reduced axes, so it broadcasts). ``Wq = clip(round_half_even(W / scale), -127, 127)``,
``scale = max|W| / 127`` per channel: this is exactly ONNX ``DequantizeLinear(Wq, scale)``
with zero point 0 (opset 13 spec: ``y = (x - x_zero_point) * x_scale``), written with Cast
and Mul on purpose: ONNX Runtime never constant-folds ``DequantizeLinear`` (its QDQ rules
keep it for fusions: all 52 stayed in PP-OCR cls's optimized graph), so a
``DequantizeLinear`` weight runs every inference and stops Conv from pre-packing its weight
and from the NCHWc layout: measured on PP-OCR cls (ORT 1.32, 2 threads), 0.95 ms fp32 ->
20.6 ms with DQ weights, 1.14 ms (noise) with Cast -> Mul, which ORT folds back into a
float initializer when the session is created. So the file
holds int8 (about 4x smaller on these weights) and the deployed session runs the float
kernels at fp32 speed and fp32 memory; outputs move by the weight rounding only. All 8
bits are used: the product is float, no u8*s8 kernel can saturate (the saturation-free
scales of :mod:`.policy` do not apply). The int8 and scale initializers and the Cast/Mul nodes are
put in the graph of the node that reads them.

Which nodes (``mode``, the integer pass that ran before):

* ``static``: Conv / ConvTranspose / Gemm / MatMul inside ``If``/``Loop``/``Scan`` bodies
  (static QDQ does not calibrate them: ORT cannot expose subgraph tensors as outputs), and the
  W / R weights of LSTM / GRU / RNN anywhere.
* ``dynamic``: Conv / ConvTranspose everywhere (``ConvInteger`` is slower than fp32 on ORT's
  x86 CPU provider, so the dynamic pass never runs them in int8), and LSTM / GRU / RNN W / R.
  MatMul / Gemm are the dynamic pass's own (subgraphs included). Main-graph Conv is on by
  default (``config.weight_only_main_conv``; the decision): ORT folds the weights back
  to float, so it is a size win at fp32 speed, and with bias correction (below) fidelity
  holds. ``scripts/bench_int8.py`` (held-out data, ORT 1.32, 2 threads, AMD EPYC with
  AVX-512 VNNI, interleaved latency), dynamic defaults, Conv float before -> weight-only now:
  PP-OCR cls 0.53 -> 0.19 MB (fp32 0.59), labels unchanged 100 %, 1.42 ms vs fp32 1.44 ms;
  EfficientNet-Lite0 14.72 -> 4.83 MB (fp32 18.61), top-1 100 % of 105 decisive crops,
  KL 0.006 (static QDQ: 98.1 %, KL 0.012). Without bias correction EfficientNet-Lite0 fell
  to 17 dB logit SQNR (84.6 % top-1 in ``optimize``'s validation).

Scale axes: Conv ``[M, C/g, k...]`` axis 0; ConvTranspose ``[C, M/g, k...]`` axis 1; Gemm
axis 0 if ``transB`` else 1; MatMul ``[..., K, N]`` last axis; LSTM/GRU/RNN W ``[D, G*H, I]``
and R ``[D, G*H, H]`` (G = 4, 3, 1 gates): axes 0 and 1, one scale per direction and gate
row. Biases and other inputs stay float (small). com.microsoft ``DynamicQuantizeLSTM`` was
not used: it also quantizes the activations, needs transposed weights, and ORT folds the
weight-only form back to the fp32 LSTM kernel anyway.

A weight built from constants by a chain of shape ops (exported LSTMs: ``Slice``/``Concat``
of ``weight_ih`` to reorder gates, then ``Unsqueeze``) is constant-folded first, whatever its
size (onnxscript's folder, forced on that chain only). Nodes left behind by an earlier fold
(the untaken branch of a folded ``If``) are disconnected first, so the float sources they
kept alive are dropped.

Checks, per node: in the main graph, with calibration samples, the node's output SQNR
(``10 log10(sum ref^2 / sum (ref - q)^2)`` dB, :mod:`.sensitivity`) on the first two
recorded samples, float activations and the int8 weight, must reach ``min_sqnr_db``
(default 20 dB); inside subgraphs (activations cannot be recorded) the weight's own
reconstruction SQNR must reach ``min_weight_only_sqnr_db`` (default 25 dB): with inputs
uncorrelated across the reduced axes the output SQNR equals it, the 5 dB margin is for
correlated ones. Per-channel int8 cannot give less than ``48 - 10 log10(n)`` dB for ``n``
weights per channel (error <= max/254 per element); Silero VAD's weights reach 31.7-46.1 dB
(worst channel 30.1 dB). Main-graph Conv / ConvTranspose / Gemm with at least 64 output
positions per channel in the recorded samples also get empirical bias correction (option
``bias_correction``, default True): the mean output shift per channel (fp32 minus int8
weights) is added to the bias, created when absent (Nagel et al. 2019, "Data-Free
Quantization", sec. 4.2; see :meth:`WeightOnlyQuantizePass._output_sqnr`). A failing
node stays float and is named in the report, as is a
weight with about one value per channel (no size gain). ``exclude_nodes``,
``exclude_op_types`` and ``fallback_nodes`` are honoured. The report lists each node as
``weight-only int8 (inside subgraph X)`` or ``weight-only int8 (main graph)``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_ir.passes import common

from ...irutil import add_initializer, all_value_names, subgraphs, unique_name
from ..base import CompressionPass
from . import params
from .config import QuantizeConfig
from .policy import resolve_policy
from .sensitivity import add_channel_rows, node_outputs, sqnr_db
from .static import FLOAT, _attr

CONV = ("Conv", "ConvTranspose")
LINEAR = ("Gemm", "MatMul")
RECURRENT = {"LSTM": 4, "GRU": 3, "RNN": 1}  # op -> gates
CONTROL_FLOW = ("If", "Loop", "Scan")
QMAX = 127


def _const(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None and not v.is_graph_input()


def _already_quantized(v: ir.Value | None) -> bool:
    """``v`` comes from ``DequantizeLinear`` or from this pass's ``Mul(Cast(int8), scale)``."""
    p = v.producer() if v is not None else None
    if p is None:
        return False
    if p.op_type == "DequantizeLinear":
        return True
    if p.op_type == "Mul":
        c = p.inputs[0].producer() if p.inputs[0] is not None else None
        return (c is not None and c.op_type == "Cast" and c.inputs[0] is not None
                and c.inputs[0].dtype == ir.DataType.INT8)
    return False


def weight_inputs(node: ir.Node) -> list[int]:
    """Indices of the inputs of ``node`` that hold its weights (see module docstring)."""
    if node.op_type in RECURRENT:
        return [1, 2]
    return [1]


def channel_axes(node: ir.Node, w: np.ndarray) -> tuple[int, ...]:
    """Axes of weight ``w`` of ``node`` that index output channels (one scale each; see the
    module docstring); the others are reduced."""
    if node.op_type == "Conv":
        return (0,)
    if node.op_type == "ConvTranspose":
        # W [C_in, C_out / group, k...]: with groups an output channel is (C_in block, column)
        return (0, 1) if _attr(node, "group", 1) > 1 else (1,)
    if node.op_type == "Gemm":
        return (0,) if _attr(node, "transB", 0) else (1,)
    if node.op_type in RECURRENT:
        return (0, 1)
    return (w.ndim - 1,)


def quantize(w: np.ndarray, keep: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Symmetric int8 of float ``w`` with one scale per index of the ``keep`` axes.

    ``scale = max|w| / 127`` over the other axes (1 for an all-zero channel), ``q =
    clip(round_half_even(w / scale), -127, 127)`` as ONNX ``QuantizeLinear`` with zero point 0.

    Returns:
        ``(q int8 shaped like w, scale float32 shaped like w with 1 on the reduced axes (it
        broadcasts against q), SQNR dB of the whole weight, worst per-channel SQNR dB)``; an
        exactly reproduced tensor or channel counts as ``inf``.
    """
    red = tuple(i for i in range(w.ndim) if i not in keep)
    w64 = w.astype(np.float64)
    m = np.abs(w64).max(axis=red, keepdims=True) if red else np.abs(w64)
    scale = np.where(m < params.TINY, 1.0, m / QMAX).astype(np.float32)
    q = np.clip(np.round(w64 / scale.astype(np.float64)), -QMAX, QMAX).astype(np.int8)
    recon = q.astype(np.float64) * scale.astype(np.float64)
    err = ((w64 - recon) ** 2).sum(axis=red) if red else (w64 - recon) ** 2
    sig = (w64 ** 2).sum(axis=red) if red else w64 ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(err == 0, np.inf, 10 * np.log10(np.where(sig == 0, 1e-300, sig) / np.where(err == 0, 1, err)))
    return q, scale, float(sqnr_db(w64, recon)), float(per.min()) if per.size else float("inf")


class WeightOnlyQuantizePass(CompressionPass):
    """Weight-only int8 (``Cast -> Mul`` -> float node); see the module docstring.

    Args:
        mode: ``static`` | ``dynamic``, the integer pass that ran before (required).

    Raises:
        ValueError: a missing or unknown ``mode``.

    Parameters: :class:`.config.QuantizeConfig` (``bias_correction``, ``weight_only_main_conv``:
    dynamic mode quantizes main-graph Conv too, ``min_sqnr_db``: ``None`` disables both checks,
    ``min_weight_only_sqnr_db``). Nodes in ``context.scope`` and ``context.keep_float`` stay float.
    """

    name = "quantize-weight-only"
    checked = False
    Config = QuantizeConfig

    def __init__(self, context=None, config=None, *, mode: str | None = None, **params) -> None:
        if mode not in ("static", "dynamic"):
            raise ValueError(f"weight-only int8 needs mode='static' or 'dynamic', not {mode!r}")
        super().__init__(context, config, **params)
        self.mode = mode

    def fresh(self) -> "WeightOnlyQuantizePass":
        return type(self)(self.context, self.config, mode=self.mode)

    def apply(self, model: ir.Model) -> bool:
        mode = self.mode
        min_sqnr = self.config.min_sqnr_db
        min_w_sqnr = self.config.min_weight_only_sqnr_db
        self._detach_dead_uses(model)
        nodes = self._choose(model, mode)
        if not nodes:
            self.report.counts.update(nodes_quantized=0, weight_only=[])
            return False
        self._fold_weight_chains(model, nodes)

        main = model.graph
        taken = all_value_names(model)
        # the fallback's rounds re-run the stage with other nodes kept in float: a node's one-node
        # check (its SQNR and bias shift) is remembered across them (``context.cache``), so only
        # nodes not yet checked are recorded. Their inputs move by the int8 error upstream only, and
        # each round is validated anyway (PP-OCRv4 det: ~1 s of recording per round saved)
        memo = self.context.cache.setdefault("weight_only_checks", {}) if self.context.cache is not None else {}
        todo = [n for n in nodes if n.graph is main and _check_key(n) not in memo]
        recorded = self._record(model, todo) if min_sqnr is not None else []
        done, sqnrs, cache, replaced = [], {}, {}, set()
        for node in nodes:
            where = "main graph" if node.graph is main else f"inside subgraph {node.graph.name or '?'}"
            idx = [i for i in weight_inputs(node) if i < len(node.inputs) and node.inputs[i] is not None]
            bad = [i for i in idx if not _const(node.inputs[i]) or node.inputs[i].dtype != FLOAT]
            if bad or not idx:
                self.report.skip(node.name, f"{node.op_type} weight is not a constant float32 tensor "
                                            f"({where}); kept in float")
                continue
            plans = []
            for i in idx:
                w = node.inputs[i].const_value.numpy()
                if w.ndim < 1 or w.size == 0:
                    break
                q, scale, s_all, s_min = quantize(w.astype(np.float32), channel_axes(node, w))
                plans.append((i, w, q, scale, s_all, s_min))
            if len(plans) != len(idx):
                self.report.skip(node.name, f"{node.op_type} has an empty or scalar weight; kept in float")
                continue
            if sum(p[2].nbytes + p[3].nbytes for p in plans) > 0.5 * sum(p[1].nbytes for p in plans):
                self.report.skip(node.name, f"{node.op_type} weight has about one value per channel: int8 with "
                                            "per-channel scales would not make it smaller; kept in float")
                continue
            shift = None
            entry = {"node": node.name, "op_type": node.op_type, "where": where,
                     "weights": [node.inputs[p[0]].name for p in plans],
                     "weight_sqnr_db": round(min(p[4] for p in plans), 1),
                     "worst_channel_sqnr_db": round(min(p[5] for p in plans), 1)}
            s = None
            if min_sqnr is not None and node.graph is main and _check_key(node) in memo:
                s, shift = memo[_check_key(node)]
            elif min_sqnr is not None and node.graph is main and recorded:
                s, shift = memo[_check_key(node)] = self._output_sqnr(model, node, plans, recorded)
            if s is not None:
                entry["output_sqnr_db"] = round(s, 1)
                sqnrs[node.name] = entry["output_sqnr_db"]
                if s < min_sqnr:
                    self.report.skip(node.name, f"{node.op_type} output SQNR {s:.1f} dB with int8 weights is below "
                                                f"{min_sqnr:g} dB ({where}); kept in float")
                    continue
            elif min_sqnr is not None and min_w_sqnr is not None and entry["weight_sqnr_db"] < min_w_sqnr:
                self.report.skip(node.name, f"{node.op_type} weight SQNR {entry['weight_sqnr_db']:.1f} dB in int8 is "
                                            f"below {min_w_sqnr:g} dB ({where}; no recorded activations to check "
                                            "its output instead); "
                                            "kept in float")
                continue
            for i, _, q, scale, _, _ in plans:
                replaced.add(node.inputs[i])
                self._rewrite(node, i, q, scale, taken, cache)
            if shift is not None and self.config.bias_correction:
                replaced.add(node.inputs[2] if len(node.inputs) > 2 else None)
                self._correct_bias(node, shift, taken)
                entry["bias_corrected"] = True
            entry["what"] = f"weight-only int8 ({where})"
            done.append(entry)
        freed = self._drop_unused(v for v in replaced if v is not None)
        self.report.counts.update(nodes_quantized=len(done), weight_only=done, node_sqnr_db=sqnrs,
                                  weights_int8_bytes=int(sum(c[1] for c in cache.values())),
                                  float_weight_bytes_removed=int(freed))
        if done:
            for g in [main, *subgraphs(main)]:
                g.sort()
        return bool(done)

    # -- selection ---------------------------------------------------------------------
    def _choose(self, model: ir.Model, mode: str) -> list[ir.Node]:
        excl_nodes, excl_ops = self.context.scope.nodes, self.context.scope.op_types
        fallback = set(self.context.keep_float)
        main_conv = self.config.weight_only_main_conv
        # main-graph ops the static pass leaves in float on this target (ConvTranspose on CPU)
        static_float = set(resolve_policy(self.config.target).float_compute_ops)
        chosen = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            in_sub = node.graph is not model.graph
            op = node.op_type
            if op in RECURRENT:
                pass
            elif op in CONV:
                if mode == "static" and not in_sub and op not in static_float:
                    continue
                if mode == "dynamic" and not in_sub and not main_conv:
                    continue
            elif op in LINEAR:
                if mode == "dynamic" or not in_sub:
                    continue  # the dynamic pass's own (subgraphs too); static's in the main graph
            else:
                continue
            w_idx = weight_inputs(node)
            ws = [node.inputs[i] for i in w_idx if i < len(node.inputs)]
            if not ws or any(_already_quantized(v) for v in ws):
                continue  # already quantized
            if op == "MatMul" and _const(node.inputs[0]):
                continue  # constant first input: not a weight x activation product
            if node.name in excl_nodes or op in excl_ops:
                self.report.skip(node.name, "excluded by the user")
                continue
            if node.name in fallback:
                self.report.skip(node.name, "kept in float by the sensitive-node fallback (a fidelity gate failed "
                                            "with it in int8)")
                continue
            chosen.append(node)
        return chosen

    def _fold_weight_chains(self, model: ir.Model, nodes: list[ir.Node]) -> None:
        """Constant-fold the nodes that compute a chosen weight from constants only."""
        chain: set[ir.Node] = set()
        seen: dict[int, bool] = {}

        def from_consts(v: ir.Value | None) -> bool:
            if v is None or _const(v):
                return True
            if id(v) in seen:
                return seen[id(v)]
            p = v.producer()
            ok = (p is not None and not v.is_graph_input() and p.op_type not in CONTROL_FLOW
                  and p.domain in ("", "ai.onnx") and all(from_consts(i) for i in p.inputs))
            seen[id(v)] = ok
            if ok:
                chain.add(p)
            return ok

        for node in nodes:
            for i in weight_inputs(node):
                if i < len(node.inputs) and node.inputs[i] is not None and not _const(node.inputs[i]):
                    from_consts(node.inputs[i])
        if not chain:
            return
        from onnxscript.optimizer import fold_constants

        leaves = {v for n in chain for v in n.inputs if v is not None and v.is_initializer()}
        fold_constants(model, should_fold=lambda n: True if n in chain else False)
        common.RemoveUnusedNodesPass()(model)
        self._drop_unused(leaves)
        self.report.counts["weight_nodes_folded"] = len(chain)

    @staticmethod
    def _detach_dead_uses(model: ir.Model) -> None:
        """Disconnect nodes no longer in the model from the values they read.

        A folded ``If`` leaves its other branch detached, but onnx-ir still counts that
        branch's nodes as uses of outer-scope values, which keeps dead weight chains (and their
        float initializers) alive through dead-code removal.
        """
        live = set(ir.traversal.RecursiveGraphIterator(model.graph))
        for g in [model.graph, *subgraphs(model.graph)]:
            values = [*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs)]
            for v in values:
                for u in list(v.uses()):
                    if u.node not in live:
                        u.node.replace_input_with(u.idx, None)

    @staticmethod
    def _drop_unused(values) -> int:
        """Remove the initializers among ``values`` that nothing reads any more (in any graph:
        onnx-ir counts uses from nested subgraphs); returns the bytes freed."""
        freed = 0
        for v in values:
            g = v.graph
            if (g is not None and v.is_initializer() and not v.uses() and not v.is_graph_output()
                    and g.initializers.get(v.name) is v):
                freed += v.const_value.nbytes
                del g.initializers[v.name]
        return freed

    # -- checks ------------------------------------------------------------------------
    def _record(self, model: ir.Model, nodes: list[ir.Node]) -> list[dict[str, np.ndarray]]:
        samples = self.context.calibration
        if not nodes or not samples:
            return []
        from .calibrate import observe

        # float inputs only: observe() declares what it records as float (an LSTM's int32
        # sequence_lens would make the session fail)
        names = sorted({v.name for n in nodes for v in n.inputs
                        if v is not None and not _const(v) and v.dtype in (None, ir.DataType.FLOAT)})
        return observe(model, names, samples, keep=2)[1]

    @staticmethod
    def _output_sqnr(model, node, plans, recorded) -> tuple[float | None, np.ndarray | None]:
        """Worst one-node SQNR (dB) over the recorded samples, float inputs vs int8 weights, and
        for Conv / ConvTranspose / Gemm the mean output shift per channel (fp32 - int8 weights,
        float32 [channels]) for empirical bias correction, or ``None``.

        With few weights per channel (depthwise 3x3: 9) the rounding errors do not average out,
        and on post-ReLU (positive) inputs their sum shifts each channel's mean: on
        EfficientNet-Lite0 (49 Conv, every node above 31 dB) the logits fell to 17 dB SQNR
        without the correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2).
        """
        attrs = {k: a.value for k, a in node.attributes.items()}
        wq = {}
        for i, _, q, scale, _, _ in plans:
            wq[i] = q.astype(np.float32) * scale  # exactly what Cast -> Mul computes
        opset = max(model.opset_imports.get("", 13), 13)
        worst = float("inf")
        # the per-channel shift's running sum, rows added in the order of np.mean(axis=0) over
        # every sample's rows (the same value, without holding each sample's difference)
        ch = 1 if node.op_type in CONV else -1
        acc, count, shifts = None, 0, node.op_type in CONV + ("Gemm",)
        for rec in recorded:
            f_in, q_in, mask = [], [], []
            for i, v in enumerate(node.inputs):
                if v is None:
                    f_in.append(None); q_in.append(None); mask.append(False)
                elif _const(v):
                    w = v.const_value.numpy()
                    f_in.append(w); q_in.append(wq.get(i, w)); mask.append(True)
                elif v.name in rec:
                    f_in.append(rec[v.name]); q_in.append(rec[v.name]); mask.append(False)
                else:
                    return None, None  # an input was not recorded: the caller checks the weight instead
            ref, got = node_outputs(node.op_type, attrs, f_in, q_in, mask, opset)
            del f_in, q_in
            worst = min(worst, sqnr_db(ref, got))
            if shifts and ref.ndim >= 2 and (acc is None or ref.shape[ch] == acc.shape[0]):
                acc, rows = add_channel_rows(acc, ref, got, ch)
                count += rows
            else:
                shifts = False  # a sample without channels: no shift (as when the rows could not stack)
            del ref, got
        shift = None
        if shifts and acc is not None:
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            n_out = acc.shape[0]
            ok_bias = bias is None or (_const(bias) and bias.const_value.numpy().reshape(-1).size == n_out)
            if count >= 64 and ok_bias and (node.op_type != "Gemm" or bias is not None):
                shift = (acc / count).astype(np.float32)  # enough positions per channel for a stable mean
        return worst, shift

    @staticmethod
    def _correct_bias(node: ir.Node, shift: np.ndarray, taken: set[str]) -> None:
        """Input 2 (bias) of ``node`` <- a new initializer ``bias + shift`` (created for a Conv
        without bias); the old bias, if shared, is left to its other readers."""
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        b = bias.const_value.numpy().astype(np.float32) if bias is not None else np.zeros_like(shift)
        new = (b.reshape(-1) + shift).reshape(b.shape).astype(np.float32)
        v = add_initializer(node.graph, new, f"{bias.name if bias is not None else node.name}_corrected", taken)
        if bias is not None:
            node.replace_input_with(2, v)
        else:
            node.resize_inputs(3)
            node.replace_input_with(2, v)

    # -- rewrite -----------------------------------------------------------------------
    @staticmethod
    def _rewrite(node, i, q, scale, taken, cache) -> None:
        """``node.inputs[i]`` <- ``Mul(Cast(q, to=FLOAT), scale)``, built once per weight and graph."""
        wv = node.inputs[i]
        graph = node.graph
        key = (id(wv), id(graph))
        if key not in cache:
            # initializers in the graph of the nodes reading them (ORT folds a node only when its
            # inputs are constants it can see; a skipped branch then costs nothing)
            q_v = add_initializer(graph, q, f"{wv.name}_int8", taken)
            s_v = add_initializer(graph, scale, f"{wv.name}_int8_scale", taken)
            f_v = ir.Value(name=unique_name(f"{wv.name}_int8_cast", taken), type=ir.TensorType(FLOAT),
                           shape=ir.Shape(q.shape))
            out = ir.Value(name=unique_name(f"{wv.name}_dequantized", taken), type=ir.TensorType(FLOAT),
                           shape=ir.Shape(q.shape))
            graph.append(ir.Node("", "Cast", [q_v], attributes=[ir.AttrInt64("to", int(FLOAT))], outputs=[f_v],
                                 name=unique_name(f"{wv.name}_int8_Cast", taken)))
            graph.append(ir.Node("", "Mul", [f_v, s_v], outputs=[out], name=unique_name(f"{wv.name}_int8_Mul", taken)))
            cache[key] = (out, q.nbytes + scale.nbytes)
        node.replace_input_with(i, cache[key][0])


def _check_key(node: ir.Node) -> tuple:
    """What a weight-only node's one-node check depends on: its name, op type and inputs' names
    (the weights are the stage's start's, shared by every fallback round)."""
    return (node.name, node.op_type, tuple(v.name if v is not None else None for v in node.inputs))
