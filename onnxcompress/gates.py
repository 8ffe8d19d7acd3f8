"""The gate engine: one place that turns measured output metrics into a verdict.

Used by ``optimize`` (and its fallback and ``--quantize auto``) and by ``validate`` (through
:func:`output_failures`). Limits come from :class:`onnxcompress.recipe.Gates`: global ones and,
per output name, ``[gates.outputs.<name>]`` overrides. Float outputs are judged by
``max_rel_error`` (max|Δ| / max|ref|, a fraction), ``min_cosine`` (worst sample) and
``min_mean_cosine`` (mean over samples); index outputs (int32/int64) and class scores by
``min_top1_agreement`` (%, equal values for index outputs).

**The default floor** (:func:`floor`): a quantized model for which the user set no gate must
still keep the task's answers on real validation data — top-1 agreement ≥
``floor_top1_agreement`` (97 %) for class scores — over the rows where the reference is decisive
(:data:`onnxcompress.validate.DECISIVE_PROB`; photo crops that show no ImageNet class flip
between near-ties without losing an answer), when there are at least :data:`FLOOR_MIN_DECISIVE`
of them — and for index outputs; mean cosine ≥
``floor_mean_cosine`` (0.99) for the other float outputs (embeddings, maps, regressions). A
worst-sample cosine is the wrong test for logits (a tie between two classes moves it without
changing an answer); the top-1 agreement is the answer itself. ``accept_degraded`` writes a model
that misses the floor anyway, the report saying so.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field, replace
from typing import Any

from .params import Param

MAX_REL_ERROR = Param("max_rel_error", None, "Gate: max |Δ|/max|ref| per output (fraction).", kind="float",
                      low=0.0, optional=True, flag="--max-rel-error")
MIN_COSINE = Param("min_cosine", None, "Gate: minimum cosine similarity per output.", kind="float", low=-1.0,
                   high=1.0, optional=True, flag="--min-cosine")
MIN_MEAN_COSINE = Param("min_mean_cosine", None, "Gate: minimum cosine similarity per output, averaged over the "
                         "validation samples.", kind="float", low=-1.0, high=1.0, optional=True,
                         flag="--min-mean-cosine")
MIN_TOP1 = Param("min_top1_agreement", None, "Gate: minimum top-1 agreement in % (99 for 99 %).", kind="float",
                 low=1.0, high=100.0, low_open=True, optional=True, flag="--min-top1-agreement",
                 hint="a percentage: for 99 % write 99")
FALLBACK = Param("fallback", True, "When a gate is missed after quantization, keep the least int8-friendly nodes in "
                 "float until it holds.", kind="bool", flag="--fallback/--no-fallback")
MAX_FALLBACK_ROUNDS = Param("max_fallback_rounds", 6, "Most re-quantizations the fallback tries.", kind="int", low=0)
FLOOR_TOP1 = Param("floor_top1_agreement", 97.0, "Default fidelity floor of a quantized model when no gate is set: "
                   "top-1 agreement in % for class-score and index outputs (judged on real data only).",
                   kind="float", low=1.0, high=100.0, low_open=True, hint="a percentage: for 97 % write 97")
FLOOR_MEAN_COSINE = Param("floor_mean_cosine", 0.99, "Default fidelity floor of a quantized model when no gate is "
                          "set: mean cosine over samples for the other float outputs.", kind="float", low=-1.0,
                          high=1.0)
ACCEPT_DEGRADED = Param("accept_degraded", False, "Write a quantized model even when it misses the default "
                        "fidelity floor (the report's 'floor' says so).", kind="bool", flag="--accept-degraded")

@dataclass
class OutputGates:
    """Limits for one output (``[gates.outputs.<name>]``); unset ones fall back to the global ones."""

    max_rel_error: float | None = MAX_REL_ERROR.field()
    min_cosine: float | None = MIN_COSINE.field()
    min_top1_agreement: float | None = MIN_TOP1.field()
    min_mean_cosine: float | None = MIN_MEAN_COSINE.field()


@dataclass
class Gates:
    """When a written model is good enough (``[gates]``), and the fallback that tries to make it so."""

    max_rel_error: float | None = MAX_REL_ERROR.field()
    min_cosine: float | None = MIN_COSINE.field()
    min_top1_agreement: float | None = MIN_TOP1.field()
    min_mean_cosine: float | None = MIN_MEAN_COSINE.field()
    fallback: bool = FALLBACK.field()
    max_fallback_rounds: int = MAX_FALLBACK_ROUNDS.field()
    floor_top1_agreement: float = FLOOR_TOP1.field()
    floor_mean_cosine: float = FLOOR_MEAN_COSINE.field()
    accept_degraded: bool = ACCEPT_DEGRADED.field()
    outputs: dict[str, OutputGates] = field(default_factory=dict)

    def limits(self, output: str) -> OutputGates:
        """The limits that apply to ``output``."""
        o = self.outputs.get(output)
        g = OutputGates(self.max_rel_error, self.min_cosine, self.min_top1_agreement, self.min_mean_cosine)
        if o is not None:
            g = replace(g, **{k: v for k, v in dataclasses.asdict(o).items() if v is not None})
        return g

    @property
    def any(self) -> bool:
        """Whether any gate is set (globally or for one output)."""
        lim = [self.max_rel_error, self.min_cosine, self.min_top1_agreement, self.min_mean_cosine]
        lim += [v for o in self.outputs.values() for v in dataclasses.astuple(o)]
        return any(v is not None for v in lim)



#: (gate name, limit field, metric key, worst-of, passes(value, limit))
KINDS = (("max-rel-error", "max_rel_error", "max_rel_err", max, operator.le),
         ("min-cosine", "min_cosine", "cosine", min, operator.ge),
         ("min-top1-agreement", "min_top1_agreement", "top1_agreement", min, operator.ge),
         ("min-mean-cosine", "min_mean_cosine", "mean_cosine", min, operator.ge))


def mean_cosine(o) -> float:
    """An output's mean cosine over samples (its worst-sample cosine where no mean was measured:
    outputs that could not be compared, reports of older versions)."""
    get = o.get if isinstance(o, dict) else lambda k, d=None: getattr(o, k, d)
    m = get("mean_cosine")
    return float(m if m is not None else get("cosine"))


def _judged(attr: str, o: dict) -> bool:
    if attr == "min_top1_agreement":
        return o.get("top1_agreement") is not None
    return not o.get("integer")  # index outputs: their agreement is gated by --min-top1-agreement


def evaluate(gates, validation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (gate, provider, limit): the worst value over the outputs that limit applies to.

    Args:
        gates: a :class:`onnxcompress.recipe.Gates`.
        validation: per provider, ``{"provider", "outputs": [{"name", "max_rel_err", "cosine",
            "top1_agreement", "integer"}, ...]}`` (:func:`onnxcompress.validate.compare` as dicts;
            non-finite values may be strings such as ``"inf"``).

    Returns:
        ``[{"gate", "provider", "value", "limit", "passed"[, "outputs"][, "why"]}]``; a gate set
        where no output can be judged by it fails with ``why``.
    """
    rows = []
    for v in validation:
        for gate, attr, key, worst_of, ok in KINDS:
            by_limit: dict[float, list[dict]] = {}
            wanted = None
            for o in v["outputs"]:
                lim = getattr(gates.limits(o.get("name", "")), attr)
                if lim is None:
                    continue
                wanted = lim if wanted is None else wanted
                if _judged(attr, o):
                    by_limit.setdefault(lim, []).append(o)
            if wanted is None:
                continue
            if not by_limit:
                why = ("no output looks like class scores" if attr == "min_top1_agreement" else
                       "no float output; gate index outputs with --min-top1-agreement")
                rows.append({"gate": gate, "provider": v["provider"], "value": float("nan"), "limit": wanted,
                             "passed": False, "why": why})
                continue
            for lim, outs in by_limit.items():
                worst = worst_of(mean_cosine(o) if key == "mean_cosine" else float(o[key]) for o in outs)
                row = {"gate": gate, "provider": v["provider"], "value": worst, "limit": lim,
                       "passed": bool(ok(worst, lim))}
                if gates.outputs:
                    row["outputs"] = [o.get("name", "") for o in outs]
                rows.append(row)
    return rows


