"""Declared parameters: every knob of onnxcompress is declared once, as a :class:`Param`.

A pass declares its parameters in its ``Config`` dataclass (fields made with
:meth:`Param.field`); recipe-level settings (gates, data, scope, output) are declared the same
way in :mod:`onnxcompress.recipe`. Everything else reads these declarations: the CLI's help text
and value checks (:func:`cli_help`), the flat :class:`onnxcompress.OptimizeOptions` (its fields
are the same ``Param`` objects), the recipe TOML schema and the zoo manifest's checks
(:func:`build`), and a search over recipes (:attr:`Param.search`). No other list of defaults
exists.

A ``Param`` shared by several configs (``target`` is read by five stages) is one object; a
command-line flag maps to exactly one ``Param`` (tested in ``tests/test_recipe.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import OnnxCompressError

KINDS = ("bool", "int", "float", "str", "strlist", "ratios", "any")


class ParamError(OnnxCompressError):
    """A value a declared parameter does not take (wrong type, outside its range or choices)."""


@dataclass(frozen=True, eq=False)
class Param:
    """One declared parameter.

    Attributes:
        key: canonical name (the field name in recipes and ``OptimizeOptions``).
        default: the value when not given (lists and dicts are copied per config).
        help: one sentence for ``--help``, ``recipe show`` and the docs.
        kind: ``bool``, ``int``, ``float``, ``str``, ``strlist`` (tuple of str),
            ``ratios`` (mapping str -> float) or ``any``.
        choices: allowed values (``str``).
        low / high: inclusive range bounds; ``low_open`` / ``high_open`` make them exclusive.
        optional: ``None`` is allowed (an "off" setting; TOML has no null: ``false`` means off,
            and an unset optional value is left out of a written recipe).
        flag: the command-line spelling (``--calibration-method``), ``None`` for recipe-only
            parameters.
        search: what an automatic search may try: a tuple of values, or ``(low, high)`` for a
            numeric range (``None``: not searched).
        validator: extra check on the normalised value; returns an error text or ``None``.
        aliases: accepted spellings mapped to canonical values (``{"on": True}``).
        hint: added to a range error (``"a percentage: for 99 % write 99"``).
    """

    key: str
    default: Any
    help: str
    kind: str = "any"
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    flag: str | None = None
    search: tuple | None = None
    validator: Callable[[Any], str | None] | None = None
    aliases: Mapping[Any, Any] | None = None
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"param {self.key}: unknown kind {self.kind!r}")

    # -- dataclass fields ------------------------------------------------------------------
    def field(self) -> Any:
        """A dataclass field with this parameter's default, carrying the declaration in its
        metadata (``metadata["param"]``)."""
        d = self.default
        if isinstance(d, (list, dict, set)):
            return dataclasses.field(default_factory=lambda: type(d)(d), metadata={"param": self})
        return dataclasses.field(default=d, metadata={"param": self})

    @property
    def name(self) -> str:
        """How messages name it: the flag when there is one, else the key."""
        return self.flag or self.key

    # -- values ----------------------------------------------------------------------------
    def check(self, value: Any, where: str = "") -> Any:
        """Return ``value`` normalised (tuples for string lists, floats for numbers, aliases
        resolved) or raise :class:`ParamError` naming the parameter and ``where``."""
        pre = f"{where}: " if where else ""
        if self.aliases and isinstance(value, str) and value.lower() in self.aliases:
            value = self.aliases[value.lower()]
        if value is None or (value is False and self.optional and self.kind != "bool"):
            if self.optional:
                return None
            raise ParamError(f"{pre}{self.name} must be set (got none)")
        if self.choices is not None and value in self.choices:
            return value
        v = self._typed(value, pre)
        if self.choices is not None and v not in self.choices:
            raise ParamError(f"{pre}{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.kind in ("int", "float"):
            lo_bad = self.low is not None and (v < self.low or (self.low_open and v == self.low))
            hi_bad = self.high is not None and (v > self.high or (self.high_open and v == self.high))
            if lo_bad or hi_bad or (self.kind == "float" and math.isnan(v)):
                hint = f" ({self.hint})" if self.hint else ""
                raise ParamError(f"{pre}{self.name} must be in {self.range_text()}{hint}, got {value!r}")
        if self.kind == "ratios":
            for k, r in v.items():
                if not 0.0 <= r < 1.0:
                    raise ParamError(f"{pre}{self.name} {k}={r}: the ratio must be in [0, 1)")
        if self.validator is not None:
            msg = self.validator(v)
            if msg:
                raise ParamError(f"{pre}{self.name} {msg}, got {value!r}")
        return v

    def _typed(self, value: Any, pre: str) -> Any:
        kind = self.kind
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                "strlist": "a list of strings", "ratios": "a table of NAME = RATIO"}.get(kind)
        bad = ParamError(f"{pre}{self.name} must be {want}{' (or false for off)' if self.optional else ''}, "
                         f"got {value!r}")
        if kind == "any":
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return int(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise bad
            return value
        if kind == "strlist":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
                raise bad
            return tuple(value)
        if kind == "ratios":
            if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(r, (int, float)) and not isinstance(r, bool) for k, r in value.items()):
                raise bad
            return {k: float(r) for k, r in value.items()}
        raise bad  # pragma: no cover

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def describe(self) -> str:
        """Help text with the allowed values and the default, as ``--help`` shows it."""
        extra = []
        if self.choices is not None:
            extra.append("one of " + ", ".join(map(str, self.choices)))
        elif self.kind in ("int", "float") and (self.low is not None or self.high is not None):
            extra.append("in " + self.range_text())
        d = self.default
        shown = ("off" if d is None else "true" if d is True else "false" if d is False
                 else ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in d) if isinstance(d, tuple) and d else "none" if d in ((), {}) else str(d))
        extra.append(f"default: {shown}")
        return f"{self.help} ({'; '.join(extra)})"


def params_of(cls_or_obj) -> dict[str, Param]:
    """``{field name: Param}`` of a config dataclass (fields without a declaration are left out)."""
    return {f.name: f.metadata["param"] for f in dataclasses.fields(cls_or_obj) if "param" in f.metadata}


def build(cls, values: Mapping[str, Any] | None = None, where: str = ""):
    """A ``cls`` config from ``values`` (keys may use dashes), every value checked by its
    declaration; keys ``cls`` does not declare raise :class:`ParamError` listing the known ones."""
    decl = params_of(cls)
    kw: dict[str, Any] = {}
    for raw, value in (values or {}).items():
        key = str(raw).replace("-", "_")
        if key not in decl:
            known = ", ".join(sorted(decl)) or "none"
            raise ParamError(f"{where + ': ' if where else ''}unknown parameter '{raw}' (known: {known})")
        kw[key] = decl[key].check(value, where)
    return cls(**kw)


def check(obj, where: str = "") -> None:
    """Check every declared field of a config instance in place (normalising its values)."""
    for name, p in params_of(obj).items():
        object.__setattr__(obj, name, p.check(getattr(obj, name), where))


def to_dict(obj, *, drop_none: bool = True) -> dict[str, Any]:
    """A config's declared fields as TOML-ready values (tuples as lists; ``None`` left out)."""
    out: dict[str, Any] = {}
    for name, p in params_of(obj).items():
        v = getattr(obj, name)
        if v is None and p.default is not None and p.optional and p.kind != "bool":
            out[name] = False  # "off" where the default is on: TOML has no null (Param.check reads it back)
            continue
        if drop_none and (v is None or (isinstance(v, dict) and not v)):
            continue
        out[name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v
    return out


@dataclass
class NoConfig:
    """The config of a stage without parameters."""
