"""A compressed chunk's decompression buffer goes back to the receive pool only once its worker
thread is done: a receive cancelled while the worker still writes into it must not hand that
buffer to the link for the next frame."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from transport.endpoint import receiving
from transport.endpoint.pool import BufferPool

SIZE = 1024


def _blocking_place(entered: threading.Event, release: threading.Event) -> Any:
    def place(*_args: Any) -> None:  # stands in for decompress + sink.write in the worker
        entered.set()
        release.wait(30)

    return place


async def _wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30), "the worker never started"


async def test_a_cancelled_placement_keeps_its_buffer_out_of_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(receiving, "_place", _blocking_place(entered, release))
    pool = BufferPool(SIZE, max_idle=4)
    blob = pool.allocate(SIZE)
    link: Any = SimpleNamespace(pool=pool)
    args: list[Any] = [None] * 5
    placing = asyncio.ensure_future(receiving._place_compressed(link, blob, *args))
    await _wait_for(entered)
    placing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await placing
    assert pool.allocate(SIZE) is not blob  # the worker still holds it: not reused
    release.set()


async def test_a_finished_placement_returns_its_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    release.set()
    monkeypatch.setattr(receiving, "_place", _blocking_place(entered, release))
    pool = BufferPool(SIZE, max_idle=4)
    blob = pool.allocate(SIZE)
    link: Any = SimpleNamespace(pool=pool)
    await receiving._place_compressed(link, blob, *([None] * 5))
    assert pool.allocate(SIZE) is blob
