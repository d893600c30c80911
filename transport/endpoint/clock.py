"""The one clock every timer of an endpoint reads: idle timeouts, heartbeats, hello deadlines,
reconnect backoff, close grace.

Time is an input. `Clock` reads the event loop's monotonic time; `ManualClock` (shipped for tests
and embedders' simulations) moves only when told, so a test of a 120 s timeout takes no 120 s:

    clock = ManualClock()
    async with Endpoint(clock=clock) as server: ...
    await clock.advance(121)          # every timer due by then fires, in order
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Clock:
    """Real time: the running event loop's clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait for `event` at most `timeout` seconds; True if it was set."""
        if event.is_set():
            return True
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        return event.is_set()

    async def within(self, awaitable: Awaitable[T], timeout: float) -> T:  # noqa: ASYNC109
        """Await `awaitable`, cancelling it and raising TimeoutError after `timeout` seconds."""
        task = asyncio.ensure_future(awaitable)
        sleeper = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait({task, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            sleeper.cancel()
            raise
        sleeper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise TimeoutError(f"not done within {timeout:g} s")
        return task.result()


class ManualClock(Clock):
    """Time that moves only by `advance()`; sleepers wake in deadline order."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.sleeping = asyncio.Event()  # set whenever a new sleeper starts: tests can await it

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._order), future))
        self.sleeping.set()
        await future

    @property
    def pending(self) -> int:
        """Sleepers still waiting (cancelled ones excluded)."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper due on the way and letting it run."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
                await _settle()
        self._now = target
        await _settle()


async def _settle(rounds: int = 20) -> None:
    """Let callbacks and woken tasks run (a few loop turns; no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
