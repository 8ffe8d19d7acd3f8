"""The zoo manifest (TOML): models, their data, and recipes (named sets of ``optimize`` options).

Layout (every table but ``[models]`` optional; see ``models/zoo.toml``)::

    [run]                       # defaults for the command-line flags
    jobs = 2
    timeout_s = 1800            # per task; the worker is killed past it
    memory_limit_mb = 8192      # per task (RLIMIT_AS of the worker process)
    threads = 1                 # ONNX Runtime intra-op threads per task

    [defaults]
    recipes = ["fuse", "int8-dynamic", "int8-static"]    # run on every model unless it says otherwise
    options = { max_calibration_samples = 256 }          # under every recipe

    [recipes.int8-static]       # flags form: any OptimizeOptions field (dashes or underscores)
    description = "static QDQ int8"
    quantize = "static"

    [recipes.my-static]         # or a built-in recipe (`onnxcompress recipe list`) and flags over it
    base = "int8-static"
    calibration_method = "entropy"

    [recipes.custom]            # or a whole recipe (onnxcompress.recipe; `recipe show` writes one)
    [[recipes.custom.stages]]
    pass = "fuse"
    [[recipes.custom.stages]]
    pass = "quantize-static"
    [recipes.custom.gates]
    min_cosine = 0.99

    [models.ppocr_det]
    path = "../zoo_cache/ppocr_det/model.onnx"          # relative to this file
    calibration = "../zoo_cache/ppocr_det/calib.npz"    # .npz or an image folder
    validation = "../zoo_cache/ppocr_det/val.npz"
    fetch = [["{python}", "../scripts/fetch_zoo.py", "--only", "ppocr_det"]]   # run when `path` is missing
    recipes = ["fuse", "int8-static"]                   # this model's recipe list (default: [defaults].recipes)
    options = { exclude_op_types = ["Resize"] }         # this model, every recipe
    image = { size = [224, 224], mean = [123.7, 116.3, 103.5], std = [58.4, 57.1, 57.4] }  # image folders
    timeout_s = 600                                     # this model's limits
    tune = { metric = "task", max_drop = 1.0, min_speedup = 1.2, trials = 10 }   # a budget search task
    [models.ppocr_det.overrides.int8-static]           # this model, one recipe
    calibration_method = "percentile"

A model's ``tune`` table (or ``[defaults] tune``; ``tune = false`` turns that off for a model)
adds the task ``<model> / tune``: ``onnxcompress tune`` with that budget (``metric``,
``max_drop``, ``min_speedup``, ``max_size_mb``, as :class:`onnxcompress.tune.Budget`) and
``trials`` (default 10) / ``time_budget_s``, on the model's calibration and validation data. Its row
is ok when the budget was met (the chosen model is written); else it fails with the constraint
missed (kind ``budget``). ``tune`` is therefore not a recipe name.

Options are merged in this order (later wins): ``OptimizeOptions`` defaults, ``[defaults]
options``, the recipe, the model's ``options``, the model's ``overrides.<recipe>``; each task
then runs one :class:`onnxcompress.recipe.Recipe` (:meth:`Manifest.recipe_for`), the same object
``optimize --recipe`` runs. Every key is checked against its declared parameter
(:mod:`onnxcompress.params`). TOML has no null: ``false`` turns an optional setting off
(``min_sqnr_db = false``, ``prune = false``).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import params as P
from .. import recipe as R
from ..data import ImageSpec
from ..errors import OnnxCompressError
from ..options import OptimizeOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:  # pragma: no cover
        tomllib = None


class ManifestError(OnnxCompressError):
    """The zoo manifest is missing, not TOML, or inconsistent."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

