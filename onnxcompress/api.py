"""The Python API: ``optimize`` (the main job).

``optimize`` resolves what to run into a :class:`~onnxcompress.recipe.Recipe` (flags through
the planner, a recipe object, file or built-in name) and runs it: :func:`onnxcompress.pipeline.run`
(load -> data -> stages -> validate and gate -> write -> report), or, for a ``quantize-auto``
stage, :func:`onnxcompress.auto.optimize_auto` (the pipeline once per int8 mode). Nothing here
prints; progress goes through an optional callback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir

from .auto import optimize_auto
from .errors import OnnxCompressError
from .options import PRUNE_MODES, QUANTIZE_MODES, OptimizeOptions  # noqa: F401 - re-exported
from .pipeline import OptimizeResult, run
from .recipe import Recipe, from_options, load as load_recipe

__all__ = ["optimize", "OptimizeOptions", "OptimizeResult"]


def optimize(
    model: str | Path | onnx.ModelProto | ir.Model,
    output: str | Path | None = None,
    options: OptimizeOptions | Recipe | None = None,
    *,
    recipe: Recipe | str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> OptimizeResult:
    """Optimize one ONNX model and write the result (the main job).

    Args:
        model: an ``.onnx`` path (never modified), an ``onnx.ModelProto`` or an ``onnx_ir.Model``
            (left as it is; its in-memory weight arrays are made read-only, see ``passes/base.py``).
        output: where to write; written atomically, only after the model passed
            ``onnx.checker``, loaded in ONNX Runtime and met every gate. ``None``: nothing is
            written; the model is in ``result.model``.
        options: flags as :class:`OptimizeOptions` (or a :class:`Recipe`).
        recipe: a :class:`Recipe`, a recipe file or a built-in recipe name (not with ``options``;
            to change a recipe's fields use :func:`onnxcompress.recipe.override`).
        progress: callback receiving a :class:`onnxcompress.progress.ProgressEvent` — a ``str``
            (the stage, or ``"stage: step done/total unit"``) whose attributes carry the stage
            that just finished (``closed``: seconds, peak RSS) and what the stage counts
            (samples, nodes, tensors: ``done``, ``total``, ``unit``).

    Returns:
        :class:`OptimizeResult` with the report: ``before``/``after`` summaries (size in bytes,
        nodes, op histogram), ``passes`` (one :class:`PassReport` each), ``validation``
        (per-provider, per-output metrics, accuracy when labels exist, latency in ms),
        ``gates``, ``recipe``, ``cost`` (seconds and peak RSS per stage) and ``notes``.

    Raises:
        ModelLoadError, DataError, ModelWriteError, InvalidModelError, ConversionError: bad input or output.
        RecipeError: a recipe that cannot be read or has values out of range.
        GateFailedError: a gate was missed; nothing is written (the report is attached as ``.report``).
    """
    rec = _resolve_recipe(options, recipe)
    if rec.stage("quantize-auto") is not None:
        return optimize_auto(model, output, rec, progress or (lambda s: None))
    return run(model, output, rec, progress)


def _resolve_recipe(options, recipe) -> Recipe:
    """The recipe to run: from ``recipe`` (object, file or built-in name), or planned from flags."""
    if options is not None and recipe is not None:
        raise OnnxCompressError("give optimize() options or a recipe, not both "
                                "(onnxcompress.recipe.override(recipe, {...}) changes a recipe's fields)")
    src = recipe if recipe is not None else options
    if src is None:
        src = OptimizeOptions()
    if isinstance(src, OptimizeOptions):
        return from_options(src)
    if isinstance(src, (str, Path)):
        return load_recipe(src)
    if isinstance(src, Recipe):
        src.check()
        return src
    raise OnnxCompressError(f"options must be OptimizeOptions or a Recipe, got {type(src).__name__}")
