"""``onnxcompress recipe``: show the effective recipe of a command line, list the built-in ones,
and list every declared parameter."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import params as P
from .cli_common import CONTEXT, command_group, one_line_errors, _fail, out_console
from .cli_flags import effective_recipe, given, with_flags
from .errors import OnnxCompressError

recipe_app = typer.Typer(no_args_is_help=True, help="Recipes: what `optimize` runs, as TOML.", context_settings=CONTEXT)
commands = command_group()
commands.add_typer(recipe_app, name="recipe")


def _show(recipe: Optional[str], **flags):
    """Print the recipe these flags mean, as TOML (`optimize IN -o OUT --recipe FILE` runs it).

    `onnxcompress recipe show --quantize static --prune 0.3 --prune-mode channel > r.toml`"""
    with one_line_errors():
        rec = effective_recipe(recipe, given(flags))
        for k in ("calibration", "validation"):  # a file that works from any folder
            v = getattr(rec.data, k)
            if isinstance(v, (str, Path)):
                setattr(rec.data, k, str(Path(v).expanduser().resolve()))
        text = rec.to_toml()
    for n in rec.notes:
        text += f"# note: {n}\n"
    print(text, end="", flush=True)


def _show_command(**kw):
    return _show(**kw)


_show_command.__doc__ = _show.__doc__
recipe_app.command("show")(with_flags(_show_command, [
    inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                      default=typer.Option(None, "--recipe", help="Start from this recipe file or built-in name.")),
]))


@recipe_app.command("list")
def list_recipes():
    """The built-in recipes (use one with `optimize --recipe NAME`)."""
    from .recipe import BUILTIN

    t = Table(title="built-in recipes")
    t.add_column("name")
    t.add_column("stages")
    t.add_column("what it does")
    from .recipe import builtin

    for name, (desc, _) in BUILTIN.items():
        t.add_row(name, " → ".join(s.name for s in builtin(name).stages), desc)
    out_console.print(t)


@recipe_app.command("params")
def list_params(stage: Optional[str] = typer.Argument(None, help="Only this stage or section (default: all).")):
    """Every declared parameter of every stage and recipe section (\\[gates], \\[data], \\[scope],
    \\[output]): default, allowed values, flag, help. Per-output gates: \\[gates.outputs.NAME] takes
    max_rel_error, min_cosine, min_top1_agreement and min_mean_cosine."""
    # (the backslashes above keep rich from reading the TOML section names as markup in --help)
    from .passes.registry import STAGES

    from .recipe import SECTIONS

    tables = [(f'[[stages]] pass = "{name}": {spec.help}', spec.config) for name, spec in STAGES.items()
              if stage is None or name == stage]
    tables += [(f"[{name}]", cls) for name, cls in SECTIONS.items() if stage is None or name == stage]
    if not tables:
        _fail(OnnxCompressError(f"no stage or section '{stage}' (stages: {', '.join(STAGES)}; "
                                f"sections: {', '.join(SECTIONS)})"))
    for title, cls in tables:
        decl = P.params_of(cls)
        if not decl:
            out_console.print(escape(title) + ": no parameters\n", highlight=False)
            continue
        t = Table(title=escape(title), title_justify="left")
        for col in ("key", "default", "values", "flag", "help"):
            t.add_column(col)
        for key, p in decl.items():
            vals = (", ".join(map(str, p.choices)) if p.choices else ", ".join(map(str, p.search)) if p.search
                    and p.kind == "any" else p.range_text() if p.kind in ("int", "float") else p.kind)
            t.add_row(key, "off" if p.default is None else str(p.default), vals, p.flag or "", p.help)
        out_console.print(t)