_PER_MODEL_ONLY = ("calibration", "validation", "image")
_FLAT = {k: p for k, p in P.params_of(OptimizeOptions).items() if k not in _PER_MODEL_ONLY}
_RUN_KEYS = {"jobs": "int", "timeout_s": "float?", "memory_limit_mb": "int?", "threads": "int?"}
_MODEL_KEYS = {"path", "calibration", "validation", "fetch", "recipes", "options", "overrides", "image",
               "timeout_s", "memory_limit_mb", "description", "tune"}
#: the task name of a model's budget search (``tune = {...}``): not a recipe name
TUNE_TASK = "tune"
#: ``tune = {...}`` keys (:class:`onnxcompress.tune.Budget` fields, then the search's own) and types
_TUNE_KEYS = {"metric": "str", "max_drop": "float", "min_speedup": "float", "max_size_mb": "float",
              "trials": "int", "time_budget_s": "float"}
#: trials of a zoo tune task when its table does not say
TUNE_TRIALS = 10
_IMAGE_KEYS = {f.name for f in dataclasses.fields(ImageSpec)}


@dataclass
class Recipe:
    """A named recipe of the manifest: flat ``optimize`` options (``options``, the flags form,
    over the built-in recipe ``base`` when given) or a whole recipe (``recipe``)."""

    name: str
    options: dict[str, Any]
    description: str = ""
    base: str | None = None
    recipe: R.Recipe | None = None
    #: the flat options this recipe sets itself ([defaults] options do not override them)
    sets: frozenset[str] = frozenset()


@dataclass
class ModelEntry:
    """One model of the manifest (paths absolute)."""

    name: str
    path: Path
    calibration: Path | None = None
    validation: Path | None = None
    fetch: list[list[str]] = field(default_factory=list)
    recipes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    image: dict[str, Any] | None = None
    timeout_s: float | None = None
    memory_limit_mb: int | None = None
    description: str = ""
    #: the budget of the model's ``tune`` task (``onnxcompress tune``'s options), or ``None``
    tune: dict[str, Any] | None = None


@dataclass
class Manifest:
    """A parsed manifest."""

    path: Path
    models: dict[str, ModelEntry]
    recipes: dict[str, Recipe]
    default_recipes: list[str]
    default_options: dict[str, Any]
    run: dict[str, Any]

    @property
    def base(self) -> Path:
        return self.path.parent

    def options_for(self, model: str, recipe: str) -> dict[str, Any]:
        """The merged option dict of one (model, recipe) task, JSON-ready (calibration/validation
        as absolute path strings, ``image`` as a dict)."""
        m = self.models[model]
        merged: dict[str, Any] = {}
        for layer in (self.default_options, self.recipes[recipe].options, m.options, m.overrides.get(recipe, {})):
            merged.update(layer)
        merged["calibration"] = str(m.calibration) if m.calibration else None
        merged["validation"] = str(m.validation) if m.validation else None
        if m.image:
            merged["image"] = dict(m.image)
        return merged

    def recipe_for(self, model: str, recipe: str) -> R.Recipe:
        """The recipe one (model, recipe) task runs: the manifest recipe, the model's data, and the
        flat option layers over it (:meth:`options_for`).

        Raises:
            ManifestError: a value outside its declaration.
        """
        zr = self.recipes[recipe]
        flat = self.options_for(model, recipe)
        image = flat.pop("image", None)
        data = {k: flat.pop(k) for k in ("calibration", "validation")}
        try:
            if zr.recipe is None and zr.base is None:
                o = options_from_dict({**flat, **data, **({"image": image} if image else {})})
                return R.from_options(o)
            base = zr.recipe if zr.recipe is not None else R.builtin(zr.base)
            m = self.models[model]
            # defaults < the recipe (what it sets itself) < the model's options < its overrides
            layers = {**{k: v for k, v in self.default_options.items() if k not in zr.sets},
                      **zr.options, **m.options, **m.overrides.get(recipe, {})}
            if image:
                layers["image"] = _image_spec(image)
            r = R.override(base, {**layers, **data}) if (layers or any(data.values())) else R._copy(base)
            for k, v in data.items():
                setattr(r.data, k, v)
            return r
        except OnnxCompressError as exc:
            raise ManifestError(f"{self.path}: model '{model}', recipe '{recipe}': {exc}") from None

    def tasks(self, only: list[str] | None = None, recipes: list[str] | None = None) -> list[tuple[str, str]]:
        """The (model, recipe) pairs to run, in manifest order.

        Args:
            only: model names (``None``: all); unknown names raise :class:`ManifestError`.
            recipes: run exactly these recipes on every selected model (``None``: each model's list).
        """
        for name in only or []:
            if name not in self.models:
                raise ManifestError(f"--only {name}: no such model in {self.path} (models: {', '.join(self.models)})")
        for r in recipes or []:
            if r not in self.recipes and r != TUNE_TASK:
                raise ManifestError(f"--recipe {r}: no such recipe in {self.path} (recipes: "
                                    f"{', '.join([*self.recipes, TUNE_TASK])})")
        out = []
        for name, m in self.models.items():
            if only and name not in only:
                continue
            for r in (recipes or m.recipes):
                if r != TUNE_TASK:
                    out.append((name, r))
            if m.tune is not None and (recipes is None or TUNE_TASK in recipes):
                out.append((name, TUNE_TASK))  # the model's budget search, after its recipes
        if recipes and not out:  # asked for by name, and nothing matches: say so, not "0 tasks, ok"
            raise ManifestError(f"--recipe {', '.join(recipes)}: no selected model has it" +
                                (f" (a '{TUNE_TASK}' task needs a tune = {{...}} table in the model or [defaults])"
                                 if TUNE_TASK in recipes else ""))
        return out


