"""The tool's own cost: wall time and peak resident memory per stage of a run.

Peak RSS per stage comes from a background thread sampling the resident set size
(``/proc/self/statm``, every :data:`SAMPLE_S` seconds) — resetting the kernel's high-water mark
(``clear_refs``) would also reset what ``getrusage`` / ``time -v`` report for the whole process,
so it is not touched. A spike shorter than the interval can be missed; the whole run's peak is
the larger of the samples and the kernel's ``ru_maxrss``. Where ``/proc`` is missing or the
address space is capped (``RLIMIT_AS``: a thread may fail to start), stages report the process
peak so far. Units: seconds and MiB.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
import weakref


#: seconds between two RSS samples
SAMPLE_S = 0.02


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mib() -> float:
    """The process's peak resident set size since start, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _sample(meter_ref, stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_S):
        meter = meter_ref()
        if meter is None:
            return
        meter._record(_rss_mib() or 0.0)
        del meter


class StageMeter:
    """Records ``{"stage", "seconds", "peak_rss_mb"}`` for consecutive stages.

    ``start(name)`` closes the running stage and opens the next; ``finish()`` closes the last,
    stops the sampler and returns the list (JSON-ready). ``exact`` is ``False`` where RSS is not
    sampled (then each stage reports the process peak so far, an upper bound)."""

    def __init__(self) -> None:
        self.stages: list[dict] = []
        self._name: str | None = None
        self._outcome: str | None = None
        self._t0 = 0.0
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # a thread cannot always start under an address-space cap (glibc aborts, or CPython waits
        # forever for it): there, stages report the process peak so far
        self.exact = _rss_mib() is not None and resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
        # the sampler holds the meter weakly: a run that raises (no finish()) ends it with the meter
        self._thread = threading.Thread(target=_sample, args=(weakref.ref(self), self._stop), daemon=True) \
            if self.exact else None
        if self._thread:
            self._thread.start()

    def _record(self, rss: float) -> None:
        with self._lock:
            self._peak = max(self._peak, rss)

    def start(self, name: str) -> dict | None:
        """Close the running stage (returned: its record, ``None`` if none ran) and open ``name``."""
        closed = self._close()
        self._name, self._t0 = name, time.perf_counter()
        with self._lock:
            self._peak = _rss_mib() or 0.0
        return closed

    def mark(self, outcome: str) -> None:
        """Say how the running stage ended when it did not do what it set out to (``"reverted"``,
        ``"gates missed"``): its record gets ``"outcome"``, and a progress display shows it."""
        self._outcome = outcome

    def _close(self) -> dict | None:
        if self._name is None:
            return None
        with self._lock:
            peak = max(self._peak, _rss_mib() or 0.0) if self.exact else peak_rss_mib()
        rec = {"stage": self._name, "seconds": round(time.perf_counter() - self._t0, 3), "peak_rss_mb": round(peak, 1)}
        if self._outcome:
            rec["outcome"] = self._outcome
        self._outcome = None
        self.stages.append(rec)
        self._name = None
        return self.stages[-1]

    @property
    def process_peak_mb(self) -> float:
        return max([peak_rss_mib(), *(st["peak_rss_mb"] for st in self.stages)])

    def finish(self) -> list[dict]:
        self._close()
        self._stop.set()
        return self.stages
