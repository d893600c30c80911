"""Measurement helpers shared by the benchmarks: sizes, peak RSS sampling, child processes.

Peak memory is reported *above each process's own baseline* (its RSS after imports and set-up, just
before the transfer starts), sampled by a thread every few milliseconds, so the figure is what the
transfer itself costs and not what torch costs to import.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MIB = 2**20


def parse_size(text: str) -> int:
    """'32GiB' -> 34359738368; '1.5GB' -> 1500000000; plain numbers are bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (use e.g. 256MiB, 32GiB, 1e9)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


@dataclass
class RssSampler:
    """Samples this process's RSS in a thread; `peak_above_baseline_mib` after stop()."""

    interval: float = 0.005
    baseline: int = 0
    peak: int = 0
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


def run_children(
    targets: list[tuple[Callable[..., None], tuple[Any, ...]]], timeout: float
) -> list[Any]:
    """Run each target(queue, *args) in its own spawned process; return what each put on its queue.

    Spawned (not forked) so each child starts from a clean interpreter and its RSS baseline is its
    own. A child that fails puts an exception text; that is raised here with the child's name.
    """
    context = multiprocessing.get_context("spawn")
    queues = [context.Queue() for _ in targets]
    processes = [
        context.Process(target=target, args=(queue, *args), daemon=True)
        for (target, args), queue in zip(targets, queues, strict=True)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=timeout) for queue in queues]
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    for result in results:
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(f"{result.get('role', 'child')} failed: {result['error']}")
    return results


def run_in_uvloop(role: str, queue: Any, body: Callable[[], Any]) -> None:
    """In a child process: run the coroutine `body()` under uvloop and put its result (or the
    error, as text) on `queue`, so run_children can report which side failed and why."""
    import traceback

    try:
        import uvloop

        queue.put(uvloop.run(body()))
    except BaseException:
        queue.put({"role": role, "error": traceback.format_exc()})
