"""Transformer fusions: BERT-style self-attention -> ``com.microsoft.Attention``.

ONNX Runtime's CPU provider fuses BERT attention itself only for the mask patterns its
optimizer knows; exports with newer mask code (e.g. transformers' ``sdpa_mask`` built from
``Range``/``GreaterOrEqual``/``And``/``Where``, as in all-MiniLM-L6-v2 exported with
PyTorch 2.x) are left as ~20 small nodes per layer. This pass matches the unfused block::

    q = MatMul(x, Wq) [+ bq]   k = MatMul(x, Wk) [+ bk]   v = MatMul(x, Wv) [+ bv]
    Qh = Transpose(Reshape(q, [B, S, N, H]), perm=[0, 2, 1, 3])   [* cq]
    Kt = Transpose(Reshape(k, [B, S, N, H]), perm=[0, 2, 3, 1])   [* ck]
    Vh = Transpose(Reshape(v, [B, S, N, H]), perm=[0, 2, 1, 3])
    P  = Softmax(MatMul(Qh, Kt) [* c | / c] [+ mask], axis=-1)
    y  = Reshape(Transpose(MatMul(P, Vh), perm=[0, 2, 1, 3]), [B, S, N*H])

and replaces it by one ``com.microsoft.Attention`` node (ORT contrib op, opset 1; spec:
onnxruntime docs/ContribOperators.md#com.microsoft.Attention)::

    y = Attention(x [B, S, D] float32, W = [Wq | Wk | Wv] [D, 3*N*H], b = [bq | bk | bv] [3*N*H],
                  mask_index = Cast(attention_mask, int32) [B, S] (1 = attend, 0 = masked),
                  num_heads=N, scale=c*cq*ck)

The additive mask is accepted only when it is *proved* to be a key-padding mask of one
rank-2 graph input: the sub-graph that computes it is run in ONNX Runtime on probe inputs
(batch 2, length 6, with padding and holes) and must give ~0 where the input is > 0 and
<= -1e4 where it is 0, the same for every query position (ORT's Attention adds -10000, its
``mask_filter_value`` default; both underflow to 0 after softmax). Blocks that do not match
(other reshapes, rotary embeddings, a mask of another kind, x not of rank 3) are left as
they are and named in the report. The pass is ``checked``: the runner reverts it if the
model's outputs move by more than 1e-4 relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx import helper

from ..irutil import add_initializer, all_value_names, unique_name
from ..params import Param
from .base import CompressionPass
from .fusion import infer_shapes

MS_DOMAIN = "com.microsoft"
#: masked logits must be at least this negative (ORT's Attention uses -10000)
MASK_MIN = -1e4
PROBE_B, PROBE_S = 2, 6


def _prod(v: ir.Value | None, op: str | tuple[str, ...]) -> ir.Node | None:
    """The producer of ``v`` if it is a default-domain node of type ``op``."""
    if v is None:
        return None
    p = v.producer()
    ops = (op,) if isinstance(op, str) else op
    if p is None or p.domain not in ("", "ai.onnx") or p.op_type not in ops:
        return None
    return p


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    return v.const_value.numpy()


def _scalar(v: ir.Value | None) -> float | None:
    c = _const(v)
    if c is None or c.size != 1 or c.dtype.kind != "f":
        return None
    return float(c.reshape(()))


def _perm(node: ir.Node) -> list[int] | None:
    a = node.attributes.get("perm")
    return None if a is None else list(a.value)


def _single_use(v: ir.Value) -> bool:
    return len(v.uses()) == 1 and not v.is_graph_output()


def _head_size(reshape: ir.Node) -> int | None:
    """Last dimension of a Reshape's target shape when it is a constant (directly or as the
    last operand of a ``Concat``), else ``None``."""
    shp = reshape.inputs[1]
    c = _const(shp)
    if c is not None:
        return int(c.reshape(-1)[-1]) if c.size and int(c.reshape(-1)[-1]) > 0 else None
    cat = _prod(shp, "Concat")
    if cat is not None and cat.inputs:
        last = _const(cat.inputs[-1])
        if last is not None and last.size >= 1 and int(last.reshape(-1)[-1]) > 0:
            return int(last.reshape(-1)[-1])
    return None


def _is_scores(v: ir.Value | None) -> bool:
    """``v`` is ``MatMul(Q, K^T)``, optionally ``Mul``/``Div`` by a scalar constant."""
    p = _prod(v, ("Mul", "Div"))
    if p is not None:
        if _scalar(p.inputs[1]) is not None:
            v = p.inputs[0]
        elif p.op_type == "Mul" and _scalar(p.inputs[0]) is not None:
            v = p.inputs[1]
        else:
            return False
    return _prod(v, "MatMul") is not None


class _Fail(Exception):
    """A candidate block does not match; the message says why."""


FUSE_ATTENTION = Param("attention", True, "Fuse BERT-style self-attention into com.microsoft.Attention. The "
                       "planner turns it off in the fuse stage before a distill stage (PyTorch cannot train that "
                       "op) and fuses after distillation instead.", kind="bool")


@dataclass
class FuseConfig:
    """The ``fuse`` stage's one knob (its other rewrites are exact and always run)."""

    attention: bool = FUSE_ATTENTION.field()


