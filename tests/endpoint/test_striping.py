"""Striping: one transfer over several parallel connections, reassembled invisibly, with resume
and integrity unchanged."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import torch
import xxhash

from benchmarks.faults import CuttingProxy
from transport import CallbackSink, Endpoint, StateDictSink, SyntheticSource

MIB = 1 << 20
SETTINGS = {"chunk_size": MIB, "stream_window": 4 * MIB, "idle_timeout": 30.0}


@pytest.mark.parametrize("scheme", ["tcp", "grpc", "http"])
async def test_a_state_dict_striped_over_four_connections(scheme: str) -> None:
    generator = torch.Generator().manual_seed(1)
    state = {f"w{i}": torch.randn(700, 1000 + i, generator=generator) for i in range(12)}
    async with Endpoint(**SETTINGS) as server, Endpoint(**SETTINGS) as client:
        url = await server.listen(f"{scheme}://127.0.0.1:0")

        async def receive() -> Any:
            return await (await anext(server.incoming())).receive_into(StateDictSink())

        receiving = asyncio.ensure_future(receive())
        peer = await client.connect(url)
        result = await peer.send_state_dict(state, streams=4)
        received = await asyncio.wait_for(receiving, 60)
        accepted = [await anext(server.accepted())]
        # Every stripe said hello before its data arrived, and all the data has: a stripe taken
        # for a new peer would be queued by now.
        assert not server._accepted, "extra stripe connections are not new peers"
        assert server._incoming.empty(), "the transfer is announced once"
    assert result.bytes == sum(t.numel() * 4 for t in state.values())
    assert all(torch.equal(received[k], v) for k, v in state.items())
    assert accepted[0].node_id == client.config.node_id


@pytest.mark.timeout(300)
async def test_striped_transfer_survives_cuts() -> None:
    total, cuts = 256 * MIB, 6
    offsets = sorted(random.Random(8).sample(range(1, total), cuts))
    async with Endpoint(**SETTINGS) as server, Endpoint(**SETTINGS) as client:
        url = await server.listen("tcp://127.0.0.1:0")
        proxy = CuttingProxy("127.0.0.1", int(url.rsplit(":", 1)[1]), offsets)
        host, port = await proxy.start()
        source = SyntheticSource(total, seed=3, tensor_bytes=16 * MIB, chunk_size=MIB)
        digests: dict[str, str] = {}

        def on_tensor(name: str, tensor: torch.Tensor) -> None:
            assert name not in digests, f"{name} delivered twice"
            digests[name] = xxhash.xxh3_64_hexdigest(tensor.view(torch.uint8).numpy())

        async def receive() -> Any:
            return await (await anext(server.incoming())).receive_into(CallbackSink(on_tensor))

        receiving = asyncio.ensure_future(receive())
        peer = await client.connect(f"tcp://{host}:{port}")
        result = await peer.send_state_dict(source, streams=3)
        await asyncio.wait_for(receiving, 60)
        await proxy.close()
    expected = {
        spec.name: xxhash.xxh3_64_hexdigest(source.tensor(spec.name).view(torch.uint8).numpy())
        for spec in source.manifest.tensors
    }
    assert digests == expected
    assert result.resumes >= 1
    assert proxy.cuts == cuts


async def test_a_new_attempt_starts_without_waiting_for_a_heartbeat() -> None:
    """After a cut, the streams of the next attempt open at once on the connections that
    survived, not when the next heartbeat happens to flush them (idle_timeout / 3 = 200 s
    here, and other timers fire after ~30 s): the whole transfer, cuts included, takes about a
    second, far within the wait below."""
    settings = {**SETTINGS, "idle_timeout": 600.0}
    total = 64 * MIB
    async with Endpoint(**settings) as server, Endpoint(**settings) as client:
        url = await server.listen("tcp://127.0.0.1:0")
        proxy = CuttingProxy("127.0.0.1", int(url.rsplit(":", 1)[1]), [20 * MIB, 40 * MIB])
        host, port = await proxy.start()
        source = SyntheticSource(total, seed=5, tensor_bytes=8 * MIB, chunk_size=MIB)

        async def receive() -> Any:
            return await (await anext(server.incoming())).receive_into(StateDictSink())

        receiving = asyncio.ensure_future(receive())
        peer = await client.connect(f"tcp://{host}:{port}")
        result = await asyncio.wait_for(peer.send_state_dict(source, streams=3), 20)
        received = await asyncio.wait_for(receiving, 20)
        await proxy.close()
    assert proxy.cuts == 2
    assert result.resumes >= 1
    assert sorted(received) == sorted(spec.name for spec in source.manifest.tensors)
    for name, tensor in received.items():  # as bytes: random bf16 bytes hold NaNs
        assert torch.equal(tensor.view(torch.uint8), source.tensor(name).view(torch.uint8)), name
