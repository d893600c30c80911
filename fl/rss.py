"""This process's peak resident memory above a baseline, sampled by a thread.

The figure is taken *above the process's own baseline* (its RSS when sampling starts, after
imports and set-up), so it is what the work that follows costs and not what torch costs to import.
`tensorwire demo` reports it per round; the benchmarks measure with the same class (fl never
imports benchmarks, so the probe lives here).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

__all__ = ["MIB", "RssSampler"]

MIB = 2**20


@dataclass
class RssSampler:
    """Samples this process's RSS in a thread; `peak_above_baseline_mib` after stop()."""

    interval: float = 0.005
    baseline: int = 0
    peak: int = 0
    # (seconds since start, RSS above baseline), at most one entry per 0.1 s: enough to plot
    # a long transfer without the samples themselves growing memory.
    timeline: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        process = psutil.Process()
        self.baseline = self.peak = process.memory_info().rss
        started = time.perf_counter()

        def sample() -> None:
            last_kept = -1.0
            while not self._stop.is_set():
                rss = process.memory_info().rss
                self.peak = max(self.peak, rss)
                now = time.perf_counter() - started
                if now - last_kept >= 0.1:
                    self.timeline.append((round(now, 3), rss - self.baseline))
                    last_kept = now
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_above_baseline_mib(self) -> float:
        return (self.peak - self.baseline) / MIB
