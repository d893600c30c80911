"""State dicts, files and byte streams round-trip bit-exactly through a real endpoint pair."""

import asyncio
from pathlib import Path

import pytest
import torch

from transport import (
    CallbackSink,
    Endpoint,
    RemoteRequestError,
    SafetensorsFileSink,
    StateDictSink,
    StreamResetError,
    SyntheticSource,
)
from transport.payload import DTYPES

from .conftest import receive_with


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (max(1, torch.Size(shape).numel()) * dtype.itemsize,),
        dtype=torch.uint8,
        generator=generator,
    )
    return raw[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape)


def _assert_same(sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> None:
    assert sent.keys() == received.keys()
    for name, tensor in sent.items():
        other = received[name]
        assert other.dtype == tensor.dtype, name
        assert other.shape == tensor.shape, name
        assert torch.equal(
            other.reshape(-1).view(torch.uint8), tensor.reshape(-1).contiguous().view(torch.uint8)
        ), name


async def test_every_dtype_and_odd_shapes(pair) -> None:
    server, _, peer = pair
    state = {
        f"{name}/{i}": _tensor(dtype, shape, i)
        for i, shape in enumerate([(), (0,), (3, 0, 2), (7, 13), (1_000_003,)])
        for name, dtype in DTYPES.items()
    }
    receiving = receive_with(server, lambda t: t.receive_into(StateDictSink()))
    result = await peer.send_state_dict(state, meta={"round": 3})
    _assert_same(state, await receiving)
    assert result.bytes == sum(t.numel() * t.element_size() for t in state.values())


async def test_non_contiguous_and_views(pair) -> None:
    server, _, peer = pair
    base = torch.randn(300, 500)
    state = {
        "transposed": base.t(),
        "strided": base[::3, ::7],
        "expanded": torch.ones(5, 1).expand(5, 9000),
    }
    receiving = receive_with(server, lambda t: t.receive_into(StateDictSink()))
    await peer.send_state_dict(state)
    _assert_same(state, await receiving)


async def test_ten_thousand_small_tensors(pair) -> None:
    server, _, peer = pair
    state = {f"block.{i}.weight": torch.full((i % 7 + 1,), float(i)) for i in range(10_000)}
    receiving = receive_with(server, lambda t: t.receive_into(StateDictSink()))
    await peer.send_state_dict(state)
    _assert_same(state, await receiving)


async def test_in_place_keeps_storage(pair) -> None:
    server, _, peer = pair
    state = {"w": torch.randn(2000, 1000), "b": torch.randn(1000)}
    target = {"w": torch.zeros(2000, 1000), "b": torch.zeros(1000)}
    pointers = {name: t.data_ptr() for name, t in target.items()}
    receiving = receive_with(server, lambda t: t.receive_into(StateDictSink(into=target)))
    await peer.send_state_dict(state)
    received = await receiving
    _assert_same(state, received)
    assert {name: t.data_ptr() for name, t in target.items()} == pointers


async def test_file_sink_and_callback_sink(pair, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    server, _, peer = pair
    state = {"a": torch.randn(1500, 1000), "b": torch.arange(10, dtype=torch.int64)}
    receiving = receive_with(
        server, lambda t: t.receive_into(SafetensorsFileSink(tmp_path / "model.safetensors"))
    )
    await peer.send_state_dict(state)
    path = await receiving
    _assert_same(state, load_file(path))
    assert not list(tmp_path.glob("*.partial"))

    seen: dict[str, torch.Tensor] = {}
    receiving = receive_with(
        server, lambda t: t.receive_into(CallbackSink(lambda n, t: seen.__setitem__(n, t.clone())))
    )
    await peer.send_state_dict(state)
    await receiving
    _assert_same(state, seen)


async def test_synthetic_source_many_chunks(pair) -> None:
    from transport import DigestSink

    server, client, peer = pair
    source = SyntheticSource(64 << 20, seed=7, chunk_size=client.config.chunk_size)
    receiving = receive_with(server, lambda t: t.receive_into(DigestSink()))
    result = await peer.send_state_dict(source)
    await receiving
    assert result.bytes == 64 << 20
    assert result.chunks == 64


async def test_file_and_bytes_streams(pair, tmp_path: Path) -> None:
    server, _, peer = pair
    original = tmp_path / "checkpoint.bin"
    original.write_bytes(torch.randint(0, 256, (3_500_001,), dtype=torch.uint8).numpy().tobytes())
    receiving = receive_with(server, lambda t: t.receive_to_file(tmp_path / "copy.bin"))
    result = await peer.send_file(original, meta={"purpose": "test"})
    assert (await receiving).read_bytes() == original.read_bytes()
    assert result.bytes == original.stat().st_size

    async def blocks():
        for i in range(50):
            yield bytes([i]) * (i * 997)

    async def collect(transfer) -> bytes:
        return b"".join([bytes(block) async for block in transfer])

    receiving = receive_with(server, collect)
    await peer.send_bytes(blocks())
    assert await receiving == b"".join(bytes([i]) * (i * 997) for i in range(50))


async def test_requests_and_handler_errors(pair) -> None:
    server, _, peer = pair

    async def handler(_peer, header, body):
        if header.get("fail"):
            raise ValueError("asked to fail")
        return {"got": header["n"]}, body[::-1]

    server.on_request(handler)
    replies = await asyncio.gather(*(peer.request({"n": i}, bytes([i, 1, 2])) for i in range(20)))
    assert [(h["got"], b) for h, b in replies] == [(i, bytes([2, 1, i])) for i in range(20)]
    with pytest.raises(RemoteRequestError, match="asked to fail"):
        await peer.request({"fail": True})


async def test_receiver_rejects(pair) -> None:
    server, _, peer = pair

    async def reject(transfer) -> None:
        transfer.reject("not today")

    receiving = receive_with(server, reject)
    with pytest.raises(StreamResetError, match="not today"):
        await peer.send_state_dict(SyntheticSource(64 << 20, chunk_size=1 << 20))
    await receiving


async def test_concurrent_streams_both_directions(listen_url) -> None:
    async with Endpoint(chunk_size=1 << 20, stream_window=4 << 20) as server:
        url = await server.listen(listen_url)
        async with Endpoint(chunk_size=1 << 20, stream_window=4 << 20) as client:
            peer = await client.connect(url)
            server_peer = await anext(server.accepted())
            states = [{"x": torch.full((300_000 + i,), float(i))} for i in range(6)]

            async def drain(endpoint, count):
                return [
                    await (await anext(endpoint.incoming())).receive_into(StateDictSink())
                    for _ in range(count)
                ]

            to_server = asyncio.ensure_future(drain(server, 3))
            to_client = asyncio.ensure_future(drain(client, 3))
            await asyncio.gather(
                *(peer.send_state_dict(s) for s in states[:3]),
                *(server_peer.send_state_dict(s) for s in states[3:]),
            )
            got = await to_server + await to_client
    assert sorted(float(d["x"][0]) for d in got) == [float(i) for i in range(6)]


async def test_a_chunk_larger_than_the_peer_window_is_a_clear_error(pair) -> None:
    from transport import ConfigError

    _, _, peer = pair
    with pytest.raises(ConfigError, match="can never fit the peer's stream window"):
        await peer.send_state_dict(SyntheticSource(16 << 20, chunk_size=8 << 20))
