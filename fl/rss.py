"""A process's peak resident memory above a baseline, sampled by a thread (this process, or
another one by pid: measured from outside).

The figure is taken *above the process's own baseline* (its RSS when sampling starts, after
imports and set-up), so it is what the work that follows costs and not what torch costs to import.
Besides the RSS it keeps the peak of the anonymous part (RssAnon: heap and private memory, not
the page cache of mmap'd files, which the kernel can drop at will): a server that sends its model
from an mmap'd file shows the file's pages in its RSS but not in its anonymous memory.
`tensorwire demo` reports it per round; the benchmarks measure with the same class (fl never
imports benchmarks, so the probe lives here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

__all__ = ["MIB", "RssSampler", "memory_of", "return_freed_memory"]

MIB = 2**20


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of process `pid` in bytes, from /proc (psutil elsewhere: no anon)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        rss = psutil.Process(pid).memory_info().rss
        return rss, rss
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie: it has exited, nothing is resident any more
        raise ProcessLookupError(f"process {pid} has exited")
    rss = int(fields["VmRSS"].split()[0]) * 1024
    return rss, int(fields.get("RssAnon", fields["VmRSS"]).split()[0]) * 1024


def return_freed_memory() -> None:
    """Make glibc give freed blocks of 1 MiB or more back to the kernel at once (mmap them), so a
    long-running server's RSS follows what it holds, not the high-water mark of slices and chunks
    it freed long ago. A no-op where the C library is not glibc."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    mallopt = getattr(ctypes.CDLL(libc_name), "mallopt", None)
    if mallopt is not None:
        m_mmap_threshold = -3
        mallopt(m_mmap_threshold, 2**20)


@dataclass
class RssSampler:
    """Samples a process's RSS (this one by default) in a thread; `peak_above_baseline_mib` and
    `anon_peak_above_baseline_mib` after stop()."""

    interval: float = 0.005
    pid: int = field(default_factory=os.getpid)
    baseline: int = 0
    peak: int = 0
    anon_baseline: int = 0
    anon_peak: int = 0
    # (seconds since start, RSS above baseline), at most one entry per 0.1 s: enough to plot
    # a long transfer without the samples themselves growing memory.
    timeline: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self.baseline, self.anon_baseline = memory_of(self.pid)
        self.peak, self.anon_peak = self.baseline, self.anon_baseline
        started = time.perf_counter()

        def sample() -> None:
            last_kept = -1.0
            while not self._stop.is_set():
                try:
                    rss, anon = memory_of(self.pid)
                except (OSError, psutil.Error):  # the process ended
                    return
                self.peak = max(self.peak, rss)
                self.anon_peak = max(self.anon_peak, anon)
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

    @property
    def anon_peak_above_baseline_mib(self) -> float:
        return (self.anon_peak - self.anon_baseline) / MIB