def _tune(where: str, value: Any) -> dict[str, Any] | None:
    """A ``tune = {metric = "top1", max_drop = 1.0, ...}`` table: ``onnxcompress tune``'s budget
    (:class:`onnxcompress.tune.Budget`) and the search's ``trials`` / ``time_budget_s``;
    ``false`` turns a ``[defaults]`` tune off for the model."""
    if value is False:
        return None
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: 'tune' must be a table like {{ metric = \"top1\", max_drop = 1.0 }} "
                            "(or false)")
    value = {str(k).replace("-", "_"): v for k, v in value.items()}  # dashes or underscores, as options
    bad = set(value) - set(_TUNE_KEYS)
    if bad:
        raise ManifestError(f"{where}: tune: unknown key(s) {sorted(bad)} (known: {', '.join(_TUNE_KEYS)})")
    t = {k: _check_value(f"{where} tune", k, kind, value[k]) for k, kind in _TUNE_KEYS.items() if k in value}
    t.setdefault("metric", "top1")
    t.setdefault("max_drop", 1.0)
    t.setdefault("trials", TUNE_TRIALS)
    if t["trials"] < 1:
        raise ManifestError(f"{where}: tune: trials must be >= 1, got {t['trials']}")
    if "time_budget_s" in t and not t["time_budget_s"] > 0:
        raise ManifestError(f"{where}: tune: time_budget_s must be > 0 seconds, got {t['time_budget_s']}")
    if isinstance(t["metric"], str) and t["metric"].startswith("python:") and t["metric"].count(":") < 2:
        raise ManifestError(f"{where}: tune: metric {t['metric']!r}: write python:module:function")
    from ..tune import Budget

    try:
        Budget(**{k: t[k] for k in ("metric", "max_drop", "min_speedup", "max_size_mb") if k in t}).check()
    except OnnxCompressError as exc:
        raise ManifestError(f"{where}: tune: {exc}") from None
    return t


def _image_spec(img: dict[str, Any]) -> ImageSpec:
    img = dict(img)
    for k in ("size", "mean", "std"):
        if img.get(k) is not None:
            img[k] = tuple(img[k])
    return ImageSpec(**img)


def options_from_dict(d: dict[str, Any]) -> OptimizeOptions:
    """Build :class:`OptimizeOptions` out of a merged option dict (see :meth:`Manifest.options_for`)."""
    kw = dict(d)
    kw.pop("description", None)
    img = kw.pop("image", None)
    o = P.build(OptimizeOptions, kw)
    if img:
        o.image = _image_spec(img)
    o.check()
    return o


def _check_value(where: str, key: str, kind: str, value: Any) -> Any:
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if optional and value is False and base != "bool":
        return None
    if base == "any":
        return value
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "strlist": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[base]
    if not ok:
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                "strlist": "a list of strings"}[base]
        raise ManifestError(f"{where}: '{key}' must be {want}{' (or false for off)' if optional else ''}, "
                            f"got {value!r}")
    return float(value) if base == "float" else value


