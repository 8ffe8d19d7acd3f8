"""One interface for every pass, and the runner that checks each one.

A pass is an onnx-ir :class:`onnx_ir.passes.InPlacePass` that also fills a
:class:`PassReport` (what it changed, what it skipped and why). :func:`run_passes` runs a
list of passes; for passes marked ``checked`` it runs the model before and after in ONNX
Runtime (optimizations off) on sample inputs and *reverts* a pass whose outputs moved by
more than its tolerance, naming it in the report. A pass never writes files or prints.

Checks cost no copy of the weights: the state to revert to is a :func:`snapshot` (onnx-ir's
``Model.clone``: new nodes and values, the same tensors, which are made read-only so that no
pass can change them under the snapshot; a pass replaces a tensor, it never edits one), and
ORT sessions read the weights in place (:func:`onnxcompress.runtime.make_session`). A run of
consecutive checked passes is checked as one batch — two ORT sessions however many passes —
and only a batch that misses its tolerance is replayed pass by pass to find the culprit.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from ..params import NoConfig, build, check
from ..progress import tick

logger = logging.getLogger("onnxcompress")


@dataclass
class PassReport:
    """What one pass did.

    Attributes:
        name: the pass name.
        changed: whether the model was modified (and kept).
        counts: what changed, e.g. ``{"batchnorm_folded": 3}``.
        skipped: ``{"node": ..., "reason": ...}`` for every candidate left alone.
        reverted: why the pass was undone (``None`` when kept).
        max_abs_err / max_rel_err: for checked passes, the worst output deviation measured
            against the model before the pass (relative = max|Δ| / max|ref| per output).
    """

    name: str
    changed: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    reverted: str | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    _grouped: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)

    def skip(self, node: str, reason: str, *, grouped: bool = False) -> None:
        """Record a candidate node left untouched, and log a warning naming it.

        ``grouped``: a policy decision that repeats for many nodes (e.g. every Conv in dynamic
        mode): the nodes sharing the reason are named in one warning by :meth:`flush`, not one
        warning each; the report still lists every node."""
        self.skipped.append({"node": node, "reason": reason})
        if grouped:
            self._grouped.setdefault(reason, []).append(node)
        elif not node:  # the whole model, not one node
            logger.warning("%s: %s", self.name, reason)
        else:
            logger.warning("%s: skipped node '%s': %s", self.name, node, reason)

    def flush(self) -> None:
        """Log the grouped skips: one warning per reason, naming its nodes."""
        for reason, nodes in self._grouped.items():
            names = ", ".join(f"'{n}'" for n in nodes[:4]) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
            logger.warning("%s: skipped %d node(s) (%s): %s", self.name, len(nodes), names, reason)
        self._grouped = {}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_grouped", None)
        return d


@dataclass(frozen=True)
class Scope:
    """Which nodes the user keeps out of every pass that prunes, quantizes or rescales
    (``--exclude``): by node name or by op type. One object, read by every such pass."""

    nodes: frozenset[str] = frozenset()
    op_types: frozenset[str] = frozenset()

    @classmethod
    def of(cls, nodes=(), op_types=()) -> "Scope":
        return cls(frozenset(nodes), frozenset(op_types))

    def excludes(self, node: ir.Node) -> bool:
        """Whether the user excluded ``node`` (its name or its op type)."""
        return node.name in self.nodes or node.op_type in self.op_types


@dataclass
class PassContext:
    """Data a pass may use (its parameters are its typed ``config``, not here).

    Attributes:
        calibration: feed dicts (input name -> array) for statistics.
        check_samples: a few feed dicts used to check passes numerically.
        holdout: held-out feed dicts for a pass that measures its own fidelity (channel
            pruning's repair); empty: it uses ``check_samples``.
        scope: the user's exclusions (:class:`Scope`).
        keep_float: node names the fallback keeps in float (quantization passes).
        cache: state a pass may keep across re-runs of the same stage (the fallback's
            re-quantizations reuse the calibration ranges: ``passes/quantize/static.py``).
        teacher: the input model as loaded (the ``distill`` stage's teacher); ``None`` outside
            the pipeline. Read-only: its tensors are shared with the model the passes rewrite.
    """

    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    check_samples: list[dict[str, np.ndarray]] = field(default_factory=list)
    holdout: list[dict[str, np.ndarray]] = field(default_factory=list)
    scope: Scope = field(default_factory=Scope)
    keep_float: tuple[str, ...] = ()
    cache: dict[str, Any] = field(default_factory=dict)
    teacher: ir.Model | None = None


class CompressionPass(ir.passes.InPlacePass):
    """Base class of onnxcompress passes.

    Subclasses set ``name``, implement :meth:`apply` (return whether the model changed) and
    may set ``checked`` (compare outputs before/after), ``rtol`` (allowed max|Δ|/max|ref| per
    output) and ``Config`` (a dataclass of declared parameters, :mod:`onnxcompress.params`).
    A pass reads its parameters from ``self.config`` and its data from ``self.context``.

    Construction: ``Pass(context, config)`` or ``Pass(context, **params)`` (each value checked
    against its declaration; an unknown name raises :class:`onnxcompress.params.ParamError`).
    """

    name: ClassVar[str] = "pass"
    #: set by the runner when the pass changed declared value types without reporting a change
    touched_types: bool = False
    checked: ClassVar[bool] = True
    rtol: ClassVar[float] = 1e-4
    Config: ClassVar[type] = NoConfig
    #: op types the pass acts on: it can change a model only when every group has at least one
    #: of its op types among the model's nodes (any graph, any function, any domain); otherwise
    #: the runner skips it without a snapshot (:meth:`applicable`). Empty: always runs.
    needs: ClassVar[tuple[frozenset[str], ...]] = ()

    def __init__(self, context: PassContext | None = None, config: Any = None, **params: Any) -> None:
        super().__init__()
        self.context = context or PassContext()
        if config is None:
            config = build(self.Config, params, self.name)
        elif params:
            config = replace(config, **{k: v for k, v in params.items()})
            check(config, self.name)
        self.config = config
        self.report = PassReport(self.name)

    def fresh(self) -> "CompressionPass":
        """A new pass object with the same context and config (a replay starts from a clean report)."""
        return type(self)(self.context, self.config)

    def applicable(self, model: ir.Model, ops: frozenset[str]) -> bool:
        """Whether the pass could change ``model``, whose nodes have the op types ``ops``
        (:func:`op_types`); ``False`` only where it provably cannot (see :attr:`needs`)."""
        return all(group & ops for group in self.needs)

    def apply(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = bool(self.apply(model))
        self.report.changed = changed
        return ir.passes.PassResult(model, modified=changed)


def output_errors(ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """Worst (max abs error, max relative error) over samples and outputs.

    Relative error of an output = max|got - ref| / max(max|ref|, 1e-12). Shape or output-set
    mismatches count as infinite error.
    """
    from ..util import plain_value

    worst_abs = worst_rel = 0.0
    for r, g in zip(ref, got):
        if set(r) - set(g):
            return float("inf"), float("inf")
        for name, a in r.items():
            b = g[name]
            if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.dtype.kind in "OUSV":
                (ka, a), (kb, b) = plain_value(a), plain_value(b)  # sequences, optionals, strings
                if ka != kb:
                    return float("inf"), float("inf")
                if a is None:
                    continue
            if a.shape != b.shape:
                return float("inf"), float("inf")
            if a.dtype.kind not in "fc":
                if not np.array_equal(a, b):
                    return float("inf"), float("inf")
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
                return float("inf"), float("inf")
            fin = np.isfinite(a64)
            if not fin.any():
                continue
            d = float(np.max(np.abs(a64[fin] - b64[fin]))) if a64.size else 0.0
            scale = max(float(np.max(np.abs(a64[fin]))), 1e-12)
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / scale)
    return worst_abs, worst_rel


def reference_outputs(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` on ``samples`` under ORT with all graph optimizations off (the
    weights are read in place, not copied)."""
    from ..runtime import make_session, run_samples

    sess = make_session(model, optimize=False)
    return run_samples(sess, samples)


def freeze_weights(model: ir.Model) -> None:
    """Make the numpy arrays behind the model's in-memory tensors read-only (initializers of
    every graph and ``Constant`` values), so a tensor shared with a :func:`snapshot` can only be
    replaced, never edited in place (an edit raises ``ValueError``: the pass is reverted).
    Tensors read from a file are read-only already."""
    from ..irutil import subgraphs

    graphs = [model.graph, *subgraphs(model.graph)]
    for g in graphs:
        for v in g.initializers.values():
            raw = getattr(v.const_value, "raw", None)
            if isinstance(raw, np.ndarray):
                raw.flags.writeable = False
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant":
            for a in node.attributes.values():
                raw = getattr(a.value, "raw", None) if a.type == ir.AttributeType.TENSOR else None
                if isinstance(raw, np.ndarray):
                    raw.flags.writeable = False


def snapshot(model: ir.Model) -> ir.Model:
    """A copy of the model to revert to, sharing its tensors: O(nodes + values) time and memory
    whatever the size of the weights (``onnx_ir.Model.clone``), tensors frozen first
    (:func:`freeze_weights`)."""
    freeze_weights(model)
    return model.clone()


#: a rewrite may turn a node into another op type that does the same job under the old name
_SAME_ROLE = {"Gemm": ("MatMul", "Gemm")}


def keep_node_names(before: ir.Model, model: ir.Model) -> int:
    """Give nodes a rewrite created (onnxscript names them ``node_Conv_0``...) the name of the node
    they replace, so ``--exclude``, ``--prune-protect``, ``--prune-ratio`` and reports keep using
    the names ``inspect`` shows. The replaced node is a removed node of the same op type (``Gemm``
    also a ``MatMul``): first the nearest one up the removed nodes that produced the new node's
    output, through any of their inputs (Conv -> BatchNormalization folded into one Conv: the
    Conv; Conv -> Mul(scale, ·) -> Add folded: the Conv), else the only one that read the same
    first input.

    Args:
        before: the model before the rewrite (a :func:`snapshot`).

    Returns:
        How many nodes were renamed.
    """
    old = {n.name: (n.op_type, [i.name if i is not None else "" for i in n.inputs])
           for n in before.graph}  # main graph: rewrites run there
    producer = {o.name: n.name for n in before.graph for o in n.outputs}
    now = {n.name for n in model.graph}
    free = {name for name in old if name and name not in now}
    renamed = 0
    for node in model.graph:
        if node.name in old or not node.inputs or node.inputs[0] is None:
            continue
        roles = _SAME_ROLE.get(node.op_type, (node.op_type,))
        pick = None
        # walk up the removed nodes that ended in this output, breadth first through every
        # input a removed node produced (a Mul(scale, conv) has its constant first), 6 levels
        level = [producer.get(node.outputs[0].name)] if node.outputs else []
        seen: set[str] = set()
        for _ in range(6):
            level = [c for c in level if c is not None and c in free and c not in seen]
            seen.update(level)
            hits = [c for c in level if old[c][0] in roles]
            if hits:
                pick = hits[0]
                break
            level = [producer.get(i) for c in level for i in old[c][1] if i]
        if pick is None:
            first = node.inputs[0].name
            cands = [n for n in free if old[n][0] in roles and old[n][1][:1] == [first]]
            pick = cands[0] if len(cands) == 1 else None
        if pick is not None:
            node.name = pick
            free.discard(pick)
            renamed += 1
    return renamed


def _types(model: ir.Model) -> dict[int, str]:
    """The declared type of every value of every graph (by object identity; ``"None"`` when
    undeclared); shapes are left out (inferring a shape changes no meaning, a type may be wrong:
    a sequence declared a tensor)."""
    from ..irutil import subgraphs

    out = {}
    for g in (model.graph, *subgraphs(model.graph)):
        for v in (*g.inputs, *g.outputs, *(o for n in g for o in n.outputs)):
            out[id(v)] = str(v.type)
    return out


def op_types(model: ir.Model) -> frozenset[str]:
    """The op types of every node of ``model``: all graphs, subgraphs and model functions."""
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    for f in model.functions.values():
        ops.update(n.op_type for n in ir.traversal.RecursiveGraphIterator(f))
    return frozenset(ops)


def _can_change(model: ir.Model, p: CompressionPass) -> bool:
    if not p.needs and type(p).applicable is CompressionPass.applicable:
        return True  # the op types would not be read
    return p.applicable(model, op_types(model))


def _run_one(model: ir.Model, p: CompressionPass, can: bool | None = None) -> tuple[ir.Model, ir.Model]:
    """Run one pass; a pass that raises is reverted (a pass bug must not cost the user the run).
    A pass that reports no change but changed a value's declared type (shape inference inside a
    rewrite turning a sequence into a tensor) is checked as if it had changed the model
    (``touched_types``; ``counts["value_types_changed"]``). A pass that cannot act on the
    model (:meth:`CompressionPass.applicable`: none of the op types it needs) is not run and
    costs no snapshot (``can``: that answer, when the caller already has it).
    Returns ``(model to go on with, snapshot from before the pass)``; they are the same object
    when the pass was reverted or not run."""
    if not (_can_change(model, p) if can is None else can):
        p.report.changed = False
        return model, model
    before = snapshot(model)
    types = _types(model) if p.checked else None
    try:
        p(model)
        p.report.flush()
        if types is not None and not p.report.changed:
            moved = sum(1 for k, t in _types(model).items() if k in types and types[k] != t)
            if moved:  # checked like a change, reported as what it is
                p.touched_types = True
                p.report.counts["value_types_changed"] = moved
        if p.report.changed:
            keep_node_names(before, model)
        return model, before
    except Exception as exc:
        p.report.flush()
        logger.warning("pass %s failed and was reverted: %s", p.name, exc)
        p.report.reverted = f"raised {type(exc).__name__}: {exc}"
        p.report.changed = False
        return before, before


def _check(model: ir.Model, ref, samples, structural: str | None = None) -> tuple[list | None, float, float, str | None]:
    """``(outputs, max_abs_err, max_rel_err, why_not_run)`` of ``model`` against ``ref``; without
    samples, the structural check (``onnx.checker``, and an ONNX Runtime load when ``structural``
    is ``"runtime"``)."""
    if not samples:
        from ..model_io import check_model

        try:
            check_model(model, runtime=structural == "runtime")
        except Exception as exc:
            return None, float("inf"), float("inf"), f"the result fails the structural check: {exc}"
        return None, 0.0, 0.0, None
    try:
        got = reference_outputs(model, samples)
    except Exception as exc:
        return None, float("inf"), float("inf"), f"ONNX Runtime could not run the result: {exc}"
    abs_err, rel_err = output_errors(ref, got)
    return got, abs_err, rel_err, None


def run_passes(model: ir.Model, passes: list[CompressionPass], samples: list[dict[str, np.ndarray]], *,
               structural: str | None = None, ref: list | None = None) -> tuple[ir.Model, list[PassReport]]:
    """Run passes in order, checking each ``checked`` pass on ``samples`` (:func:`run_passes_ref`,
    without the outputs). Returns ``(model, reports)``."""
    model, reports, _ = run_passes_ref(model, passes, samples, structural=structural, ref=ref)
    return model, reports


def run_passes_ref(model: ir.Model, passes: list[CompressionPass], samples: list[dict[str, np.ndarray]], *,
                   structural: str | None = None,
                   ref: list | None = None) -> tuple[ir.Model, list[PassReport], list | None]:
    """Run passes in order, checking each ``checked`` pass on ``samples``.

    ``structural`` (``"checker"`` or ``"runtime"``): without samples, checked passes are still
    checked, by ``onnx.checker`` (and an ONNX Runtime load): for models that cannot be run on
    any inputs at hand. ``ref``: the model's outputs on ``samples`` when already known (the
    pipeline's probe), saving one run.

    A checked pass whose outputs deviate beyond its ``rtol`` from the model before it, that
    raises, or that leaves a model ONNX Runtime cannot run, is reverted; the report says why.
    Consecutive checked passes are checked together, against the strictest ``rtol`` among those
    that changed the model; a batch that misses it is replayed from its start, each pass
    checked alone (fresh pass objects: :meth:`CompressionPass.fresh`). Unchecked passes (lossy
    rewrites, judged later by validation) only make the reference outputs stale.

    Returns:
        ``(model, reports, ref)``; ``model`` may be a new object (a snapshot) when a pass was
        reverted; ``ref``: the outputs of the returned model on ``samples`` when known (the
        last check's, or the ``ref`` given when nothing changed since), else ``None`` — the
        next stage's checks start from it instead of running the model again.
    """
    reports: list[PassReport] = []
    # `ref`: outputs of `model` as it stands, when known
    i = 0
    while i < len(passes):
        if len(passes) > 1:
            tick("running", i, len(passes), "passes", weak=True)
        if not passes[i].checked:
            model, _ = _run_one(model, passes[i])
            if passes[i].report.changed:
                ref = None
            reports.append(passes[i].report)
            i += 1
            continue
        j = i
        while j < len(passes) and passes[j].checked:
            j += 1
        batch = passes[i:j]
        start = None  # the model before the batch's first pass that can change it
        for k, p in enumerate(batch):
            if k and len(passes) > 1:
                tick("running", i + k, len(passes), "passes", weak=True)
            can = _can_change(model, p)
            if start is None and (samples or structural) and can:
                start = snapshot(model)
            model, _ = _run_one(model, p, can)
        changed = [p for p in batch if p.report.changed or p.touched_types]
        if changed and start is not None:
            if ref is None and samples:
                ref = reference_outputs(start, samples)
            got, abs_err, rel_err, why = _check(model, ref, samples, structural)
            if why is None and rel_err <= min(p.rtol for p in changed):
                for p in changed:
                    p.report.max_abs_err, p.report.max_rel_err = abs_err, rel_err
                ref = got
            else:
                model, ref, batch = _one_by_one(start, batch, ref, samples, structural)
        elif changed:
            ref = None  # changed and not run: the outputs are not known
        reports.extend(p.report for p in batch)
        i = j
    if len(passes) > 1:
        tick("running", len(passes), len(passes), "passes", weak=True)
    return model, reports, ref if samples else None


def _one_by_one(model: ir.Model, batch: list[CompressionPass], ref, samples, structural: str | None = None):
    """Replay ``batch`` from ``model`` (its start) with fresh pass objects, checking each one
    against the outputs before it and reverting those that miss their ``rtol`` or fail in ORT.
    Returns ``(model, ref, passes)``."""
    fresh = []
    for old in batch:
        p = old.fresh()
        fresh.append(p)
        model, before = _run_one(model, p)
        if not p.report.changed and not p.touched_types:
            continue
        got, abs_err, rel_err, why = _check(model, ref, samples, structural)
        if samples:
            p.report.max_abs_err, p.report.max_rel_err = abs_err, rel_err
        if why or rel_err > p.rtol:
            p.report.reverted = why or f"outputs moved by {rel_err:.3g} relative (tolerance {p.rtol:g})"
            logger.warning("pass %s reverted: %s", p.name, p.report.reverted)
            p.report.changed = False
            model = before
        else:
            ref = got
    return model, ref, fresh