def label(row: dict[str, Any]) -> str:
    """A gate row's name with the outputs it judged when limits differ per output
    (``min-cosine[logits]``)."""
    outs = row.get("outputs")
    return f"{row['gate']}[{','.join(outs)}]" if outs else row["gate"]


def output_failures(limits, m) -> list[str]:
    """What one output misses: ``limits`` (an :class:`onnxcompress.recipe.OutputGates`) against its
    metrics ``m`` (an :class:`onnxcompress.validate.OutputMetrics` or its dict)."""
    get = m.get if isinstance(m, dict) else lambda k, d=None: getattr(m, k, d)
    failed = []
    if limits.max_rel_error is not None and not get("integer") and float(get("max_rel_err")) > limits.max_rel_error:
        failed.append(f"max rel error {float(get('max_rel_err')):.4g} > {limits.max_rel_error:g}")
    if limits.min_cosine is not None and not get("integer") and float(get("cosine")) < limits.min_cosine:
        failed.append(f"cosine {float(get('cosine')):.6f} < {limits.min_cosine:g}")
    if limits.min_mean_cosine is not None and not get("integer") and mean_cosine(m) < limits.min_mean_cosine:
        failed.append(f"mean cosine {mean_cosine(m):.6f} < {limits.min_mean_cosine:g}")
    top1 = get("top1_agreement")
    if limits.min_top1_agreement is not None and top1 is not None and top1 < limits.min_top1_agreement:
        failed.append(f"top-1 {top1:.2f} % < {limits.min_top1_agreement:g} %")
    return failed