def _norm_options(where: str, table: Any, *, allow_per_model: bool = False) -> dict[str, Any]:
    """Flat option keys (``OptimizeOptions`` fields), each checked by its declared parameter."""
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: expected a table of optimize options, got {table!r}")
    out: dict[str, Any] = {}
    for raw, value in table.items():
        key = raw.replace("-", "_")
        if key in ("description", "base"):
            continue
        if key in _PER_MODEL_ONLY and not allow_per_model:
            raise ManifestError(f"{where}: '{raw}' is a per-model setting: put it in the [models.<name>] table")
        if key not in _FLAT:
            raise ManifestError(f"{where}: unknown option '{raw}' (known: {', '.join(sorted(_FLAT))})")
        try:
            v = _FLAT[key].check(value, where)
        except P.ParamError as exc:
            raise ManifestError(f"{exc} ('{raw}' in the manifest)") from None
        out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _recipe(p: Path, name: str, t: dict) -> Recipe:
    """One ``[recipes.<name>]`` table: a whole recipe (``stages``), a built-in ``base`` with flat
    options over it, or flat options (the flags form)."""
    where = f"{p}: [recipes.{name}]"
    desc = str(t.get("description", ""))
    if "stages" in t:
        data = t.get("data", {})
        if isinstance(data, dict) and any(k in data for k in ("calibration", "validation", "image")):
            raise ManifestError(f"{where}: data sources are per-model settings: put them in the [models.<name>] table")
        try:
            rec = R.Recipe.from_dict(t, where=where)
        except OnnxCompressError as exc:
            raise ManifestError(str(exc)) from None
        return Recipe(name, {}, desc or rec.description, recipe=rec, sets=_keys_set(t))
    base = t.get("base")
    if base is not None and base not in R.BUILTIN:
        raise ManifestError(f"{where}: base '{base}' is not a built-in recipe ({', '.join(R.BUILTIN)})")
    opts = _norm_options(where, t)
    sets = frozenset(opts) | (frozenset(R.BUILTIN[base][1]) if base else frozenset())
    return Recipe(name, opts, desc, base=base, sets=sets)


def _keys_set(t: dict) -> frozenset[str]:
    """The flat option names a whole-recipe table sets (its stage and section keys, by declaration)."""
    from ..passes.registry import STAGES

    flat = {id(p): k for k, p in P.params_of(OptimizeOptions).items()}
    out = set()
    for st in t.get("stages", []):
        spec = STAGES.get(st.get("pass")) if isinstance(st, dict) else None
        decl = P.params_of(spec.config) if spec else {}
        out |= {flat[id(decl[k])] for k in st if k in decl and id(decl[k]) in flat}
    for name, klass in R._SECTIONS.items():
        sec = t.get(name, {})
        decl = P.params_of(klass)
        out |= {flat[id(decl[k])] for k in (sec if isinstance(sec, dict) else {}) if k in decl and id(decl[k]) in flat}
    return frozenset(out)


def _check_names(where: str, names) -> None:
    for n in names:
        if not _NAME.match(n):
            raise ManifestError(f"{where}: name '{n}' must be letters, digits, '_', '-', '.', '+' "
                                "(it becomes a file name)")