class AttentionFusionPass(CompressionPass):
    """Fuse unfused BERT self-attention into ``com.microsoft.Attention`` (see module docstring).

    Report counts: ``attention_fused`` (number of blocks), ``mask_input`` (the graph input
    used as ``mask_index``, or ``None``). Every Softmax that looks like attention but does not
    match is named in ``skipped`` with the reason.
    """

    name = "fuse-attention"
    needs = (frozenset({"Softmax"}),)
    checked = True

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        infer_shapes(model)
        taken = all_value_names(model)
        blocks = []
        for sm in list(graph):
            if sm.op_type != "Softmax" or sm.domain not in ("", "ai.onnx"):
                continue
            if not any(u.node.op_type == "MatMul" and u.idx == 0 for u in sm.outputs[0].uses()):
                continue  # not attention (e.g. a classifier's Softmax): nothing to warn about
            try:
                blocks.append(self._match(sm))
            except _Fail as exc:
                self.report.skip(sm.name, f"attention not fused: {exc}")
        if not blocks:
            self.report.counts["attention_fused"] = 0
            return False
        masks = {b["mask"] for b in blocks if b["mask"] is not None}
        mask_inputs: dict[ir.Value, ir.Value | None] = self._prove_masks(model, masks) if masks else {}
        mask_index: dict[str, ir.Value] = {}
        fused = 0
        for b in blocks:
            m_in = None
            if b["mask"] is not None:
                m_in = mask_inputs.get(b["mask"])
                if m_in is None:
                    self.report.skip(b["softmax"].name, "attention not fused: the additive mask is not a key-padding "
                                                        "mask of one rank-2 graph input (checked on probe inputs)")
                    continue
            self._rewrite(graph, b, m_in, mask_index, taken)
            fused += 1
        if fused:
            common.RemoveUnusedNodesPass()(model)
            graph.sort()
            if MS_DOMAIN not in model.opset_imports:
                model.opset_imports[MS_DOMAIN] = 1
        self.report.counts["attention_fused"] = fused
        self.report.counts["mask_input"] = sorted(mask_index) or None
        return bool(fused)

    # ------------------------------------------------------------------ matching
    def _match(self, sm: ir.Node) -> dict:
        axis = sm.attributes.get("axis")
        axis = -1 if axis is None else axis.value
        if axis not in (-1, 3):
            raise _Fail(f"Softmax axis {axis} is not the last of 4")
        v = sm.inputs[0]
        mask = None
        scale = 1.0
        add = _prod(v, "Add")
        if add is not None:
            if not _single_use(v):
                raise _Fail("scores are used elsewhere")
            a, b = add.inputs
            if _is_scores(a) and not _is_scores(b):
                v, mask = a, b
            elif _is_scores(b) and not _is_scores(a):
                v, mask = b, a
            else:
                raise _Fail("cannot tell the scores from the mask in the Add before Softmax")
            if _const(mask) is not None:
                if np.all(_const(mask) == 0):
                    mask = None
                else:
                    raise _Fail("constant additive bias before Softmax (not a padding mask)")
        sc = _prod(v, ("Mul", "Div"))
        if sc is not None:
            if not _single_use(v):
                raise _Fail("scores are used elsewhere")
            c = _scalar(sc.inputs[1])
            if c is None and sc.op_type == "Mul":
                c, other = _scalar(sc.inputs[0]), sc.inputs[1]
            else:
                other = sc.inputs[0]
            if c is None or c == 0:
                raise _Fail(f"{sc.op_type} of the scores by a non-constant")
            scale *= c if sc.op_type == "Mul" else 1.0 / c
            v = other
        qk = _prod(v, "MatMul")
        if qk is None or not _single_use(v):
            raise _Fail("no MatMul(Q, K^T) before Softmax")
        q_side, s_q = self._scaled(qk.inputs[0])
        k_side, s_k = self._scaled(qk.inputs[1])
        scale *= s_q * s_k
        q, hq, rq = self._head_split(q_side, [0, 2, 1, 3], "Q")
        k, hk, rk = self._head_split(k_side, [0, 2, 3, 1], "K")
        # P @ V
        p_out = sm.outputs[0]
        if not _single_use(p_out):
            raise _Fail("attention probabilities are used elsewhere")
        pv = p_out.uses()[0].node
        if pv.op_type != "MatMul" or pv.inputs[0] is not p_out:
            raise _Fail("Softmax output does not feed MatMul(P, V)")
        v_, hv, rv = self._head_split(pv.inputs[1], [0, 2, 1, 3], "V")
        if not (hq == hk == hv):
            raise _Fail(f"head sizes differ (Q {hq}, K {hk}, V {hv})")
        ctx = pv.outputs[0]
        if not _single_use(ctx):
            raise _Fail("attention context is used elsewhere")
        tr = ctx.uses()[0].node
        if tr.op_type != "Transpose" or _perm(tr) != [0, 2, 1, 3] or not _single_use(tr.outputs[0]):
            raise _Fail("context is not transposed back with perm [0, 2, 1, 3]")
        rs = tr.outputs[0].uses()[0].node
        if rs.op_type != "Reshape":
            raise _Fail("context is not reshaped back to [B, S, D]")
        projs = []
        for t, what in ((q, "Q"), (k, "K"), (v_, "V")):
            projs.append(self._projection(t, what))
        x = projs[0][0]
        if any(p[0] is not x for p in projs):
            raise _Fail("Q, K and V are not projections of the same tensor")
        if x.shape is None or len(x.shape) != 3:
            raise _Fail("the attention input is not known to be of rank 3 [B, S, D]")
        d_out = projs[0][1].shape[1]
        if any(p[1].shape[1] != d_out for p in projs) or d_out % hq:
            raise _Fail(f"projection widths {[p[1].shape[1] for p in projs]} do not split into heads of {hq}")
        fin = rs.outputs[0]
        c = _const(rs.inputs[1])
        if c is not None and c.size and int(c.reshape(-1)[-1]) not in (-1, d_out):
            raise _Fail(f"context reshaped to last dim {int(c.reshape(-1)[-1])}, not {d_out}")
        return {"softmax": sm, "x": x, "w": [p[1] for p in projs], "b": [p[2] for p in projs],
                "num_heads": d_out // hq, "scale": scale, "mask": mask, "out": fin, "out_node": rs}

    @staticmethod
    def _scaled(v: ir.Value) -> tuple[ir.Value, float]:
        """Strip an optional ``Mul``/``Div`` by a scalar constant from Q or K^T."""
        p = _prod(v, ("Mul", "Div"))
        if p is None or not _single_use(v):
            return v, 1.0
        c = _scalar(p.inputs[1])
        other = p.inputs[0]
        if c is None and p.op_type == "Mul":
            c, other = _scalar(p.inputs[0]), p.inputs[1]
        if c is None or c == 0:
            return v, 1.0
        return other, (c if p.op_type == "Mul" else 1.0 / c)

    @staticmethod
    def _head_split(v: ir.Value, perm: list[int], what: str) -> tuple[ir.Value, int, ir.Node]:
        """``Transpose(Reshape(t, [B, S, N, H]), perm)`` -> (t, H, reshape node)."""
        tr = _prod(v, "Transpose")
        if tr is None or _perm(tr) != perm or not _single_use(v):
            raise _Fail(f"{what} is not Transpose(perm={perm}) of a head split")
        rs = _prod(tr.inputs[0], "Reshape")
        if rs is None or not _single_use(tr.inputs[0]):
            raise _Fail(f"{what} head split is not a Reshape")
        h = _head_size(rs)
        if h is None:
            raise _Fail(f"{what} head size is not a constant in the Reshape target")
        if not _single_use(rs.inputs[0]):
            raise _Fail(f"{what} projection is used elsewhere")
        return rs.inputs[0], h, rs

    @staticmethod
    def _projection(t: ir.Value, what: str) -> tuple[ir.Value, np.ndarray, np.ndarray]:
        """``t = MatMul(x, W) [+ b]`` with constant W [D, n] and b [n] -> (x, W, b)."""
        bias = None
        add = _prod(t, "Add")
        if add is not None:
            a, b = add.inputs
            if _const(b) is not None and _prod(a, "MatMul") is not None:
                mm_out, bias = a, _const(b)
            elif _const(a) is not None and _prod(b, "MatMul") is not None:
                mm_out, bias = b, _const(a)
            else:
                raise _Fail(f"{what} projection: Add without a constant bias")
            if not _single_use(mm_out):
                raise _Fail(f"{what} projection MatMul output is used elsewhere")
            t = mm_out
        mm = _prod(t, "MatMul")
        if mm is None:
            raise _Fail(f"{what} is not a MatMul projection")
        w = _const(mm.inputs[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            raise _Fail(f"{what} projection weight is not a constant float32 matrix")
        if bias is None:
            bias = np.zeros(w.shape[1], np.float32)
        bias = np.asarray(bias, np.float32).reshape(-1)
        if bias.size != w.shape[1]:
            raise _Fail(f"{what} bias of {bias.size} values for {w.shape[1]} columns")
        return mm.inputs[0], w, bias

    # ------------------------------------------------------------------ mask proof
    def _prove_masks(self, model: ir.Model, masks: set[ir.Value]) -> dict[ir.Value, ir.Value | None]:
        """For each additive mask value, the rank-2 graph input it is a key-padding mask of
        (or ``None``); decided by running the mask's sub-graph on probe inputs."""
        from ..runtime import make_session

        graph = model.graph
        needed: set[ir.Node] = set()
        inputs: set[ir.Value] = set()
        stack = list(masks)
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            p = v.producer()
            if p is None:
                if v.is_graph_input():
                    inputs.add(v)
                continue
            needed.add(p)
            stack.extend(i for i in p.inputs if i is not None)
        nodes = [n for n in graph if n in needed]
        inits = {}
        for n in nodes:
            for i in n.inputs:
                if i is not None and i.const_value is not None and i.producer() is None and not i.is_graph_input():
                    inits[i.name] = ir.serde.serialize_tensor(i.const_value)
                    inits[i.name].name = i.name
        ordered = [v for v in graph.inputs if v in inputs]
        masks_l = sorted(masks, key=lambda m: m.name)
        g = helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "mask_probe",
            [ir.serde.serialize_value(v) for v in ordered],
            [helper.make_tensor_value_info(m.name, onnx.TensorProto.FLOAT, None) for m in masks_l],
            list(inits.values()))
        pm = helper.make_model(g, opset_imports=[helper.make_opsetid(d or "", v) for d, v in model.opset_imports.items()])
        pm.ir_version = min(model.ir_version, 10)
        try:
            sess = make_session(pm.SerializeToString(), optimize=False)
        except Exception as exc:  # noqa: BLE001 - unknown ops in the mask: no proof
            self.report.counts["mask_probe_error"] = str(exc).splitlines()[0][:200]
            return {m: None for m in masks}
        patterns = [np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
                    np.array([[0, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 0]])]
        result: dict[ir.Value, ir.Value | None] = {m: None for m in masks}
        for cand in ordered:
            if cand.shape is None or len(cand.shape) != 2:
                continue
            ok = {m: True for m in masks}
            for pat in patterns:
                feeds = {}
                for v in ordered:
                    dt = onnx.helper.tensor_dtype_to_np_dtype(v.dtype.value) if v.dtype is not None else np.float32
                    shape = [PROBE_B, PROBE_S] if len(v.shape or []) == 2 else [
                        d if isinstance(d, int) else (PROBE_B if i == 0 else PROBE_S) for i, d in enumerate(v.shape or [])]
                    feeds[v.name] = pat.astype(dt) if v is cand else np.zeros(shape, dt)
                try:
                    outs = sess.run([m.name for m in masks_l], feeds)
                except Exception:  # noqa: BLE001
                    ok = {m: False for m in masks}
                    break
                for m, val in zip(masks_l, outs):
                    ok[m] = ok[m] and _is_padding_mask(np.asarray(val), pat)
            for m in masks:
                if ok[m] and result[m] is None:
                    result[m] = cand
        return result

    # ------------------------------------------------------------------ rewrite
    def _rewrite(self, graph: ir.Graph, b: dict, m_in: ir.Value | None, mask_index: dict, taken: set[str]) -> None:
        base = b["softmax"].name.rsplit("/", 1)[0] or b["softmax"].name
        w = np.concatenate(b["w"], axis=1).astype(np.float32)
        bias = np.concatenate(b["b"]).astype(np.float32)
        w_v = add_initializer(graph, w, f"{base}/qkv_weight", taken)
        b_v = add_initializer(graph, bias, f"{base}/qkv_bias", taken)
        ins = [b["x"], w_v, b_v]
        if m_in is not None:
            if m_in.name not in mask_index:
                out = ir.Value(name=unique_name(f"{m_in.name}_int32", taken))
                graph.append(ir.Node("", "Cast", [m_in], attributes=[ir.AttrInt64("to", onnx.TensorProto.INT32)],
                                     outputs=[out], name=unique_name(f"{m_in.name}_Cast_int32", taken)))
                mask_index[m_in.name] = out
            ins.append(mask_index[m_in.name])
        y = ir.Value(name=unique_name(f"{base}/attention_out", taken))
        node = ir.Node(MS_DOMAIN, "Attention", ins, attributes=[
            ir.AttrInt64("num_heads", int(b["num_heads"])), ir.AttrFloat32("scale", float(b["scale"]))],
            outputs=[y], name=unique_name(f"{base}/Attention", taken))
        graph.append(node)
        old = b["out"]
        y.type, y.shape = old.type, old.shape
        name = old.name
        old.replace_all_uses_with(y, replace_graph_outputs=True)
        old.name = unique_name(f"{name}_unfused", taken)
        y.name = name


def _is_padding_mask(m: np.ndarray, pat: np.ndarray) -> bool:
    """Whether additive mask ``m`` (broadcastable to [B, heads, S, S]) is ~0 where ``pat``
    [B, S] > 0 and <= MASK_MIN where it is 0, identically for every query position."""
    if m.dtype.kind != "f" or m.ndim > 4:
        return False
    b, s = pat.shape
    m4 = m.reshape((1,) * (4 - m.ndim) + m.shape)
    try:
        full = np.broadcast_to(m4, np.broadcast_shapes(m4.shape, (b, 1, s, s)))
    except ValueError:
        return False
    if full.shape[0] != b or full.shape[-2:] != (s, s):
        return False
    keep = np.broadcast_to((pat > 0)[:, None, None, :], full.shape)
    return bool(np.all(np.abs(full[keep]) <= 1e-6) and np.all(full[~keep] <= MASK_MIN))
