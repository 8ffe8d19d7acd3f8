"""The tool's own cost: wall time and peak resident memory per stage of a run.

Peak RSS per stage comes from Linux's ``VmHWM`` (``/proc/self/status``), reset at each stage
start by writing ``5`` to ``/proc/self/clear_refs`` (proc(5)); where that is not possible the
figure is the process peak so far (``getrusage``'s ``ru_maxrss``), which is then only an upper
bound for the stage. Units: seconds and MiB.
"""

from __future__ import annotations

import resource
import sys
import time


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak resident set size since start (or the last reset), in MiB."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class StageMeter:
    """Records ``{"stage", "seconds", "peak_rss_mb"}`` for consecutive stages.

    ``start(name)`` closes the running stage and opens the next; ``finish()`` closes the last
    and returns the list (JSON-ready). ``exact`` says whether each stage's peak was measured
    on its own (``False``: the process peak so far, an upper bound)."""

    def __init__(self) -> None:
        self.stages: list[dict] = []
        self._name: str | None = None
        self._t0 = 0.0
        self.exact = True
        self.process_peak_mb = 0.0

    def start(self, name: str) -> None:
        self._close()
        self._name, self._t0 = name, time.perf_counter()
        self.exact = _reset_peak() and self.exact

    def _close(self) -> None:
        if self._name is None:
            return
        peak = peak_rss_mib()
        self.process_peak_mb = max(self.process_peak_mb, peak)
        self.stages.append({"stage": self._name, "seconds": round(time.perf_counter() - self._t0, 3),
                            "peak_rss_mb": round(peak, 1)})
        self._name = None

    def finish(self) -> list[dict]:
        self._close()
        return self.stages
