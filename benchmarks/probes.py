"""Measurement helpers shared by the benchmarks: sizes, peak RSS sampling, child processes.

Peak memory is reported *above each process's own baseline* (its RSS after imports and set-up, just
before the transfer starts), sampled by a thread every few milliseconds, so the figure is what the
transfer itself costs and not what torch costs to import. The RSS probe and the size formatter
live in fl (fl/rss.py, fl/sizes.py) because `tensorwire demo` reports the same figures and fl never
imports benchmarks; they are re-exported here so every benchmark keeps one import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from benchmarks.outside import child_main, collect, end, spawn
from fl.rss import MIB, RssSampler
from fl.sizes import format_size

__all__ = ["MIB", "RssSampler", "format_size", "parse_size", "run_children", "run_in_uvloop"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'32GiB' -> 34359738368; '1.5GB' -> 1500000000; plain numbers are bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (use e.g. 256MiB, 32GiB, 1e9)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def run_children(
    targets: list[tuple[Callable[..., None], tuple[Any, ...]]], timeout: float
) -> list[Any]:
    """Run each target(queue, *args) in its own spawned process; return what each put on its queue.

    Spawned (not forked) so each child starts from a clean interpreter and its RSS baseline is its
    own. A child that fails puts an exception text; that is raised here with the child's name.
    """
    processes, queues = spawn(targets)
    try:
        # Fails fast: the first child that reports an error or dies ends the run with its error.
        return collect(processes, queues, timeout)
    finally:
        end(processes)


def run_in_uvloop(role: str, queue: Any, body: Callable[[], Any]) -> None:
    """In a child process: run the coroutine `body()` under uvloop and put its result (or the
    error, as text) on `queue`, so run_children can report which side failed and why."""
    child_main(role, queue, body, "uvloop")
