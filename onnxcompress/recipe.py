"""Recipes: what ``optimize`` does, as data (TOML in and out).

A recipe is ordered **stages** (a registered stage name and its config, see
:mod:`onnxcompress.passes.registry`), **gates** (with optional limits per output name),
**data** settings, the user's **scope** (exclusions) and **output** settings::

    description = "static int8"

    [[stages]]
    pass = "fuse"

    [[stages]]
    pass = "quantize-static"
    calibration_method = "auto"
    target = "auto"

    [gates]
    min_cosine = 0.99
    [gates.outputs.logits]          # this output only
    min_top1_agreement = 99

    [data]
    calibration = "calib.npz"       # relative to the recipe file
    max_calibration_samples = 256

    [scope]
    exclude_nodes = ["/head/Conv"]

    [output]
    providers = ["cpu"]

Every key is a declared parameter (:mod:`onnxcompress.params`); unknown keys and bad values are
refused with the file and the key named. A command line becomes a recipe through the planner
(:func:`from_options`), and flags given beside ``--recipe`` override its fields (:func:`override`).
``onnxcompress recipe show`` prints the effective recipe; ``recipe list`` the built-in ones
(:data:`BUILTIN`).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from . import params as P
from .data import ImageSpec
from .errors import OnnxCompressError
from .gates import Gates, OutputGates
from .options import (CALIBRATION, EXCLUDE_NODES, EXCLUDE_OP_TYPES, EXTERNAL_DATA, LATENCY, MAX_CALIBRATION_SAMPLES,
                      PROVIDERS, VALIDATION, AutoQuantizeConfig, OptimizeOptions)
from .passes.distill_stage import DistillConfig
from .passes.lowrank import LowRankConfig
from .passes.transformer import FuseConfig
from .passes.prune import MagnitudePruneConfig
from .passes.prune_channels import ChannelPruneConfig
from .passes.prune_nm import NMPruneConfig
from .passes.quantize.config import EqualizeConfig, QuantizeConfig, SmoothQuantConfig, StaticQuantizeConfig, TargetConfig
from .passes.registry import STAGES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class RecipeError(OnnxCompressError):
    """A recipe that is not TOML, names an unknown stage or key, or sets a value out of range."""


# --------------------------------------------------------------------------- sections
@dataclass
class DataSettings:
    """``[data]``: calibration and validation sources and how to read them."""

    calibration: Any = CALIBRATION.field()
    validation: Any = VALIDATION.field()
    max_calibration_samples: int = MAX_CALIBRATION_SAMPLES.field()
    image: ImageSpec = field(default_factory=ImageSpec)


@dataclass
class ScopeSettings:
    """``[scope]``: what the user keeps out of every pruning and int8 stage."""

    exclude_nodes: tuple[str, ...] = EXCLUDE_NODES.field()
    exclude_op_types: tuple[str, ...] = EXCLUDE_OP_TYPES.field()


@dataclass
class OutputSettings:
    """``[output]``: where the result is validated and how it is written."""

    providers: tuple[str, ...] = PROVIDERS.field()
    latency: bool = LATENCY.field()
    external_data: bool | None = EXTERNAL_DATA.field()


@dataclass
class Stage:
    """One stage: a registered name and its config (an instance of the stage's config class)."""

    name: str
    config: Any = None

    def __post_init__(self) -> None:
        spec = STAGES.get(self.name)
        if spec is None:
            raise RecipeError(f"unknown stage '{self.name}' (known: {', '.join(STAGES)})")
        if isinstance(self.config, Mapping) and "pass" in self.config:
            raise RecipeError(f"stage '{self.name}': 'pass' given twice")
        if self.config is None:
            self.config = spec.config()
        elif isinstance(self.config, Mapping):
            self.config = P.build(spec.config, self.config, f"stage '{self.name}'")
        elif not isinstance(self.config, spec.config):
            raise RecipeError(f"stage '{self.name}' takes a {spec.config.__name__}, got {type(self.config).__name__}")

    @property
    def spec(self):
        return STAGES[self.name]


#: a recipe's most stages (each stage runs the model through its checks: a longer list is a mistake
#: or an attack, not a recipe)
MAX_STAGES = 32

_SECTIONS = {"gates": Gates, "data": DataSettings, "scope": ScopeSettings, "output": OutputSettings}
#: the recipe's sections and their declared parameters (``recipe params`` lists them)
SECTIONS = {**_SECTIONS, "data.image": ImageSpec, "gates.outputs.NAME": OutputGates}


@dataclass
class Recipe:
    """What ``optimize`` runs (see the module docstring)."""

    stages: list[Stage] = field(default_factory=list)
    gates: Gates = field(default_factory=Gates)
    data: DataSettings = field(default_factory=DataSettings)
    scope: ScopeSettings = field(default_factory=ScopeSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    description: str = ""
    #: planner notes for the report (flags that had no effect, ...); not part of the recipe's data
    notes: list[str] = field(default_factory=list, compare=False, repr=False)

    def check(self) -> None:
        """Check every value against its declaration, and the stage list: at most
        :data:`MAX_STAGES` stages and one int8 stage. Raises :class:`RecipeError`."""
        if len(self.stages) > MAX_STAGES:
            raise RecipeError(f"{len(self.stages)} stages: a recipe has at most {MAX_STAGES}")
        int8 = [s.name for s in self.stages if s.spec.int8]
        if len(int8) > 1:
            raise RecipeError(f"more than one int8 stage ({', '.join(int8)}): a recipe quantizes once")
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            if name != "distill":
                continue
            before = names[:i]
            if any(STAGES[b].int8 for b in before):
                raise RecipeError("stage 'distill' comes after int8: distillation trains a float model (PyTorch "
                                  "cannot train Q/DQ); put it before the quantize stage")
            sparse = [b for b in before if b in ("prune-magnitude", "prune-nm")]
            if sparse:
                raise RecipeError(f"stage 'distill' after '{sparse[0]}': distillation trains every weight and "
                                  "would fill the pruned zeros again; distil first and prune after it, or prune "
                                  "channels (prune-channels), whose removed channels stay removed")
        try:
            for st in self.stages:
                P.check(st.config, f"stage '{st.name}'")
            for name in _SECTIONS:
                P.check(getattr(self, name), f"[{name}]")
            for out, lim in self.gates.outputs.items():
                P.check(lim, f"[gates.outputs.{out}]")
            P.check(self.data.image, "[data.image]")
        except P.ParamError as exc:
            raise RecipeError(str(exc)) from None
        from .options import check_data_source

        for what in ("calibration", "validation"):
            check_data_source(getattr(self.data, what), what)

    def stage(self, name: str) -> Stage | None:
        """The first stage called ``name``."""
        return next((s for s in self.stages if s.name == name), None)

    # -- dict / TOML -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """TOML-ready dict (unset optional values left out; data sources must be paths)."""
        d: dict[str, Any] = {}
        if self.description:
            d["description"] = self.description
        d["stages"] = [{"pass": s.name, **P.to_dict(s.config)} for s in self.stages]
        gates = P.to_dict(self.gates)
        if self.gates.outputs:
            gates["outputs"] = {k: P.to_dict(v) for k, v in self.gates.outputs.items()}
        d["gates"] = gates
        data = P.to_dict(self.data)
        for k in ("calibration", "validation"):
            if k in data:
                if not isinstance(data[k], (str, Path)):
                    raise RecipeError(f"[data] {k}: only a path can be written to a recipe file "
                                      f"(got {type(data[k]).__name__})")
                data[k] = str(data[k])
        img = {k: list(v) if isinstance(v, tuple) else v for k, v in P.to_dict(self.data.image).items()}
        if img != {k: list(v) if isinstance(v, tuple) else v for k, v in P.to_dict(ImageSpec()).items()}:
            data["image"] = img
        d["data"] = data
        d["scope"] = P.to_dict(self.scope)
        d["output"] = P.to_dict(self.output)
        return d

    def report_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` for a report: with data given as arrays (which a file cannot hold), the
        stages and their settings without the data."""
        try:
            return self.to_dict()
        except RecipeError:
            return {"stages": [{"pass": s.name, **P.to_dict(s.config)} for s in self.stages]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "recipe", base: Path | None = None) -> "Recipe":
        """Build and check a recipe from a dict (a parsed TOML document).

        Args:
            base: folder that relative data paths are resolved against (the recipe file's).

        Raises:
            RecipeError: unknown keys or stages, wrong types, values out of range.
        """
        if not isinstance(d, Mapping):
            raise RecipeError(f"{where}: expected a table")
        known = {"description", "stages", "gates", "data", "scope", "output", "version"}
        bad = sorted(set(d) - known)
        if bad:
            raise RecipeError(f"{where}: unknown key(s) {bad} (known: {', '.join(sorted(known))})")
        try:
            stages = []
            raw = d.get("stages", [])
            if not isinstance(raw, list):
                raise RecipeError(f"{where}: 'stages' must be an array of tables ([[stages]])")
            for i, t in enumerate(raw):
                if not isinstance(t, Mapping) or not isinstance(t.get("pass"), str):
                    raise RecipeError(f"{where}: stage {i + 1} must be a table with pass = \"<name>\"")
                t = dict(t)
                try:
                    stages.append(Stage(t.pop("pass"), t))
                except (RecipeError, P.ParamError) as exc:
                    raise RecipeError(f"{where}: {exc}") from None
            sections = {}
            for name, klass in _SECTIONS.items():
                t = d.get(name, {})
                if not isinstance(t, Mapping):
                    raise RecipeError(f"{where}: [{name}] must be a table")
                t = dict(t)
                extra: dict[str, Any] = {}
                if name == "gates" and "outputs" in t:
                    extra["outputs"] = _output_gates(where, t.pop("outputs"))
                if name == "data" and "image" in t:
                    img = t.pop("image")
                    if not isinstance(img, Mapping):
                        raise RecipeError(f"{where}: [data.image] must be a table")
                    extra["image"] = P.build(ImageSpec, {k: v.upper() if k in ("layout", "channels") and
                                                         isinstance(v, str) else v for k, v in img.items()},
                                             f"{where}: [data.image]")
                sec = P.build(klass, t, f"{where}: [{name}]")
                sections[name] = replace(sec, **extra) if extra else sec
        except P.ParamError as exc:
            raise RecipeError(str(exc)) from None
        data = sections["data"]
        if base is not None:
            for k in ("calibration", "validation"):
                v = getattr(data, k)
                if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
                    setattr(data, k, str((base / v).resolve()))
        desc = d.get("description", "")
        if not isinstance(desc, str):
            raise RecipeError(f"{where}: 'description' must be a string")
        r = cls(stages=stages, description=desc, **sections)
        try:
            r.check()
        except RecipeError as exc:
            raise RecipeError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
        return r

    def to_toml(self) -> str:
        """The recipe as TOML (round-trips through :func:`loads` unchanged)."""
        import tomli_w

        head = (f"# onnxcompress {__version__} recipe: onnxcompress optimize IN -o OUT --recipe THIS_FILE\n"
                "# every key is a declared parameter: `onnxcompress recipe params` lists them with their help\n")
        return head + tomli_w.dumps(self.to_dict())


def _output_gates(where: str, t: Any) -> dict[str, OutputGates]:
    if not isinstance(t, Mapping) or not all(isinstance(v, Mapping) for v in t.values()):
        raise RecipeError(f"{where}: [gates.outputs] must hold one table per output name")
    return {str(k): P.build(OutputGates, v, f"{where}: [gates.outputs.{k}]") for k, v in t.items()}


def loads(text: str, *, where: str = "recipe", base: Path | None = None) -> Recipe:
    """Parse a TOML recipe. Raises :class:`RecipeError`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: invalid TOML ({exc})") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply to be a recipe") from None
    return Recipe.from_dict(doc, where=where, base=base)


def load(path: str | Path) -> Recipe:
    """Read a recipe file, or a built-in recipe by name (:data:`BUILTIN`).

    Raises:
        RecipeError: neither a readable regular file nor a built-in name; or an invalid recipe.
    """
    p = Path(path)
    if str(path) in BUILTIN and not p.exists():
        return builtin(str(path))
    if not p.exists():
        raise RecipeError(f"{p}: no such recipe file, and not a built-in recipe "
                          f"({', '.join(BUILTIN)}; `onnxcompress recipe list`)")
    from .paths import PathError, check_input_file

    try:
        check_input_file(p, "recipe")
    except PathError as exc:
        raise RecipeError(str(exc)) from None
    if p.stat().st_size > 1 << 20:
        raise RecipeError(f"{p}: over 1 MB; not a recipe")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise RecipeError(f"{p}: cannot read it as text ({exc})") from None
    return loads(text, where=str(p), base=p.resolve().parent)


# --------------------------------------------------------------------------- the planner
def quantize_stages(mode: str, q: AutoQuantizeConfig) -> list[Stage]:
    """The stages of one int8 mode: ``equalize`` (static with equalize auto, or on),
    ``pair-permute`` (static), ``smooth-quant`` (when on), then ``quantize-<mode>``."""
    st = []
    if q.equalize is True or (q.equalize == "auto" and mode == "static"):
        st.append(Stage("equalize", EqualizeConfig(mode="auto" if q.equalize == "auto" else "on", target=q.target,
                                                   per_channel=q.per_channel)))
    if mode == "static":  # x86 without VNNI: pair saturation-free int8 weights (no-op elsewhere)
        st.append(Stage("pair-permute", TargetConfig(target=q.target)))
    if q.smooth_quant:
        st.append(Stage("smooth-quant", SmoothQuantConfig(mode=mode, target=q.target)))
    cls = StaticQuantizeConfig if mode == "static" else QuantizeConfig
    st.append(Stage(f"quantize-{mode}", cls(**{f.name: getattr(q, f.name) for f in fields(cls)})))
    return st


def _from_flat(cls, o: OptimizeOptions):
    """A ``cls`` config whose fields take the flat option declared by the same parameter (the
    others keep their declared defaults)."""
    flat = {id(p): name for name, p in P.params_of(OptimizeOptions).items()}
    kw = {}
    for fname, p in P.params_of(cls).items():
        if id(p) in flat:
            kw[fname] = getattr(o, flat[id(p)])
    return cls(**kw)


def from_options(o: OptimizeOptions) -> Recipe:
    """The planner: the recipe a set of flags means (see :class:`OptimizeOptions`).

    Raises:
        OnnxCompressError: an option out of its declared range.
    """
    o.check()
    notes: list[str] = []
    # a distill stage trains the model in PyTorch, which cannot train com.microsoft.Attention: the
    # attention is fused after distillation instead (a second fuse stage)
    stages = [Stage("fuse", FuseConfig(attention=not o.distill))] if o.fuse else []
    if o.prune or o.prune_mode == "nm":
        if o.prune_mode == "channel":
            stages.append(Stage("prune-channels", ChannelPruneConfig(
                ratio=o.prune, ratios=dict(o.prune_ratios or {}), scope=o.prune_channel_scope,
                importance=o.prune_importance, round_to=o.prune_round_to, repair=o.prune_repair,
                protect=tuple(o.prune_protect))))
        elif o.prune_mode == "nm":
            c = NMPruneConfig(pattern=o.prune_nm, min_size=o.prune_min_size)
            n, m = c.n_m
            if o.prune and abs(o.prune - (1 - n / m)) > 1e-9:
                notes.append(f"--prune {o.prune} ignored in nm mode: {n}:{m} fixes the sparsity at {1 - n / m:.0%}")
            stages.append(Stage("prune-nm", c))
        else:
            stages.append(Stage("prune-magnitude", MagnitudePruneConfig(
                sparsity=o.prune, scope=o.prune_scope, min_size=o.prune_min_size,
                skip_first_last=o.prune_skip_first_last)))
    if o.low_rank:
        stages.append(Stage("low-rank", LowRankConfig(target_ratio=o.low_rank)))
    if o.distill:
        if not (o.prune or o.prune_mode == "nm" or o.low_rank):
            notes.append("--distill without pruning or low-rank: the model is its own teacher, so there is "
                         "nothing to win back (the stage keeps the model)")
        stages.append(Stage("distill", DistillConfig(epochs=o.distill)))
        if o.fuse:
            stages.append(Stage("fuse"))
    q = _from_flat(AutoQuantizeConfig, o)
    if o.quantize == "auto":
        stages.append(Stage("quantize-auto", q))
    elif o.quantize:
        stages += quantize_stages(o.quantize, q)
    for flag, why, hit in (
            ("--calibration-method", "only static quantization calibrates ranges",
             o.calibration_method != "auto" and o.quantize not in ("static", "auto")),
            ("--bias-correction-mode", "only static quantization corrects biases",
             o.bias_correction_mode != "node" and o.quantize not in ("static", "auto")),
            ("--prune-nm", "it applies to --prune-mode nm", o.prune_nm != "2:4" and o.prune_mode != "nm")):
        if hit:
            notes.append(f"{flag} is ignored here: {why}")
    r = Recipe(
        stages=stages,
        gates=Gates(max_rel_error=o.max_rel_error, min_cosine=o.min_cosine, min_top1_agreement=o.min_top1_agreement,
                    min_mean_cosine=o.min_mean_cosine, fallback=o.fallback, max_fallback_rounds=o.max_fallback_rounds,
                    floor_top1_agreement=o.floor_top1_agreement, floor_mean_cosine=o.floor_mean_cosine,
                    accept_degraded=o.accept_degraded),
        data=DataSettings(calibration=o.calibration, validation=o.validation,
                          max_calibration_samples=o.max_calibration_samples, image=o.image),
        scope=ScopeSettings(exclude_nodes=tuple(o.exclude_nodes), exclude_op_types=tuple(o.exclude_op_types)),
        output=OutputSettings(providers=tuple(o.providers), latency=o.latency, external_data=o.external_data),
        notes=notes)
    return r


#: flat option fields that choose stages (given beside a recipe, they re-plan it)
STRUCTURAL = ("fuse", "quantize", "prune", "prune_mode", "equalize", "smooth_quant", "low_rank", "distill")


def to_options(r: Recipe) -> OptimizeOptions:
    """The flat view of a recipe: the flags that plan the same stages (for a planner-shaped
    recipe; a hand-written one keeps the settings of its first stage of each kind)."""
    o = OptimizeOptions()
    decl = P.params_of(OptimizeOptions)
    by_param = {id(p): name for name, p in decl.items()}
    o.fuse = r.stage("fuse") is not None
    ds = r.stage("distill")
    o.distill = ds.config.epochs if ds is not None else None
    taken: set[str] = set()
    for st in r.stages:
        for fname, p in P.params_of(st.config).items():
            flat = by_param.get(id(p))
            if flat is not None and flat not in taken:  # the first stage that declares it
                setattr(o, flat, getattr(st.config, fname))
                taken.add(flat)
    pm = next((s for s in r.stages if s.name.startswith("prune-")), None)
    if pm is not None:
        o.prune_mode = {"prune-magnitude": "unstructured", "prune-channels": "channel", "prune-nm": "nm"}[pm.name]
        o.prune = {"prune-magnitude": getattr(pm.config, "sparsity", None),
                   "prune-channels": getattr(pm.config, "ratio", None)}.get(pm.name)
    qs = next((s for s in r.stages if s.spec.int8), None)
    if qs is not None:
        o.quantize = qs.name.split("-", 1)[1]
        if qs.name != "quantize-auto":
            eq = r.stage("equalize")
            o.equalize = False if eq is None else ("auto" if eq.config.mode == "auto" else True)
            if eq is None and o.quantize == "dynamic":
                o.equalize = "auto"
            o.smooth_quant = r.stage("smooth-quant") is not None
    for sec in (r.gates, r.data, r.scope, r.output):
        for fname in P.params_of(sec):
            if fname in decl:
                setattr(o, fname, getattr(sec, fname))
    o.image = r.data.image
    return o


def override(r: Recipe, given: Mapping[str, Any]) -> Recipe:
    """``r`` with flat options (``OptimizeOptions`` field names, e.g. the flags given on the
    command line) applied over it.

    Flags that choose stages (:data:`STRUCTURAL`) re-plan the recipe from its flat view
    (:func:`to_options`); the others set every stage field and section field declared by the
    same parameter. A flag that no stage or section of the result reads becomes a note.

    Raises:
        OnnxCompressError: a value outside its declaration, or an unknown option name.
    """
    decl = P.params_of(OptimizeOptions)
    unknown = [k for k in given if k not in decl and k != "image"]
    if unknown:
        raise RecipeError(f"unknown option(s) {unknown} (known: {', '.join(sorted(decl))})")
    given = {k: (v if k == "image" else decl[k].check(v)) for k, v in given.items()}
    out = _copy(r)
    if any(k in given for k in STRUCTURAL):
        return _replan(out, given, decl)
    for k, v in given.items():
        hit = False
        if k == "image":
            out.data.image, hit = v, True
        p = decl.get(k)
        for st in out.stages:
            for fname, sp in P.params_of(st.config).items():
                if sp is p:
                    setattr(st.config, fname, v)
                    hit = True
        for sec in (out.gates, out.data, out.scope, out.output):
            for fname, sp in P.params_of(sec).items():
                if sp is p:
                    setattr(sec, fname, v)
                    hit = True
        if not hit and v != p.default:
            out.notes.append(f"{p.name} is ignored here: no stage of this recipe takes it")
    out.check()
    return out


def _replan(r: Recipe, given: Mapping[str, Any], decl: Mapping[str, P.Param]) -> Recipe:
    """Plan the stages again from the recipe's flat view with ``given`` over it; each planned stage
    the recipe already had keeps the recipe's settings that no flag can express (``percentile``,
    ``repair_samples``, ...). The change of stages is noted."""
    from .passes.quantize.config import EQUALIZE_MODE, SMOOTH_MODE

    planned = from_options(replace(to_options(r), **given))
    from .passes.transformer import FUSE_ATTENTION

    flagged = ({id(p) for p in decl.values()}  # the planner sets these
               | {id(EQUALIZE_MODE), id(SMOOTH_MODE), id(FUSE_ATTENTION)})
    if given.get("distill"):  # --distill N sets the stage's epochs
        from .distill_params import EPOCHS

        flagged.add(id(EPOCHS))
    old: dict[str, Stage] = {}
    for s in r.stages:
        old.setdefault(s.name, s)
    for st in planned.stages:
        prev = old.get(st.name)
        if prev is None:
            continue
        for fname, p in P.params_of(st.config).items():
            if id(p) not in flagged and fname in P.params_of(prev.config):
                setattr(st.config, fname, getattr(prev.config, fname))
    before, after = [s.name for s in r.stages], [s.name for s in planned.stages]
    planned.description = r.description
    planned.gates.outputs = r.gates.outputs
    planned.notes = [*r.notes, *planned.notes]
    if before != after:
        flags = ", ".join(decl[k].name for k in given if k in STRUCTURAL)
        planned.notes.append(f"{flags} re-planned the recipe's stages: {' -> '.join(before) or 'none'} became "
                             f"{' -> '.join(after) or 'none'}")
    planned.check()
    return planned


def _copy(r: Recipe) -> Recipe:
    """A copy whose stage configs and sections can be changed (data sources are shared, not copied)."""
    data = replace(r.data)
    return Recipe(stages=[Stage(s.name, copy.deepcopy(s.config)) for s in r.stages],
                  gates=copy.deepcopy(r.gates), data=data, scope=copy.deepcopy(r.scope),
                  output=copy.deepcopy(r.output), description=r.description, notes=list(r.notes))


# --------------------------------------------------------------------------- built-in recipes
#: name -> (description, flat options): each built by the planner, so a built-in recipe and its
#: flags are the same recipe
BUILTIN: dict[str, tuple[str, dict[str, Any]]] = {
    "fuse": ("clean-up and fusion only (exact rewrites, each checked)", {}),
    "int8-dynamic": ("dynamic int8: no calibration data needed; MatMul/Gemm/Attention int8, Conv weights int8",
                     {"quantize": "dynamic"}),
    "int8-static": ("static int8 QDQ, calibrated (give --calibration data)", {"quantize": "static"}),
    "int8-static-avx2": ("static int8 for x86 CPUs without VNNI (saturation-free weight pairs)",
                         {"quantize": "static", "target": "avx2"}),
    "int8-auto": ("both int8 modes, the fastest that keeps the answers", {"quantize": "auto"}),
    "channel-prune-int8": ("30 % of channels removed per group with least-squares repair, then static int8",
                           {"prune": 0.3, "prune_mode": "channel", "quantize": "static"}),
    "sparse-2-4": ("2:4 semi-structured sparsity", {"prune_mode": "nm", "prune_nm": "2:4"}),
}


def builtin(name: str) -> Recipe:
    """A built-in recipe by name. Raises :class:`RecipeError` for an unknown name."""
    if name not in BUILTIN:
        raise RecipeError(f"no built-in recipe '{name}' (built-in: {', '.join(BUILTIN)})")
    desc, flat = BUILTIN[name]
    r = from_options(OptimizeOptions(**flat))
    r.description = desc
    r.notes = []
    return r
