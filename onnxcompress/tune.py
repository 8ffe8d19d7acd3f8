"""``onnxcompress tune``: state a budget (metric drop, speed-up, size); get the best model found.

The search space is read from the declared parameters (:mod:`onnxcompress.params`): each entry
of :data:`SPACE` names a flat option of :class:`~onnxcompress.OptimizeOptions` whose ``Param``
carries a ``search`` range, and the condition under which it matters. Optuna (a proven search
library with resumable storage) runs a multi-objective TPE search — metric up, latency ratio
down, size down — with the budget as constraints (Optuna's ``constraints_func``), so the Pareto
front bends toward models that meet it.

Each trial: the planner turns the suggested options into a recipe; ``optimize`` runs it on the
model with the calibration data (no file written); the metric is measured on the *search* half
of the validation data against the fp32 model; latency is measured interleaved with the fp32
model (``bench``'s engine: paired rounds, median ratio with its bootstrap interval); size is the
written file's. A trial meets ``max_drop`` only when the drop's bootstrap bound over the search
samples does (:func:`drop_bound`: a drop within the budget only by the noise of a few samples is
not taken). The winner is re-measured on the *held-out* half, which the search never saw; when
it misses the budget there, other feasible trials (the finalists timed together first, then
the rest; fastest first; at most :data:`HELD_OUT_TRIES`) are measured there too and the first
that holds is taken. If none does, the one that misses least there is written and the budget
counts as not met (exit 3): a model that meets the budget only on the data it was chosen on has
not met it.

Never empty-handed: the best model that meets the budget is written; if none does, the closest
one (least normalised violation) is written, the failed constraint named, and the exit code is 3.
Every Pareto-optimal trial is saved as a recipe (``<out>.tune/pareto/*.toml``), reproducible with
``optimize --recipe``. Trials are cached by a content hash of model + data + recipe, and the
Optuna study lives in ``<state>/study.db``: ``--resume STATE`` after a kill continues it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DataError, GateFailedError, OnnxCompressError
from .model_io import write_atomic
from .options import EQUALIZE, PRUNE, PRUNE_MODE, QUANTIZE, SMOOTH_QUANT, OptimizeOptions
from .params import Param
from .tune_params import (PRUNE_PROBE_RATIO, PRUNE_SENSITIVITY_TIME_SHARE, SENSITIVITY_GROUPS, SENSITIVITY_NODES,
                          SENSITIVITY_TIME_SHARE)
from .passes.prune_channels import ROUND_TO
from .passes.quantize.config import (BIAS_CORRECTION, BIAS_CORRECTION_MODE, CALIBRATION_METHOD, PER_CHANNEL,
                                     TARGET)

METRICS = ("top1", "task", "accuracy", "boxes", "cosine", "max_rel_error")


@dataclass(frozen=True)
class Axis:
    """One searched option: the flat field, its declaration (whose ``search`` gives the values
    or range) and the condition ``{field: allowed values}`` under which it matters."""

    field: str
    param: Param
    when: dict[str, tuple] = field(default_factory=dict)


KEEP_FLOAT = Param("keep_float", 0, "How many of the most int8-sensitive nodes stay in float (measured once "
                   "before the search: the metric gained with one node in float, then the int8 output SQNR; "
                   "see --sensitivity-nodes).", kind="int", low=0, search=(0, 1, 2, 4, 8))

#: ``prune_groups``'s values: every group; all but the K most pruning-sensitive; only the K least
PRUNE_GROUP_CHOICES = ("all", "spare-1", "spare-2", "spare-4", "least-2", "least-4", "least-8", "least-16")
PRUNE_GROUPS = Param("prune_groups", "all", "Which channel groups a channel-pruning trial prunes, by the pruning "
                     "sensitivity measured before the search (see --sensitivity-groups): all (every group loses "
                     "--prune of its channels), spare-K (all but the K most sensitive measured groups) or least-K "
                     "(only the K least sensitive measured groups; every other group whole).", kind="str",
                     choices=PRUNE_GROUP_CHOICES, search=PRUNE_GROUP_CHOICES)

#: the search space, each axis a declared parameter (values from ``Param.search``; ``target``'s
#: from this CPU, :func:`search_targets`)
SPACE: tuple[Axis, ...] = (
    Axis("quantize", QUANTIZE),
    Axis("per_channel", PER_CHANNEL, {"quantize": ("dynamic", "static")}),
    Axis("calibration_method", CALIBRATION_METHOD, {"quantize": ("static",)}),
    Axis("bias_correction", BIAS_CORRECTION, {"quantize": ("static",)}),
    # sequential: one segmented pass (about two forward passes of 16 samples), cheap enough to search
    Axis("bias_correction_mode", BIAS_CORRECTION_MODE, {"quantize": ("static",), "bias_correction": (True,)}),
    Axis("equalize", EQUALIZE, {"quantize": ("static",)}),
    Axis("smooth_quant", SMOOTH_QUANT, {"quantize": ("dynamic", "static")}),
    Axis("keep_float", KEEP_FLOAT, {"quantize": ("dynamic", "static")}),
    Axis("target", TARGET, {"quantize": ("dynamic", "static")}),
    Axis("prune_mode", PRUNE_MODE),
    Axis("prune", PRUNE, {"prune_mode": ("unstructured", "channel")}),
    Axis("prune_round_to", ROUND_TO, {"prune_mode": ("channel",)}),
    Axis("prune_groups", PRUNE_GROUPS, {"prune_mode": ("channel",)}),
)


def search_targets(fixed: str | None = None) -> tuple[str, ...]:
    """The int8 targets the search tries on this machine: ``fixed`` alone when the user names one
    (``auto``: this CPU's); else this CPU's own target (:func:`onnxcompress.runtime.cpu_features`,
    read from ``/proc/cpuinfo``: ``generic`` where that is missing) and ``generic`` (saturation-free
    weights: on x86 their integer results are the same on every CPU, so the model measured here is
    the model any x86 CPU runs), when the two differ in policy (:func:`_computes_like`): ``vnni``
    and ``generic`` on a VNNI CPU, ``arm64`` and ``generic`` on ARM, one target on an AVX2 or
    AVX-512 CPU without VNNI.
    Targets whose int8 results on this CPU differ from those on their own hardware (``vnni`` on an
    AVX2-only CPU: its pair sums saturate here) or that are not this machine (``cuda``,
    ``tensorrt``, ``arm64`` on x86) are not searched: a trial's metric and latency would not be the
    target's (:func:`target_warning` says so when the user fixes one)."""
    from .runtime import cpu_features

    host = cpu_features().int8_target
    if fixed is not None:
        return (host if fixed == "auto" else fixed,)
    return (host,) if _computes_like("generic", host) else (host, "generic")


def _computes_like(target: str, host: str) -> bool:
    """Whether ``target``'s int8 policy is ``host``'s (the same decisions, so the same model)."""
    from .passes.quantize.policy import resolve_policy

    return resolve_policy(target) == replace(resolve_policy(host), target=target)


@dataclass
class Budget:
    """What the user asks for.

    Attributes:
        metric: ``top1`` (top-1 agreement with fp32 over every row, %), ``task`` (what the default
            fidelity floor reads, :func:`onnxcompress.gates.floor_top1`, on the first output: top-1
            agreement over the rows where fp32 is decisive for class scores, equally decoded
            sequences for CTC-style outputs, equal elements for index outputs, else mean cosine
            x 100), ``accuracy`` (%, needs ``labels`` in the validation data), ``boxes``
            (detections kept: F1 x 100 of the candidate's detections matched to fp32's,
            :func:`box_matches`), ``cosine`` (worst
            output cosine x 100), ``max_rel_error`` (negated, x 100), or ``python:module:function`` taking ``(onnxruntime.InferenceSession, list of
            feed dicts)`` and returning a float, higher is better.
        max_drop: the most the metric may fall below fp32's (its own units: percentage points).
        min_speedup: fp32 latency / candidate latency at least this (``None``: no bound).
        max_size_mb: the written model at most this many MB (10^6 bytes; ``None``: no bound).
    """

    metric: str = "top1"
    max_drop: float = 1.0
    min_speedup: float | None = None
    max_size_mb: float | None = None

    def check(self) -> None:
        if self.metric not in METRICS and not self.metric.startswith("python:"):
            raise OnnxCompressError(f"--metric must be one of {', '.join(METRICS)} or python:module:function, "
                                    f"got {self.metric!r}")
        if not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise OnnxCompressError(f"--max-drop must be a finite number >= 0, got {self.max_drop}")
        if self.min_speedup is not None and not (self.min_speedup > 0 and math.isfinite(self.min_speedup)):
            raise OnnxCompressError(f"--min-speedup must be a finite number > 0, got {self.min_speedup}")
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            raise OnnxCompressError(f"--max-size-mb must be > 0, got {self.max_size_mb}")


@dataclass
class Trial:
    """One evaluated recipe."""

    number: int
    options: dict[str, Any]
    recipe_toml: str = ""
    metric: float = float("nan")
    drop: float = float("inf")
    #: :func:`drop_bound` on the search samples (``nan``: a user metric); the budget judges it
    drop_bound: float = float("nan")
    speedup: float = float("nan")
    speedup_ci: tuple[float, float] | None = None
    size_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    violation: float = float("inf")
    path: str | None = None

    def feasible(self) -> bool:
        return self.error is None and self.violation <= 0.0


@dataclass
class TuneResult:
    output: Path | None
    chosen: Trial | None
    trials: list[Trial]
    report: dict[str, Any]
    met: bool


# ----------------------------------------------------------------------------- metrics


def _user_metric(spec: str) -> Callable:
    mod, _, fn = spec[len("python:"):].rpartition(":")
    if not mod or not fn:
        raise OnnxCompressError(f"--metric {spec}: write python:module:function")
    try:
        return getattr(importlib.import_module(mod), fn)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the user's module: a SyntaxError, an error or SystemExit at import
        raise OnnxCompressError(f"--metric {spec}: cannot import it ({type(exc).__name__}: "
                                f"{_first(exc)})") from None


def measure(budget: Budget, model_path: Path, ref_outputs, feeds, labels) -> float:
    """The budget's metric of the model at ``model_path`` on ``feeds`` (higher is better).

    ``ref_outputs``: the fp32 model's outputs on ``feeds`` (first output used for top-1/cosine).
    """
    return measure_with_bound(budget, model_path, ref_outputs, feeds, labels)[0]


def measure_with_bound(budget: Budget, model_path: Path, ref_outputs, feeds, labels,
                       idx: np.ndarray | None = None, got_out: list | None = None) -> tuple[float, float]:
    """:func:`measure` and, with bootstrap resamples ``idx`` of the samples, :func:`drop_bound`
    (``nan`` without ``idx`` or for a user metric, which is a whole-set figure). ``got_out``: a
    list that receives the model's first output per sample (built-in metrics only).

    Raises:
        OnnxCompressError: a user metric that fails or returns no finite number.
        DataError: ``accuracy`` without labels.
    """
    from .runtime import make_session, run_samples

    sess = make_session(str(model_path), optimize=True)
    if budget.metric.startswith("python:"):
        fn = _user_metric(budget.metric)
        try:
            value = fn(sess, feeds)
        except KeyboardInterrupt:  # the user's Ctrl-C: stop (the CLI says how to resume), never a failed trial
            raise
        except BaseException as exc:  # the user's code: SystemExit and all, one line
            raise OnnxCompressError(f"--metric {budget.metric} raised {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
        given = value
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            value = float("nan")
        if not math.isfinite(value):
            raise OnnxCompressError(f"--metric {budget.metric} returned {repr(given)[:80]}, not a finite number")
        return value, float("nan")
    outs = run_samples(sess, feeds)
    first = sess.get_outputs()[0].name
    got = [o[first] for o in outs]
    from .validate import session_charset

    charset = session_charset(sess)  # the input's metadata, kept by every rewrite
    del outs, sess
    if budget.metric == "accuracy" and labels is None:
        raise DataError("--metric accuracy needs 'labels' in the validation data")
    ref = [r[first] for r in ref_outputs]
    if got_out is not None:
        got_out.extend(got)
    from .validate import _batch_one

    one = _batch_one(feeds)
    value = _score(budget.metric, ref, got, labels, first, one, charset)
    bound = (drop_bound(budget.metric, ref, got, labels, idx, first, one, charset) if idx is not None
             else float("nan"))
    return value, bound


def _score(metric: str, ref: list[np.ndarray], got: list[np.ndarray], labels, first: str = "output",
           batch_one: bool = False, charset: tuple[str, ...] | None = None) -> float:
    """A built-in metric of the first output ``got`` (one array per sample) against ``ref`` (the
    fp32 model's, the same samples); ``labels``: all samples' labels, concatenated; ``first``: the
    output's name (it tells class scores from embeddings, :func:`onnxcompress.validate.output_metrics`);
    ``charset``: the model's characters (a recognizer's lines compared without edge whitespace)."""
    from .validate import output_metrics

    if metric == "accuracy":
        pred = np.concatenate([class_rows(g) for g in got]).argmax(-1)
        return float(100.0 * np.mean(pred == np.asarray(labels).ravel()[: pred.size]))
    if metric == "task":
        from dataclasses import asdict

        from .gates import floor_top1, mean_cosine

        d = asdict(output_metrics(first, ref, got, batch_one=batch_one, charset=charset))
        t = floor_top1(d)
        return float(t[0]) if t is not None else 100.0 * float(mean_cosine(d))
    if metric == "boxes":
        try:
            m = np.array([box_matches(r, g) for r, g in zip(ref, got)], dtype=np.float64).reshape(-1, 3).sum(0)
        except ValueError as exc:  # not a detector's output
            raise DataError(f"{exc} (output '{first}')") from None
        return 100.0 * 2 * m[0] / (m[1] + m[2]) if m[1] + m[2] else 100.0
    if metric == "top1":
        same = sum(int(np.sum(np.asarray(r).argmax(-1) == np.asarray(g).argmax(-1))) for r, g in zip(ref, got))
        n = sum(int(np.prod(np.asarray(r).shape[:-1])) for r in ref)
        return 100.0 * same / max(n, 1)
    # cosine and relative error as validation and the gates measure them (worst over samples)
    m = output_metrics(first, ref, got)
    return 100.0 * float(m.cosine) if metric == "cosine" else -100.0 * float(m.max_rel_err)


#: bootstrap resamples of the search samples behind a trial's drop bound (:func:`drop_bound`)
BOOTSTRAP = 200
#: a trial meets ``max_drop`` when this quantile of its drop over the resamples does (0.8: about
#: the drop plus 0.84 standard errors)
DROP_QUANTILE = 0.8


def resamples(n: int, seed: int = 0) -> np.ndarray:
    """``[BOOTSTRAP, n]`` sample indices drawn with replacement, the same for every trial of one
    search (the trials' bounds are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))


def drop_bound(metric: str, ref: list[np.ndarray], got: list[np.ndarray], labels, idx: np.ndarray,
               first: str = "output", batch_one: bool = False, charset: tuple[str, ...] | None = None) -> float:
    """The :data:`DROP_QUANTILE` quantile of the drop (fp32's metric minus the candidate's) over the
    bootstrap resamples ``idx`` of the samples (Efron & Tibshirani 1993, the paired percentile
    bootstrap): a drop measured on a few dozen samples is noisy, and the fastest of many trials
    whose point drop is just within the budget is usually one that the noise favoured (the winner's
    curse). On EfficientNet-Lite0 the static trial that tune chose met the budget (2) on its search
    half and dropped 2.63 on samples it never saw.

    Each sample's share of the metric (agreeing rows and rows, label hits, its cosine) is computed
    once and the resamples add those up, so the bound costs about one more evaluation of the metric.
    ``task`` keeps the measure that the whole set uses (decisive rows, decoded sequences, equal
    elements or mean cosine: :func:`onnxcompress.gates.floor_top1`) in every resample.

    Args:
        ref / got: the first output of fp32 and of the candidate, one array per sample.
        labels: (``accuracy``) every sample's labels, concatenated in sample order.
        idx: :func:`resamples`.

    Returns:
        the bound, in the metric's units; ``nan`` for ``cosine`` and ``max_rel_error`` (a worst
        sample: no resample is worse than the whole set, so there is no bound to add), for no
        resamples, or where the samples cannot be split (a scalar or non-tensor output).
    """
    try:
        parts = _per_sample(metric, ref, got, labels, first, batch_one, charset)
    except (ValueError, TypeError, IndexError, AttributeError):
        return float("nan")
    if parts is None or not len(idx):
        return float("nan")
    num_ref, num, den, _ = parts
    drops = []
    for pick in idx:
        d = den[pick].sum()
        if d > 0:
            drops.append(100.0 * (num_ref[pick].sum() - num[pick].sum()) / d)
    return float(np.quantile(drops, DROP_QUANTILE)) if drops else float("nan")


def answer_step(metric: str, ref: list, labels, first: str = "output",
                batch_one: bool = False) -> tuple[float, int] | None:
    """What one changed answer costs in the metric: ``(percentage points, answers counted)`` for a
    metric that counts answers (``top1``, ``accuracy``, ``task`` on class choices, decoded
    sequences or index outputs); ``None`` for a continuous one (cosines, errors, a user metric).
    With 38 decisive rows one flip is 2.6 pp: a ``--max-drop`` below that cannot tell a model with
    one flip from one with none, on the search half or the held-out half."""
    try:
        parts = _per_sample(metric, ref, ref, labels, first, batch_one)
    except (ValueError, TypeError, IndexError, AttributeError):
        return None
    if parts is None or not parts[3]:
        return None
    n = int(parts[2].sum())
    if metric == "boxes":  # the denominator counts fp32's and the candidate's detections: 2 per answer
        n //= 2
    return (100.0 / n, n) if n > 0 else None


def _per_sample(metric: str, ref, got, labels, first: str, batch_one: bool = False,
                charset: tuple[str, ...] | None = None):
    """Per sample: (fp32's numerator, the candidate's numerator, denominator) of the metric as a
    ratio of sums, and whether it counts answers (``False``: ``task`` judged by mean cosine);
    ``None`` for a worst-sample metric."""
    from dataclasses import asdict

    from .gates import floor_top1, mean_cosine
    from .validate import output_metrics

    n = len(ref)
    if metric in ("cosine", "max_rel_error") or metric.startswith("python:") or n == 0:
        return None
    den = np.zeros(n)
    num_ref, num = np.zeros(n), np.zeros(n)
    if metric == "accuracy":  # one label per row of class scores (label_rows), as _score counts them
        rows = [label_rows(r) for r in ref]
        lab = np.asarray(labels).ravel()
        cut = np.cumsum([0, *rows])
        for i, (r, g) in enumerate(zip(ref, got)):
            y = lab[cut[i]:cut[i + 1]]
            den[i] = len(y)
            num_ref[i] = np.sum(class_rows(r).argmax(-1)[: len(y)] == y)
            num[i] = np.sum(class_rows(g).argmax(-1)[: len(y)] == y)
        return num_ref, num, den, True
    if metric == "boxes":
        for i, (r, g) in enumerate(zip(ref, got)):
            matched, n_ref, n_got = box_matches(r, g)
            den[i], num[i] = n_ref + n_got, 2 * matched
        return den.copy(), num, den, True
    if metric == "top1":
        for i, (r, g) in enumerate(zip(ref, got)):
            den[i] = int(np.prod(np.asarray(r).shape[:-1]))
            num[i] = int(np.sum(np.asarray(r).argmax(-1) == np.asarray(g).argmax(-1)))
        return den.copy(), num, den, True
    # task: the measure the whole set is judged by, per sample
    from .validate import ctc_logits_layout

    layout = ctc_logits_layout(ref, first, batch_one)  # decided once, over every sample
    whole = asdict(output_metrics(first, ref, got, ctc=layout, charset=charset))
    t = floor_top1(whole)
    for i, (r, g) in enumerate(zip(ref, got)):
        m = asdict(output_metrics(first, [r], [g], ctc=layout, charset=charset))
        if t is None:
            den[i], num[i] = 1.0, float(mean_cosine(m))
        elif whole.get("integer"):
            den[i] = np.asarray(r).size
            num[i] = (m.get("top1_agreement") or 0.0) * den[i] / 100.0
        elif whole.get("sequence_agreement") is not None:
            den[i] = m.get("n_sequences") or 0
            num[i] = (m.get("sequence_agreement") or 0.0) * den[i] / 100.0
        else:
            den[i] = m.get("n_decisive") or 0
            num[i] = (m.get("top1_agreement_decisive") or 0.0) * den[i] / 100.0
    return den.copy(), num, den, t is not None


#: ``boxes``: a detection is a box whose best class score is at least this (YOLOv8's default)
BOX_SCORE = 0.25
#: ``boxes``: class-wise non-maximum suppression drops a box overlapping a better one this much
BOX_NMS_IOU = 0.45
#: ``boxes``: a candidate detection matches an fp32 one of the same class overlapping this much
BOX_MATCH_IOU = 0.5


def detections(out: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The detections in a YOLO-style raw output, per image: ``(boxes [k, 4] x1 y1 x2 y2, classes [k])``.

    Layout (YOLOv8 and later, Ultralytics' export): ``[images, 4 + classes, anchors]`` float, each
    anchor a box centre x, y, width, height, then one score per class (already sigmoid-ed); or the
    same transposed, ``[images, anchors, 4 + classes]`` (told apart by which axis is shorter). A box
    is kept when its best class score is at least :data:`BOX_SCORE`, then class-wise greedy
    non-maximum suppression at IoU :data:`BOX_NMS_IOU` (as Ultralytics' ``non_max_suppression``).

    Raises:
        ValueError: not a rank-3 float output with at least one class.
    """
    a = np.asarray(out)
    if a.ndim != 3 or a.dtype.kind != "f" or min(a.shape[1:]) < 5:
        raise ValueError(f"--metric boxes needs a YOLO-style output [images, 4 + classes, anchors], got shape "
                         f"{list(a.shape)} ({a.dtype})")
    if a.shape[1] > a.shape[2]:
        a = a.transpose(0, 2, 1)
    return [_image_detections(img) for img in a]


def _image_detections(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`detections` of one image's ``[4 + classes, anchors]``."""
    scores = np.nan_to_num(img[4:], nan=-np.inf)
    cls, best = scores.argmax(0), scores.max(0)
    # a box with a non-finite coordinate or score is no detection (a candidate that computes
    # NaN loses it)
    keep = np.flatnonzero((best >= BOX_SCORE) & np.isfinite(best) & np.isfinite(img[:4]).all(0))
    cx, cy, w, h = img[:4, keep].astype(np.float64)  # float64: no overflow on huge finite coordinates
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    cls, best = cls[keep], best[keep]
    kept = []
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        idx = idx[np.argsort(-best[idx], kind="stable")]
        while idx.size:
            kept.append(idx[0])
            idx = idx[1:][_iou(boxes[idx[0]], boxes[idx[1:]]) <= BOX_NMS_IOU]
    kept = np.array(sorted(kept), dtype=np.int64)
    return boxes[kept].reshape(-1, 4), cls[kept]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1 y1 x2 y2 box with each of ``boxes`` [k, 4]; boxes without area overlap
    fully only an equal box (1), else not at all (0)."""
    with np.errstate(invalid="ignore", over="ignore"):  # areas of huge boxes: inf, their IoU nan -> no match
        return _iou_values(box, boxes)


def _iou_values(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(boxes) - inter
    same = np.all(boxes == box, axis=1).astype(inter.dtype)
    return np.where(union > 0, np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), same)


def _detection_counts(outs: list[np.ndarray]) -> list[int]:
    """Detections per sample (:func:`detections`, all images of a sample)."""
    return [sum(len(c) for _, c in detections(o)) for o in outs]


def box_matches(ref: np.ndarray, got: np.ndarray) -> tuple[int, int, int]:
    """``(matched, fp32 detections, candidate detections)`` over the images of one sample: each fp32
    detection (best score first per class, :func:`detections`) matches the unmatched candidate
    detection of its class that overlaps it most, if by IoU >= :data:`BOX_MATCH_IOU`. F1 of the
    candidate against fp32 = 2 matched / (fp32 + candidate detections)."""
    matched = n_ref = n_got = 0
    for (rb, rc), (gb, gc) in zip(detections(ref), detections(got)):
        n_ref, n_got = n_ref + len(rb), n_got + len(gb)
        free = np.ones(len(gb), bool)
        for b, c in zip(rb, rc):
            cand = np.flatnonzero(free & (gc == c))
            if not cand.size:
                continue
            ious = _iou(b, gb[cand])
            j = int(ious.argmax())
            if ious[j] >= BOX_MATCH_IOU:
                free[cand[j]] = False
                matched += 1
    return matched, n_ref, n_got


# ----------------------------------------------------------------------------- the search


def target_warning(target: str) -> str | None:
    """A warning when a fixed ``--target`` is not what this CPU computes: the trials' metric and
    latency are measured here (``None`` when they are the target's)."""
    from .runtime import cpu_features

    host = cpu_features().int8_target
    if target in ("auto", host, "generic"):
        return None
    if target in ("cuda", "tensorrt", "arm64") or not _computes_like(target, host):
        return (f"--target {target} is not this CPU ({host}): the trials' metric and speed are measured here, "
                f"on the CPU execution provider, and may not be what {target} computes")
    return None


def _suggest(trial, calibrated: bool, targets: tuple[str, ...] = ("auto",), ranked: bool = True) -> dict[str, Any]:
    """Flat options for one Optuna trial, from :data:`SPACE` (conditional axes skipped; ``target``
    among ``targets``, :func:`search_targets`, and not suggested when there is one;
    ``prune_groups`` only when ``ranked``: some group's pruning sensitivity was measured)."""
    chosen: dict[str, Any] = {}
    for ax in SPACE:
        if any(chosen.get(k) not in allowed for k, allowed in ax.when.items()):
            continue
        if ax.field == "prune_groups" and not ranked:
            continue
        p = ax.param
        if ax.field == "target":
            if len(targets) < 2:
                continue
            values = targets
        elif ax.field == "prune_mode":
            values = ("none", *p.search)
        elif ax.field == "quantize":
            values = tuple("none" if v is None else v for v in p.search)
            if not calibrated:
                values = tuple(v for v in values if v != "static")
        elif ax.field == "smooth_quant" and not calibrated:
            continue
        else:
            values = p.search
        if p.kind == "float" and p.choices is None and len(values) == 2 and ax.field == "prune":
            chosen[ax.field] = round(trial.suggest_float(ax.field, values[0] + 0.05, values[1], step=0.05), 2)
        else:
            labels = [str(v) for v in values]
            pick = trial.suggest_categorical(ax.field, labels)
            chosen[ax.field] = values[labels.index(pick)]
    chosen["quantize"] = None if chosen.get("quantize") == "none" else chosen.get("quantize")
    if chosen.get("prune_mode") == "none":
        chosen.pop("prune_mode")
    return chosen


def prune_groups_ratios(choice: str, ranked: list[str], groups: list[str]) -> dict[str, float]:
    """``prune_groups``'s per-group ratios (``--prune-ratio GROUP=0``, the groups left whole), each
    group named by a root layer. ``ranked``: the measured groups, most pruning-sensitive first;
    ``groups``: every group channel pruning would prune. ``all``: none; ``spare-K``: the K first of
    ``ranked``; ``least-K``: every group but the K last of ``ranked``.

    Raises:
        OnnxCompressError: a choice that is not one of :data:`PRUNE_GROUP_CHOICES`.
    """
    if choice == "all":
        return {}
    parsed = _prune_groups_k(choice)
    if parsed is None:
        raise OnnxCompressError(f"prune_groups: expected one of {', '.join(PRUNE_GROUP_CHOICES)}, got {choice!r}")
    kind, k = parsed
    if kind == "spare":
        return {g: 0.0 for g in ranked[:k]}
    keep = set(ranked[-k:]) if k else set()
    return {g: 0.0 for g in groups if g not in keep}


def _prune_groups_k(choice: str) -> tuple[str, int] | None:
    """``spare-K`` / ``least-K`` as ``(kind, K)``; ``None`` for anything else (``all`` included)."""
    kind, _, k = choice.partition("-")
    return (kind, int(k)) if kind in ("spare", "least") and k.isdigit() else None


def effective_prune_groups(choice: str, n_ranked: int) -> str:
    """``choice`` with its K cut to the measured groups (``least-16`` of 6 measured: ``least-6``)."""
    parsed = _prune_groups_k(choice)
    return choice if parsed is None else f"{parsed[0]}-{min(parsed[1], n_ranked)}"


def _options(chosen: dict[str, Any], base: OptimizeOptions, sensitive: list[str] = (),
             ranked: list[str] = (), groups: list[str] = ()) -> OptimizeOptions:
    """Flat options of a trial; ``keep_float`` k becomes the k most sensitive nodes excluded;
    ``prune_groups`` the groups channel pruning leaves whole (:func:`prune_groups_ratios`)."""
    chosen = dict(chosen)
    k = int(chosen.pop("keep_float", 0) or 0)
    if k:
        chosen["exclude_nodes"] = tuple(sensitive[:k])
    which = chosen.pop("prune_groups", "all") or "all"
    if which != "all" and chosen.get("prune_mode") == "channel":
        chosen["prune_ratios"] = {**(base.prune_ratios or {}), **prune_groups_ratios(which, list(ranked), list(groups))}
    return replace(base, **chosen)


#: what the state folder holds (checked before any work: regular files or new, none an input)
STATE_FILES = ("study.db", "cache.json", "sensitivity.json", "prune_sensitivity.json", "timing.npz", "report.json",
               "chosen.toml")
STATE_DIRS = ("trials", "pareto")


def _check_state(st: Path, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Refuse a state folder that is not a folder, holds a non-regular file or a link where a
    state file goes, or where a state file is an input or another output.

    Raises:
        OnnxCompressError: one line naming the path.
    """
    from .paths import check_distinct, check_output_file

    if st.exists() and (st.is_symlink() or not st.is_dir()):
        raise OnnxCompressError(f"{st}: the tune state folder is not a folder; give --resume a folder")
    if not st.exists():
        check_output_file(st, "tune state folder")
    for d in STATE_DIRS:
        p = st / d
        if p.exists() and (p.is_symlink() or not p.is_dir()):
            raise OnnxCompressError(f"{p}: expected a folder of the tune state; remove it or use another --resume")
    state = {f"tune state file {f}": st / f for f in STATE_FILES}
    if st.exists():
        for label, p in state.items():
            check_output_file(p, label)
    check_distinct({**state, **outputs}, {k: v for k, v in inputs.items() if v is not None and
                                         not (isinstance(v, (str, Path)) and Path(v).is_dir())})
    for label, v in inputs.items():
        if isinstance(v, (str, Path)) and Path(v).exists() and st.exists():
            try:
                inside = Path(v).resolve().is_relative_to(st.resolve())
            except (OSError, ValueError):
                inside = False
            if inside:
                raise OnnxCompressError(f"{v}: the {label} is inside the tune state folder {st}, which tune "
                                        "writes; keep inputs elsewhere")


def _read_json(path: Path, default, kind: type):
    """A state file's JSON, or ``default`` when it is missing or not what tune wrote (a corrupt
    cache only costs re-evaluation)."""
    if not path.exists():
        return default
    try:
        v = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        return default
    return v if isinstance(v, kind) else default


def _key(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()


def _file_hash(path: Path | None) -> str:
    if path is None:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def judged_drop(t: Trial) -> float:
    """The drop the budget judges: the larger of the point drop and its bootstrap bound."""
    return max(t.drop, t.drop_bound) if t.drop_bound == t.drop_bound else t.drop


@dataclass
class _Search:
    model: Path
    budget: Budget
    base: OptimizeOptions
    state: Path
    search_feeds: list
    final_feeds: list
    search_labels: Any
    final_labels: Any
    fp32_metric: float
    ref_search: list
    ref_final: list
    bench_data: Path
    fp32_size: int
    cache: dict[str, dict] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    #: the study's and the trial cache's key: model, data, budget, the targets searched
    data_key: str = ""
    #: the same without the targets (what fp32 measurements depend on)
    base_key: str = ""
    say: Callable[[str], None] = lambda s: None
    #: (node, int8 output SQNR dB, metric gain with only it in float or None), in keep_float's
    #: order (measured once, before the search: :func:`_sensitivity`)
    sensitivity: list = field(default_factory=list)
    #: the finalists' joint timing (:func:`_final_timing`): trial number, speed-up, interval
    final_timing: list = field(default_factory=list)
    #: bootstrap resamples of the search samples (:func:`resamples`), the same for every trial
    boot_idx: np.ndarray | None = None
    #: warnings that the data is too small to resolve the budget (:func:`answer_step`)
    resolution: list = field(default_factory=list)
    #: how many --validation samples are also --calibration samples (``data.shared_samples``)
    shared_with_calibration: int = 0
    #: channel-pruning groups, most sensitive first (:func:`_prune_sensitivity`): dicts with
    #: ``group`` (a root layer's name), ``layers``, ``channels``, ``macs_share`` and ``drop`` (the
    #: metric's drop with only this group pruned at :data:`PRUNE_PROBE_RATIO`; None: not measured)
    prune_sensitivity: list = field(default_factory=list)
    #: the int8 targets searched (:func:`search_targets`)
    targets: tuple = ("auto",)
    #: the model's node names as the pipeline gives them (NameFix: unnamed nodes named), to check
    #: cached group names against
    node_names: frozenset = frozenset()

    def ranked_groups(self) -> list[str]:
        """The measured channel-pruning groups, most sensitive first (``prune_groups``'s order)."""
        return [g["group"] for g in self.prune_sensitivity if g.get("drop") is not None]

    def pruned_groups(self) -> list[str]:
        """Every group channel pruning prunes (measured or not)."""
        return [g["group"] for g in self.prune_sensitivity]

    def violation(self, t: Trial) -> float:
        """Sum of the budget's violations, each relative to its bound (0 when met). The drop is
        judged by its bootstrap bound (:func:`drop_bound`) where there is one."""
        b = self.budget
        v = max(0.0, judged_drop(t) - b.max_drop) / max(b.max_drop, 1.0)
        if b.min_speedup is not None:
            v += max(0.0, b.min_speedup - (t.speedup if t.speedup == t.speedup else 0.0)) / b.min_speedup
        if b.max_size_mb is not None:
            v += max(0.0, t.size_bytes / 1e6 - b.max_size_mb) / b.max_size_mb
        return v

    def evaluate(self, number: int, chosen: dict[str, Any]) -> Trial:
        from .api import optimize
        from .bench import benchmark
        from .recipe import from_options

        opts = _options(chosen, self.base, [x[0] for x in self.sensitivity], self.ranked_groups(),
                        self.pruned_groups())
        t = Trial(number, {k: v for k, v in chosen.items()})
        if t.options.get("keep_float"):  # what the trial really kept (at most the ranked nodes), for its label
            t.options["keep_float"] = min(int(t.options["keep_float"]), len(self.sensitivity))
        if t.options.get("prune_groups"):  # likewise: at most the measured groups
            t.options["prune_groups"] = effective_prune_groups(str(t.options["prune_groups"]), len(self.ranked_groups()))
        t0 = time.perf_counter()
        try:
            rec = from_options(opts)
            t.recipe_toml = rec.to_toml()
        except OnnxCompressError as exc:
            t.error = str(exc)
            return t
        key = _key(self.data_key, t.recipe_toml)
        path = self.state / "trials" / f"{key[:16]}.onnx"
        if key in self.cache and (self.cache[key].get("error") or path.exists()):
            return replace(Trial(**{**self.cache[key], "number": number}), path=str(path) if path.exists() else None)
        try:
            optimize(self.model, path, recipe=rec)
            t.path = str(path)
            t.size_bytes = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
            t.metric, t.drop_bound = measure_with_bound(self.budget, path, self.ref_search, self.search_feeds,
                                                        self.search_labels, self.boot_idx)
            if not math.isfinite(t.metric):  # a broken candidate (non-finite outputs): no score to search on
                raise OnnxCompressError(f"{self.budget.metric} of the result is not finite")
            t.drop = self.fp32_metric - t.metric
            g = benchmark([self.model, path], data=self.bench_data, duration=1.5, warmup=2, memory=False).groups[0]
            m = g.models[1]
            t.speedup, t.speedup_ci = _speedup(m, float("nan"))
        except (GateFailedError, OnnxCompressError) as exc:
            t.error = str(exc).splitlines()[0]
        t.seconds = round(time.perf_counter() - t0, 2)
        t.violation = self.violation(t) if t.error is None else float("inf")
        self.cache[key] = {k: v for k, v in t.__dict__.items() if k not in ("number", "path")}
        write_atomic(self.state / "cache.json", json.dumps(self.cache, default=str))
        return t


def tune(model: str | Path, output: str | Path, budget: Budget, *, calibration=None, validation=None,
         trials: int = 30, time_budget_s: float | None = None, state: str | Path | None = None,
         seed: int = 0, progress: Callable[[str], None] | None = None,
         sensitivity_nodes: int = SENSITIVITY_NODES.default, sensitivity_groups: int = SENSITIVITY_GROUPS.default,
         target: str | None = None) -> TuneResult:
    """Search recipes for ``budget`` and write the best model found (see the module docstring).

    Args:
        model: the fp32 ``.onnx`` path (never modified).
        output: where to write the chosen model.
        budget: :class:`Budget`.
        calibration / validation: data (paths or arrays, as ``optimize`` takes). The validation
            samples are split in two: the search half scores trials, the held-out half re-measures
            the winner. Without validation data, the calibration data is split three ways.
        trials: the most trials (cached ones count); ``time_budget_s`` stops earlier.
        state: folder for the Optuna study, the trial models and the cache (default
            ``<output>.tune``); passing the same folder again resumes.
        sensitivity_nodes: :data:`SENSITIVITY_NODES`.
        sensitivity_groups: :data:`SENSITIVITY_GROUPS`.
        target: the int8 target (``--target``'s values); ``None``: searched among this CPU's own
            target and ``generic`` (:func:`search_targets`).

    Returns:
        :class:`TuneResult`; ``met`` is False when no trial met the budget (the closest was written).

    Raises:
        OnnxCompressError: bad input, or not one trial produced a model.
    """
    try:
        import optuna
    except ImportError:
        raise OnnxCompressError("tune needs Optuna: pip install 'onnxcompress[tune]'") from None
    budget.check()
    sensitivity_nodes = SENSITIVITY_NODES.check(sensitivity_nodes, "--sensitivity-nodes")
    sensitivity_groups = SENSITIVITY_GROUPS.check(sensitivity_groups, "--sensitivity-groups")
    if time_budget_s is not None and not (time_budget_s > 0 and math.isfinite(time_budget_s)):
        raise OnnxCompressError(f"--time-budget must be more than 0 seconds, got {time_budget_s:g}")
    if target is not None:
        if not isinstance(target, str) or target not in TARGET.choices:
            shown = repr(target) if len(repr(target)) <= 40 else repr(target)[:37] + "..."
            raise OnnxCompressError(f"--target must be one of {', '.join(TARGET.choices)}, got {shown}")
    warning = target_warning(target) if target is not None else None
    say = progress or (lambda s: None)
    out = Path(output)
    if not out.name:
        raise OnnxCompressError("-o: give an output file path")
    if not out.parent.is_dir():  # said against -o, not against the state folder beside it
        raise OnnxCompressError(f"-o {out}: its folder {out.parent} does not exist")
    st = Path(state) if state is not None else out.with_name(out.name + ".tune")
    from .model_io import check_output_path

    _check_state(st, {"input model": model, "calibration data": calibration, "validation data": validation},
                 {"-o": out, "-o's external data": out.with_name(out.name + ".data")})
    check_output_path(out, tuple(Path(v) for v in (model, calibration, validation)
                                 if isinstance(v, (str, Path)) and Path(v).is_file()))
    created = not st.exists()
    try:
        (st / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxCompressError(f"{st}: cannot create the tune state folder ({exc.strerror or exc})") from None
    try:
        s = _prepare(Path(model), budget, calibration, validation, st, say, sensitivity_nodes, time_budget_s, trials,
                     sensitivity_groups, search_targets(target))
    except BaseException:
        if created:  # made by this call and holding nothing worth resuming
            shutil.rmtree(st, ignore_errors=True)
        raise
    if warning:
        say("tune: warning: " + warning)
        s.resolution.append(warning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = "tune-" + s.data_key[:16]
    storage = f"sqlite:///{(st / 'study.db').resolve()}"
    try:
        others = [x.study_name for x in optuna.get_all_study_summaries(storage, include_best_trial=False)
                  if x.study_name != study_name]
    except Exception:  # a corrupt or foreign study.db: create_study below says so
        others = []
    if others:
        s.resolution.append(f"{st / 'study.db'} holds {len(others)} study(ies) of other settings (model, data, budget "
                            "or the targets searched): this run started a new one beside them, not resumed one")
        say("tune: " + s.resolution[-1])

    def constraints(ft):
        return [ft.user_attrs.get("violation", 1.0)]

    import warnings

    with warnings.catch_warnings():  # constraints_func: deprecated in Optuna 5, supported until 7
        warnings.simplefilter("ignore", FutureWarning)
        # the seed moves on with the trials the study already holds: a resumed search draws new candidates,
        # not the random ones it drew before (each a cached repeat that uses up --trials)
        sampler = optuna.samplers.TPESampler(seed=seed + _stored_trials(storage, study_name),
                                             constraints_func=constraints, n_startup_trials=min(8, trials))
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                    directions=["maximize", "maximize", "minimize"], sampler=sampler)
    except Exception as exc:  # a corrupt or foreign study.db
        raise OnnxCompressError(f"{st / 'study.db'}: not a tune study Optuna can open "
                                f"({str(exc).splitlines()[0][:200]}); remove it or use another --resume folder") from None
    if not study.trials:
        for seed_params in _seeds(budget, s.base.calibration is not None, s.targets, s.prune_sensitivity):
            study.enqueue_trial(seed_params, skip_if_exists=True)
    t_start = time.perf_counter()
    done = [ft for ft in study.trials if ft.state == optuna.trial.TrialState.COMPLETE]
    for ft in done:  # resumed: the finished trials are known (their models in the cache)
        s.trials.append(Trial(ft.number, json.loads(ft.user_attrs.get("options", "{}")),
                              **json.loads(ft.user_attrs.get("result", "{}"))))
    while len(s.trials) < trials:
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            break
        ot = study.ask()
        chosen = _suggest(ot, s.base.calibration is not None, s.targets, bool(s.ranked_groups()))
        say(f"trial {ot.number + 1}/{trials}: {_describe(chosen)}" + _best_so_far(s.trials))
        t = s.evaluate(ot.number, chosen)
        s.trials.append(t)
        ot.set_user_attr("violation", t.violation if t.error is None else 1e9)
        ot.set_user_attr("options", json.dumps(t.options, default=str))  # as evaluated (clipped counts)
        ot.set_user_attr("result", json.dumps({k: v for k, v in t.__dict__.items()
                                               if k not in ("number", "options")}, default=str))
        if t.error is not None:
            study.tell(ot, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(ot, [t.metric, t.speedup if t.speedup == t.speedup else 0.0, t.size_bytes])
    return _finish(s, out, st, say, t_start)


def _stored_trials(storage: str, study_name: str) -> int:
    """How many trials the study ``study_name`` in ``storage`` holds (0: none, or no such study)."""
    import optuna

    try:
        return sum(x.n_trials for x in optuna.get_all_study_summaries(storage, include_best_trial=False)
                   if x.study_name == study_name)
    except Exception:  # a corrupt or foreign study.db: create_study says so
        return 0


def _seeds(budget: Budget, calibrated: bool, targets: tuple[str, ...] = ("auto",),
           prune_sensitivity: list[dict] = ()) -> list[dict[str, Any]]:
    """The first trials: the fixed recipes a user would try (``int8-dynamic``, ``int8-static``, all
    settings at their declared defaults, the target this CPU's), so the search starts from — and can
    only improve on — them; with a size budget, also channel pruning + int8 (what a size goal needs
    beyond int8); when the measured pruning sensitivity (:func:`_prune_sensitivity`) allows, also
    int8 with the K least sensitive groups pruned at the probe's ratio (``least-K``, the largest K
    of :data:`PRUNE_GROUP_CHOICES` whose drops measured alone, negative ones as 0, add up to at most
    half of ``max_drop``: drops of separate groups roughly add, and the other half is int8's), kept
    channels rounded to 8 (what the CPU's blocked convolution kernels want)."""
    def defaults(mode: str) -> dict[str, Any]:
        d = {"quantize": mode, "per_channel": str(PER_CHANNEL.default), "keep_float": str(KEEP_FLOAT.default),
             "prune_mode": "none"}
        if len(targets) > 1:
            d["target"] = targets[0]
        if calibrated:
            d["smooth_quant"] = str(SMOOTH_QUANT.default)
        if mode == "static":
            d.update(calibration_method=str(CALIBRATION_METHOD.default), bias_correction=str(BIAS_CORRECTION.default),
                     bias_correction_mode=str(BIAS_CORRECTION_MODE.default), equalize=str(EQUALIZE.default))
        return d

    seeds = [defaults("dynamic")] + ([defaults("static")] if calibrated else [])
    if budget.max_size_mb is not None:
        mode = "static" if calibrated else "dynamic"
        for ratio in (0.5, 0.3):
            seeds.append({**defaults(mode), "prune_mode": "channel", "prune": ratio, "prune_round_to": "1",
                          "prune_groups": "all"})
    drops = sorted(max(0.0, float(g["drop"])) for g in prune_sensitivity if g.get("drop") is not None)
    least = [c for c in PRUNE_GROUP_CHOICES if c.startswith("least-") and int(c.split("-")[1]) <= len(drops)
             and sum(drops[:int(c.split("-")[1])]) <= budget.max_drop / 2]
    if least:
        k = int(least[-1].split("-")[1])
        measured = [g for g in prune_sensitivity if g.get("drop") is not None]
        # rounded to 8 only where that still removes channels at the probe's ratio (small groups: 1)
        def rounded_away(n: int) -> bool:  # rounding the kept channels up to 8 keeps all n
            return math.ceil((n - math.floor(PRUNE_PROBE_RATIO * n)) / 8) * 8 >= n

        small = any(rounded_away(int(g.get("channels", 0))) for g in measured[-k:])
        seeds.append({**defaults("static" if calibrated else "dynamic"), "prune_mode": "channel",
                      "prune": PRUNE_PROBE_RATIO, "prune_round_to": "1" if small else "8", "prune_groups": least[-1]})
    return seeds


def _prepare(model: Path, budget: Budget, calibration, validation, st: Path, say,
             sensitivity_nodes: int = SENSITIVITY_NODES.default, time_budget_s: float | None = None,
             trials: int | None = None, sensitivity_groups: int = SENSITIVITY_GROUPS.default,
             targets: tuple[str, ...] | None = None) -> _Search:
    """Data splits, the fp32 reference outputs and metric, the timing data (``targets``: the int8
    targets searched, default :func:`search_targets`)."""
    from .model_io import load_model
    from .pipeline import _samples
    from .recipe import Recipe
    from .data import input_specs

    say("tune: reading the model and the data")
    targets = search_targets() if targets is None else tuple(targets)
    loaded = load_model(model)
    specs = input_specs(loaded)
    import onnx_ir as ir

    ir.passes.common.NameFixPass()(loaded)  # the names every optimize run gives (recipes name nodes so)
    node_names = frozenset(n.name for n in ir.traversal.RecursiveGraphIterator(loaded.graph) if n.name)
    del loaded
    if calibration is None and validation is None:
        raise DataError("tune needs data: --calibration (and, better, --validation from another source)")
    calib, _ = _samples(calibration, specs, Recipe().data.image, "calibration") if calibration is not None else ([], {})
    if validation is not None:
        val, extras = _samples(validation, specs, Recipe().data.image, "validation")
        labels = extras.get("labels")
    else:
        k = max(1, len(calib) // 3)
        val, calib, labels = calib[-2 * k:], calib[: -2 * k] or calib[:k], None
        # the calibration third as a file in the state folder: trial recipes name their data by path
        import io

        buf = io.BytesIO()
        np.savez(buf, **{f"{i}__{n}": a for i, f in enumerate(calib) for n, a in f.items()})
        write_atomic(st / "calibration.npz", buf.getvalue())
        calibration = str((st / "calibration.npz").resolve())
    if len(val) < 2:
        raise DataError("tune needs at least 2 validation samples (one half searches, the other checks)")
    overlap, shared = None, 0
    if validation is not None and calib:
        from .data import shared_samples

        n = shared = shared_samples(calibration, validation, calib, val)
        if n:
            overlap = (f"{n} of the {len(val)} --validation samples are also --calibration samples: the trials "
                       "are calibrated on rows they are scored on, and the held-out check is not on unseen data "
                       "(give --validation from another source)")
            say("tune: warning: " + overlap)
    # the halves interleave (samples 0, 2, 4, ... search; 1, 3, 5, ... held out): a file sorted by
    # class or by source splits evenly, where first/second halves would not (a newcomer's digits test
    # file had every row fp32 gets wrong in its first half: 97.3 % searched, 100 % held out)
    search, final = val[0::2], val[1::2]
    lab_s = lab_f = None
    if budget.metric == "accuracy" and labels is None:
        raise DataError("--metric accuracy needs 'labels' in the validation data")
    from .runtime import is_ort_error, run_reference

    try:  # at the level the trials are measured at (ORT's optimizations on), so that the fp32 model
        # agrees with itself on near-tie answers; unoptimized where ORT's optimizer breaks the model
        sess, ref = run_reference(str(model), [*search, *final])
        ref_s, ref_f = ref[:len(search)], ref[len(search):]
    except Exception as exc:  # ORT's refusal: bad data or an op it does not know
        if not is_ort_error(exc):
            raise
        from .validate import _first_line

        raise DataError(f"ONNX Runtime cannot run the input model on the validation data: {_first_line(exc)}") from None
    del sess
    if budget.metric == "top1" and ref:
        _check_class_scores(ref[0])
    if budget.metric == "accuracy":
        # one label per row of the first output (what _check_labels counts and _score scores), in the
        # file's sample order; each half takes its samples' rows
        _check_labels(labels, ref)
        rows = [0] * len(val)
        for r, i in zip(ref, [*range(0, len(val), 2), *range(1, len(val), 2)]):  # ref: search, then held out
            rows[i] = label_rows(r[next(iter(r))])
        chunks = np.split(np.asarray(labels).ravel(), np.cumsum(rows)[:-1])  # each sample's labels, file order
        lab_s = np.concatenate(chunks[0::2])
        lab_f = np.concatenate(chunks[1::2]) if len(val) > 1 else chunks[0][:0]
    bench_data = st / "timing.npz"
    import io

    buf = io.BytesIO()
    np.savez(buf, **{f"{i}__{n}": a for i, f in enumerate(search[:8]) for n, a in f.items()})
    write_atomic(bench_data, buf.getvalue())
    base_key = _key(_file_hash(model), [sorted((k, hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())
                                               for f in [*calib, *val] for k, a in f.items())],
                    budget.__dict__, {"drop_bound": [BOOTSTRAP, DROP_QUANTILE]}, {"split": "interleaved"},
                    {"ctc_text": "edge whitespace not compared"})
    # the trials' int8 results and the target axis's values are this CPU's
    data_key = _key(base_key, {"targets": list(targets), "prune_groups": list(PRUNE_GROUP_CHOICES)})
    # the budget judges each trial on its metric: the default floor (a fixed task criterion) must not
    # refuse a trial that the budget would accept
    if isinstance(calibration, (str, Path)):  # recipes read data paths relative to the recipe file
        calibration = str(Path(calibration).resolve())
    base = OptimizeOptions(calibration=calibration, validation=None, latency=False, fallback=False,
                           accept_degraded=True, target=targets[0] if len(targets) == 1 else "auto")
    cache = {k: v for k, v in _read_json(st / "cache.json", {}, dict).items() if isinstance(v, dict)}
    s = _Search(model, budget, base, st, search, final, lab_s, lab_f, 0.0, ref_s, ref_f, bench_data,
                model.stat().st_size, cache=cache, data_key=data_key, say=say, base_key=base_key)
    if overlap:
        s.resolution.append(overlap)
    s.shared_with_calibration = shared
    s.boot_idx = resamples(len(search))
    s.fp32_metric = measure(budget, model, ref_s, search, lab_s)
    first = next(iter(ref_s[0]), "output") if ref_s else "output"
    if budget.metric == "boxes":
        for half, refs in (("search", ref_s), ("held-out", ref_f)):
            if not sum(_detection_counts([r[first] for r in refs])):
                raise DataError(f"--metric boxes: the input model finds no detection (class score >= {BOX_SCORE:g}) "
                                f"in the {half} half of the validation data: nothing to judge (give images "
                                "with objects, or another metric)")
    from .validate import _batch_one

    for half, refs, lab, feeds in (("search", ref_s, lab_s, search), ("held-out", ref_f, lab_f, final)):
        step = answer_step(budget.metric, [r[first] for r in refs], lab, first, _batch_one(feeds)) if refs else None
        # --max-drop 0 asks for no changed answer at all: that needs no warning
        if step is not None and step[0] > budget.max_drop > 0:
            s.resolution.append(f"the {half} half has {step[1]} counted answers: one changed answer is "
                                f"{step[0]:.3g} > --max-drop {budget.max_drop:g}, so the budget cannot tell a model "
                                "with one changed answer from one with none there (give more --validation data)")
            say("tune: warning: " + s.resolution[-1])
    s.targets = targets
    s.node_names = node_names
    s.sensitivity = _sensitivity(s, say, sensitivity_nodes, time_budget_s, trials)
    s.prune_sensitivity = _prune_sensitivity(s, say, sensitivity_groups, time_budget_s, trials)
    return s


def _check_class_scores(first_ref: dict) -> None:
    """``--metric top1`` compares the argmax of the first output's last axis: refuse an output where
    that is no class (labels, strings, one score per row), which would read 100 % whatever changes.

    Raises:
        DataError: one line naming the output and the metric to use instead.
    """
    name = next(iter(first_ref))
    o = np.asarray(first_ref[name]) if not isinstance(first_ref[name], (list, dict)) else None
    if o is None or o.dtype.kind != "f" or o.ndim == 0 or o.shape[-1] < 2:
        what = (f"{o.dtype} of shape {list(o.shape)}" if o is not None else type(first_ref[name]).__name__)
        raise DataError(f"--metric top1 needs class scores (float, last axis >= 2 classes); the first output "
                        f"'{name}' is {what}: use --metric task (equal labels for index outputs, else mean "
                        "cosine) or cosine")


def class_rows(out) -> np.ndarray:
    """One sample's class scores as rows ``[rows, C]``: its leading axes flattened (``[N, C]``: N
    rows; ``[N, T, C]``: N·T; ``[C]``: 1) — one label each for ``--metric accuracy``."""
    o = np.asarray(out)
    return o.reshape(-1, o.shape[-1])


def label_rows(out) -> int:
    """How many labels one sample's class scores take (:func:`class_rows`)."""
    return int(class_rows(out).shape[0])


def _check_labels(labels, refs: list[dict]) -> None:
    """``--metric accuracy``'s labels: 1-D integer class indices, one per row of the first output,
    each a valid index of its last axis.

    Raises:
        DataError: one line saying what is wrong.
    """
    from .data import class_indices

    lab = class_indices(labels, "--metric accuracy")
    first = next(iter(refs[0]))
    outs = [np.asarray(r[first]) for r in refs]
    if any(o.ndim < 1 for o in outs):
        raise DataError(f"--metric accuracy: the first output '{first}' is a scalar, not class scores")
    rows = sum(label_rows(o) for o in outs)
    classes = int(outs[0].shape[-1])
    if lab.shape[0] != rows:
        raise DataError(f"--metric accuracy: {lab.shape[0]} labels for {rows} rows of the first output '{first}'")
    if lab.size and (lab.min() < 0 or lab.max() >= classes):
        raise DataError(f"--metric accuracy: labels {int(lab.min())}..{int(lab.max())} outside 0..{classes - 1} "
                        f"(the first output '{first}' has {classes} classes)")


#: a measured node goes ahead of the SQNR order only when keeping it in float wins back at least this
#: share of the all-int8 model's drop from fp32 (a continuous metric's noise is not a gain)
MIN_GAIN_SHARE = 0.05


def _sensitivity(s: _Search, say, measured: int = SENSITIVITY_NODES.default, time_budget_s: float | None = None,
                 trials: int | None = None) -> list[tuple[str, float, float | None]]:
    """The order in which ``keep_float`` keeps nodes in float: ``(node, int8 output SQNR dB,
    metric gain)`` per int8 node.

    One static int8 run gives each node's one-node output SQNR (:mod:`onnxcompress.passes.quantize
    .sensitivity`). Then the ``measured`` lowest-SQNR nodes are each kept in float alone (static
    int8 of every other node, ``exclude_nodes``) and the result scored with the budget's metric on
    the search half: its *gain* over the all-int8 model is what keeping that node in float buys
    for this task — the issue's per-layer sensitivity, measured where it is used (SQNR is one
    node's output, not the task's answer). A node is not started when the time spent plus one
    node's cost (the all-int8 run's) would pass :data:`SENSITIVITY_TIME_SHARE` of
    ``time_budget_s`` (this time comes before the search's own budget), and nothing is measured
    when ``trials`` leaves no trial after the seed recipes (which keep no node in float). Nodes
    whose gain is at least :data:`MIN_GAIN_SHARE` of the all-int8 drop (and positive) come first,
    largest first (equal gains: lower SQNR first), then every other node by SQNR, lowest first.

    Cached in the state folder (``sensitivity.json``) with a key of the model, the data, the
    budget and ``measured``: a resumed run with the same ones reuses it (the same order for the
    same ``keep_float``); anything else measures again. The measured models live in a private
    temporary folder of the state folder, removed whatever happens. ``[]`` when static int8
    cannot run."""
    from .api import optimize

    f = s.state / "sensitivity.json"
    key = _key(s.data_key, {"sensitivity_nodes": measured})
    known = _read_json(f, {}, dict)
    nodes = known.get("nodes") if known.get("key") == key else None
    if isinstance(nodes, list) and nodes and all(
            isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and isinstance(x[1], (int, float))
            and (x[2] is None or isinstance(x[2], (int, float))) for x in nodes):
        say(f"tune: per-node sensitivity from {f} (measured before, same model, data and budget)")
        return [(x[0], float(x[1]), None if x[2] is None else float(x[2])) for x in nodes]
    say("tune: per-node int8 sensitivity")
    t0 = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=".sensitivity-", dir=s.state))
    try:
        static = replace(s.base, quantize="static")
        try:
            res = optimize(s.model, folder / "all.onnx", static)
        except OnnxCompressError:
            return []
        sq: dict[str, float] = {}
        for p in res.report.get("passes", []):
            sq.update({k: float(v) for k, v in (p.get("counts", {}).get("node_sqnr_db") or {}).items()})
        del res
        by_sqnr = sorted(sq, key=lambda n: sq[n])
        gains: dict[str, float] = {}
        if trials is not None and trials <= len(_seeds(s.budget, s.base.calibration is not None)):
            measured = 0  # every trial is a seed recipe, none keeps a node in float
        base = float("nan")
        if measured and by_sqnr:
            try:
                base = measure(s.budget, folder / "all.onnx", s.ref_search, s.search_feeds, s.search_labels)
            except OnnxCompressError as exc:
                say(f"tune: sensitivity not measured: the all-int8 model cannot be scored ({str(exc).splitlines()[0]})")
            if not math.isfinite(base):
                say("tune: sensitivity not measured: the all-int8 model's metric is not finite")
        one_cost = time.perf_counter() - t0
        for n in by_sqnr[:measured] if math.isfinite(base) else []:
            spent = time.perf_counter() - t0
            if time_budget_s is not None and spent + one_cost > SENSITIVITY_TIME_SHARE * time_budget_s:
                say(f"tune: sensitivity stopped after {len(gains)} node(s): one more would pass "
                    f"{SENSITIVITY_TIME_SHARE:.0%} of --time-budget")
                break
            try:
                optimize(s.model, folder / "one.onnx", replace(static, exclude_nodes=(n,)))
                got = measure(s.budget, folder / "one.onnx", s.ref_search, s.search_feeds, s.search_labels)
            except OnnxCompressError:
                continue
            if math.isfinite(got):
                gains[n] = got - base
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    least = MIN_GAIN_SHARE * max(s.fp32_metric - base, 0.0) if math.isfinite(base) else 0.0
    first = sorted((n for n in gains if gains[n] > 0 and gains[n] >= least), key=lambda n: (-gains[n], sq[n]))
    order = first + [n for n in by_sqnr if n not in first]
    out = [(n, sq[n], gains.get(n)) for n in order]
    if first:
        say("tune: kept in float alone, these raise the metric most: " + ", ".join(
            f"{n} (+{gains[n]:.3g})" for n in first[:5]))
    write_atomic(f, json.dumps({"key": key, "nodes": out}))
    return out


def _prune_sensitivity(s: _Search, say, measured: int = SENSITIVITY_GROUPS.default,
                       time_budget_s: float | None = None, trials: int | None = None) -> list[dict[str, Any]]:
    """Channel-pruning sensitivity per dependency group, most sensitive first: the order in which
    ``prune_groups`` picks the groups a channel-pruning trial prunes (the issue's per-group pruning
    ratios: 0 for the groups left whole, the trial's ``prune`` for the rest).

    One channel-pruning run at :data:`PRUNE_PROBE_RATIO` (no int8) lists the groups the pass
    would prune, with their layers' MACs (``groups_detail``). Then the ``measured`` groups with
    the most MACs (where pruning saves the most time) are each pruned alone at that ratio — every
    other group at ratio 0 through ``prune_ratios``, least-squares repair as in the trials — and
    scored with the budget's metric on the search half: ``drop`` = fp32's metric minus that.
    A group is not started when the time spent (the probe's included) plus one group's cost (the
    last group's optimize and scoring; before the first, the probe's) would pass
    :data:`PRUNE_SENSITIVITY_TIME_SHARE` of ``time_budget_s``. This time, like the int8
    sensitivity's, comes before the search's own budget. Nothing is measured when ``trials``
    leaves no trial after the seed recipes. A group that cannot be pruned or scored is skipped
    with a line; the rest are still measured. Measured groups come first, largest drop first; equal
    drops (a coarse metric: one changed answer or none) by the mean cosine of the first output
    to fp32's, lowest first (``cosine``; None for a user metric), then more MACs first; then the
    unmeasured groups by MACs, ``drop`` None.

    Cached in ``prune_sensitivity.json`` under a key of the model, data, budget and ``measured``
    (not the int8 targets: the measurement is fp32); a resumed run reuses it when it was complete
    (every group asked for measured), else it measures again. ``[]`` when channel pruning cannot
    run or prunes nothing. ``macs_share``: the group's own layers' share of the whole model's
    Conv/ConvTranspose/Gemm/MatMul MACs.
    Measured models live in a private temporary folder of the state folder, removed whatever
    happens."""
    from .api import optimize

    f = s.state / "prune_sensitivity.json"
    # fp32 pruning: the int8 targets do not enter (s.base_key: model, data, budget)
    key = _key(s.base_key, {"sensitivity_groups": measured, "probe": PRUNE_PROBE_RATIO})
    known = _read_json(f, {}, dict)
    # a measurement cut short (time, failed groups) is measured again, not kept for the state's life
    groups = known.get("groups") if known.get("key") == key and known.get("complete") is True else None
    if isinstance(groups, list) and all(_valid_group(g, s.node_names) for g in groups):
        say(f"tune: per-group pruning sensitivity from {f} (measured before, same model, data and budget)")
        return groups
    if measured == 0 or (trials is not None and trials <= len(_seeds(s.budget, s.base.calibration is not None))):
        return []
    say("tune: per-group channel-pruning sensitivity")
    t0 = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=".prune-sensitivity-", dir=s.state))
    probe = replace(s.base, quantize=None, prune_mode="channel", prune=PRUNE_PROBE_RATIO)
    out: list[dict[str, Any]] = []
    try:
        try:
            res = optimize(s.model, folder / "all.onnx", probe)
        except Exception as exc:  # optional: any failure (ORT's too) leaves the search without it
            s.resolution.append(f"per-group pruning sensitivity not measured: channel pruning fails ({_first(exc)}); "
                                "channel-pruning trials prune every group alike")
            say("tune: " + s.resolution[-1])
            return []
        counts = next((p.get("counts", {}) for p in res.report.get("passes", [])
                       if p.get("name") == "prune-channels"), {})
        details = counts.get("groups_detail") or []
        del res
        pruned = [d for d in details if d.get("roots") and d["kept"] < d["channels"]]
        if not pruned:
            s.resolution.append("per-group pruning sensitivity: channel pruning finds no group to prune in this model "
                                "(every group blocked or of one channel)")
            say("tune: " + s.resolution[-1])
        # the share of the whole model's MACs (Conv/ConvTranspose/Gemm/MatMul) in each group's own layers
        total = int(counts.get("macs_before") or 0) or sum(int(d.get("macs", 0)) for d in details) or 1
        pruned.sort(key=lambda d: -int(d.get("macs", 0)))
        drops: dict[str, float] = {}
        cosines: dict[str, float] = {}
        first = next(iter(s.ref_search[0]), None) if s.ref_search else None
        todo = pruned[:measured]
        one_cost = time.perf_counter() - t0  # the probe's; after the first group, a group's own cost
        complete = True
        for i, d in enumerate(todo):
            spent = time.perf_counter() - t0
            if time_budget_s is not None and spent + one_cost > PRUNE_SENSITIVITY_TIME_SHARE * time_budget_s:
                s.resolution.append(f"per-group pruning sensitivity stopped after {i} of {len(todo)} group(s): one more "
                                    f"would pass {PRUNE_SENSITIVITY_TIME_SHARE:.0%} of --time-budget (a longer "
                                    "budget measures more)")
                say("tune: " + s.resolution[-1])
                complete = False
                break
            others = {o["roots"][0]: 0.0 for o in pruned if o is not d}
            g0 = time.perf_counter()
            try:
                optimize(s.model, folder / "one.onnx", replace(probe, prune_ratios=others))
                outs: list = []
                got = measure_with_bound(s.budget, folder / "one.onnx", s.ref_search, s.search_feeds,
                                         s.search_labels, got_out=outs)[0]
            except Exception as exc:  # one group that cannot be pruned or scored: the others still are
                s.resolution.append(f"per-group pruning sensitivity: group '{d['roots'][0]}' not measured "
                                    f"({_first(exc)})")
                say("tune: " + s.resolution[-1])
                complete = False
                continue
            finally:
                one_cost = time.perf_counter() - g0  # optimize and scoring: what the next group costs
            if math.isfinite(got):
                drops[d["roots"][0]] = s.fp32_metric - got
                c = (_mean_cosine(first, [r[first] for r in s.ref_search], outs) if outs and first is not None
                     else float("nan"))
                if math.isfinite(c):  # the tie-break of a coarse metric (one answer = many groups' 0)
                    cosines[d["roots"][0]] = c
            else:
                complete = False
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for d in pruned:
        g = d["roots"][0]
        out.append({"group": g, "layers": len(d["roots"]), "channels": int(d["channels"]),
                    "macs_share": round(int(d.get("macs", 0)) / total, 4),
                    "drop": None if g not in drops else float(f"{drops[g]:.4g}"),
                    "cosine": None if g not in cosines else float(f"{cosines[g]:.6f}")})
    out.sort(key=lambda g: (g["drop"] is None, -(g["drop"] or 0.0), g["cosine"] if g["cosine"] is not None else 1.0,
                            -g["macs_share"]))
    if drops:
        say("tune: pruned alone at {:.0%}, these groups lose the most: ".format(PRUNE_PROBE_RATIO) + ", ".join(
            f"{g['group']} ({g['drop']:+.3g})" for g in out[:5] if g["drop"] is not None))
    write_atomic(f, json.dumps({"key": key, "groups": out, "complete": complete}))
    return out


def _valid_group(g: Any, names: frozenset) -> bool:
    """Whether a cached ``prune_sensitivity.json`` entry is one :func:`_prune_sensitivity` writes:
    every key with a finite value of its type, the group a node of the model (``names``: the node
    names the pipeline gives, empty: not checked). Anything else is measured again."""
    def num(v, optional=False):
        return (optional and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v))

    return (isinstance(g, dict) and isinstance(g.get("group"), str) and (not names or g["group"] in names)
            and isinstance(g.get("layers"), int) and isinstance(g.get("channels"), int)
            and num(g.get("macs_share")) and num(g.get("drop"), True) and num(g.get("cosine"), True))


def _first(exc: BaseException) -> str:
    """An exception as one short line (:func:`onnxcompress.validate._first_line`, at most 200 characters)."""
    from .validate import _first_line

    return _first_line(exc)[:200]


def _mean_cosine(name: str, ref: list, got: list) -> float:
    """The mean cosine over samples of two models' output ``name`` as validation and the floor
    measure it (:func:`onnxcompress.validate.output_metrics`, :func:`onnxcompress.gates.mean_cosine`);
    ``nan`` for outputs that are not float arrays (labels, strings, ZipMap dicts: no cosine)."""
    if not all(isinstance(x, np.ndarray) and x.dtype.kind == "f" for x in (*ref, *got)):
        return float("nan")
    from .gates import mean_cosine
    from .validate import output_metrics

    return float(mean_cosine(output_metrics(name, ref, got, ctc=None)))


def _describe(chosen: dict[str, Any]) -> str:
    parts = [f"{chosen.get('quantize') or 'fp32'}"]
    if chosen.get("keep_float"):
        parts[0] += f" ({chosen['keep_float']} in float)"
    if chosen.get("quantize") and chosen.get("target") not in (None, "auto"):
        parts.append(f"target {chosen['target']}")
    if chosen.get("prune_mode"):
        parts.append(f"{chosen['prune_mode']} prune" + (f" {chosen['prune']:.2f}" if chosen.get("prune") else "")
                     + (f" ({chosen['prune_groups']})" if chosen.get("prune_groups") not in (None, "all") else ""))
    return ", ".join(parts)


def _best_so_far(trials: list[Trial]) -> str:
    ok = [t for t in trials if t.feasible()]
    if not ok:
        return ""
    b = max(ok, key=lambda t: (t.speedup, -t.size_bytes))
    return f" (best so far: {b.speedup:.2f}x, {b.size_bytes / 1e6:.3f} MB, drop {b.drop:.2f})"


def _pareto(trials: list[Trial]) -> list[Trial]:
    ok = [t for t in trials if t.error is None]
    front = []
    for t in ok:
        dominated = any((o.metric >= t.metric and o.speedup >= t.speedup and o.size_bytes <= t.size_bytes)
                        and (o.metric > t.metric or o.speedup > t.speedup or o.size_bytes < t.size_bytes)
                        for o in ok)
        if not dominated:
            front.append(t)
    return front


def _finish(s: _Search, out: Path, st: Path, say, t_start: float) -> TuneResult:
    from .model_io import save_model, load_model

    ok = [t for t in s.trials if t.error is None and t.path and Path(t.path).exists()]
    if not ok:
        if not s.trials:
            raise OnnxCompressError("tune: the time budget ran out before the first trial finished "
                                    "(give a longer --time-budget)")
        errors = "; ".join(sorted({t.error or "" for t in s.trials}))[:400]
        raise OnnxCompressError(f"tune: no trial produced a model ({errors})")
    feasible = [t for t in ok if t.feasible()]
    if feasible:
        fastest = max(feasible, key=lambda t: (t.speedup, -t.size_bytes, t.metric))
        # a trial wins on speed only beyond the noise: those whose interval reaches the fastest's
        # median are ties, and the smallest of them (then the most faithful) is chosen
        ties = [t for t in feasible if t is fastest or (t.speedup_ci is not None and t.speedup_ci[1] >= fastest.speedup)
                or t.speedup >= 0.97 * fastest.speedup]
        ties = timed = _final_timing(s, ties, say)
        fastest = max(ties, key=lambda t: (t.speedup, -t.size_bytes, t.metric))
        ties = [t for t in ties if t is fastest or t.speedup >= 0.97 * fastest.speedup]
        chosen = min(ties, key=lambda t: (t.size_bytes, -t.metric))
        why = ("the fastest trial that meets the budget" if chosen is fastest else
               f"as fast as the fastest within 3 % ({chosen.speedup:.2f}x vs {fastest.speedup:.2f}x), and smaller")
    else:
        chosen = min(ok, key=lambda t: (t.violation, -t.speedup))
        why = "no trial met the budget: the closest one (least violation)"
        timed = []
    say("tune: checking the chosen model on the held-out data")
    fp32_held = measure(s.budget, s.model, s.ref_final, s.final_feeds, s.final_labels)
    held = measure(s.budget, Path(chosen.path), s.ref_final, s.final_feeds, s.final_labels)
    tried = [{"trial": chosen.number, "metric": held, "drop": fp32_held - held}]
    held_failed = None
    if feasible and not _holds(s, fp32_held - held):
        # the search's choice misses the budget on data it never saw: other feasible trials are
        # measured there, the first that holds is taken (:func:`_held_out_order`)
        first, first_held = chosen, held
        for t in _held_out_order(chosen, timed, feasible)[:HELD_OUT_TRIES]:
            m = measure(s.budget, Path(t.path), s.ref_final, s.final_feeds, s.final_labels)
            tried.append({"trial": t.number, "metric": m, "drop": fp32_held - m})
            if _holds(s, fp32_held - m):
                chosen, held = t, m
                why = (f"trial {first.number}, the search's choice, drops {fp32_held - first_held:.3g} on the held-out "
                       f"samples (> {s.budget.max_drop:g}); this one, the {_ordinal(len(tried) - 1)} other feasible "
                       "trial measured there (fastest first), holds")
                break
        else:  # none holds: the one closest to the budget there (ties: the search's order)
            best = min(range(len(tried)), key=lambda i: tried[i]["drop"])
            # the finalists' copies carry the joint re-timing that the choice used
            by_number = {t.number: t for t in [*feasible, *timed, first]}
            chosen, held = by_number[tried[best]["trial"]], tried[best]["metric"]
            held_failed = (f"{s.budget.metric} drop {fp32_held - held:.3g} > {s.budget.max_drop:g} on the "
                           f"{len(s.final_feeds)} held-out samples the search never saw"
                           + (f" (so did the {len(tried) - 1} other feasible trial(s) measured there)"
                              if len(tried) > 1 else ""))
            why = ("every trial measured on the held-out samples misses the budget there: the one that misses "
                   "it least" + (" (the search's choice)" if chosen.number == first.number else
                                  f" (the search chose trial {first.number}, drop {fp32_held - first_held:.3g} there)"))
    elif not _holds(s, fp32_held - held):  # no trial was feasible: the closest also misses held out
        held_failed = (f"{s.budget.metric} drop {fp32_held - held:.3g} > {s.budget.max_drop:g} on the "
                       f"{len(s.final_feeds)} held-out samples the search never saw")
    save_model(load_model(chosen.path), out, protect=(s.model,))
    pareto = _pareto(s.trials)
    pdir = st / "pareto"
    shutil.rmtree(pdir, ignore_errors=True)
    pdir.mkdir()
    for t in pareto:
        write_atomic(pdir / f"trial{t.number:03d}.toml", t.recipe_toml)
    write_atomic(st / "chosen.toml", chosen.recipe_toml)
    failed = _failed(s, chosen) + ([held_failed] if held_failed else [])
    # the chosen model may be no faster than fp32 (a size or accuracy budget, or nothing faster met it)
    lo = chosen.speedup_ci[0] if chosen.speedup_ci else chosen.speedup
    if not lo > 1.0:
        why += ("; it is not faster than fp32 beyond the timing noise" + (" and keeps every int8 candidate node in float"
                if chosen.options.get("keep_float") and s.sensitivity and chosen.options["keep_float"] >= len(s.sensitivity)
                else ""))
    from . import __version__

    report = {
        "kind": "tune", "version": __version__, "input": str(s.model), "output": str(out),
        "budget": s.budget.__dict__, "fp32_metric": s.fp32_metric, "chosen": chosen.number, "why": why,
        "met": not failed, "failed": failed,
        "held_out": {"metric": held, "fp32_metric": fp32_held, "drop": fp32_held - held,
                     "within_budget": _holds(s, fp32_held - held), "samples": len(s.final_feeds),
                     "shared_with_calibration": s.shared_with_calibration,
                     "tried": tried},
        "resolution": s.resolution,
        "trials": [{k: v for k, v in t.__dict__.items() if k != "recipe_toml"} for t in s.trials],
        "pareto": [t.number for t in pareto], "pareto_recipes": str(pdir), "chosen_recipe": str(st / "chosen.toml"),
        "fp32_size_bytes": s.fp32_size, "final_timing": s.final_timing,
        "sensitivity": [{"node": n, "int8_sqnr_db": round(v, 2),
                         "metric_gain_in_float": None if g is None else float(f"{g:.4g}")} for n, v, g in s.sensitivity],
        "prune_sensitivity": s.prune_sensitivity, "prune_probe_ratio": PRUNE_PROBE_RATIO,
        "targets_searched": list(s.targets),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_atomic(st / "report.json", json.dumps(report, indent=1, default=str))
    return TuneResult(out, chosen, s.trials, report, met=not failed)


#: when the search's choice misses the budget on the held-out samples, at most this many other
#: feasible trials are measured there (:func:`_finish`)
HELD_OUT_TRIES = 4


def _held_out_order(chosen: Trial, timed: list[Trial], feasible: list[Trial]) -> list[Trial]:
    """The other feasible trials in the order the held-out check tries them when ``chosen``
    misses there: first the finalists timed together with fp32 (:func:`_final_timing`, the
    timing the choice used), then the rest by their search timing; fastest first, then the
    smaller; each trial once (``_final_timing`` returns copies: trials are told by number)."""
    key = lambda t: (-t.speedup, t.size_bytes, -t.metric)  # noqa: E731
    seen, out = {chosen.number}, []
    for t in sorted(timed, key=key) + sorted(feasible, key=key):
        if t.number not in seen:
            seen.add(t.number)
            out.append(t)
    return out


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(n, f"{n}th")


def _holds(s: _Search, drop: float) -> bool:
    """Whether a drop measured on the held-out samples is within the budget (its point value:
    the bootstrap bound guards the search's choice, this check is a second, independent look)."""
    return bool(drop <= s.budget.max_drop + 1e-9)


def _speedup(m, default: float) -> tuple[float, tuple[float, float] | None]:
    """A bench row's speed-up over the first model (``ModelBench.speedup``, ``default`` when it has
    none) and its interval (the inverse of ``latency_ratio_ci``), or ``None``."""
    ci = m.latency_ratio_ci
    return (float(m.speedup) if m.speedup else default), ((1.0 / ci[1], 1.0 / ci[0]) if ci else None)


#: seconds of the finalists' joint timing (:func:`_final_timing`)
FINAL_TIMING_S = 4.0
#: at most this many finalists are timed together (the fastest by their search timing)
FINAL_TIMING_MAX = 6


def _final_timing(s: _Search, ties: list[Trial], say) -> list[Trial]:
    """Time the finalists again, together and interleaved with fp32 in one ``bench`` call.

    Each trial was timed alone for 1.5 s during the search. On a busy machine those intervals
    are wide enough that a much slower trial "ties" with the fastest. The smallest tie then won:
    YOLOv8n's dynamic trial (1.0x of fp32 when re-timed) over static (1.7x).

    Returns copies of the trials whose ``speedup``/``speedup_ci`` are from this timing. They are
    returned as they were when there is one finalist or the timing fails.
    """
    if len(ties) < 2:
        return ties
    ties = sorted(ties, key=lambda t: -t.speedup)[:FINAL_TIMING_MAX]
    from .bench import benchmark

    say(f"tune: timing the {len(ties)} fastest trials together with fp32")
    try:
        g = benchmark([s.model, *[Path(t.path) for t in ties]], data=s.bench_data, duration=FINAL_TIMING_S,
                      warmup=2, memory=False).groups[0]
    except OnnxCompressError:
        return ties
    out = []
    for t, m in zip(ties, g.models[1:]):
        speedup, ci = _speedup(m, t.speedup)
        out.append(replace(t, speedup=speedup, speedup_ci=ci))
    s.final_timing = [{"trial": t.number, "speedup": t.speedup, "speedup_ci": t.speedup_ci} for t in out]
    return out


def _failed(s: _Search, t: Trial) -> list[str]:
    b, out = s.budget, []
    if judged_drop(t) > b.max_drop:
        out.append(f"{b.metric} drop {t.drop:.3g} > {b.max_drop:g}" if t.drop > b.max_drop else
                   f"{b.metric} drop {t.drop:.3g}, but up to {t.drop_bound:.3g} > {b.max_drop:g} within the noise "
                   f"of {len(s.search_feeds)} samples ({DROP_QUANTILE:.0%} bootstrap bound)")
    if b.min_speedup is not None and not t.speedup >= b.min_speedup:
        out.append(f"speed-up {t.speedup:.3g}x < {b.min_speedup:g}x")
    if b.max_size_mb is not None and t.size_bytes / 1e6 > b.max_size_mb:
        out.append(f"size {t.size_bytes / 1e6:.4g} MB > {b.max_size_mb:g} MB")
    return out
