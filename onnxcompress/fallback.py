"""Sensitive-node fallback: when a gate is missed after int8, keep the least int8-friendly nodes
in float until every gate holds.

When the activation ranges were chosen by ``auto`` (the default) and it clipped some tensor, a
first round re-quantizes with plain min/max ranges instead (the calibration statistics hold
both): clipped ranges that fit the calibration rows best can lose answers on data from another
source. Wider ranges lower a node's one-node SQNR, so the per-node check may keep a few more
nodes in float there: they are that round's nodes in float (report, weight share, note). It is
not one of the node rounds. Then the nodes are
ordered by the per-node int8 output SQNR the quantization passes measured (worst
first); a round re-quantizes the pre-int8 model (a snapshot: the float weights are shared,
not copied) with the worst ``k`` nodes kept in float. ``k`` takes the sizes 1, 2, 4, ...
(``gates.max_fallback_rounds`` of them at most; never every node: that would not be
quantization), in this order: 1, then 2 (one or two sensitive nodes are the usual repair), then
the largest; when the largest fails too the fallback stops there (keeping more nodes in float
loses fewer answers, up to noise, so the sizes between would fail as well: three rounds instead
of six on a model that static int8 cannot keep, such as PP-OCRv4 rec under the floor), else the
smallest passing size between is found by bisection. The
calibration statistics and the per-node checks (static and weight-only) are reused across rounds
(``PassContext.cache``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .gates import label as gate_label
from .passes.base import run_passes
from .validate import validate_all

logger = logging.getLogger("onnxcompress")

#: the node rounds try this many of the smallest sizes (1, 2 nodes in float) one after the other
#: before the largest (see the module docstring)
FIRST_SIZES = 2


def sensitive_fallback(run, original, int8, val, labels, providers, judge):
    """Run the fallback rounds (see the module docstring).

    Args:
        run: the ``pipeline._Run`` (recipe, report, progress).
        original: the input model (validation reference).
        int8: ``pipeline._Int8``: the pre-int8 snapshot, the int8 stage, its context and reports.
        val, labels, providers: validation data and where to run it.
        judge: ``validation -> (gate rows, passed)`` (the user's gates and the default floor).

    Returns:
        ``(model, reports, validation, gates, passed)`` of the chosen round: the node round with
        the fewest nodes in float that passed, else the last node round (the largest size tried),
        else the min/max round; ``None`` when no round could run. ``run.report["fallback"]``
        records every round in the order tried, and ``float_weight_share``: the share of the
        quantized nodes' constant inputs (bytes, fp32) that the chosen round kept in float.
    """
    g = run.recipe.gates
    def node_sqnr(reports) -> dict[str, float]:  # every int8 node: integer pass, QAttention, weight-only
        out: dict[str, float] = {}
        for r in reports:
            out.update(r.counts.get("node_sqnr_db") or {})
        return out

    def attempt(cfg, ctx):
        """One round: the pre-int8 model re-quantized with ``cfg`` / ``ctx``, validated and judged."""
        m, reps = run_passes(int8.start.clone(), int8.stage.spec.passes(cfg, ctx), [])
        v = validate_all(original, m, val, labels, providers, latency=False, cache=run.ref_cache)
        return (m, reps, v, *judge(v))

    cfg = int8.stage.config
    sqnr = node_sqnr(int8.reports)
    min_sqnr = getattr(cfg, "min_sqnr_db", None)
    floor = min_sqnr if min_sqnr is not None else -float("inf")
    order = sorted((n for n in sqnr if sqnr[n] >= floor), key=lambda n: sqnr[n])  # nodes now in int8
    most = len(order) - 1  # keeping every node in float is not quantization: then the gate fails
    rounds, k = [], 1
    chosen_round = -1  # the round whose model is returned: the last, or the smallest that passed
    model = validation = gates = None
    reports, passed = int8.reports, False
    level = logger.level
    logger.setLevel(logging.ERROR)  # the rounds' skip messages are summarized in the report
    try:
        if getattr(cfg, "calibration_method", None) == "auto" and g.max_fallback_rounds > 0 \
                and _auto_clips(int8.ctx, getattr(cfg, "percentile", 99.99)):
            # auto's ranges clip where clipping lowers the calibration rows' expected error; on
            # data from another source the unclipped ones can keep more answers (a HardSwish
            # classifier: 95.8 -> 97.5 % top-1): tried first, before any node gives up int8 (the
            # calibration statistics are reused, not gathered again); not one of the node rounds
            run.say("fallback: min/max activation ranges")
            # the round's result stands unless a node round follows (chosen_round: -1, this one)
            model, reports, validation, gates, passed = attempt(replace(cfg, calibration_method="minmax"), int8.ctx)
            mm_sqnr = node_sqnr(reports)
            # wider ranges lower a node's one-node SQNR: nodes the per-node check keeps in float
            # at these ranges (and not at auto's) are this round's nodes in float, reported as such
            lost = sorted(n for n in order if mm_sqnr.get(n, floor) < floor)
            rounds.append({"calibration_method": "minmax", "kept_in_float": lost, "passed": passed,
                           "gates": {gate_label(x): x["value"] for x in gates}})
            if not passed:
                run.meter.mark("gates missed")
            if passed:
                sqnr = mm_sqnr
                run.note("fallback: with min/max activation ranges instead of auto's clipped ones the gates hold; "
                         + (f"{len(lost)} node(s) the per-node SQNR check keeps in float at these wider ranges "
                            f"({', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''})" if lost
                            else "no node kept in float"))
        # the sizes the rounds may take: 1, 2, 4, ... nodes in float, at most max_fallback_rounds
        sizes: list[int] = []
        while 0 < k <= most and len(sizes) < g.max_fallback_rounds:
            sizes.append(k)
            if k == most:
                break
            k = min(2 * k, most)

        def node_round(i: int):
            excluded = tuple(order[:sizes[i]])
            run.say(f"fallback: {len(excluded)} node(s) kept in float")
            res = attempt(cfg, replace(int8.ctx, keep_float=excluded))
            rounds.append({"kept_in_float": list(excluded), "passed": res[4],
                           "gates": {gate_label(x): x["value"] for x in res[3]}})
            if not res[4]:
                run.meter.mark("gates missed")
            return res

        if not passed and sizes:
            # the fewest nodes first, one size after the other (one or two sensitive nodes are the
            # usual repair); then the most: when even they fail, the sizes between would too (more
            # float, fewer answers lost: monotone up to noise), so the fallback stops there instead
            # of trying every size; when they pass, bisection finds the smallest passing size
            res = None
            for i in range(min(FIRST_SIZES, len(sizes))):
                res = node_round(i)
                chosen_round = len(rounds) - 1
                if res[4]:
                    break
            if (res is None or not res[4]) and len(sizes) > FIRST_SIZES:
                res = node_round(len(sizes) - 1)
                chosen_round = len(rounds) - 1
                lo, hi = FIRST_SIZES, len(sizes) - 1  # sizes[hi] passes (while res passes)
                while res[4] and lo < hi:
                    mid = (lo + hi) // 2
                    res_mid = node_round(mid)
                    if res_mid[4]:
                        hi, res, chosen_round = mid, res_mid, len(rounds) - 1
                    else:
                        lo = mid + 1
            model, reports, validation, gates, passed = res
    finally:
        logger.setLevel(level)
    if not passed and len(order) <= 1:
        why = ("the quantization measured no per-node int8 SQNR to order the nodes by"
               + (" (--min-node-sqnr 0 turns that check off)" if min_sqnr is None else "") if not order else
               "only one node is int8, and keeping it in float would leave no int8 model")
        run.note("fallback: no node could be kept in float: " + why
                 + (" (min/max activation ranges were tried)" if rounds else ""))
    elif not passed:
        run.note(f"fallback: the gates still fail with {len(rounds[chosen_round]['kept_in_float']) if rounds else 0} "
                 f"of {len(order)} quantized nodes kept in float"
                 + (" (min/max activation ranges were tried too)"
                    if any("calibration_method" in r for r in rounds) else ""))
    kept = rounds[chosen_round]["kept_in_float"] if rounds else []
    run.report["fallback"] = {"rounds": rounds, "kept_in_float": kept, "passed": passed, "int8_nodes": len(order),
                              "node_sqnr_db": dict(sqnr),
                              "float_weight_share": _weight_share(int8.start, kept, order)}
    if not rounds:
        return None
    return model, reports, validation, gates, passed


def _auto_clips(ctx, percentile: float) -> bool:
    """Whether ``auto`` chose a range other than min/max for some tensor (from the calibration
    statistics in the stage's cache); ``True`` when they are not there to tell."""
    cache = getattr(ctx, "cache", None)
    stats = cache.get("stats") if isinstance(cache, dict) and cache.get("method") == "auto" else None
    if not stats:
        return True
    try:
        return any(st.range("auto", percentile) != st.range("minmax", percentile) for st in stats.values())
    except ValueError:  # a tensor never observed
        return True


def _weight_share(model, kept, quantized) -> float | None:
    """Share of the constant-input bytes of the ``quantized`` nodes (names in ``model``) held by
    the ``kept`` ones; ``None`` when those nodes have no constant inputs."""
    by_name = {n.name: n for n in model.graph.all_nodes()} if model is not None else {}

    def nbytes(name: str) -> int:
        n = by_name.get(name)
        if n is None:
            return 0
        return sum(v.const_value.size * 4 for v in n.inputs if v is not None and v.const_value is not None)

    total = sum(nbytes(n) for n in quantized)
    return round(sum(nbytes(n) for n in kept) / total, 4) if total else None
