"""The flags of ``optimize`` and ``recipe show``, generated from the declared parameters.

Each flag is one field of :class:`onnxcompress.OptimizeOptions`, whose declaration
(:class:`onnxcompress.params.Param`) gives its name, help, allowed values and default. Every
flag defaults to "not given" (``None``), so a flag given beside ``--recipe`` overrides exactly
that field (:func:`onnxcompress.recipe.override`); the declared default is shown in the help.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, List, Optional

import typer

from . import params as P
from .errors import OnnxCompressError
from .options import OptimizeOptions

#: flags whose command-line form differs from their field's value: field -> (python type, parse)
_SPECIAL = {
    "fuse": (Optional[bool], lambda v: not v),                       # --no-fuse
    "providers": (Optional[str], lambda v: tuple(p.strip() for p in v.split(",") if p.strip())),
    "min_sqnr_db": (Optional[float], lambda v: v or None),           # 0 disables
    "equalize": (Optional[str], lambda v: v),
    "calibration": (Optional[Path], lambda v: v),
    "validation": (Optional[Path], lambda v: v),
    "exclude_nodes": (Optional[List[str]], tuple),
    "prune_protect": (Optional[List[str]], tuple),
    "prune_ratios": (Optional[List[str]], None),                    # NODE=RATIO, parsed below
}
_PY = {"bool": Optional[bool], "int": Optional[int], "float": Optional[float], "str": Optional[str]}
#: second spellings kept from earlier releases
_ALIASES = {"min_top1_agreement": ("--min-top1",)}
#: image-folder flags: (python name, ImageSpec field)
IMAGE_FLAGS = {"image_size": "size", "mean": "mean", "std": "std", "layout": "layout", "channels": "channels"}


def flag_fields() -> dict[str, P.Param]:
    """``{OptimizeOptions field: Param}`` for every field that has a command-line flag."""
    return {k: p for k, p in P.params_of(OptimizeOptions).items() if p.flag}


def parameters() -> list[inspect.Parameter]:
    """The typer parameters of every declared flag (keyword-only, default "not given")."""
    out = []
    for field, p in flag_fields().items():
        py, _ = _SPECIAL.get(field, (_PY.get(p.kind), None))
        if py is None:
            raise TypeError(f"no command-line type for {field} ({p.kind})")
        names = (p.flag, *_ALIASES.get(field, ()))
        opt = typer.Option(None, *names, help=p.describe(), show_default=False)
        out.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=py))
    from .data import ImageSpec

    for py_name, f in IMAGE_FLAGS.items():
        p = P.params_of(ImageSpec)[f]
        help_ = p.describe() + (" Give HxW, e.g. 224x224." if f == "size" else " Give 3 comma-separated numbers."
                                if f in ("mean", "std") else "")
        out.append(inspect.Parameter(py_name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                     default=typer.Option(None, p.flag, help=help_, show_default=False)))
    return out


def given(kw: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave, as ``OptimizeOptions`` fields (``image``: the given image-folder
    fields as a dict). Values are not range-checked here (the planner checks them).

    Raises:
        OnnxCompressError: a value in the wrong form (``--prune-ratio`` without ``=``, a bad ``--mean``).
    """
    out: dict[str, Any] = {}
    for field, p in flag_fields().items():
        v = kw.get(field)
        if v is None or (isinstance(v, (list, tuple)) and not v and field != "providers"):
            continue
        parse = _SPECIAL.get(field, (None, None))[1]
        if field == "prune_ratios":
            out[field] = _ratios(v)
        elif field == "exclude_nodes":
            out["exclude_nodes"] = tuple(v)
            # names that look like op types (Conv, MatMul) also exclude every node of that type
            ops = tuple(e for e in v if e[:1].isupper() and "/" not in e and "." not in e)
            if ops:  # only when some: an --exclude beside --recipe keeps the recipe's op types otherwise
                out["exclude_op_types"] = ops
        else:
            out[field] = parse(v) if parse else v
    image = _image({k: kw.get(k) for k in IMAGE_FLAGS})
    if image:
        out["image"] = image
    return out


def _ratios(items) -> dict[str, float]:
    bad = [r for r in items if "=" not in r]
    try:
        ratios = {k.strip(): float(v) for k, v in (r.rsplit("=", 1) for r in items if "=" in r)}
    except ValueError as exc:
        ratios, bad = {}, [str(exc)]
    if bad:
        raise OnnxCompressError(f"--prune-ratio takes NODE=RATIO (e.g. /conv1/Conv=0.5), got {bad[0]!r}")
    return ratios


def _image(kw: dict[str, str | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        if kw["image_size"] is not None:
            size = tuple(int(v) for v in kw["image_size"].lower().split("x"))
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"--image-size takes HxW, e.g. 224x224 (got {kw['image_size']!r})")
            out["size"] = size
        for k in ("mean", "std"):
            if kw[k] is not None:
                out[k] = tuple(float(v) for v in kw[k].split(","))
        for k in ("layout", "channels"):
            if kw[k] is not None:
                out[k] = kw[k].upper()
    except ValueError as exc:
        raise OnnxCompressError(f"bad image options: {exc}") from None
    return out


def with_flags(func, own: list[inspect.Parameter]):
    """Give ``func`` (taking ``**kw``) the typer signature ``own`` + every declared flag."""
    func.__signature__ = inspect.Signature([*own, *parameters()])
    return func


def effective_recipe(base: str | Path | None, flags: dict[str, Any]):
    """The recipe a command line means: ``base`` (a recipe file or built-in name; ``None``: the
    flags alone, through the planner) with the given ``flags`` (:func:`given`) over it.

    Raises:
        OnnxCompressError: an unreadable recipe or a value outside its declaration.
    """
    from dataclasses import replace

    from .data import ImageSpec
    from .recipe import from_options, load, override

    flags = dict(flags)
    image = flags.pop("image", None)
    if base is None:
        o = OptimizeOptions(**flags)
        if image:
            o.image = ImageSpec(**image)
        return from_options(o)
    r = load(base)
    if image:
        flags["image"] = replace(r.data.image, **image)
    return override(r, flags)
