"""N:M semi-structured sparsity (2:4 by default) and sparse-storage measurement.

N:M: in every run of M consecutive weights along the reduction (input-channel) axis, only
the N largest magnitudes are kept (Mishra et al. 2021, "Accelerating Sparse Deep Neural
Networks"). The layout is the one NVIDIA's sparse tensor cores (Ampere and later; TensorRT
with ``--sparsity=enable``, cuSPARSELt) accelerate: for Conv ``[O, I, kh, kw]`` the runs are
along ``I`` for each ``(o, kh, kw)``; for Gemm/MatMul along ``K``. ONNX Runtime's CPU kernels are
dense, so the file and latency on CPU do not change; the report says so. Every pruned tensor's
mask is verified after writing.

:func:`storage_report` measures what actually shrinks a file with unstructured zeros: the
dense file compressed (zlib), or ONNX ``sparse_initializer`` (COO, int64 indices; ONNX Runtime
densifies them at load), and says which is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import zlib
from typing import Any

import numpy as np
import onnx_ir as ir

from ..params import Param
from .base import CompressionPass
from .prune import MIN_SIZE

NM_OPS = ("Conv", "Gemm", "MatMul")


def _to_runs(arr: np.ndarray, node: ir.Node) -> tuple[np.ndarray, callable]:
    """View ``arr`` as [rows, K] with K the reduction axis last; returns (2-D copy, inverse)."""
    op = node.op_type
    if op == "Conv":
        perm = (0, *range(2, arr.ndim), 1)  # [O, kh, kw, I]
        t = np.transpose(arr, perm)
        shape = t.shape
        inv_perm = np.argsort(perm)
        return t.reshape(-1, shape[-1]).copy(), lambda x: np.transpose(x.reshape(shape), inv_perm)
    trans_b = op == "Gemm" and any(a.name == "transB" and a.value for a in node.attributes.values())
    if trans_b:  # [N, K]
        return arr.copy(), lambda x: x
    return arr.T.copy(), lambda x: x.T  # [K, N] -> [N, K]


def nm_mask(arr2d: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep mask of the N largest |w| in every run of M along the last axis (K % M == 0)."""
    rows, k = arr2d.shape
    g = np.abs(arr2d).reshape(rows, k // m, m)
    order = np.argsort(-g, axis=-1, kind="stable")
    mask = np.zeros_like(g, bool)
    np.put_along_axis(mask, order[..., :n], True, axis=-1)
    return mask.reshape(rows, k)


def verify_nm(arr: np.ndarray, node: ir.Node, n: int, m: int) -> bool:
    """Whether ``arr`` (a weight of ``node``) has at most N non-zeros in every run of M along K."""
    a2, _ = _to_runs(arr, node)
    if a2.shape[1] % m:
        return False
    nz = (a2.reshape(a2.shape[0], -1, m) != 0).sum(-1)
    return bool(np.all(nz <= n))


def _pattern_error(v: str) -> str | None:
    nm = v.split(":")
    if len(nm) != 2 or not all(x.isdigit() for x in nm) or not 0 < int(nm[0]) < int(nm[1]):
        return "must look like 2:4 (0 < N < M)"
    return None


PATTERN = Param("pattern", "2:4", "N:M pattern: at most N non-zeros in every M weights along the reduction axis.",
                kind="str", flag="--prune-nm", validator=_pattern_error, search=("2:4", "1:4", "2:8"))


@dataclass
class NMPruneConfig:
    pattern: str = PATTERN.field()
    min_size: int = MIN_SIZE.field()

    @property
    def n_m(self) -> tuple[int, int]:
        n, m = self.pattern.split(":")
        return int(n), int(m)


class NMPrunePass(CompressionPass):
    """N:M sparsity for Conv/Gemm/MatMul constant weights.

    Parameters: :class:`NMPruneConfig`; nodes in ``context.scope`` are left dense. Depthwise/grouped Convs with fewer than M input channels per group and
    weights whose K is not a multiple of M are skipped and named.
    """

    name = "prune-nm"
    checked = False
    Config = NMPruneConfig

    def apply(self, model: ir.Model) -> bool:
        n, m = self.config.n_m
        min_size = self.config.min_size
        done: dict[str, bool] = {}
        total = zeros = zeroed = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type not in NM_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            if w is None or w.const_value is None or w.is_graph_input():
                continue
            if self.context.scope.excludes(node):
                self.report.skip(node.name, "excluded by the user")
                continue
            arr = w.const_value.numpy()
            if arr.dtype.kind != "f" or arr.size < min_size:
                continue
            if node.op_type == "MatMul" and arr.ndim != 2:
                self.report.skip(node.name, f"MatMul weight of rank {arr.ndim}; only 2-D weights")
                continue
            if w.name in done:
                continue
            if len(w.uses()) > 1:
                self.report.skip(node.name, f"weight '{w.name}' is shared by several nodes")
                continue
            a2, inv = _to_runs(arr, node)
            if a2.shape[1] % m:
                self.report.skip(node.name, f"reduction axis of {a2.shape[1]} is not a multiple of {m}")
                continue
            mask = nm_mask(a2, n, m)
            new = inv(np.where(mask, a2, 0).astype(arr.dtype))
            new = np.ascontiguousarray(new)
            zeroed += int(np.count_nonzero(arr)) - int(np.count_nonzero(new))
            w.const_value = ir.tensor(new, name=w.name)
            ok = verify_nm(new, node, n, m)
            if not ok:  # pragma: no cover - would be a bug
                raise RuntimeError(f"N:M mask check failed on '{node.name}'")
            done[w.name] = ok
            total += new.size
            zeros += int(np.sum(new == 0))
        self.report.counts.update(
            pattern=f"{n}:{m}", tensors_pruned=len(done), masks_verified=all(done.values()) if done else False,
            achieved_sparsity=round(zeros / max(total, 1), 4),
            note=(f"{n}:{m} sparsity along the input-channel axis: accelerated by sparse tensor cores "
                  "(TensorRT --sparsity=enable on Ampere+, cuSPARSELt); ONNX Runtime CPU kernels are dense, so "
                  "CPU latency and raw file size do not change (the compressed file shrinks)"), weights_zeroed=zeroed)
        # changed only where a weight became zero (weights already in the pattern change no answer)
        return zeroed > 0


def storage_report(model: ir.Model | bytes, *, min_sparsity: float = 0.3) -> dict[str, Any]:
    """Measure file sizes of the dense model and of a ``sparse_initializer`` variant.

    The sparse variant stores float initializers with at least ``min_sparsity`` zeros as COO
    ``sparse_initializer`` (values + int64 flat indices, as the ONNX spec and ONNX Runtime
    expect). Both are compressed with zlib (level 6). ``choice`` names the smallest compressed
    form that ONNX Runtime loads. Measurement only: the model written stays dense.
    """
    import onnx
    from onnx import helper, numpy_helper

    raw = model if isinstance(model, bytes) else ir.to_proto(model).SerializeToString()
    proto = onnx.ModelProto()
    proto.ParseFromString(raw)
    keep, sparse = [], []
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size >= 64 and np.mean(arr == 0) >= min_sparsity:
            flat = arr.ravel()
            idx = np.flatnonzero(flat).astype(np.int64)
            values = numpy_helper.from_array(flat[idx], init.name)
            indices = numpy_helper.from_array(idx, "")
            sparse.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
        else:
            keep.append(init)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    proto.graph.sparse_initializer.extend(sparse)
    sp = proto.SerializeToString()
    loads = True
    try:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(sp, so, providers=["CPUExecutionProvider"])
    except Exception:
        loads = False
    out = {"dense_bytes": len(raw), "dense_zlib_bytes": len(zlib.compress(raw, 6)),
           "sparse_initializer_bytes": len(sp), "sparse_initializer_zlib_bytes": len(zlib.compress(sp, 6)),
           "sparse_tensors": len(sparse), "sparse_initializer_loads_in_ort": loads}
    best_sparse = loads and sparse and out["sparse_initializer_zlib_bytes"] < out["dense_zlib_bytes"]
    out["choice"] = "sparse_initializer" if best_sparse else "dense zeros + compressed archive"
    return out
