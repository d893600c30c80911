"""One timeout: waits fail only when nothing moved for idle_timeout; heartbeats keep an idle
connection alive; a silent peer is dropped. All on a manual clock: no test waits in real time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from transport import DigestSink, Endpoint, IdleTimeoutError, SyntheticSource
from transport.endpoint.clock import ManualClock

MIB = 1 << 20


async def advance_until(task: asyncio.Future[Any], clock: ManualClock, step: float) -> float:
    """Move the manual clock by `step` until `task` is done; returns the time it took."""
    started = clock.now()
    for _ in range(10_000):
        if task.done():
            return clock.now() - started
        await clock.advance(step)
    raise AssertionError("the task never finished")


class PacedSink(DigestSink):
    """Each chunk it places lets the test move the clock on: a transfer far longer than
    idle_timeout, never idle that long."""

    inline_writes = True

    def __init__(self) -> None:
        super().__init__()
        self.placed = asyncio.Event()
        self.count = 0

    def write(self, chunk: Any, pieces: Any) -> None:
        super().write(chunk, pieces)
        self.count += 1
        self.placed.set()


async def test_a_transfer_longer_than_idle_timeout_completes_while_it_progresses() -> None:
    clock = ManualClock()
    settings: Any = {"chunk_size": MIB, "stream_window": 2 * MIB, "idle_timeout": 0.5}
    async with (
        Endpoint(clock=clock, **settings) as server,
        Endpoint(clock=clock, **settings) as client,
    ):
        url = await server.listen("tcp://127.0.0.1:0")
        sink = PacedSink()

        async def receive() -> Any:
            return await (await anext(server.incoming())).receive_into(sink)

        receiving = asyncio.ensure_future(receive())
        peer = await client.connect(url)
        sending = asyncio.ensure_future(
            peer.send_state_dict(SyntheticSource(16 * MIB, chunk_size=MIB))
        )
        started, paced = clock.now(), 0
        while not receiving.done():
            waiting = asyncio.ensure_future(sink.placed.wait())
            await asyncio.wait({waiting, receiving}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            sink.placed.clear()
            while paced < sink.count:  # each chunk "takes" 0.3 s: well within idle_timeout
                paced += 1
                await clock.advance(0.3)
        stats = await receiving
        await sending
    assert clock.now() - started > 4 * 0.5  # far longer than idle_timeout
    assert stats.chunks == 16


async def test_heartbeats_keep_an_idle_connection_usable() -> None:
    clock = ManualClock()
    settings: Any = {"idle_timeout": 0.6, "heartbeat_interval": 0.1}
    async with (
        Endpoint(clock=clock, **settings) as server,
        Endpoint(clock=clock, **settings) as client,
    ):
        url = await server.listen("memory://heartbeats")

        async def echo(_peer: Any, header: Any, body: bytes) -> tuple[dict[str, Any], bytes]:
            return {"ok": True}, body

        server.on_request(echo)
        peer = await client.connect(url)
        for _ in range(40):  # idle for 2 s: more than three idle_timeouts
            await clock.advance(0.05)
        reply, body = await peer.request({"q": 1}, b"still here")
    assert reply["ok"] is True
    assert body == b"still here"


async def test_a_silent_peer_is_dropped_after_idle_timeout() -> None:
    """Without heartbeats answered (the peer's process hangs), the link fails."""
    clock = ManualClock()
    settings: Any = {"idle_timeout": 0.6, "heartbeat_interval": 0.1}
    async with Endpoint(clock=clock, **settings) as server:
        url = await server.listen("tcp://127.0.0.1:0")
        async with Endpoint(clock=clock, **settings) as client:
            peer = await client.connect(url)
            link = peer._link
            link.buffer_updated = lambda nbytes: None  # type: ignore[method-assign]
            await advance_until(asyncio.ensure_future(link.closed.wait()), clock, 0.1)
            assert isinstance(link.error, IdleTimeoutError)


async def test_a_receiver_that_never_takes_the_transfer_times_out_the_sender() -> None:
    clock = ManualClock()
    # No compression: "auto" would sample the codec on the first chunks in worker threads, in
    # real time, while the manual clock runs ahead in loop turns (2.7 s on a loaded machine).
    settings: Any = {
        "chunk_size": MIB, "stream_window": 2 * MIB, "idle_timeout": 0.5, "compression": "off"
    }  # fmt: skip
    async with (
        Endpoint(clock=clock, **settings) as server,
        Endpoint(clock=clock, **settings) as client,
    ):
        url = await server.listen("tcp://127.0.0.1:0")
        peer = await client.connect(url)
        sending = asyncio.ensure_future(
            peer.send_state_dict(SyntheticSource(16 * MIB, chunk_size=MIB))
        )
        took = await advance_until(sending, clock, 0.1)
        with pytest.raises(IdleTimeoutError, match="nothing moved"):
            await sending
    # one idle_timeout (plus the 0.1 s steps the I/O took), not more; 20 steps of 0.1 add up to
    # 2.0000000000000004, hence the margin
    assert 0.5 <= took < 2.05
