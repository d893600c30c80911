"""Every driver behaves the same to the application: the same code, a different URL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from transport import (
    ConnectionClosedError,
    DigestSink,
    Endpoint,
    RemoteRequestError,
    StateDictSink,
    SyntheticSource,
    TensorwireError,
    client_tls,
    create_ca,
    issue_certificate,
)
from transport.certs import CertificateFiles

from .conftest import MIB, TRANSPORTS, Setup


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(1000, 257, generator=generator).to(torch.bfloat16),
        "norm": torch.randn(257, generator=generator),
        "step": torch.tensor(seed),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
    }


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


async def _receive(endpoint: Endpoint, count: int) -> list[dict[str, torch.Tensor]]:
    return [
        await (await anext(endpoint.incoming())).receive_into(StateDictSink()) for _ in range(count)
    ]


async def test_state_dict_round_trip(setup: Setup) -> None:
    async with setup.server(chunk_size=MIB, stream_window=4 * MIB) as server:
        url = await server.listen(setup.listen_url())
        async with setup.client(chunk_size=MIB, stream_window=4 * MIB) as client:
            receiving = asyncio.ensure_future(_receive(server, 1))
            await (await client.connect(url)).send_state_dict(_state(1))
            (received,) = await asyncio.wait_for(receiving, 30)
    assert _same(received, _state(1))


async def test_many_concurrent_streams_both_directions(setup: Setup) -> None:
    async with setup.server(chunk_size=MIB, stream_window=4 * MIB) as server:
        url = await server.listen(setup.listen_url())
        async with setup.client(chunk_size=MIB, stream_window=4 * MIB) as client:
            peer = await client.connect(url)
            back = await anext(server.accepted())
            to_server = asyncio.ensure_future(_receive(server, 8))
            to_client = asyncio.ensure_future(_receive(client, 8))
            await asyncio.gather(
                *(peer.send_state_dict(_state(i)) for i in range(8)),
                *(back.send_state_dict(_state(100 + i)) for i in range(8)),
            )
            got = await asyncio.wait_for(to_server, 60) + await asyncio.wait_for(to_client, 60)
    steps = sorted(int(d["step"]) for d in got)
    assert steps == list(range(8)) + list(range(100, 108))
    assert all(_same(d, _state(int(d["step"]))) for d in got)


# The big transfer runs once per driver family, over its plain form; memory:// and the TLS forms
# (the same driver code under an ssl layer) stream 128 MiB: 16 chunks, 4 stream windows.
FAMILIES = [("tcp", False), ("grpc", False), ("http", False)]
OTHERS = [transport for transport in TRANSPORTS if transport not in FAMILIES]


async def _stream(setup: Setup, nbytes: int) -> None:
    async with setup.server() as server:
        url = await server.listen(setup.listen_url())
        async with setup.client() as client:

            async def receive() -> Any:
                return await (await anext(server.incoming())).receive_into(DigestSink())

            receiving = asyncio.ensure_future(receive())
            result = await (await client.connect(url)).send_state_dict(SyntheticSource(nbytes))
            stats = await asyncio.wait_for(receiving, 300)
    assert result.bytes == stats.bytes == nbytes


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("setup", FAMILIES, ids=[s for s, _ in FAMILIES], indirect=True)
async def test_a_2_gib_stream(setup: Setup) -> None:
    await _stream(setup, 2 << 30)


@pytest.mark.parametrize("setup", OTHERS, ids=[s for s, _ in OTHERS], indirect=True)
async def test_a_128_mib_stream(setup: Setup) -> None:
    await _stream(setup, 128 * MIB)


async def test_request_response(setup: Setup) -> None:
    async with setup.server() as server:
        url = await server.listen(setup.listen_url())

        async def handler(_peer: Any, header: Any, body: bytes) -> tuple[dict[str, Any], bytes]:
            if header.get("fail"):
                raise ValueError("no such round")
            return {"round": header["round"] + 1}, body * 2

        server.on_request(handler)
        async with setup.client() as client:
            peer = await client.connect(url)
            replies = await asyncio.gather(*(peer.request({"round": i}, b"ab") for i in range(10)))
            with pytest.raises(RemoteRequestError, match="no such round"):
                await peer.request({"fail": True})
    assert [(h["round"], b) for h, b in replies] == [(i + 1, b"abab") for i in range(10)]


class _SlowSink(DigestSink):
    """20 ms per chunk: the transfer is surely still running when the sender goes away."""

    inline_writes = False

    def write(self, chunk: Any, pieces: Any) -> None:
        time.sleep(0.02)
        super().write(chunk, pieces)


async def test_peer_that_disconnects_mid_stream(setup: Setup) -> None:
    settings = {"chunk_size": MIB, "stream_window": 2 * MIB, "idle_timeout": 600.0}
    async with setup.server(**settings) as server:
        url = await server.listen(setup.listen_url())
        client = setup.client(**settings)
        peer = await client.connect(url)
        source = SyntheticSource(256 * MIB, chunk_size=MIB)
        moving = asyncio.Event()
        sending = asyncio.ensure_future(
            peer.send_state_dict(source, progress=lambda done, total: moving.set())
        )
        transfer = await anext(server.incoming())
        receiving = asyncio.ensure_future(transfer.receive_into(_SlowSink()))
        await moving.wait()
        await client.close()  # the sending side goes away for good, mid-stream
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(sending, 10)
        # It said goodbye: nothing will come back, so the receiver does not wait idle_timeout.
        with pytest.raises(ConnectionClosedError, match="closed its endpoint"):
            await asyncio.wait_for(receiving, 1)


async def test_untrusted_client_is_refused_and_the_server_keeps_serving(
    setup: Setup, tmp_path: Path
) -> None:
    if not setup.tls:
        pytest.skip("only meaningful under mutual TLS")
    foreign_ca = create_ca(tmp_path / "foreign")
    intruder = issue_certificate(foreign_ca, tmp_path / "foreign", "intruder", kind="client")
    async with setup.server() as server:
        url = await server.listen(setup.listen_url())
        trusted = client_tls(setup.pki, "site-1")
        untrusted = type(trusted)(
            ca_file=trusted.ca_file,
            cert_file=str(intruder.cert_file),
            key_file=str(intruder.key_file),
        )
        async with Endpoint(tls=untrusted, idle_timeout=2.0) as bad:
            with pytest.raises(TensorwireError):  # noqa: PT012 - refused at connect or first use
                peer = await bad.connect(url)
                await peer.send_state_dict(_state(5))
        async with setup.client() as good:
            receiving = asyncio.ensure_future(_receive(server, 1))
            await (await good.connect(url)).send_state_dict(_state(6))
            (received,) = await asyncio.wait_for(receiving, 30)
    assert _same(received, _state(6))
    assert isinstance(intruder, CertificateFiles)


async def test_graceful_close(setup: Setup) -> None:
    async with setup.server() as server:
        url = await server.listen(setup.listen_url())
        async with setup.client() as client:
            peer = await client.connect(url)
            receiving = asyncio.ensure_future(_receive(server, 1))
            await peer.send_state_dict(_state(2))
            await asyncio.wait_for(receiving, 30)
            server_side = await anext(server.accepted())
            await peer.close()
            await asyncio.wait_for(server_side.wait_closed(), 10)
            assert peer.closed
