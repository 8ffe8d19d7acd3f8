"""Opset upgrades that are checked, not trusted.

``onnx.version_converter`` turns opset-9 ``Upsample`` into a ``Resize`` that misses
``Upsample``'s asymmetric coordinate mapping (max error 1.25 on a 0-31 ramp) and may leave
an IR version too old for the new opset. :func:`upgrade_opset` fixes both: it converts,
sets ``coordinate_transformation_mode=asymmetric`` (and ``nearest_mode=floor`` for nearest)
on every ``Resize`` that came from an ``Upsample``, raises the IR version to the minimum the
opset needs, and compares outputs on sample inputs; a conversion that is not exact is
refused (:class:`ConversionError`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import version_converter

from .errors import ConversionError
from .passes.base import output_errors, reference_outputs

def min_ir_version(opset: int) -> int:
    """The lowest IR version that supports default-domain ``opset`` (onnx's version table)."""
    return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


def upgrade_opset(model: ir.Model, target: int, samples: list[dict[str, np.ndarray]], *, rtol: float = 1e-5,
                  ref: list | None = None) -> tuple[ir.Model, dict]:
    """Return ``model`` converted to default-domain opset ``target`` (>= current), checked.

    Args:
        model: the model.
        target: wanted opset of the default domain.
        samples: feed dicts used to compare outputs before/after.
        rtol: allowed max|Δ| / max|ref| per output.
        ref: ``model``'s outputs on ``samples`` when already known (the checks before), saving a run.

    Returns:
        ``(model, info)`` with ``info = {"from": old, "to": new, "ir_version": ..., "max_rel_err": ...}``.

    Raises:
        ConversionError: the converter failed, or outputs changed beyond ``rtol``.
    """
    current = model.opset_imports.get("", 1)
    if current >= target:
        return model, {}
    from .model_io import skeleton

    proto, weights = skeleton(model)  # the large weights stay where they are; re-attached below
    upsample_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "Upsample" and n.domain in ("", "ai.onnx")}
    upsample_modes = {n.output[0]: next((a.s.decode() for a in n.attribute if a.name == "mode"), "nearest")
                      for n in proto.graph.node if n.op_type == "Upsample"}
    try:
        conv = version_converter.convert_version(proto, target)
    except Exception as exc:
        raise ConversionError(f"cannot convert opset {current} -> {target}: {exc}") from None
    for node in conv.graph.node:
        if node.op_type == "Resize" and node.output[0] in upsample_outputs:
            keep = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
            del node.attribute[:]
            node.attribute.extend(keep)
            node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
            if upsample_modes.get(node.output[0], "nearest") == "nearest":
                node.attribute.append(onnx.helper.make_attribute("nearest_mode", "floor"))
    need_ir = min_ir_version(target)
    if conv.ir_version < need_ir:
        conv.ir_version = need_ir
    new = ir.from_proto(conv)
    for name, tensor in weights:
        if name in new.graph.initializers:
            new.graph.initializers[name].const_value = tensor
    info = {"from": current, "to": target, "ir_version": conv.ir_version,
            "upsample_converted": len(upsample_outputs)}
    if samples:
        try:
            if ref is None:
                ref = reference_outputs(model, samples)
            got = reference_outputs(new, samples)
        except Exception as exc:
            raise ConversionError(f"opset {current} -> {target}: converted model does not run ({exc})") from None
        _abs, rel = output_errors(ref, got)
        info["max_rel_err"] = rel
        if rel > rtol:
            raise ConversionError(f"opset {current} -> {target} changes the outputs by {rel:.3g} relative; refusing")
    return new, info