def _path(base: Path, where: str, key: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: '{key}' must be a path string, got {value!r}")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _image(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: 'image' must be a table (size, mean, std, layout, channels)")
    bad = set(value) - _IMAGE_KEYS
    if bad:
        raise ManifestError(f"{where}: unknown image key(s) {sorted(bad)} (known: {sorted(_IMAGE_KEYS)})")
    for k, n in (("size", 2), ("mean", 3), ("std", 3)):
        v = value.get(k)
        if v is not None and (not isinstance(v, list) or len(v) != n
                              or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise ManifestError(f"{where}: image.{k} must be a list of {n} numbers, got {v!r}")
    if value.get("layout", "NCHW").upper() not in ("NCHW", "NHWC"):
        raise ManifestError(f"{where}: image.layout must be NCHW or NHWC")
    if value.get("channels", "RGB").upper() not in ("RGB", "BGR"):
        raise ManifestError(f"{where}: image.channels must be RGB or BGR")
    out = dict(value)
    for k in ("layout", "channels"):
        if k in out:
            out[k] = out[k].upper()
    return out


def _fetch(where: str, value: Any) -> list[list[str]]:
    if value is None:
        return []
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = [value]  # one command
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in value)):
        raise ManifestError(f"{where}: 'fetch' must be a command (list of strings) or a list of commands, "
                            f"e.g. [\"{{python}}\", \"../scripts/fetch_zoo.py\", \"--only\", \"NAME\"]")
    return value


