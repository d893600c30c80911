"""A dropped connection resumes: nothing lost, nothing duplicated, little re-sent."""

import asyncio
import random
from typing import Any

import pytest
import torch
import xxhash

from benchmarks.faults import CuttingProxy
from transport import CallbackSink, Endpoint, SyntheticSource
from transport.endpoint.clock import ManualClock
from transport.endpoint.link import CLOSE_GRACE_S

MIB = 1 << 20


def _tensor_digests(source: SyntheticSource) -> dict[str, str]:
    return {
        spec.name: xxhash.xxh3_64_hexdigest(source.tensor(spec.name).view(torch.uint8).numpy())
        for spec in source.manifest.tensors
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", ["tcp", "grpc", "http"])
async def test_twenty_cuts_during_a_gib_transfer(scheme: str) -> None:
    total, chunk, window, cuts = 1 << 30, 1 * MIB, 4 * MIB, 20
    settings = {"chunk_size": chunk, "stream_window": window, "idle_timeout": 60.0}
    offsets = sorted(random.Random(3).sample(range(1, total), cuts))
    async with Endpoint(**settings) as server, Endpoint(**settings) as client:
        url = await server.listen(f"{scheme}://127.0.0.1:0")
        port = int(url.rsplit(":", 1)[1])
        proxy = CuttingProxy("127.0.0.1", port, offsets)
        host, proxy_port = await proxy.start()
        source = SyntheticSource(total, seed=4, tensor_bytes=64 * MIB, chunk_size=chunk)
        received: dict[str, str] = {}

        def on_tensor(name: str, tensor: torch.Tensor) -> None:
            assert name not in received, f"{name} delivered twice"
            received[name] = xxhash.xxh3_64_hexdigest(tensor.view(torch.uint8).numpy())

        async def receive() -> None:
            transfer = await anext(server.incoming())
            await transfer.receive_into(CallbackSink(on_tensor))

        receiving = asyncio.ensure_future(receive())
        peer = await client.connect(f"{scheme}://{host}:{proxy_port}")
        result = await peer.send_state_dict(source)
        await asyncio.wait_for(receiving, 60)
        await proxy.close()
    assert proxy.cuts == cuts
    assert result.resumes == cuts
    assert received == _tensor_digests(source)
    assert result.bytes_sent - total < cuts * window + chunk


async def test_reopening_a_completed_transfer_is_not_delivered_twice() -> None:
    async with Endpoint(chunk_size=MIB, stream_window=4 * MIB) as server:
        url = await server.listen("tcp://127.0.0.1:0")
        async with Endpoint(chunk_size=MIB, stream_window=4 * MIB) as client:
            peer = await client.connect(url)
            source = SyntheticSource(8 * MIB, seed=1, chunk_size=MIB)
            receiving = asyncio.ensure_future(_take_one(server))
            await peer.send_state_dict(source, transfer_id="round-1/site-a")
            await receiving
            again = await peer.send_state_dict(source, transfer_id="round-1/site-a")
            # A first attempt does not wait for RESUME: at most a window goes out before it lands.
            assert again.bytes_sent <= 4 * MIB
            # A round trip behind the reopened transfer: the server has handled its OPEN.
            server.on_request(_echo)
            assert (await peer.request({"ping": 1}))[0] == {"ping": 1}
            assert server._incoming.empty()


async def _take_one(server: Endpoint) -> None:
    from transport import DigestSink

    transfer = await anext(server.incoming())
    await transfer.receive_into(DigestSink())


@pytest.mark.parametrize("scheme", ["tcp", "grpc", "http"])
async def test_closing_beside_a_hung_peer_is_bounded(scheme: str) -> None:
    """A peer that stopped reading behind a socket that stays open (a hung process or
    middlebox) holds a close for a short grace, not for the whole idle_timeout (300 s here).
    The closing endpoint runs on a manual clock: the grace passes without a real wait."""
    settings = {"idle_timeout": 300.0}
    async with Endpoint(**settings) as server:
        url = await server.listen(f"{scheme}://127.0.0.1:0")
        proxy = CuttingProxy("127.0.0.1", int(url.rsplit(":", 1)[1]), [])
        host, port = await proxy.start()
        clock = ManualClock()
        client = Endpoint(clock=clock, **settings)
        peer = await client.connect(f"{scheme}://{host}:{port}")
        server.on_request(_echo)
        assert (await peer.request({"ping": 1}))[0] == {"ping": 1}
        proxy.stall()
        link = peer._link
        closing = asyncio.ensure_future(client.close())
        await asyncio.wait_for(link.closed.wait(), 60)  # the link's close began: its grace runs
        grace_ends = clock.now() + CLOSE_GRACE_S
        await clock.advance(0)  # the close's first wait on the clock starts
        # Whenever the close waits on the clock, time moves to the end of the grace, never
        # beyond: a close that waited any longer would never finish here.
        while not closing.done():
            clock.sleeping.clear()
            await clock.advance(max(0.0, grace_ends - clock.now()))
            if not closing.done():
                await _first_of(closing, clock.sleeping)
        await closing
        assert clock.now() <= grace_ends
        await proxy.close()


async def _first_of(task: asyncio.Future[Any], event: asyncio.Event) -> None:
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait_for(asyncio.wait({task, waiter}, return_when="FIRST_COMPLETED"), 60)
    finally:
        waiter.cancel()


async def _echo(peer: Any, header: Any, body: bytes) -> tuple[Any, bytes]:
    return header, body
