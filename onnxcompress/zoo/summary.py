"""The numbers a zoo row keeps out of one ``optimize`` report."""

from __future__ import annotations

import math
from typing import Any


def _num(x):
    """JSON-safe float (reports write inf/nan as strings); ``None`` when not a number."""
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def summarize_report(rep: dict) -> dict[str, Any]:
    """Size, nodes, fidelity (worst over outputs), accuracy, latency, quantized/skipped nodes,
    reverted passes and notes out of an ``optimize`` report."""
    before, after = rep.get("before", {}) or {}, rep.get("after", {}) or {}
    fb = before.get("file_bytes") or before.get("size_bytes")
    fa = after.get("file_bytes") or after.get("size_bytes")
    row: dict[str, Any] = {
        "bytes_before": fb, "bytes_after": fa, "size_ratio": (fb / fa if fb and fa else None),
        "compressed_bytes_before": before.get("compressed_bytes"), "compressed_bytes_after": after.get("compressed_bytes"),
        "nodes_before": before.get("n_nodes"), "nodes_after": after.get("n_nodes"),
        "sparsity_pct_after": after.get("sparsity_pct"),
        # gates the recipe set and that held: "ok" means judged good, not only written
        # "gates": the recipe's gates judged it; "floor": only the default floor of int8 models did
        "gated": ("degraded" if any(g.get("floor") and not g.get("passed") for g in rep.get("gates") or [])
                  else "gates" if any(not g.get("floor") for g in rep.get("gates") or [])
                  else "floor" if rep.get("gates") else False),
    }
    val = (rep.get("validation") or [{}])[0]
    outs = val.get("outputs", []) or []
    rel = [v for v in (_num(o.get("max_rel_err")) for o in outs) if v is not None]
    cos = [v for v in (_num(o.get("cosine")) for o in outs) if v is not None]
    sqnr = [v for v in (_num(o.get("sqnr_db")) for o in outs) if v is not None]
    top1 = [o["top1_agreement"] for o in outs if o.get("top1_agreement") is not None]
    lr, lc = _num(val.get("latency_ms_reference")), _num(val.get("latency_ms_candidate"))
    row.update(
        provider=val.get("provider"), n_samples=val.get("n_samples"),
        max_rel_err=max(rel) if rel else None, min_cosine=min(cos) if cos else None,
        min_sqnr_db=min(sqnr) if sqnr else None, top1_agreement=min(top1) if top1 else None,
        accuracy_reference=val.get("accuracy_reference"), accuracy_candidate=val.get("accuracy_candidate"),
        latency_ms_before=lr, latency_ms_after=lc, speedup=(lr / lc if lr and lc else None),
    )
    n_q, skipped, reverted = 0, 0, []
    for p in rep.get("passes", []) or []:
        if p.get("name", "").startswith("quantize"):
            n_q += int((p.get("counts") or {}).get("nodes_quantized", 0) or 0)
            skipped += len(p.get("skipped") or [])
        if p.get("reverted"):
            reverted.append(p["name"])
    row.update(nodes_quantized=n_q, nodes_skipped=skipped, reverted=reverted,
               notes=list(rep.get("notes", []) or []), optimize_seconds=rep.get("seconds"))
    return row