#: the default floor judges class scores on their decisive rows when there are at least this many
#: (fewer: an output that merely looks like scores, such as an embedding, is judged by mean cosine)
FLOOR_MIN_DECISIVE = 10


#: the one-flip tolerance of the floor never lowers its top-1 limit below this (%)
FLOOR_MIN_TOLERATED = 90.0


def floor_top1(o) -> tuple[float, int | None] | None:
    """What the floor reads for one output's answers: ``(agreement %, rows)``: over all elements
    of an index output (rows ``None``); the share of equally decoded sequences of a CTC-style
    output (rank >= 3, distributions on the last axis); the top-1 agreement over the decisive
    rows of class scores (at least :data:`FLOOR_MIN_DECISIVE`). ``None`` when the output is
    judged by mean cosine."""
    if o.get("integer"):
        return (float(o["top1_agreement"]), None) if o.get("top1_agreement") is not None else None
    if o.get("sequence_agreement") is not None:  # a CTC-style output: decoded sequences kept
        return float(o["sequence_agreement"]), o.get("n_sequences")
    dec, n = o.get("top1_agreement_decisive"), o.get("n_decisive")
    if dec is not None and n is not None and n >= FLOOR_MIN_DECISIVE:
        return float(dec), int(n)
    return None


def floor(gates: Gates, validation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default floor's rows (see the module docstring), shaped like :func:`evaluate`'s with
    ``"floor": True``: per provider, the worst top-1 agreement (:func:`floor_top1`) over the
    outputs whose answers are class choices, and the worst mean cosine over the other float
    outputs. Over ``n`` rows the limit tolerates one flip, never below
    :data:`FLOOR_MIN_TOLERATED` (``min(limit, max(100·(n-1)/n, 90))``: 20 rows at 97 % would
    fail on one flip; 4 rows still fail on one). Outputs whose shape differs between the models on some
    sample (NMS, NonZero) are not judged (``skipped``); a NaN value fails."""
    rows = []
    for v in validation:
        first = len(rows)
        judged = [o for o in v["outputs"] if not o.get("shapes_differ")]
        skipped = [o.get("name", "") for o in v["outputs"] if o.get("shapes_differ")]
        top1 = [(o, floor_top1(o)) for o in judged]
        answers = [(o, t) for o, t in top1 if t is not None]
        other = [o for o, t in top1 if t is None and not o.get("integer")]
        if answers:
            lim = gates.floor_top1_agreement
            lims = [(t[0], min(lim, max(100.0 * (t[1] - 1) / t[1], FLOOR_MIN_TOLERATED)) if t[1] else lim)
                    for _, t in answers]
            worst = min(lims, key=lambda x: x[0] - x[1] if x[0] == x[0] else -float("inf"))
            ok = all(val >= lim for val, lim in lims)  # NaN fails
            rows.append({"gate": "floor-top1-agreement", "provider": v["provider"], "value": worst[0],
                         "limit": round(worst[1], 4), "passed": bool(ok), "floor": True,
                         "outputs": [o.get("name", "") for o, _ in answers]})
        if other:
            vals = [mean_cosine(o) for o in other]
            worst = min(vals, key=lambda x: x if x == x else -float("inf"))
            ok = all(x >= gates.floor_mean_cosine for x in vals)
            rows.append({"gate": "floor-mean-cosine", "provider": v["provider"], "value": worst,
                         "limit": gates.floor_mean_cosine, "passed": bool(ok), "floor": True,
                         "outputs": [o.get("name", "") for o in other]})
        if skipped and len(rows) > first:  # on this provider's last row
            rows[-1]["skipped"] = skipped
    return rows
