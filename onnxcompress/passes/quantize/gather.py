"""Weight-only int8 for embedding tables read by ``Gather``.

A ``Gather(table, ids)`` on a constant float table of shape ``[V, D]`` (``axis=0``), such
as a transformer's word embeddings, is stored as int8 with one symmetric scale per row:

    Gather(Wq, ids) -> Cast(float) -> Mul(Unsqueeze(Gather(scale, ids), -1))

Only the gathered rows are dequantized at run time, so the cost is a few element-wise ops
on the gathered slice, and the table shrinks 4x. Rows are independent, so per-row scales
keep rare tokens with small norms accurate. Tables whose int8 reconstruction SQNR is below
``min_weight_sqnr_db`` (default 30 dB) are left in float and named in the report.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ...irutil import add_initializer, all_value_names, replace_node, unique_name
from ..base import CompressionPass
from . import params
from .config import QuantizeConfig
from .static import _attr, _is_const

MIN_ELEMENTS = 4096


class GatherQuantizePass(CompressionPass):
    """Per-row int8 embedding tables (see module docstring)."""

    name = "quantize-gather"
    needs = (frozenset({"Gather"}),)
    checked = False
    Config = QuantizeConfig

    def apply(self, model: ir.Model) -> bool:
        min_sqnr = self.config.min_weight_sqnr_db
        excl, excl_ops = self.context.scope.nodes, self.context.scope.op_types
        taken = all_value_names(model)
        graph = model.graph
        done = []
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            if node.name in excl or "Gather" in excl_ops:
                self.report.skip(node.name, "excluded by the user")
                continue
            table = node.inputs[0]
            if not _is_const(table) or _attr(node, "axis", 0) != 0:
                continue
            w = table.const_value.numpy()
            if w.dtype != np.float32 or w.ndim != 2 or w.size < MIN_ELEMENTS:
                continue
            scale = params.weight_params(w, 0, 127)
            q = params.quantize_weight(w, scale, 0, 127)
            recon = q.astype(np.float32) * scale[:, None]
            noise = float(np.sum((w.astype(np.float64) - recon) ** 2))
            sqnr = np.inf if noise == 0 else 10 * np.log10(float(np.sum(w.astype(np.float64) ** 2)) / noise)
            if sqnr < min_sqnr:
                self.report.skip(node.name, f"embedding table '{table.name}' int8 SQNR {sqnr:.1f} dB < {min_sqnr:g} dB; kept in float")
                continue
            ids = node.inputs[1]
            base = node.name or table.name
            q_v = add_initializer(graph, q, f"{table.name}_q", taken)
            s_v = add_initializer(graph, scale.astype(np.float32), f"{table.name}_row_s", taken)
            axes = add_initializer(graph, np.array([-1], np.int64), f"{base}_axes", taken)
            gq = ir.Value(name=unique_name(f"{base}_q", taken))
            gs = ir.Value(name=unique_name(f"{base}_s", taken))
            gf = ir.Value(name=unique_name(f"{base}_f", taken))
            gsu = ir.Value(name=unique_name(f"{base}_su", taken))
            mul = ir.Node("", "Mul", [gf, gsu], name=unique_name(f"{base}_Mul", taken))
            nodes = [
                ir.Node("", "Gather", [q_v, ids], attributes=[ir.AttrInt64("axis", 0)], outputs=[gq], name=unique_name(f"{base}_Gather_q", taken)),
                ir.Node("", "Gather", [s_v, ids], attributes=[ir.AttrInt64("axis", 0)], outputs=[gs], name=unique_name(f"{base}_Gather_s", taken)),
                ir.Node("", "Cast", [gq], attributes=[ir.AttrInt64("to", onnx.TensorProto.FLOAT)], outputs=[gf], name=unique_name(f"{base}_Cast", taken)),
                ir.Node("", "Unsqueeze", [gs, axes], outputs=[gsu], name=unique_name(f"{base}_Unsqueeze", taken)),
                mul,
            ]
            graph.extend(nodes)
            replace_node(graph, node, mul.outputs[0])
            done.append({"node": node.name, "table": table.name, "shape": list(w.shape), "sqnr_db": round(float(sqnr), 1)})
        if done:
            graph.sort()
        self.report.counts["tables_quantized"] = done
        return bool(done)
