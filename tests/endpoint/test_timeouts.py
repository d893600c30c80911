"""One timeout: waits fail only when nothing moved for idle_timeout; heartbeats keep an idle
connection alive; a silent peer is dropped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from transport import DigestSink, Endpoint, IdleTimeoutError, SyntheticSource

MIB = 1 << 20


class SlowSink(DigestSink):
    """Takes 0.15 s per chunk: a transfer far longer than idle_timeout, never idle that long."""

    inline_writes = False

    def write(self, chunk: Any, pieces: Any) -> None:
        time.sleep(0.15)
        super().write(chunk, pieces)


async def test_a_transfer_longer_than_idle_timeout_completes_while_it_progresses() -> None:
    settings = {"chunk_size": MIB, "stream_window": 2 * MIB, "idle_timeout": 0.5}
    async with Endpoint(**settings) as server, Endpoint(**settings) as client:
        url = await server.listen("tcp://127.0.0.1:0")

        async def receive() -> Any:
            return await (await anext(server.incoming())).receive_into(SlowSink())

        receiving = asyncio.ensure_future(receive())
        peer = await client.connect(url)
        started = time.perf_counter()
        await peer.send_state_dict(SyntheticSource(16 * MIB, chunk_size=MIB))
        stats = await receiving
    assert time.perf_counter() - started > 4 * 0.5  # far longer than idle_timeout
    assert stats.chunks == 16


async def test_heartbeats_keep_an_idle_connection_usable() -> None:
    settings = {"idle_timeout": 0.6, "heartbeat_interval": 0.1}
    async with Endpoint(**settings) as server, Endpoint(**settings) as client:
        url = await server.listen("tcp://127.0.0.1:0")

        async def echo(_peer: Any, header: Any, body: bytes) -> tuple[dict[str, Any], bytes]:
            return {"ok": True}, body

        server.on_request(echo)
        peer = await client.connect(url)
        await asyncio.sleep(2.0)  # idle for more than three idle_timeouts
        reply, body = await peer.request({"q": 1}, b"still here")
    assert reply["ok"] is True
    assert body == b"still here"


async def test_a_receiver_that_never_reads_times_out_the_sender() -> None:
    settings = {"chunk_size": MIB, "stream_window": 2 * MIB, "idle_timeout": 0.5}
    async with Endpoint(**settings) as server, Endpoint(**settings) as client:
        url = await server.listen("tcp://127.0.0.1:0")
        peer = await client.connect(url)
        with pytest.raises(IdleTimeoutError, match="nothing moved"):
            await peer.send_state_dict(SyntheticSource(16 * MIB, chunk_size=MIB))
