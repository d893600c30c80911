"""Child processes measured from outside: peak RSS read by the parent from /proc, and a runner
that fails fast.

Each child reports wall-clock marks of its own (`baseline_at`: imports done, nothing of the
workload allocated yet; `ready_at`: set up, the work starts; `finished_at`: its side of the work
is over). The parent samples every
child's resident set from /proc/<pid>/statm every few milliseconds on a thread of its own, so the
figures include everything the process holds (allocator pools, native library buffers, memory
allocated before any in-process sampler could start) and cost the child nothing.

`run_measured` waits on all children at once: the first child that reports an error, or dies
without reporting, ends the run with that child's error (its traceback), and the others are
killed. A run never waits out its timeout because one side failed.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from fl.rss import MIB

__all__ = ["ChildFailed", "ProcessRss", "child_main", "collect", "end", "run_measured", "spawn"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_POLL_SECONDS = 0.005


class ChildFailed(RuntimeError):
    """A benchmark child failed, died or did not finish in time; the message says which and why."""


class ProcessRss:
    """Samples the resident set of some processes from outside, every 5 ms, until stopped."""

    def __init__(self, pids: list[int]) -> None:
        self._timelines: dict[int, list[tuple[float, int]]] = {pid: [] for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-from-outside", daemon=True)

    def start(self) -> ProcessRss:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for pid, timeline in self._timelines.items():
                rss = _resident_bytes(pid)
                # Only changes (and one sample a second) are kept: a day-long run stays small.
                if rss is not None and (
                    not timeline or timeline[-1][1] != rss or now - timeline[-1][0] >= 1.0
                ):
                    timeline.append((now, rss))
            self._stop.wait(_POLL_SECONDS)

    def window(self, pid: int, marks: dict[str, float]) -> dict[str, float]:
        """The RSS at marks["baseline_at"] (the last sample before it) and the peak within
        [marks["ready_at"], marks["finished_at"]] (the work, not its set-up), in MiB."""
        timeline = self._timelines.get(pid, [])
        before = [rss for at, rss in timeline if at <= marks["baseline_at"]]
        start = marks.get("ready_at", marks["baseline_at"])
        inside = [rss for at, rss in timeline if start <= at <= marks["finished_at"]]
        baseline = before[-1] if before else (inside[0] if inside else 0)
        peak = max(inside, default=baseline)
        return {
            "outside_baseline_rss_mib": baseline / MIB,
            "outside_peak_rss_mib": max(peak, baseline) / MIB,
        }

    def timeline(self, pid: int, start: float) -> list[tuple[float, float]]:
        """(seconds since start, MiB) pairs, for plots."""
        return [(at - start, rss / MIB) for at, rss in self._timelines.get(pid, []) if at >= start]


def _resident_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def run_measured(
    targets: list[tuple[Callable[..., None], tuple[Any, ...]]],
    timeout: float,
    payload_bytes: int = 0,
) -> list[dict[str, Any]]:
    """Run each target(queue, *args) in its own spawned process and return what each reported,
    with `outside_peak_rss_mib` (absolute, over [ready_at, finished_at]),
    `outside_baseline_rss_mib` (at baseline_at) and `above_payload_mib` (the peak less the
    baseline and `payload_bytes`, the dict itself) added.
    """
    processes, queues = spawn(targets)
    sampler = ProcessRss([p.pid for p in processes if p.pid is not None]).start()
    try:
        results = collect(processes, queues, timeout)
    finally:
        sampler.stop()
        end(processes)
    for process, result in zip(processes, results, strict=True):
        assert process.pid is not None
        result.update(sampler.window(process.pid, result))
        peak, baseline = result["outside_peak_rss_mib"], result["outside_baseline_rss_mib"]
        above = peak - baseline - payload_bytes / MIB
        result["above_payload_mib"] = above
    return results


def spawn(
    targets: list[tuple[Callable[..., None], tuple[Any, ...]]],
) -> tuple[list[Any], list[Any]]:
    """Start each target(queue, *args) in its own spawned process (a clean interpreter, so its
    RSS baseline is its own); the processes and their queues."""
    context = multiprocessing.get_context("spawn")
    queues = [context.Queue() for _ in targets]
    processes = [
        context.Process(target=target, args=(queue, *args), daemon=True)
        for (target, args), queue in zip(targets, queues, strict=True)
    ]
    for process in processes:
        process.start()
    return processes, queues


def collect(processes: list[Any], queues: list[Any], timeout: float) -> list[Any]:
    """Every child's report, or ChildFailed as soon as one fails, dies or time runs out."""
    results: list[Any] = [None] * len(processes)
    deadline = time.monotonic() + timeout
    while any(result is None for result in results):
        for index, (process, queue) in enumerate(zip(processes, queues, strict=True)):
            if results[index] is None:
                results[index] = poll_child(process, queue)
        if time.monotonic() > deadline:
            waiting = [p.name for p, r in zip(processes, results, strict=True) if r is None]
            raise ChildFailed(f"no result within {timeout:.0f} s from {', '.join(waiting)}")
        time.sleep(0.02)
    return [result for result in results if result is not None]


def poll_child(process: Any, queue: Any, name: str | None = None) -> Any:
    """A child's report if it has sent one (None while it runs); ChildFailed when it reported
    an error or ended without a word. `name`: what to call it (default: its process name)."""
    name = name or process.name
    try:
        result = queue.get_nowait()
    except queue_module.Empty:
        if process.is_alive():
            return None
        try:  # it may have reported just before it ended
            result = queue.get(timeout=1.0)
        except queue_module.Empty:
            raise ChildFailed(
                f"{name} ended (exit code {process.exitcode}) without a result"
            ) from None
    if isinstance(result, dict) and "error" in result:
        raise ChildFailed(f"{result.get('role', name)} failed:\n{result['error']}")
    return result


def end(processes: list[Any]) -> None:
    """Join each process briefly, then kill what still runs."""
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def child_main(role: str, queue: Any, body: Callable[[], Any], loop: str | None) -> None:
    """In a child: run `body()` (a coroutine function under `loop`, "asyncio" or "uvloop"; a
    plain function when loop is None) and put its result, or the error as text, on `queue`."""
    try:
        if loop is None:
            result = body()
        elif loop == "uvloop":
            import uvloop

            result = uvloop.run(body())
        else:
            import asyncio

            result = asyncio.run(body())
        queue.put({"role": role, **result})
    except BaseException:
        queue.put({"role": role, "error": traceback.format_exc()})