def load_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest.

    Raises:
        ManifestError: missing/unreadable file, invalid TOML, unknown keys or options, wrong
            types, undefined recipes, a model without ``path``, or options ``optimize`` refuses.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: no such manifest file")
    if tomllib is None:  # pragma: no cover
        raise ManifestError("reading TOML on Python 3.10 needs 'tomli' (pip install tomli)")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(f"{p}: not a text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{p}: invalid TOML ({exc})") from None
    except RecursionError:
        raise ManifestError(f"{p}: nested too deeply to be a manifest") from None
    base = p.resolve().parent
    known_top = {"run", "defaults", "recipes", "models", "version", "description"}
    bad = set(doc) - known_top
    if bad:
        raise ManifestError(f"{p}: unknown top-level key(s) {sorted(bad)} (known: {sorted(known_top)})")

    run_t = doc.get("run", {})
    if not isinstance(run_t, dict):
        raise ManifestError(f"{p}: [run] must be a table")
    run: dict[str, Any] = {}
    for k, v in run_t.items():
        key = k.replace("-", "_")
        if key not in _RUN_KEYS:
            raise ManifestError(f"{p}: [run] unknown key '{k}' (known: {', '.join(_RUN_KEYS)})")
        run[key] = _check_value(f"{p}: [run]", k, _RUN_KEYS[key], v)

    recipes_t = doc.get("recipes", {})
    if not isinstance(recipes_t, dict) or not recipes_t:
        raise ManifestError(f"{p}: no recipes: add at least one [recipes.<name>] table (e.g. [recipes.fuse])")
    _check_names(f"{p}: [recipes]", recipes_t)
    recipes = {}
    for name, t in recipes_t.items():
        where = f"{p}: [recipes.{name}]"
        if name == TUNE_TASK:
            raise ManifestError(f"{where}: '{TUNE_TASK}' names a model's budget search (tune = {{...}} in "
                                "[models.<name>] or [defaults]); give the recipe another name")
        if not isinstance(t, dict):
            raise ManifestError(f"{where}: must be a table of optimize options")
        recipes[name] = _recipe(p, name, t)

    defaults_t = doc.get("defaults", {})
    if not isinstance(defaults_t, dict):
        raise ManifestError(f"{p}: [defaults] must be a table")
    bad = set(defaults_t) - {"recipes", "options", "tune"}
    if bad:
        raise ManifestError(f"{p}: [defaults] unknown key(s) {sorted(bad)} (known: recipes, options, tune)")
    default_tune = _tune(f"{p}: [defaults]", defaults_t["tune"]) if "tune" in defaults_t else None
    default_recipes = defaults_t.get("recipes", list(recipes))
    if not isinstance(default_recipes, list) or not all(isinstance(r, str) for r in default_recipes):
        raise ManifestError(f"{p}: [defaults] recipes must be a list of recipe names")
    for r in default_recipes:
        if r not in recipes:
            raise ManifestError(f"{p}: [defaults] recipes names '{r}', which is not defined "
                                f"(recipes: {', '.join(recipes)})")
    default_options = _norm_options(f"{p}: [defaults] options", defaults_t.get("options", {}))

    models_t = doc.get("models")
    if not isinstance(models_t, dict) or not models_t:
        raise ManifestError(f"{p}: no models: add at least one [models.<name>] table with a 'path'")
    _check_names(f"{p}: [models]", models_t)
    models = {}
    for name, t in models_t.items():
        where = f"{p}: [models.{name}]"
        if not isinstance(t, dict):
            raise ManifestError(f"{where}: must be a table with at least 'path'")
        bad = set(t) - _MODEL_KEYS
        if bad:
            raise ManifestError(f"{where}: unknown key(s) {sorted(bad)} (known: {', '.join(sorted(_MODEL_KEYS))})")
        if "path" not in t:
            raise ManifestError(f"{where}: missing 'path' (the .onnx file, relative to the manifest)")
        rlist = t.get("recipes", default_recipes)
        if not isinstance(rlist, list) or not all(isinstance(r, str) for r in rlist):
            raise ManifestError(f"{where}: 'recipes' must be a list of recipe names")
        for r in rlist:
            if r == TUNE_TASK:
                raise ManifestError(f"{where}: '{TUNE_TASK}' is not a recipe: give the model a tune = {{...}} table "
                                    "(its budget) instead")
            if r not in recipes:
                raise ManifestError(f"{where}: recipe '{r}' is not defined (recipes: {', '.join(recipes)})")
        overrides_t = t.get("overrides", {})
        if not isinstance(overrides_t, dict):
            raise ManifestError(f"{where}: 'overrides' must be a table of [models.{name}.overrides.<recipe>] tables")
        overrides = {}
        for r, o in overrides_t.items():
            if r not in recipes:
                raise ManifestError(f"{where}: overrides for recipe '{r}', which is not defined "
                                    f"(recipes: {', '.join(recipes)})")
            overrides[r] = _norm_options(f"{where}.overrides.{r}", o)
        lim = {}
        for k in ("timeout_s", "memory_limit_mb"):
            if k in t:
                lim[k] = _check_value(where, k, _RUN_KEYS[k], t[k])
        models[name] = ModelEntry(
            name=name, path=_path(base, where, "path", t["path"]),
            calibration=_path(base, where, "calibration", t.get("calibration")),
            validation=_path(base, where, "validation", t.get("validation")),
            fetch=_fetch(where, t.get("fetch")), recipes=list(rlist),
            options=_norm_options(f"{where} options", t.get("options", {})), overrides=overrides,
            image=_image(where, t["image"]) if "image" in t else None,
            description=str(t.get("description", "")),
            tune=_tune(where, t["tune"]) if "tune" in t else default_tune, **lim)

    mf = Manifest(p.resolve(), models, recipes, list(default_recipes), default_options, run)
    # every task's options must be acceptable to optimize(): fail now, not after an hour
    for name, m in models.items():
        for r in recipes:  # --recipe may run any recipe on any model
            try:
                mf.recipe_for(name, r)
            except ManifestError:
                raise
            except OnnxCompressError as exc:
                raise ManifestError(f"{p}: model '{name}', recipe '{r}': {exc}") from None
    return mf
