"""Every option declared once: declarations, recipes (TOML), flags over recipes, the planner, the
Python API's model and data forms, and the package's structure."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer.main
from typer.testing import CliRunner

import graphs as G
from onnxcompress import OptimizeOptions, optimize
from onnxcompress import params as P
from onnxcompress import recipe as R
from onnxcompress.cli import app
from onnxcompress.cli_flags import flag_fields
from onnxcompress.errors import GateFailedError, OnnxCompressError
from onnxcompress.passes.registry import STAGES

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "onnxcompress"
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_test.npz"
runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- declarations


def test_every_stage_declares_typed_params_with_help():
    for name, spec in STAGES.items():
        cfg = spec.config()
        for key, p in P.params_of(cfg).items():
            assert p.help and p.kind in P.KINDS, (name, key)
            assert p.check(getattr(cfg, key)) == getattr(cfg, key) or p.kind == "strlist", (name, key)
            if p.search is not None and p.kind in ("int", "float") and len(p.search) == 2 and p.choices is None:
                lo, hi = p.search
                p.check(lo), p.check(hi)  # a search range inside the declared range


def test_each_cli_flag_maps_to_exactly_one_declared_param():
    cmd = typer.main.get_command(app).get_command(None, "optimize")  # a lazy command: loaded here
    flags = {o: prm.name for prm in cmd.params for o in (*prm.opts, *prm.secondary_opts) if o.startswith("--")}
    own = {"--output", "--recipe", "--report", "--html", "--quiet",
           "--image-size", "--mean", "--std", "--layout", "--channels"}  # image flags: ImageSpec's params
    declared = flag_fields()
    by_flag: dict[str, list] = {}
    for field, p in declared.items():
        for spelling in p.flag.split("/"):
            by_flag.setdefault(spelling, []).append(p)
    for flag, field in flags.items():
        if flag in own:
            continue
        if flag == "--min-top1":  # an older spelling of --min-top1-agreement
            continue
        assert flag in by_flag, f"{flag} has no declared parameter"
        assert len({id(p) for p in by_flag[flag]}) == 1, f"{flag} maps to several parameters"
        assert by_flag[flag][0] is declared[field], flag
    # and every declared flag is on the command line
    assert set(by_flag) <= set(flags)
    # a parameter read by several stages is one object (declared once)
    targets = {id(P.params_of(STAGES[s].config)["target"]) for s in STAGES if "target" in P.params_of(STAGES[s].config)}
    assert len(targets) == 1


def test_values_are_checked_by_their_declaration():
    with pytest.raises(OnnxCompressError, match="--calibration-method must be one of"):
        OptimizeOptions(quantize="static", calibration_method="median").check()
    with pytest.raises(OnnxCompressError, match=r"--prune must be in \[0, 1\)"):
        OptimizeOptions(prune=1.5).check()
    with pytest.raises(OnnxCompressError, match="--prune-nm must look like 2:4"):
        OptimizeOptions(prune_mode="nm", prune_nm="4:2").check()
    with pytest.raises(OnnxCompressError, match="unknown parameter 'sparsity'"):
        R.Stage("prune-channels", {"sparsity": 0.5})
    res = _invoke("optimize", DIGITS, "-o", "/tmp/never.onnx", "--target", "z80", "-q")
    assert res.exit_code == 2 and "--target must be one of" in res.output


# ----------------------------------------------------------------------------- recipes as data


@pytest.mark.parametrize("name", list(R.BUILTIN))
def test_builtin_recipes_round_trip_toml(name):
    r = R.builtin(name)
    text = r.to_toml()
    again = R.loads(text)
    assert again.to_toml() == text
    assert again == r
    # the flat view plans the same stages again
    flat = R.from_options(R.to_options(r))
    assert [(s.name, s.config) for s in flat.stages] == [(s.name, s.config) for s in r.stages]


def test_recipe_errors_name_file_and_key(tmp_path):
    bad = {
        "[[stages]]\npass = 'quantise-static'": "unknown stage 'quantise-static'",
        "[[stages]]\npass = 'quantize-static'\ncalibration_method = 'median'": "--calibration-method must be one of",
        "[gates]\nmin_cosine = 2.0": "--min-cosine must be in",
        "colour = 'red'": "unknown key(s) ['colour']",
        "[[stages]]\nratio = 0.3": "pass = \"<name>\"",
        "[gates.outputs.y]\nmin_cos = 0.9": "unknown parameter 'min_cos'",
        "stages = 3": "must be an array of tables",
        "[[stages": "invalid TOML",
        "x = " + "[" * 3000 + "]" * 3000: "nested too deeply",
        "[[stages]]\npass = 'fuse'\n" * 40: "at most 32",
        "[[stages]]\npass = 'quantize-auto'\n" * 2: "more than one int8 stage",
    }
    for text, needle in bad.items():
        p = tmp_path / "r.toml"
        p.write_text(text)
        with pytest.raises(R.RecipeError) as ei:
            R.load(p)
        assert needle in str(ei.value) and str(p) in str(ei.value), (text, str(ei.value))
    with pytest.raises(R.RecipeError, match="no such recipe file, and not a built-in"):
        R.load(tmp_path / "missing.toml")


def test_flags_override_a_recipe():
    base = R.builtin("int8-static")
    r = R.override(base, {"calibration_method": "percentile", "min_cosine": 0.99})
    assert r.stage("quantize-static").config.calibration_method == "percentile"
    assert r.gates.min_cosine == 0.99 and base.gates.min_cosine is None  # the base is not touched
    r = R.override(base, {"target": "avx2"})
    assert {s.config.target for s in r.stages if hasattr(s.config, "target")} == {"avx2"}
    r = R.override(base, {"quantize": "dynamic"})  # a flag that chooses stages re-plans
    assert [s.name for s in r.stages] == ["fuse", "smooth-quant", "quantize-dynamic"]
    r = R.override(R.builtin("fuse"), {"calibration_method": "entropy"})
    assert any("--calibration-method is ignored" in n for n in r.notes)
    # a flag that chooses stages re-plans, keeping the settings no flag expresses
    tuned = R.override(base, {})
    tuned.stage("quantize-static").config.percentile = 99.0
    tuned.stages = [s for s in tuned.stages if s.name != "pair-permute"]
    r = R.override(tuned, {"prune": 0.3})
    assert r.stage("quantize-static").config.percentile == 99.0 and r.stage("prune-magnitude") is not None
    assert any("re-planned" in n for n in r.notes)
    r = R.override(tuned, {"quantize": "dynamic"})  # the smoothing mode follows the new int8 mode
    assert r.stage("smooth-quant").config.mode == "dynamic"
    # --exclude NODE keeps the recipe's op types; "off" round-trips
    scoped = R.override(base, {"exclude_op_types": ("Gemm",)})
    assert R.override(scoped, {"exclude_nodes": ("/conv1/Conv",)}).scope.exclude_op_types == ("Gemm",)
    off = R.override(base, {"min_sqnr_db": None})
    assert R.loads(off.to_toml()).stage("quantize-static").config.min_sqnr_db is None


def _cases(tmp_path):
    tr = tmp_path / "mlp.onnx"
    onnx.save(G.mlp(k=64, n=32, batch=4), tr)
    rng = np.random.default_rng(0)
    cal = tmp_path / "mlp.npz"
    np.savez(cal, x=rng.standard_normal((12, 4, 64)).astype(np.float32))
    return [
        (DIGITS, ["--quantize", "static", "--prune", "0.3", "--prune-mode", "channel", "--calibration", CALIB]),
        (DIGITS, ["--quantize", "dynamic", "--prune", "0.5", "--calibration", CALIB]),
        (DIGITS, ["--prune-mode", "nm", "--calibration", CALIB, "--validation", VAL]),
        (DIGITS, ["--quantize", "static", "--calibration", CALIB, "--validation", VAL, "--target", "avx2"]),
        (tr, []),
        (tr, ["--quantize", "static", "--calibration", cal, "--per-tensor"]),
        (DIGITS, ["--quantize", "static", "--calibration", CALIB, "--min-node-sqnr", "0"]),  # "off" survives TOML
    ]


def test_recipe_show_then_optimize_recipe_writes_the_same_bytes(tmp_path):
    for i, (model, flags) in enumerate(_cases(tmp_path)):
        a, b, r = tmp_path / f"a{i}.onnx", tmp_path / f"b{i}.onnx", tmp_path / f"r{i}.toml"
        res = _invoke("optimize", model, "-o", a, "--no-latency", "-q", *flags)
        assert res.exit_code == 0, res.output
        shown = _invoke("recipe", "show", "--no-latency", *flags)
        assert shown.exit_code == 0, shown.output
        r.write_text(shown.stdout)
        res = _invoke("optimize", model, "-o", b, "--recipe", r, "-q")
        assert res.exit_code == 0, res.output
        assert _sha(a) == _sha(b), flags


def test_builtin_recipe_by_name_equals_its_flags(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _invoke("optimize", DIGITS, "-o", a, "--quantize", "static", "--calibration", CALIB, "-q").exit_code == 0
    res = _invoke("optimize", DIGITS, "-o", b, "--recipe", "int8-static", "--calibration", CALIB, "-q")
    assert res.exit_code == 0, res.output
    assert _sha(a) == _sha(b)


def test_auto_from_a_recipe_file(tmp_path):
    r = tmp_path / "auto.toml"
    r.write_text(_invoke("recipe", "show", "--quantize", "auto").stdout)
    res = _invoke("optimize", DIGITS, "-o", tmp_path / "q.onnx", "--recipe", r, "--calibration", CALIB,
                  "--validation", VAL, "--report", tmp_path / "rep.json", "-q")
    assert res.exit_code == 0, res.output
    import json
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["auto"]["chosen"] in ("dynamic", "static") and set(rep["auto"]["candidates"]) == {"dynamic", "static"}


def test_gates_per_output_name(tmp_path):
    """One output gated strictly, the other not at all."""
    from onnx import helper
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"])]
    m = G.model(nodes, [G.vi("x", [4, 32])], [G.vi("a", [4, 16]), G.vi("b", [4, 16])],
                [G.init("w", rng.standard_normal((32, 16))), G.init("w2", rng.standard_normal((32, 16)))])
    src = tmp_path / "two.onnx"
    onnx.save(m, src)
    strict = R.builtin("int8-dynamic")
    strict.gates.outputs["a"] = R.OutputGates(max_rel_error=1e-9)
    strict.gates.fallback = False
    with pytest.raises(GateFailedError) as ei:
        optimize(src, tmp_path / "q.onnx", recipe=strict)
    rows = ei.value.report["gates"]
    assert rows and all(r["outputs"] == ["a"] for r in rows) and not (tmp_path / "q.onnx").exists()
    strict.gates.outputs = {"c": R.OutputGates(min_cosine=0.9)}  # a name the model does not have
    with pytest.raises(R.RecipeError, match="no output named 'c'"):
        optimize(src, tmp_path / "q.onnx", recipe=strict)
    strict.gates.outputs = {"b": R.OutputGates(min_cosine=0.9)}
    res = optimize(src, tmp_path / "q.onnx", recipe=strict)
    assert [r["outputs"] for r in res.report["gates"]] == [["b"]]


# ----------------------------------------------------------------------------- the Python API


def test_optimize_takes_a_modelproto_and_arrays(tmp_path):
    proto = onnx.load(DIGITS)
    with np.load(CALIB) as z:
        calib = {k: z[k] for k in z.files}
    a = tmp_path / "a.onnx"
    res = optimize(proto, a, OptimizeOptions(quantize="static", calibration=calib, latency=False))
    assert res.passed and a.exists() and res.report["input"] == "<in-memory model>"
    # the same data as a file: the same model
    b = tmp_path / "b.onnx"
    optimize(DIGITS, b, OptimizeOptions(quantize="static", calibration=CALIB, latency=False))
    assert _sha(a) == _sha(b)
    # a list of feed dicts, and a CalibrationDataReader-like object; no output path: the model comes back
    name = proto.graph.input[0].name
    feeds = [{name: calib[name][i:i + 1]} for i in range(len(calib[name]))]

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    for src in (feeds, Reader()):
        res = optimize(proto, None, OptimizeOptions(quantize="static", calibration=src, latency=False))
        assert res.output is None and res.model is not None and not res.report["written"]
        import onnx_ir as ir
        onnx.checker.check_model(ir.to_proto(res.model))


def test_wrong_types_are_one_line_errors(tmp_path):
    with pytest.raises(OnnxCompressError, match="model must be a path, an onnx.ModelProto"):
        optimize(42, tmp_path / "x.onnx")
    with pytest.raises(OnnxCompressError, match="calibration data: expected a path"):
        optimize(DIGITS, tmp_path / "x.onnx", OptimizeOptions(calibration=np.zeros(3)))
    with pytest.raises(OnnxCompressError, match="options or a recipe, not both"):
        optimize(DIGITS, tmp_path / "x.onnx", OptimizeOptions(), recipe="fuse")
    with pytest.raises(OnnxCompressError, match="no array for model input"):
        optimize(DIGITS, tmp_path / "x.onnx", OptimizeOptions(quantize="static", calibration={"nope": np.zeros(3)}))
    assert not (tmp_path / "x.onnx").exists()


# ----------------------------------------------------------------------------- structure


def test_no_free_form_options_in_passes():
    for f in (PKG / "passes").rglob("*.py"):
        assert "options.get(" not in f.read_text(), f


def test_no_function_in_api_over_80_lines():
    tree = ast.parse((PKG / "api.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= 80, f"api.{node.name} has {n} lines"


def _imports() -> dict[str, set[str]]:
    """Module -> package modules it imports (at any depth: lazy imports count too)."""
    mods = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = f
    out: dict[str, set[str]] = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for c in cands:
                if c in mods and c != name and not (name.startswith(c + ".") or c == "onnxcompress"):
                    deps.add(c)
        out[name] = deps
    return out


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
