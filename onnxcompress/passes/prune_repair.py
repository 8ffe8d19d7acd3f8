"""Accuracy repair after channel pruning, without training.

For every consumer whose input channels were removed (Conv, Gemm, MatMul), its weights over
the kept input channels (and its bias) are re-fitted by least squares so that, on calibration
activations of the *unpruned* model, its output matches the unpruned output: the
reconstruction step of He et al. 2017 ("Channel Pruning for Accelerating Very Deep Neural
Networks") and ThiNet (Luo et al. 2017). The intercept column is the bias correction: the
constant that a removed channel used to contribute (its mean activation times its weights,
including what BN shift or bias passed on) moves into the bias. The fit is ridge-regularised
towards the pruned weights. Normal equations are accumulated sample by sample (bounded
memory); a consumer with too many input features gets the bias correction only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from ..irutil import all_value_names, attr as _attr


def fidelity(reference: ir.Model, candidate: ir.Model, samples: list[dict[str, np.ndarray]]) -> dict[str, float | None]:
    """Worst output metrics of ``candidate`` against ``reference`` (ORT, optimizations off)."""
    from ..runtime import make_session, run_samples
    from ..validate import output_metrics

    ref = run_samples(make_session(reference, optimize=False), samples)
    got = run_samples(make_session(candidate, optimize=False), samples)
    ms = [output_metrics(n, [r[n] for r in ref], [g[n] for g in got]) for n in ref[0]]
    agree = [m.top1_agreement for m in ms if m.top1_agreement is not None]
    return {"max_rel_err": round(max(m.max_rel_err for m in ms), 6), "cosine": round(min(m.cosine for m in ms), 6),
            "sqnr_db": round(float(min(m.sqnr_db for m in ms)), 3), "top1_agreement": min(agree) if agree else None}


def _patches(x: np.ndarray, node: ir.Node, kshape: tuple[int, int], n_rows: int, rng: np.random.Generator,
             out_hw: tuple[int, int]):
    """Random im2col rows of a 2-D Conv input ``x`` [N,C,H,W] -> ([P, C*kh*kw], (n, oh, ow) indices)."""
    kh, kw = kshape
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    sh, sw = list(_attr(node, "strides", [1, 1]))
    dh, dw = list(_attr(node, "dilations", [1, 1]))
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c = x.shape[:2]
    oh, ow = out_hw
    total = n * oh * ow
    p = min(n_rows, total)
    flat = rng.choice(total, p, replace=False) if p < total else np.arange(total)
    ni, rem = np.divmod(flat, oh * ow)
    hi, wi = np.divmod(rem, ow)
    cols = np.empty((p, c, kh, kw), np.float64)
    for a in range(kh):
        for b in range(kw):
            cols[:, :, a, b] = xp[ni, :, hi * sh + a * dh, wi * sw + b * dw]
    return cols.reshape(p, -1), (ni, hi, wi)


def repair(original: ir.Model, model: ir.Model, dep, removed: set[int], samples: list[dict[str, np.ndarray]], *,
           lam: float = 1e-3, max_features: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Re-fit every consumer of removed channels in ``model`` on activations of ``original``.

    Returns ``{"summary": {...}, "skipped": [(node, reason)], "layers": [...]}``.
    """
    from ..runtime import run_with_outputs

    uf = dep.uf
    rng = np.random.default_rng(seed)
    nodes = {n.name: n for n in model.graph}
    jobs = []
    skipped = []
    for node, x, t in dep.sinks:
        keep_in = np.array([uf.find(int(i)) not in removed for i in t.ids], bool)
        if keep_in.all():
            continue
        if node.name in dep.roots:
            keep_out = np.array([uf.find(int(i)) not in removed for i in dep.roots[node.name][1]], bool)
        else:
            keep_out = None
        cur = nodes.get(node.name)
        if cur is None:
            skipped.append((node.name, "node not found after pruning"))
            continue
        w = cur.inputs[1].const_value.numpy()
        if node.op_type == "Conv":
            if w.ndim != 4 or _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                skipped.append((node.name, "only 2-D Conv with explicit pads is re-fitted"))
                continue
            feats = int(np.prod(w.shape[1:])) + 1
        elif node.op_type == "Gemm":
            feats = (w.shape[1] if int(_attr(node, "transB", 0)) else w.shape[0]) + 1
        elif node.op_type == "MatMul":
            feats = w.shape[0]
        else:
            skipped.append((node.name, f"{node.op_type} consumers are not re-fitted"))
            continue
        jobs.append({"node": cur, "x": x.name, "y": node.outputs[0].name, "keep_in": keep_in, "keep_out": keep_out,
                     "feats": feats, "full": feats <= max_features, "G": None, "H": None, "sa": None, "sy": None,
                     "n": 0, "yy": 0.0, "axis": t.axis})
    if not jobs or not samples:
        return {"summary": {"layers_refit": 0, "layers_bias_only": 0}, "skipped": skipped, "layers": []}
    names = [j["x"] for j in jobs] + [j["y"] for j in jobs]
    for res in run_with_outputs(original, names, samples):
        for j in jobs:
            node = j["node"]
            x = np.asarray(res[j["x"]], np.float64)
            y = np.asarray(res[j["y"]], np.float64)
            target_rows = min(max(4 * j["feats"], 4096), 32768)
            per = max(1, math.ceil(target_rows / len(samples)))
            if node.op_type == "Conv":
                x = x[:, j["keep_in"]]
                kh, kw = node.inputs[1].const_value.shape[2:]
                a, (ni, hi, wi) = _patches(x, node, (kh, kw), per, rng, y.shape[2:])
                yr = y[ni, :, hi, wi]
                a = np.concatenate([a, np.ones((a.shape[0], 1))], 1)
            else:
                xr = x.reshape(-1, x.shape[-1])[:, j["keep_in"]]
                yr = y.reshape(-1, y.shape[-1])
                if xr.shape[0] > per:
                    idx = rng.choice(xr.shape[0], per, replace=False)
                    xr, yr = xr[idx], yr[idx]
                a = np.concatenate([xr, np.ones((xr.shape[0], 1))], 1) if node.op_type == "Gemm" else xr
            if j["keep_out"] is not None:
                yr = yr[:, j["keep_out"]]
            if j["full"]:
                j["G"] = (0 if j["G"] is None else j["G"]) + a.T @ a
                j["H"] = (0 if j["H"] is None else j["H"]) + a.T @ yr
            j["sa"] = (0 if j["sa"] is None else j["sa"]) + a.sum(0)
            j["sy"] = (0 if j["sy"] is None else j["sy"]) + yr.sum(0)
            j["yy"] += float(np.sum(yr ** 2))
            j["n"] += a.shape[0]
    taken = all_value_names(model)
    layers = []
    n_full = n_bias = 0
    for j in jobs:
        node = j["node"]
        m0 = _current_matrix(node)  # [F, O] in regression form
        if j["full"]:
            G, H = j["G"], j["H"]
            lam_abs = lam * float(np.trace(G)) / G.shape[0] + 1e-12
            A = G + lam_abs * np.eye(G.shape[0])
            try:
                m = np.linalg.solve(A, H + lam_abs * m0)
            except np.linalg.LinAlgError:
                m = np.linalg.lstsq(A, H + lam_abs * m0, rcond=None)[0]

            def err(mm):
                return float(np.trace(mm.T @ G @ mm) - 2 * np.trace(mm.T @ H) + j["yy"])

            e0, e1 = err(m0), err(m)
            if not np.all(np.isfinite(m)) or e1 > e0:
                skipped.append((node.name, "least-squares fit did not lower the error; kept as pruned"))
                continue
            n_full += 1
            layers.append({"node": node.name, "kind": "least-squares", "rel_err_before": round(math.sqrt(max(e0, 0) / max(j["yy"], 1e-30)), 5),
                           "rel_err_after": round(math.sqrt(max(e1, 0) / max(j["yy"], 1e-30)), 5), "rows": j["n"]})
        else:
            if node.op_type == "MatMul":
                skipped.append((node.name, f"{j['feats']} input features: too many to re-fit, and MatMul has no bias"))
                continue
            mean_a = j["sa"] / j["n"]
            mean_y = j["sy"] / j["n"]
            m = m0.copy()
            m[-1] = mean_y - mean_a[:-1] @ m0[:-1]
            n_bias += 1
            layers.append({"node": node.name, "kind": "bias-correction", "features": j["feats"]})
        _write_matrix(model, node, m, taken)
    return {"summary": {"layers_refit": n_full, "layers_bias_only": n_bias, "samples": len(samples)},
            "skipped": skipped, "layers": layers}


