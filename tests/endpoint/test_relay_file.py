"""A relay forwards a transfer while it arrives: each chunk goes on to every site once it is
verified and on disk, the sites get exactly what was sent, and an upstream that fails makes the
onward sends fail instead of waiting for bytes that will never come."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from transport import (
    Endpoint,
    IncomingTransfer,
    Peer,
    RelayFile,
    StateDictSink,
    StateDictSource,
    TensorwireError,
)
from transport.payload import Chunk

CHUNK = 1 << 20


class GatedSource(StateDictSource):
    """An upstream sender that may only send chunks below `allowed` (the test opens the gate)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__(state, chunk_size=CHUNK)
        self.allowed = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def is_ready(self, chunk: Chunk) -> bool:
        return chunk.index < self.allowed

    def when_ready(self, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def open_up_to(self, allowed: int) -> None:
        self.allowed = allowed
        for listener in list(self._listeners):
            listener()


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(3 * CHUNK // 4 * 3, generator=generator),  # spans several chunks
        "small": torch.randn(1000, generator=generator),
        "ints": torch.arange(300_000, dtype=torch.int64),
    }


def _endpoint() -> Endpoint:
    return Endpoint(chunk_size=CHUNK, stream_window=2 * CHUNK, idle_timeout=20)


@pytest.fixture
async def chain() -> AsyncIterator[tuple[Peer, Endpoint, list[Peer], list[Endpoint]]]:
    """upstream -> relay -> two sites, all on real tcp sockets."""
    async with _endpoint() as upstream, _endpoint() as relay:
        relay_url = await relay.listen("tcp://127.0.0.1:0")
        to_relay = await upstream.connect(relay_url)
        async with _endpoint() as site_a, _endpoint() as site_b:
            sites = [site_a, site_b]
            to_sites = [await relay.connect(await s.listen("tcp://127.0.0.1:0")) for s in sites]
            yield to_relay, relay, to_sites, sites


async def _receive(site: Endpoint, progress: Callable[[int, int], None] | None = None) -> Any:
    transfer = await anext(site.incoming())
    return await transfer.receive_into(StateDictSink(), progress=progress)


def _set_at(event: asyncio.Event, nbytes: int) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        if done >= nbytes:
            event.set()

    return progress


async def _forward(relay: Endpoint, to_sites: list[Peer], path: Path) -> tuple[Any, list[Any]]:
    incoming: IncomingTransfer = await anext(relay.incoming())
    assert incoming.manifest is not None
    relayed = RelayFile(path)
    sends = [
        asyncio.ensure_future(
            peer.send_state_dict(relayed.source(incoming.manifest), transfer_id=f"t/{n}")
        )
        for n, peer in enumerate(to_sites)
    ]
    try:
        received = await incoming.receive_into(relayed.sink)
    except BaseException:
        await asyncio.gather(*sends, return_exceptions=True)
        raise
    return received, await asyncio.gather(*sends, return_exceptions=True)


async def test_sites_get_chunks_before_the_upstream_transfer_ends(chain, tmp_path) -> None:
    to_relay, relay, to_sites, sites = chain
    state = _state()
    source = GatedSource(state)
    half = 2
    got_half = [asyncio.Event() for _ in sites]
    receiving = [
        asyncio.ensure_future(_receive(site, _set_at(event, half * CHUNK)))
        for site, event in zip(sites, got_half, strict=True)
    ]
    forwarding = asyncio.ensure_future(_forward(relay, to_sites, tmp_path / "model.safetensors"))
    source.open_up_to(half)
    sending = asyncio.ensure_future(to_relay.send_state_dict(source, transfer_id="up"))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in got_half)), 30)
    assert not sending.done(), "the upstream could not have finished: its gate is half shut"
    source.open_up_to(10**9)
    await asyncio.wait_for(sending, 30)
    path, sent = await asyncio.wait_for(forwarding, 30)
    assert path == tmp_path / "model.safetensors"
    assert path.is_file()
    assert all(not isinstance(result, BaseException) for result in sent), sent
    for received in await asyncio.gather(*receiving):
        assert received.keys() == state.keys()
        for name, tensor in state.items():
            assert torch.equal(received[name], tensor), name


async def test_a_failed_upstream_fails_the_onward_sends(chain, tmp_path) -> None:
    to_relay, relay, to_sites, sites = chain
    source = GatedSource(_state())
    got_one = [asyncio.Event() for _ in sites]
    receiving = [
        asyncio.ensure_future(_receive(site, _set_at(event, 1)))
        for site, event in zip(sites, got_one, strict=True)
    ]
    forwarding = asyncio.ensure_future(_forward(relay, to_sites, tmp_path / "model.safetensors"))
    source.open_up_to(1)
    sending = asyncio.ensure_future(to_relay.send_state_dict(source, transfer_id="up"))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in got_one)), 30)
    sending.cancel()  # the upstream sender gives up: the relay's receive fails
    with pytest.raises(TensorwireError):
        await asyncio.wait_for(forwarding, 30)
    for site in receiving:
        with pytest.raises(TensorwireError, match="relayed transfer failed"):
            await asyncio.wait_for(site, 30)
    assert not (tmp_path / "model.safetensors").exists()
