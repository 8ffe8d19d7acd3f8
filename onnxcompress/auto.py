"""``--quantize auto``: quantize with each mode, keep the fastest that keeps the answers.

Dynamic always, static when calibration data is given (calibrating on random inputs is no basis
for a choice). Each candidate is the recipe with its ``quantize-auto`` stage planned for one mode
(:func:`onnxcompress.recipe.quantize_stages`), run through the whole pipeline (gates, default
floor and fallback included) into a temporary folder beside the output.

The choice is decided on the task: a candidate *keeps the answers* when it meets the user's gates,
or — without gates — the default floor (:func:`onnxcompress.gates.floor`: top-1 agreement for
class scores and index outputs, mean cosine for other outputs). The candidates that keep the
answers are timed together on the validation inputs with :func:`onnxcompress.bench.benchmark`
(interleaved, the first requested provider; only when the target is this machine) and the
fastest is written (atomically, after the usual checks) — if it is at least
:data:`AUTO_SPEED_MARGIN` faster than the next; otherwise the more faithful one (:func:`fidelity`,
then the smaller). Only when no candidate keeps the answers (``--accept-degraded``, or no floor
applies) does fidelity alone choose, within :data:`AUTO_COSINE_SLACK` of the best worst-output
cosine. A worst-sample cosine window is the wrong test for logits: it left static's speed on the
table on classifiers that kept 98.9 % top-1 (issue 18).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import GateFailedError, ModelWriteError, OnnxCompressError
from .model_io import check_output_path, external_data_files, load_model, save_model
from .recipe import Recipe, _copy, quantize_stages
from .pipeline import OptimizeResult, _load_data, _Run, run
from .cost import peak_rss_mib
from .progress import ProgressEvent
from .runtime import cpu_features
from .util import compressed_size, jsonable

#: when no candidate meets the task criterion: those whose worst-output cosine is within this of
#: the best one's are timed
AUTO_COSINE_SLACK = 0.01
#: a candidate must be this much faster (median ratio) to win on speed; closer is a tie
AUTO_SPEED_MARGIN = 1.05


def fidelity(report: dict) -> float:
    """Worst cosine over the float outputs of every validated provider; for a model whose outputs
    are all indices (int32/int64), the worst agreement as a fraction. ``nan`` without validation."""
    outs = [o for v in report.get("validation", []) for o in v["outputs"]]
    cos = [float(o["cosine"]) for o in outs if not o.get("integer")]
    if cos:
        return min(cos)
    agree = [float(o["top1_agreement"]) / 100.0 for o in outs if o.get("top1_agreement") is not None]
    return min(agree) if agree else float("nan")


def keeps_answers(report: dict) -> bool:
    """Whether a candidate that was written meets the task criterion: every gate row (the user's
    gates or the default floor) passed. ``False`` when nothing judged it."""
    rows = report.get("gates") or []
    return bool(rows) and all(g["passed"] for g in rows)


def criterion(recipe: Recipe) -> str:
    """The task criterion in words (for the report)."""
    g = recipe.gates
    if g.any:
        return "your gates"
    return (f"default floor: top-1 agreement >= {g.floor_top1_agreement:g} % for class scores, "
            f"mean cosine >= {g.floor_mean_cosine:g} for other outputs")


def candidate(recipe: Recipe, mode: str) -> Recipe:
    """``recipe`` with its ``quantize-auto`` stage planned for ``mode``, written inline."""
    r = _copy(recipe)
    i = next(k for k, s in enumerate(r.stages) if s.name == "quantize-auto")
    q = r.stages[i].config
    if mode != "static":  # settings only static mode reads, at their defaults
        q = replace(q, calibration_method="auto", bias_correction_mode="node")
    r.stages[i:i + 1] = quantize_stages(mode, q)
    r.output = replace(r.output, external_data=None)
    r.notes = [n for n in r.notes]
    return r


def optimize_auto(model, output, recipe: Recipe, say: Callable[[str], None]):
    """Run every candidate, choose, write (see the module docstring).

    Raises:
        GateFailedError: no candidate passed the gates (``.report`` holds one candidate's).
        OnnxCompressError: bad input (the first candidate's error, as ``--quantize dynamic`` would
            raise it); a model or output that is not a file path.
    """
    if not isinstance(model, (str, Path)) or output is None:
        raise OnnxCompressError("--quantize auto needs the model as a file path and an output path "
                                "(the candidates are written and timed as files)")
    t0 = time.perf_counter()
    inp, out = Path(model), Path(output)
    from .pipeline import _data_files

    protect = (inp, *external_data_files(inp), *_data_files(recipe))
    folder = check_output_path(out, protect, recipe.output.external_data)  # before two whole runs
    modes = ["dynamic", "static"] if recipe.data.calibration is not None else ["dynamic"]
    _sweep(folder)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".onnxcompress-auto-{os.getpid()}-", dir=folder))
    except OSError as exc:
        raise ModelWriteError(f"{folder}: cannot write there ({exc.strerror or exc})") from None
    try:
        cands = _run_candidates(inp, recipe, modes, tmp, say)
        ok = {m: c for m, c in cands.items() if c["passed"]}
        summary = {m: {"passed": c["passed"], "fidelity": fidelity(c["report"]) if c["report"] else None,
                       "keeps_answers": keeps_answers(c["report"]) if c["passed"] else False,
                       "file_bytes": c["report"].get("after", {}).get("file_bytes"), "error": c.get("error")}
                   for m, c in cands.items()}
        auto: dict[str, Any] = {"candidates": summary, "chosen": None, "fidelity": "worst-output cosine",
                                "criterion": criterion(recipe)}
        if not ok:
            _none_passed(cands, auto, out, t0, say)
        chosen, why = _choose(inp, recipe, modes, ok, summary, auto, tmp, say)
        auto["chosen"], auto["why"] = chosen, why
        tw = time.perf_counter()
        report = _write_chosen(inp, out, recipe, cands, chosen, summary, auto, protect, say)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["cost"] = _total_cost(cands, report["seconds"], (f"writing {out}", time.perf_counter() - tw))
        say(ProgressEvent("done", closed=report["cost"]["stages"][-1], final=True))  # the whole run is over
        return OptimizeResult(out, report, True, recipe=recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep(folder: Path) -> None:
    """Remove candidate folders that killed runs left behind (their process is gone)."""
    for d in folder.glob(".onnxcompress-auto-*-*"):
        try:
            pid = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # another user's live process
            continue


def _run_candidates(inp: Path, recipe: Recipe, modes, tmp: Path, say) -> dict[str, dict]:
    cands: dict[str, dict] = {}
    for mode in modes:
        say(f"auto: trying --quantize {mode}")
        path = tmp / f"{mode}.onnx"
        try:
            res = run(inp, path, candidate(recipe, mode),
                      progress=lambda m, mode=mode, path=path: say(_prefixed(_unprivate(m, path, mode), f"auto ({mode}): ")))
            cands[mode] = {"path": path, "report": res.report, "passed": True}
        except GateFailedError as exc:
            cands[mode] = {"report": getattr(exc, "report", {}), "passed": False,
                           "error": str(exc).replace(str(path), f"the {mode} candidate")}
        except OnnxCompressError as exc:
            if not cands:  # the first mode: bad input or data, which the user must see as such
                raise
            cands[mode] = {"report": {}, "passed": False, "error": str(exc).replace(str(path), f"the {mode} candidate")}
    return cands


def _none_passed(cands, auto, out: Path, t0: float, say) -> None:
    report = next((c["report"] for c in cands.values() if c["report"]), {})
    seconds = round(time.perf_counter() - t0, 2)
    report = {**report, "output": str(out), "auto": jsonable(auto), "written": False, "seconds": seconds,
              "cost": _total_cost(cands, seconds)}
    say(ProgressEvent("done", closed=None, final=True))  # the whole run is over (each candidate closed its own)
    err = GateFailedError("--quantize auto: no mode passed: " + "; ".join(
        f"{m}: {c.get('error', 'failed')}" for m, c in cands.items()) + f" -- {out} not written")
    err.report = report  # type: ignore[attr-defined]
    raise err


def _choose(inp, recipe: Recipe, modes, ok, summary, auto, tmp: Path, say) -> tuple[str, str]:
    """The mode to write and why: the candidates that keep the answers (task criterion) are timed;
    when none does, fidelity (within the slack) first."""
    fid = {m: summary[m]["fidelity"] for m in ok}
    best = max((f for f in fid.values() if f == f), default=float("nan"))
    keep = [m for m in ok if summary[m]["keeps_answers"]]
    if keep:
        for m in ok:
            if m not in keep:
                summary[m]["left_out"] = "misses the task criterion"
    else:
        keep = [m for m in ok if not (fid[m] < best - AUTO_COSINE_SLACK)]
        for m in ok:
            if m not in keep:
                summary[m]["left_out"] = (f"fidelity {fid[m]:.5f} is more than {AUTO_COSINE_SLACK:g} below the best "
                                          f"({best:.5f})")
    by_fidelity = sorted(keep, key=lambda m: (-(fid[m] if fid[m] == fid[m] else -1.0), summary[m]["file_bytes"] or 0))
    if len(modes) == 1:
        return by_fidelity[0], "static not tried (no --calibration data to calibrate on)"
    if len(ok) == 1:
        return by_fidelity[0], "the only mode that passed"
    if len(keep) == 1:
        return by_fidelity[0], ("the only mode that keeps the answers" if summary[keep[0]]["keeps_answers"]
                                else "the other lost more fidelity")
    target = recipe.stage("quantize-auto").config.target
    if target not in ("auto", cpu_features().int8_target):
        return by_fidelity[0], f"the more faithful one (target {target} is not this machine: no timing here)"
    try:
        return _time(inp, recipe, ok, keep, by_fidelity[0], summary, auto, tmp, say)
    except Exception as exc:  # noqa: BLE001 - timing is a tie-break: fidelity decides then
        return by_fidelity[0], f"the more faithful one (timing failed: {exc})"


def _time(inp, recipe: Recipe, ok, keep, chosen, summary, auto, tmp: Path, say) -> tuple[str, str]:
    from .bench import benchmark

    prov = recipe.output.providers[0] if recipe.output.providers else "cpu"
    data = tmp / "timing.npz"
    say("auto: timing the candidates (interleaved)")
    _, val, _ = _load_data(_Run(recipe, inp, None, None), load_model(inp))
    np.savez(data, **{f"{k}__{n}": a for k, f in enumerate(val[:8]) for n, a in f.items()})
    bench = benchmark([inp, *(ok[m]["path"] for m in keep)], data=data, duration=6.0, warmup=2,
                      memory=False, providers=(prov,))
    lat = {m: mb.latency.p50_ms for m, mb in zip(keep, bench.groups[0].models[1:])}
    for m in keep:
        summary[m]["latency_ms"] = float(f"{lat[m]:.4g}")
    auto["fp32_latency_ms"] = float(f"{bench.groups[0].models[0].latency.p50_ms:.4g}")
    fastest = sorted(keep, key=lambda m: lat[m])
    if lat[fastest[1]] >= AUTO_SPEED_MARGIN * lat[fastest[0]]:
        chosen = fastest[0]
        among = ("the modes that keep the answers" if summary[chosen]["keeps_answers"] else
                 f"the modes within {AUTO_COSINE_SLACK:g} of the best fidelity")
        why = (f"fastest ({lat[chosen]:.4g} vs {lat[fastest[1]]:.4g} ms median, interleaved on "
               f"{bench.groups[0].provider.replace('ExecutionProvider', '')}) of {among}")
    else:
        why = (f"speeds within {AUTO_SPEED_MARGIN - 1:.0%} of each other "
               f"({', '.join(f'{m} {lat[m]:.4g} ms' for m in keep)}): the more faithful one")
    if lat[chosen] > 1.1 * auto["fp32_latency_ms"]:
        summary[chosen]["slower_than_fp32"] = True
    return chosen, why


def _write_chosen(inp, out: Path, recipe: Recipe, cands, chosen, summary, auto, protect, say) -> dict:
    report = dict(cands[chosen]["report"])
    model = load_model(cands[chosen]["path"])
    say(f"writing {out}")
    size = save_model(model, out, external_data=recipe.output.external_data, protect=protect)
    report["after"] = {**report.get("after", {}), "file_bytes": size,
                       "compressed_bytes": compressed_size([out, *external_data_files(out)])}
    report["output"] = str(out)
    report["recipe"] = jsonable(recipe.report_dict())
    report["auto"] = jsonable(auto)
    others = [f"{m}: {summary[m].get('left_out') or summary[m].get('error') or ''}".rstrip(": ")
              for m in cands if m != chosen]
    note = f"--quantize auto chose {chosen}: {auto['why']}" + "".join(f"; {o}" for o in others if ":" in o)
    report["notes"] = [*report.get("notes", []), note]
    if summary[chosen].get("slower_than_fp32"):
        report["notes"].append(f"--quantize auto: even the chosen {chosen} model is slower than fp32 here "
                               f"({summary[chosen]['latency_ms']} vs {auto['fp32_latency_ms']} ms): consider fp32")
    report["written"] = True
    return report


def _total_cost(cands, seconds: float, write: tuple[str, float] | None = None) -> dict:
    """The whole auto run's cost: every candidate's stages (named by mode; a candidate's write to
    its private folder named as such), then choosing (timing the candidates) and ``write``
    (``(stage name, seconds)`` of writing the chosen model), so that the stages add up to the
    run's ``seconds``."""
    stages, peak = [], 0.0
    for mode, c in cands.items():
        cost = (c.get("report") or {}).get("cost") or {}
        for st in cost.get("stages", []):
            name = f"writing the {mode} candidate" if st["stage"].startswith("writing ") else st["stage"]
            stages.append({**st, "stage": f"auto ({mode}): {name}"})
        peak = max(peak, float(cost.get("peak_rss_mb") or 0.0))
    rest = seconds - sum(st["seconds"] for st in stages) - (write[1] if write else 0.0)
    now = round(max(peak_rss_mib(), peak), 1)
    stages.append({"stage": "auto: choosing (timing the candidates)", "seconds": round(max(rest, 0.0), 3),
                   "peak_rss_mb": now})
    if write:
        stages.append({"stage": write[0], "seconds": round(write[1], 3), "peak_rss_mb": now})
    return {"stages": stages, "peak_rss_mb": round(max(st["peak_rss_mb"] for st in stages), 1),
            "peak_per_stage": all((c.get("report") or {}).get("cost", {}).get("peak_per_stage") for c in cands.values())}


def _unprivate(msg: str, path: Path, mode: str) -> str:
    """A candidate's progress message with its private output path named as the candidate."""
    stage = msg.stage if isinstance(msg, ProgressEvent) else str(msg)
    closed = (msg.closed or {}).get("stage", "") if isinstance(msg, ProgressEvent) else ""
    if str(path) not in stage and str(path) not in closed:
        return msg
    def named(text: str) -> str:
        return text.replace(f"writing {path}", f"writing the {mode} candidate").replace(str(path), f"the {mode} candidate")

    if isinstance(msg, ProgressEvent):
        closed = {**msg.closed, "stage": named(msg.closed["stage"])} if msg.closed and "stage" in msg.closed else msg.closed
        return ProgressEvent(named(msg.stage), msg.step, msg.done, msg.total, msg.unit, closed, msg.final)
    return named(stage)


def _prefixed(msg: str, prefix: str) -> str:
    """A candidate run's progress message, named by its mode (events keep their numbers)."""
    return msg.prefixed(prefix) if isinstance(msg, ProgressEvent) else prefix + msg