def _current_matrix(node: ir.Node) -> np.ndarray:
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    has_b = len(node.inputs) > 2 and node.inputs[2] is not None
    if node.op_type == "Conv":
        o = w.shape[0]
        b = node.inputs[2].const_value.numpy().astype(np.float64) if has_b else np.zeros(o)
        return np.concatenate([w.reshape(o, -1).T, b[None]], 0)
    if node.op_type == "Gemm":
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        weff = (w.T if int(_attr(node, "transB", 0)) else w) * alpha
        n = weff.shape[1]
        c = np.broadcast_to(node.inputs[2].const_value.numpy().astype(np.float64).reshape(-1), (n,)) * beta if has_b else np.zeros(n)
        return np.concatenate([weff, c[None]], 0)
    return w


def _write_matrix(model: ir.Model, node: ir.Node, m: np.ndarray, taken: set[str]) -> None:
    from ..irutil import set_input_array as _set_input_array

    graph = model.graph
    dtype = node.inputs[1].const_value.numpy().dtype
    w_old = node.inputs[1].const_value.numpy()
    if node.op_type == "Conv":
        o = w_old.shape[0]
        _set_input_array(graph, node, 1, m[:-1].T.reshape(w_old.shape).astype(dtype), taken)
        _set_bias(graph, node, m[-1].astype(dtype), taken)
    elif node.op_type == "Gemm":
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        weff = m[:-1] / alpha
        _set_input_array(graph, node, 1, (weff.T if int(_attr(node, "transB", 0)) else weff).astype(dtype), taken)
        if beta == 0.0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            beta = 1.0
        _set_bias(graph, node, (m[-1] / beta).astype(dtype), taken)
    else:
        _set_input_array(graph, node, 1, m.astype(dtype), taken)


def _set_bias(graph: ir.Graph, node: ir.Node, b: np.ndarray, taken: set[str]) -> None:
    from ..irutil import add_initializer
    from ..irutil import set_input_array as _set_input_array

    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _set_input_array(graph, node, 2, b, taken)
        return
    v = add_initializer(graph, b, f"{node.name}_bias", taken)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, v)
