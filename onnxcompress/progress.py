"""Progress of a run: stage changes and counts (samples, nodes, tensors) for whoever listens.

A pass never prints (``docs/ARCHITECTURE.md``); it calls :func:`tick` with what it counts, and
the pipeline that installed a listener with :func:`listening` turns that into a
:class:`ProgressEvent` for the caller's ``progress`` callback (the CLI draws one bar per
stage). Without a listener :func:`tick` costs one context-variable lookup.

A :class:`ProgressEvent` *is* the text a plain ``progress(str)`` callback always received
(``"quantize-static: recording activations 12/64 sample runs"``); its attributes carry the
numbers for callers that draw bars.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from typing import Callable, Iterator

#: seconds between two count events of the same step (the last one, done == total, always goes)
MIN_INTERVAL_S = 0.1

_listener: ContextVar[Callable[[str, int, int | None, str, bool], None] | None] = ContextVar("onnxcompress_progress",
                                                                                   default=None)


class ProgressEvent(str):
    """Progress text with its numbers.

    Attributes:
        stage: the running stage's text (``"quantize-static"``, ``"validating with ONNX Runtime"``).
        step: what is counted inside it (``"recording activations"``); ``""`` at a stage start.
        done: units finished so far (``None`` at a stage start).
        total: units in all (``None`` when unknown).
        unit: what a unit is (``"sample runs"``, ``"nodes"``, ``"tensors"``).
        closed: at a stage start, the cost of the stage just finished (``{"stage", "seconds",
            "peak_rss_mb"}``, as in ``report["cost"]``), else ``None``.
        final: the run is over (``closed`` is its last stage; no stage starts). Under
            ``--quantize auto`` each candidate's run ends with its own final event, its stage
            prefixed ``auto (<mode>): ``; the whole run ends with an unprefixed ``"done"``.
    """

    stage: str
    step: str
    done: int | None
    total: int | None
    unit: str
    closed: dict | None
    final: bool

    def __new__(cls, stage: str, step: str = "", done: int | None = None, total: int | None = None,
                unit: str = "", closed: dict | None = None, final: bool = False) -> "ProgressEvent":
        if done is None:
            text = stage
        else:
            of = f"/{total}" if total is not None else ""
            text = f"{stage}: {step} {done}{of} {unit}".rstrip()
        ev = super().__new__(cls, text)
        ev.stage, ev.step, ev.done, ev.total, ev.unit, ev.closed = stage, step, done, total, unit, closed
        ev.final = final
        return ev

    def prefixed(self, prefix: str) -> "ProgressEvent":
        """The same event with ``prefix`` before its stage (``auto (static): ``)."""
        return ProgressEvent(prefix + self.stage, self.step, self.done, self.total, self.unit, self.closed,
                             self.final)


def tick(step: str, done: int, total: int | None = None, unit: str = "", *, weak: bool = False) -> None:
    """Report ``done`` of ``total`` ``unit``s of ``step`` to the listener, if any.

    ``weak``: a count of coarse units (the passes of a stage) that gives way to any other step
    in progress (the samples and nodes inside one pass) and never hides one."""
    fn = _listener.get()
    if fn is not None:
        fn(step, done, total, unit, weak)


def counted(items, step: str, unit: str):
    """Yield from ``items`` (a sized iterable), ticking after each one."""
    items = list(items) if not hasattr(items, "__len__") else items
    n = len(items)
    for k, x in enumerate(items):
        yield x
        tick(step, k + 1, n, unit)


class Listener:
    """What :func:`listening` yields: :meth:`raise_pending` re-raises, outside the passes, an
    exception the caller's callback raised inside one (a pass's failure is caught and reported
    as the pass's; the callback's is the caller's own)."""

    def __init__(self) -> None:
        self.pending: BaseException | None = None

    def raise_pending(self) -> None:
        if self.pending is not None:
            exc, self.pending = self.pending, None
            raise exc


@contextlib.contextmanager
def listening(stage: Callable[[], str], emit: Callable[[ProgressEvent], None] | None) -> Iterator[Listener]:
    """Within the block, :func:`tick` calls become :class:`ProgressEvent`s of the stage that
    ``stage()`` names, passed to ``emit`` at most every :data:`MIN_INTERVAL_S` per step (and
    always when a step completes).

    A step that has ticked and is not complete holds the bar until it completes (or the stage
    changes): the counts of loops nested inside it (each node's calibration runs inside bias
    correction's loop over nodes) are not shown, so the bar does not jump between the two.
    A ``weak`` step (:func:`tick`) never holds it.

    An exception ``emit`` raises inside a tick is kept (no more ticks are sent) and raised by
    the yielded :class:`Listener`'s ``raise_pending()``, or when the block ends."""
    guard = Listener()
    if emit is None:
        yield guard
        return
    last: dict[str, float] = {}
    owner: list = [None, None]  # (stage, step) of the step in progress
    failed = [False]

    def on_tick(step: str, done: int, total: int | None, unit: str, weak: bool) -> None:
        if failed[0]:
            return
        st = stage()
        if owner[0] != st:
            owner[:] = [st, None]
            last.clear()
        if owner[1] not in (None, step):
            return
        complete = total is not None and done >= total
        if not weak:
            owner[1] = None if complete else step
        now = time.perf_counter()
        if complete or step not in last or now - last[step] >= MIN_INTERVAL_S:  # perf_counter may start near 0
            last[step] = now
            try:
                emit(ProgressEvent(st, step, done, total, unit))
            except BaseException as exc:  # noqa: BLE001 - the caller's; raised outside the pass
                failed[0] = True
                guard.pending = exc

    token = _listener.set(on_tick)
    try:
        yield guard
    finally:
        _listener.reset(token)
    guard.raise_pending()
