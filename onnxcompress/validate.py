"""Compare a candidate model with its reference on the same inputs (the judge).

Both run with ONNX Runtime's graph optimizations on, as they will be deployed (the candidate's
Q/DQ fused into integer kernels); the reference without pre-packed weights or the memory arena
(:func:`onnxcompress.runtime.reference_session`: unoptimized where ORT could only build it by
copying its weights). Metrics per output, over all
samples (the style of Polygraphy's comparator):

* ``max_abs_err``: max |cand - ref|;
* ``max_rel_err``: max |cand - ref| / max |ref| (per sample, worst sample);
* ``cosine``: cosine similarity of the flattened outputs, worst sample;
* ``mean_cosine``: the same, averaged over samples (the default floor's measure for outputs
  that are not class scores: embeddings, maps, regressions);
* ``sqnr_db``: 10 log10(sum ref^2 / sum (cand - ref)^2) over all samples;
* ``top1_agreement`` (%): for outputs that look like class scores (rank 2, last axis > 1, a
  name that does not say embedding/hidden/feature/pool/state): share of rows whose argmax
  agrees; ``top1_agreement_rows`` the same for a higher-rank output whose last axis holds
  probability distributions (a CTC recognizer's per-timestep softmax), over all leading positions;
* ``top1_agreement_decisive`` (%) and ``n_decisive``: the same over the rows where the reference
  is decisive — its top class has probability >= :data:`DECISIVE_PROB` (the row itself when it is
  a probability distribution, else its softmax). A flip between two near-tied classes is not a
  lost answer; the default floor judges class scores by this share (``gates.floor``);
* ``accuracy`` (%): when labels are given, for both models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from .runtime import LEVELS, make_session, median_latency_ms, run_reference, run_samples
from .util import jsonable, plain_value


@dataclass
class OutputMetrics:
    name: str
    max_abs_err: float
    max_rel_err: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None = None
    #: an index output (int32/int64: ArgMax class indices, TopK / NMS indices): ``top1_agreement``
    #: is the % of equal elements; the float gates (relative error, cosine) do not apply to it.
    #: uint8 / bool outputs (images, masks) are values and keep the float gates.
    integer: bool = False
    #: cosine averaged over samples (``None`` where the outputs could not be compared: then
    #: ``cosine`` is -1)
    mean_cosine: float | None = None
    #: top-1 agreement over the reference's decisive rows, their count and all rows' (class scores)
    top1_agreement_decisive: float | None = None
    n_decisive: int | None = None
    n_rows: int | None = None
    #: per-row top-1 agreement of a higher-rank output whose last axis holds distributions (a CTC
    #: recognizer's per-timestep softmax); kept apart from ``top1_agreement``, which the
    #: ``--min-top1-agreement`` gate reads for rank-2 class scores only
    top1_agreement_rows: float | None = None
    #: for such a higher-rank distribution output: the % of sequences (``[..., T, C]`` rows over
    #: the leading axes) whose greedy CTC decoding (argmax per position, repeats collapsed, the
    #: blank — the reference's most frequent class — dropped) is equal: text lines kept. When the
    #: model names its characters (:func:`text_charset`), whitespace at either end of a line is
    #: not part of the text (a recognizer's padded region reads as blank or space by chance)
    sequence_agreement: float | None = None
    n_sequences: int | None = None
    #: an output whose shape differs between the models on some sample (data-dependent shapes:
    #: NMS, NonZero); the default floor does not judge it
    shapes_differ: bool = False


#: a reference row is decisive when its top class has at least this probability
DECISIVE_PROB = 0.3
#: largest total of reference outputs (bytes) :func:`compare` keeps in a caller's ``cache``
REF_CACHE_BYTES = 256 << 20


def _decisive(rows: np.ndarray) -> np.ndarray:
    """Per row of class scores ``[N, C]``: whether the top class has probability >=
    :data:`DECISIVE_PROB` (rows that already are distributions as they are, else softmax)."""
    r = np.asarray(rows, np.float64)
    if np.all(r >= 0) and np.allclose(r.sum(-1), 1.0, atol=1e-3):
        p = r
    else:
        e = np.exp(r - r.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
    return p.max(-1) >= DECISIVE_PROB


@dataclass
class Comparison:
    """Result of :func:`compare`; ``outputs`` lists per-output metrics."""

    provider: str
    n_samples: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    latency_ms_reference: float | None = None
    latency_ms_candidate: float | None = None
    #: ORT graph optimization level the reference ran at (:func:`onnxcompress.runtime.reference_session`)
    reference_level: str | None = None
    #: per float output of the reference: on how many samples it holds a NaN or an infinity (only
    #: outputs with any); equal non-finite values in the same places count as agreement, so the
    #: figures there say little
    nonfinite_reference: dict[str, int] = field(default_factory=dict)

    def worst(self, attr: str, lowest: bool) -> float | None:
        vals = [getattr(o, attr) for o in self.outputs if getattr(o, attr) is not None
                and not (o.integer and attr in ("max_abs_err", "max_rel_err", "cosine", "sqnr_db"))]
        if not vals:
            return None
        return min(vals) if lowest else max(vals)


_NOT_SCORES = ("embed", "hidden", "feature", "pool", "state", "token")


def _looks_like_scores(a: np.ndarray, name: str = "") -> bool:
    """Class scores: a rank-2 float output with >1 column whose name does not say it is an
    embedding, or a higher-rank one whose last axis holds probability distributions (a CTC
    recognizer's per-timestep softmax ``[N, T, C]``: top-1 per row is the decoded character).
    Recognizers exported without their softmax: :func:`ctc_logits_layout`."""
    if a.dtype.kind != "f" or a.ndim < 2 or a.shape[-1] <= 1 or any(k in name.lower() for k in _NOT_SCORES):
        return False
    if a.ndim == 2:
        return True
    return bool(a.size and np.all(a >= 0) and np.allclose(a.sum(-1, dtype=np.float64), 1.0, atol=1e-3))


#: rank-3 float outputs read as a recognizer's per-position logits (:func:`ctc_logits_layout`):
#: at least this many classes (a character set: NER tags, segmentation classes and a detector's
#: 4 + 80 columns are fewer or fail the other tests) ...
LOGIT_MIN_CLASSES = 32
#: ... at most this many positions per sequence (a detector's anchors, a segmentation's pixels
#: are more) ...
LOGIT_MAX_POSITIONS = 1024
#: ... at least this share of the (finite) rows put softmax probability >= :data:`LOGIT_TOP_PROB`
#: on one class (ddddocr's captcha model: 97 % at >= 0.5) ...
LOGIT_DECISIVE_SHARE = 0.8
LOGIT_TOP_PROB = 0.5
#: ... one class, the blank, tops between these shares of the rows (a hidden state whose outlier
#: channel tops every row is not a recognizer) ...
LOGIT_BLANK_SHARE = (0.25, 0.98)
#: ... and the rows' tops fall on at least this many classes (a detector's rows top on its 4 box
#: coordinates)
LOGIT_MIN_TOPS = 6
#: values per chunk of the detection's streamed softmax (rows of the class axis, at least one)
_LOGIT_CHUNK = 1 << 20


def ctc_logits_layout(refs: list, name: str = "", batch_one: bool = False) -> tuple[bool, int] | None:
    """Whether a rank-3 float output of every reference sample holds a CTC recognizer's
    per-position *logits* (exported without its softmax): ``(time_major, blank)`` or ``None``.

    The tests (:data:`LOGIT_MIN_CLASSES` ... :data:`LOGIT_MIN_TOPS`) run once over all samples'
    finite rows, streamed in float32 chunks (memory: one chunk). ``time_major``: the output is
    ``[T, 1, C]`` while every sample's input batch is 1 (``batch_one``), so axis 0 is time.
    ``blank``: the class that tops most rows. Names that say embedding/hidden/feature/... are
    never read as logits."""
    if not refs or any(k in name.lower() for k in _NOT_SCORES):
        return None
    if not all(isinstance(r, np.ndarray) and r.dtype.kind == "f" and r.ndim == 3 and r.size for r in refs):
        return None
    c = refs[0].shape[-1]
    if c < LOGIT_MIN_CLASSES or any(r.shape[-1] != c for r in refs):
        return None
    if all(_looks_like_scores(r, name) for r in refs):
        # already distributions (a softmax), read as such: their softmax could never be peaked
        return None
    time_major = batch_one and all(r.shape[1] == 1 and r.shape[0] > 1 for r in refs)
    if any((r.shape[0] if time_major else r.shape[1]) > LOGIT_MAX_POSITIONS for r in refs):
        return None
    tops = np.zeros(c, np.int64)
    decisive = rows = 0
    step = max(1, _LOGIT_CHUNK // c)
    for r in refs:
        flat = r.reshape(-1, c)
        for i in range(0, flat.shape[0], step):
            x = np.asarray(flat[i:i + step], np.float32)
            x = x[np.isfinite(x).all(-1)]
            if not x.size:
                continue
            m = x.max(-1, keepdims=True)
            top = 1.0 / np.exp(x - m).sum(-1)  # the largest class's softmax probability, in (0, 1]
            decisive += int(np.sum(top >= LOGIT_TOP_PROB))
            rows += x.shape[0]
            tops += np.bincount(x.argmax(-1), minlength=c)
    if not rows or decisive < LOGIT_DECISIVE_SHARE * rows or np.count_nonzero(tops) < LOGIT_MIN_TOPS:
        return None
    lo, hi = LOGIT_BLANK_SHARE
    if not lo * rows <= tops.max() <= hi * rows:
        return None
    return time_major, int(tops.argmax())


#: the metadata key under which PaddleOCR's recognizers (paddle2onnx exports, RapidOCR's models)
#: list their characters, one per line
CHARSET_KEY = "character"


def text_charset(meta) -> tuple[str, ...] | None:
    """A CTC recognizer's characters from its ONNX metadata (``{key: value}``, as
    ``onnx_ir.Model.metadata_props`` or ONNX Runtime's ``custom_metadata_map``), or ``None``.

    PaddleOCR's exports store them one per line under :data:`CHARSET_KEY`; its CTC classes are
    the blank (class 0), then character ``i`` as class ``i + 1``, then, when the model was trained
    with ``use_space_char``, a space as the last class (PaddleOCR ``CTCLabelDecode``). Anything
    else (no key, not text, an empty list) is ``None``: the sequences are then compared as they
    decode."""
    try:
        value = dict(meta or {}).get(CHARSET_KEY)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, str) or not value:
        return None
    # PaddleOCR reads its dictionary line by line ("\n", a "\r" before it trimmed); a character
    # that str.splitlines() would also split on (\x85, \u2028, ...) makes the two counts differ:
    # then the list does not say which class is which, and nothing is stripped
    lines = value.split("\n")
    if lines[-1] == "":
        lines.pop()
    chars = tuple(line[:-1] if line.endswith("\r") else line for line in lines)
    if len(chars) != len(value.splitlines()):
        return None
    return chars or None


def space_classes(charset: tuple[str, ...] | None, n_classes: int) -> frozenset[int]:
    """Classes of an ``n_classes``-way CTC output that decode to whitespace, in PaddleOCR's
    layout (:func:`text_charset`): blank + characters (+ a trailing space). Empty when the count
    fits neither layout (then the characters do not describe this output)."""
    if not charset or n_classes not in (len(charset) + 1, len(charset) + 2):
        return frozenset()
    ws = {i + 1 for i, ch in enumerate(charset) if ch.isspace() or ch == ""}
    if n_classes == len(charset) + 2:
        ws.add(len(charset) + 1)
    return frozenset(ws)


def session_charset(sess) -> tuple[str, ...] | None:
    """:func:`text_charset` of an ONNX Runtime session's model (``None`` where it has none)."""
    try:
        return text_charset(sess.get_modelmeta().custom_metadata_map)
    except Exception:  # noqa: BLE001 - metadata is optional; a session without it compares plainly
        return None


def _is_index(a) -> bool:
    """int32 / int64 output: indices (class, TopK, NMS), compared by equality."""
    a = np.asarray(a)
    return a.dtype.kind == "i" and a.dtype.itemsize >= 4


def output_metrics(name: str, refs: list[np.ndarray], cands: list[np.ndarray], *, batch_one: bool = False,
                   ctc: tuple[bool, int] | None | str = "detect",
                   charset: tuple[str, ...] | None = None) -> OutputMetrics:
    """Metrics of one output over samples (see module docstring). Sequence outputs are compared
    element by element (their numbers concatenated), optional and string outputs for equality
    (:func:`onnxcompress.util.plain_value`). ``ctc``: :func:`ctc_logits_layout`'s answer when the
    caller has it (for a subset of the samples it was decided on), else detected here
    (``batch_one``: every sample's input batch is 1). ``charset``: the reference model's characters
    (:func:`text_charset`): decoded sequences are then compared without whitespace at their ends."""
    if any(not isinstance(x, np.ndarray) or x.dtype.kind in "OUSV" for x in (*refs, *cands)):
        plain_r = [plain_value(r) for r in refs]
        plain_c = [plain_value(c) for c in cands]
        if any(kr != kc for (kr, _), (kc, _) in zip(plain_r, plain_c)):
            return OutputMetrics(name, float("inf"), float("inf"), -1.0, -float("inf"), None)
        if any(a is None for _, a in plain_r):  # equal structures and values (strings, absent optionals)
            return OutputMetrics(name, 0.0, 0.0, 1.0, float("inf"), None)
        refs, cands = [a for _, a in plain_r], [a for _, a in plain_c]
    max_abs = max_rel = 0.0
    cos = 1.0
    sig = noise = 0.0
    agree = total = agree_d = total_d = 0
    seq_same = seq_total = 0
    cosines: list[float] = []
    scores = False
    # whether a higher-rank output holds per-position class scores is decided once, over every
    # reference sample's rows (peaked logits: a share of rows, which varies between samples)
    logits = ctc_logits_layout(refs, name, batch_one) if ctc == "detect" else ctc
    for r, c in zip(refs, cands):
        r64 = np.asarray(r, np.float64)
        c64 = np.asarray(c, np.float64)
        if r64.shape != c64.shape:
            idx = _is_index(r)
            return OutputMetrics(name, float("inf"), float("inf"), -1.0, -float("inf"),
                                 0.0 if idx or (r64.ndim == 2 and _looks_like_scores(r, name)) else None,
                                 integer=idx, shapes_differ=True)
        fin_r, fin_c = np.isfinite(r64), np.isfinite(c64)
        if not (fin_r.all() and fin_c.all()):
            # equal non-finite values in the same places (log-probabilities, masked scores) match;
            # the metrics are taken over the finite rest
            if not np.array_equal(fin_r, fin_c) or not np.array_equal(r64[~fin_r], c64[~fin_c], equal_nan=True):
                return OutputMetrics(name, float("inf"), float("inf"), -1.0, -float("inf"), None)
            r64, c64 = np.where(fin_r, r64, 0.0), np.where(fin_c, c64, 0.0)
        d = np.abs(r64 - c64)
        if d.size:
            max_abs = max(max_abs, float(d.max()))
            scale = float(np.abs(r64).max())
            max_rel = max(max_rel, float(d.max()) / scale if scale > 0 else (0.0 if d.max() == 0 else float("inf")))
            nr, nc = np.linalg.norm(r64), np.linalg.norm(c64)
            one = float(np.dot(r64.ravel(), c64.ravel()) / (nr * nc)) if nr > 0 and nc > 0 else \
                (0.0 if nr != nc else 1.0)
            cos = min(cos, one)
            if nr > 0:  # an all-zero reference has no direction: judged by the errors, not the mean cosine
                cosines.append(one)
            sig += float(np.sum(r64**2))
            noise += float(np.sum(d**2))
        if logits is not None or _looks_like_scores(r, name):
            scores = True
            rows_r, rows_c = r.reshape(-1, r.shape[-1]), c.reshape(-1, c.shape[-1])
            same = rows_r.argmax(-1) == rows_c.argmax(-1)
            dec = _decisive(rows_r) if np.all(np.isfinite(r)) else np.zeros(rows_r.shape[0], bool)
            agree += int(np.sum(same))
            total += rows_r.shape[0]
            agree_d += int(np.sum(same & dec))
            total_d += int(np.sum(dec))
            if r.ndim >= 3:
                eq = _sequences_equal(r, c, *(logits or (False, None)),
                                      strip=space_classes(charset, r.shape[-1]))
                seq_same += int(np.sum(eq))
                seq_total += eq.size
    sqnr = float("inf") if noise == 0 else (10 * np.log10(sig / noise) if sig > 0 else -float("inf"))
    mean_cos = float(np.mean(cosines)) if cosines else (1.0 if cos == 1.0 else cos)
    if refs and all(_is_index(r) for r in refs):
        same = sum(int(np.sum(np.asarray(r) == np.asarray(c))) for r, c in zip(refs, cands))
        n = sum(np.asarray(r).size for r in refs)
        return OutputMetrics(name, max_abs, max_rel, cos, sqnr, 100.0 * same / n if n else 100.0, integer=True,
                             mean_cosine=mean_cos)
    rank2 = bool(refs) and np.asarray(refs[0]).ndim == 2
    share = 100.0 * agree / total if total else None
    return OutputMetrics(name, max_abs, max_rel, cos, sqnr, share if rank2 else None, mean_cosine=mean_cos,
                         top1_agreement_decisive=100.0 * agree_d / total_d if total_d else None,
                         n_decisive=total_d if scores else None, n_rows=total if scores else None,
                         top1_agreement_rows=share if scores and not rank2 else None,
                         sequence_agreement=100.0 * seq_same / seq_total if seq_total else None,
                         n_sequences=seq_total or None)


def _ctc_decode(path: np.ndarray, blank: int) -> tuple[int, ...]:
    """Greedy CTC decoding of one argmax path: repeats collapsed, then the blank dropped."""
    if path.size == 0:
        return ()
    keep = np.ones(path.size, bool)
    keep[1:] = path[1:] != path[:-1]
    out = path[keep]
    return tuple(int(v) for v in out[out != blank])


def _sequences_equal(r: np.ndarray, c: np.ndarray, time_major: bool = False, blank: int | None = None,
                     strip: frozenset[int] = frozenset()) -> np.ndarray:
    """Per sequence of a ``[..., T, C]`` score output: whether the greedy CTC decodings of
    reference and candidate are equal (``blank``: default the reference's most frequent argmax
    class). ``time_major``: ``[T, 1, C]`` (:func:`ctc_logits_layout`), one sequence of ``T``.
    ``strip``: classes dropped from both ends of each decoding first (whitespace, :func:`space_classes`),
    only where the blank is class 0 (the layout those classes were read in)."""
    if time_major:
        r, c = np.swapaxes(r, 0, 1), np.swapaxes(c, 0, 1)
    pr = r.reshape(-1, r.shape[-2], r.shape[-1]).argmax(-1)
    pc = c.reshape(-1, c.shape[-2], c.shape[-1]).argmax(-1)
    if blank is None:
        blank = int(np.bincount(pr.ravel()).argmax()) if pr.size else 0
    if blank != 0:
        strip = frozenset()  # not PaddleOCR's layout (blank first): the characters do not name these classes
    return np.array([_strip(_ctc_decode(a, blank), strip) == _strip(_ctc_decode(b, blank), strip)
                     for a, b in zip(pr, pc)], bool)


def _strip(seq: tuple[int, ...], classes: frozenset[int]) -> tuple[int, ...]:
    """``seq`` without members of ``classes`` at either end (``str.strip`` for class indices)."""
    if not classes:
        return seq
    i, j = 0, len(seq)
    while i < j and seq[i] in classes:
        i += 1
    while j > i and seq[j - 1] in classes:
        j -= 1
    return seq[i:j]


def _batch_one(samples: list[dict]) -> bool:
    """Whether every sample's inputs all have a leading dimension of 1 (one item per sample)."""
    return bool(samples) and all(isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == 1
                                 for s in samples for v in s.values())


def compare(
    reference: "bytes | str | ir.Model",
    candidate: "bytes | str | ir.Model",
    samples: list[dict[str, np.ndarray]],
    *,
    labels: np.ndarray | None = None,
    provider: str = "CPUExecutionProvider",
    latency: bool = True,
    level: str = "all",
    cache: dict | None = None,
) -> Comparison:
    """Run both models on ``samples`` and compare every output of the reference.

    Args:
        reference / candidate: serialized models, paths, or ``onnx_ir.Model`` (weights read in
            place: :func:`onnxcompress.runtime.make_session`).
        samples: feed dicts.
        labels: optional int labels, one per row of the first output over all samples.
        provider: ONNX Runtime execution provider of the candidate (and reference).
        latency: also measure the median latency (ms) of both on the first sample.
        level: ONNX Runtime graph optimization level of the candidate and the timed reference
            (``all``, ``extended``, ``basic``, ``disable``; :data:`onnxcompress.runtime.LEVELS`).
        cache: a dict the caller keeps while ``reference`` and ``samples`` stay the same (the
            fallback's rounds): the reference's outputs per provider, ``(output names, outputs per
            sample, ORT level, its characters)``, are kept there (when they total at most :data:`REF_CACHE_BYTES`)
            and reused instead of running it again.

    One ORT session exists at a time (reference, then the reference optimized for the latency
    figure, then the candidate), so validation holds at most one runtime's copy of weights.

    A reference output missing from the candidate counts as infinitely wrong.
    """
    ref_level = None
    if cache is not None and provider in cache:
        ref_outputs, refs, ref_level, charset = cache[provider]
    else:
        ref_sess, refs = run_reference(reference, samples, level=level, provider=provider,
                                       step=f"input model on {provider.replace('ExecutionProvider', '')}")
        ref_outputs = [o.name for o in ref_sess.get_outputs()]
        ref_level = ref_sess.onnxcompress_level
        charset = session_charset(ref_sess)
        del ref_sess
        if cache is not None and all(isinstance(v, np.ndarray) for r in refs for v in r.values()) \
                and sum(v.nbytes for r in refs for v in r.values()) <= REF_CACHE_BYTES:
            cache[provider] = (ref_outputs, refs, ref_level, charset)
    comp = Comparison(provider=provider, n_samples=len(samples))
    comp.reference_level = ref_level
    for name in ref_outputs:
        bad = sum(1 for r in refs if isinstance(r.get(name), np.ndarray) and r[name].dtype.kind == "f"
                  and not np.isfinite(r[name]).all())
        if bad:
            comp.nonfinite_reference[name] = bad
    if latency and samples:
        ref_opt = make_session(reference, optimize=level, provider=provider)
        comp.latency_ms_reference = median_latency_ms(ref_opt, samples[0])
        del ref_opt
    # pre-packed weights (a copy of every GEMM weight) only where the candidate is timed
    cand_sess = make_session(candidate, optimize=level, provider=provider, prepack=bool(latency and samples))
    cands = run_samples(cand_sess, samples, f"result on {provider.replace('ExecutionProvider', '')}")
    if latency and samples:
        comp.latency_ms_candidate = median_latency_ms(cand_sess, samples[0])
    del cand_sess
    one = _batch_one(samples)
    for name in ref_outputs:
        if not cands or name not in cands[0]:
            comp.outputs.append(OutputMetrics(name, float("inf"), float("inf"), -1.0, -float("inf"), None))
            continue
        comp.outputs.append(output_metrics(name, [r[name] for r in refs], [c[name] for c in cands], batch_one=one,
                                           charset=charset))
    if labels is not None:
        first = ref_outputs[0]
        r = np.concatenate([x[first] for x in refs])
        c = np.concatenate([x[first] for x in cands])
        if r.ndim == 2 and len(labels) == r.shape[0]:
            comp.accuracy_reference = float(100.0 * np.mean(r.argmax(-1) == labels))
            comp.accuracy_candidate = float(100.0 * np.mean(c.argmax(-1) == labels))
    return comp


def validate_all(original: ir.Model, model: ir.Model, val, labels, providers: list[str], latency: bool,
                 cache: dict | None = None) -> list[dict]:
    """:func:`compare` on every provider, as JSON-ready dicts.

    The candidate runs as it will be deployed, at ``ORT_ENABLE_ALL``. When ONNX Runtime cannot run
    it there, the input model is tried at the same level: when that fails too, ONNX Runtime's own
    optimizer breaks the model (not our rewrite), so both are compared at the highest level at
    which the input runs, and the dict says so (``ort_level``, ``note``: deployment advice).

    Raises:
        OnnxCompressError: the result fails where the input runs (nothing may be written).
    """
    out = []
    for p in providers:
        try:
            d = jsonable(asdict(compare(original, model, val, labels=labels, provider=p, latency=latency,
                                        cache=cache)))
            d["ort_level"] = "all"
        except Exception as exc:  # ORT's refusal, whatever its type
            d = _lower_level(original, model, val, labels, p, latency, _first_line(exc))
        out.append(d)
    return out


def fusion_named(why: str) -> str | None:
    """The ORT graph transformer an error message names (``SimplifiedLayerNormFusion`` in
    "... running SimplifiedLayerNormalization node. Name:'/SimplifiedLayerNormFusion/' ..."),
    or ``None``."""
    return next((w.strip("'/ ") for w in why.replace(":", " ").split() if w.strip("'/").endswith("Fusion")), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _lower_level(original, model, val, labels, provider: str, latency: bool, why: str) -> dict:
    """Validate at the highest level at which the input runs (see :func:`validate_all`)."""
    from .errors import OnnxCompressError

    works = None
    for name in LEVELS:
        try:
            run_samples(make_session(original, optimize=name, provider=provider), val[:1])
            works = name
            break
        except Exception:  # noqa: BLE001 - trying the next level down
            continue
    if works == "all" or works is None:
        where = "runs" if works == "all" else "does not run at any level either"
        raise OnnxCompressError(f"ONNX Runtime cannot run the optimized model on {provider} ({why}); the input "
                                f"model {where}: nothing written") from None
    d = jsonable(asdict(compare(original, model, val, labels=labels, provider=provider, latency=latency,
                                level=works)))
    fusion = fusion_named(why)
    d["ort_level"] = works
    d["note"] = (f"ONNX Runtime's own graph optimizer breaks the input model at ORT_ENABLE_ALL on {provider}"
                 + (f" ({fusion})" if fusion else "") + f": {why}. Validated at ORT_ENABLE_{works.upper()} "
                 f"(deploy with SessionOptions.graph_optimization_level = ORT_ENABLE_{works.upper()}); the "
                 "rewrites of onnxcompress are not the cause")
    return d


@dataclass
class LayerMetrics:
    """One intermediate tensor that both models compute (same name, same shape), compared over
    the samples (:func:`layerwise`)."""

    name: str
    #: the reference node that produces it
    op_type: str
    node: str
    #: 10 log10(sum ref^2 / sum (cand - ref)^2) over the samples (inf: equal)
    sqnr_db: float
    #: cosine of the flattened tensors, the worst sample
    cosine: float
    #: how much this step lowers the SQNR it was handed: its SQNR minus the worst among the
    #: compared tensors its node reads (through reference tensors the candidate does not have,
    #: such as a convolution's output before the BatchNormalization folded into it; the model's
    #: inputs count as exact), both capped at :data:`LAYER_SQNR_CAP_DB`; negative: the step adds
    #: noise. The error is accumulated, not the step's alone: where earlier layers already left
    #: noise, a nonlinearity can lower the SQNR without being quantized. ``None`` when it reads
    #: none of them
    drop_db: float | None = None


#: :func:`layerwise` counts SQNRs above this as this when it takes differences: 40 dB is noise of
#: 0.01 % of the signal's power (a step from exact to 45 dB is no step at all for int8)
LAYER_SQNR_CAP_DB = 40.0
#: the most samples :func:`layerwise` runs (SQNR over a few samples already ranks the layers)
LAYERWISE_SAMPLES = 8
#: bytes of intermediate values read per sample and model in one pass of :func:`layerwise`
LAYERWISE_BUDGET = 128 << 20


def layerwise(reference: "ir.Model", candidate: "ir.Model", samples: list[dict], *,
              max_samples: int = LAYERWISE_SAMPLES, budget: int = LAYERWISE_BUDGET) -> list[LayerMetrics]:
    """Where the candidate departs from the reference: every float32 tensor that a node of both
    graphs produces under one name, compared on the first ``max_samples`` samples, in the
    reference's graph order (the layerwise comparison of Polygraphy's ``--mark all`` and ONNX
    Runtime's ``qdq_loss_debug``). A Q/DQ model keeps the names of the float tensors it
    quantizes, so each row is the float value a quantized layer hands on.

    Both models run with ONNX Runtime's optimizations off (Q/DQ with the ONNX semantics of
    ``QuantizeLinear``/``DequantizeLinear``, which fused int8 kernels match up to rounding), the
    float32 tensors (by their declared type, else ONNX shape inference's) read as extra outputs
    in passes of at most ``budget`` bytes per sample and model (sizes from shape inference on
    the largest sample): two sessions per pass, their weights read in place
    (:func:`onnxcompress.runtime.make_session`).

    Args:
        reference / candidate: ``onnx_ir.Model`` (not modified).
        samples: feed dicts (graph inputs by name).

    Returns:
        One :class:`LayerMetrics` per compared tensor; empty when no name is shared.

    Raises:
        onnxruntime's errors where a model does not run on the samples.
    """
    from .passes.quantize.calibrate import plan_chunks, value_bytes

    samples = samples[:max_samples]
    if not samples:
        return []
    cand_out = _float32_values(candidate)
    producer = {}
    names = []
    ref_float = _float32_values(reference)
    for node in reference.graph:
        for v in node.outputs:
            if v.name and v.name in cand_out and v.name in ref_float:
                producer[v.name] = node
                names.append(v.name)
    if not names:
        return []
    largest = max(samples, key=lambda f: sum(np.asarray(a).size for a in f.values()))
    sig: dict[str, float] = {}
    noise: dict[str, float] = {}
    cos: dict[str, float] = {}
    for chunk in plan_chunks(names, value_bytes(reference, largest), budget):
        ref_s = make_session(reference, optimize=False, extra_outputs=chunk)
        cand_s = make_session(candidate, optimize=False, extra_outputs=chunk)
        r_in = {i.name for i in ref_s.get_inputs()}
        c_in = {i.name for i in cand_s.get_inputs()}
        for feed in samples:
            r = ref_s.run(chunk, {k: v for k, v in feed.items() if k in r_in})
            c = cand_s.run(chunk, {k: v for k, v in feed.items() if k in c_in})
            for n, a, b in zip(chunk, r, c):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape:
                    sig[n] = float("nan")
                    continue
                a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
                fa, fb = np.isfinite(a64), np.isfinite(b64)
                # equal non-finite values (masked scores) match; one side non-finite is unbounded error
                broken = bool(np.any(fa != fb)) or not np.array_equal(a64[~fa], b64[~fb], equal_nan=True)
                a64, b64 = a64[fa & fb], b64[fa & fb]
                sig[n] = sig.get(n, 0.0) + float(a64 @ a64)
                noise[n] = noise.get(n, 0.0) + (float("inf") if broken else float(np.sum((a64 - b64) ** 2)))
                if broken:
                    cos[n] = -1.0
                    continue
                na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
                one = float(a64 @ b64 / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
                cos[n] = min(cos.get(n, 1.0), one)
        del ref_s, cand_s
    rows: dict[str, LayerMetrics] = {}
    known = {v.name: float("inf") for v in reference.graph.inputs}  # the samples themselves: exact
    for n in names:
        s, e = sig.get(n), noise.get(n)
        if s is None or e is None or not np.isfinite(s):
            continue  # not produced on these samples, or of another shape in the candidate
        db = float("inf") if e == 0 else (10 * np.log10(s / e) if s > 0 and np.isfinite(e) else -float("inf"))
        node = producer[n]
        feeds = [known[k] for k in _compared_inputs(node, known)]
        cap = LAYER_SQNR_CAP_DB
        drop = float(min(db, cap) - min(min(feeds), cap)) if feeds and not np.isnan(db) else None
        drop = None if drop is not None and np.isnan(drop) else drop  # -inf on both sides: no step to tell
        rows[n] = LayerMetrics(n, node.op_type, node.name or "", float(db), cos[n], drop)
        known[n] = float(db)
    return list(rows.values())


def _compared_inputs(node, rows, depth: int = 8) -> set[str]:
    """Names in ``rows`` that ``node`` reads, directly or through up to ``depth`` producers of
    values not in ``rows`` (constants end a path)."""
    found: set[str] = set()
    stack = [(v, 0) for v in node.inputs if v is not None]
    seen: set[int] = set()
    while stack:
        v, d = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.name in rows:
            found.add(v.name)
        elif d < depth and v.producer() is not None and v.const_value is None:
            stack += [(u, d + 1) for u in v.producer().inputs if u is not None]
    return found


def _float32_values(model: "ir.Model") -> set[str]:
    """Names of the main graph's node outputs that are float32: declared so, or so by ONNX shape
    inference on the model's skeleton where undeclared (a value of unknown type is left out: it
    cannot be read as a float output)."""
    import onnx

    from .model_io import skeleton

    out, unknown = set(), set()
    for node in model.graph:
        for v in node.outputs:
            if v.dtype == ir.DataType.FLOAT:
                out.add(v.name)
            elif v.dtype is None and v.name:
                unknown.add(v.name)
    if unknown:
        try:
            proto, _ = skeleton(model)
            inferred = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # noqa: BLE001 - types are a help: what stays unknown is left out
            return out
        out |= {vi.name for vi in inferred.graph.value_info
                if vi.name in unknown and vi.type.HasField("tensor_type")
                and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return out
