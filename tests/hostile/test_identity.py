"""Transfers belong to the identity that opened them, and node ids are bound to certificates.

An attacker reuses an honest site's transfer id (observed or guessed): while the honest transfer is
interrupted, before it starts, or from a raw connection that asks the receiver what it holds. Each
runs beside the honest transfer, which must still complete bit-exactly and be reported from the
honest identity; the attacker's bytes only ever arrive as the attacker's own transfer. Over the
every driver: plain (identity: the node id) and with mutual TLS (the certificate)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from transport import Endpoint, StateDictSink, TLSConfig, client_tls, create_pki, server_tls
from transport.drivers import driver_for
from transport.exceptions import ConnectionClosedError, TensorwireError
from transport.payload import StateDictSource
from transport.wire import FrameType

from .conftest import MIB, RawReceiver, raw

TID = "round-7/site-1/result"
TRANSPORTS = ["memory", "tcp", "tcps", "grpc", "grpcs", "http", "https"]
MUTUAL_TLS = {"tcps", "grpcs", "https"}
SETTINGS: dict[str, Any] = {"chunk_size": MIB // 4, "stream_window": 2 * MIB}


def state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(1024, 1024, generator=generator),  # 4 MiB: 16 chunks
        "b": torch.randn(4096, generator=generator),
    }


VICTIM_STATE, ATTACKER_STATE = state(1), state(2)


def same(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return received.keys() == expected.keys() and all(
        torch.equal(received[name], tensor) for name, tensor in expected.items()
    )


@dataclass
class Site:
    """A server that receives every transfer, and how clients of each identity reach it."""

    scheme: str
    url: str
    pki: Path
    server: Endpoint
    results: list[tuple[str | None, str | None, Any]] = field(default_factory=list)

    def client(self, name: str, **settings: Any) -> Endpoint:
        """An honest endpoint of identity `name` (its certificate under TLS, else its node id)."""
        return Endpoint(tls=self.tls(name), **{"node_id": name, **SETTINGS, **settings})

    def tls(self, name: str) -> TLSConfig | None:
        return client_tls(self.pki, name) if self.scheme in MUTUAL_TLS else None

    def received(self, node: str) -> list[Any]:
        """What the application received under `TID` from `node`."""
        return [value for peer, tid, value in self.results if peer == node and tid == TID]

    async def raw(self, name: str, claim: str, frames: list[bytes]) -> tuple[RawReceiver, Any]:
        """A raw connection with `name`'s certificate (under TLS) whose HELLO claims `claim`."""
        receiver = RawReceiver()
        connection = await driver_for(self.url).connect(self.url, receiver, tls=self.tls(name))
        for frame in [hello(claim), *frames]:
            await connection.send([frame])
        return receiver, connection


def hello(node: str) -> bytes:
    settings = {
        "stream_window": 4 * MIB,
        "connection_window": 16 * MIB,
        "max_streams": 8,
        "max_pending_requests": 8,
    }
    return raw(FrameType.HELLO, header={"protocol": 1, "node": node, "sfm": settings})


def open_frame(attempt: int, manifest: object, stream_id: int = 1) -> bytes:
    header = {
        "kind": "state_dict",
        "transfer": TID,
        "attempt": attempt,
        "stripes": 1,
        "manifest": manifest,
    }
    return raw(FrameType.OPEN, stream_id=stream_id, header=header)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    create_pki(directory, clients=("site-1", "site-2"))
    return directory


@pytest.fixture(params=TRANSPORTS)
async def site(request: pytest.FixtureRequest, pki: Path) -> AsyncIterator[Site]:
    scheme = request.param
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)
    listen = f"memory://identity-{name}" if scheme == "memory" else f"{scheme}://127.0.0.1:0"
    tls = server_tls(pki) if scheme in MUTUAL_TLS else None
    async with Endpoint(tls=tls, node_id="server", **SETTINGS) as server:
        url = await server.listen(listen)
        here = Site(scheme, url, pki, server)
        receiving: set[asyncio.Future[None]] = set()

        async def receive(transfer: Any) -> None:
            try:
                value = await transfer.receive_into(StateDictSink())
            except TensorwireError as error:
                value = error
            here.results.append((transfer.peer_node, transfer.transfer_id, value))

        async def serve() -> None:
            async for transfer in server.incoming():
                receiving.add(asyncio.ensure_future(receive(transfer)))

        serving = asyncio.ensure_future(serve())
        yield here
        serving.cancel()
        for task in receiving:
            task.cancel()


async def until(condition: Any, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_hijack_while_the_victims_transfer_is_interrupted(site: Site) -> None:
    """The victim's connection is cut mid-transfer; the attacker reuses its id at once (as the
    next attempt, with the same manifest); the victim resumes and completes with its own bytes."""
    async with site.client("site-1") as victim, site.client("site-2") as attacker:
        victim_peer = await victim.connect(site.url)
        attacker_peer = await attacker.connect(site.url)
        attack: list[asyncio.Future[Any]] = []

        def cut_once(done: int, total: int) -> None:
            if not attack and done >= total // 2:
                victim_peer._link.abort(ConnectionClosedError("cut by the test"))
                sending = attacker_peer.send_state_dict(ATTACKER_STATE, transfer_id=TID)
                attack.append(asyncio.ensure_future(sending))

        result = await asyncio.wait_for(
            victim_peer.send_state_dict(VICTIM_STATE, transfer_id=TID, progress=cut_once), 60
        )
        assert result.resumes >= 1  # it really was interrupted and resumed
        stolen = await asyncio.wait_for(attack[0], 60)
        assert stolen.resumes == 0  # told nothing held: it sent every byte
        assert stolen.bytes_sent == stolen.bytes
        await until(lambda: len(site.results) == 2, "both transfers")
    (victims,) = site.received("site-1")
    assert same(victims, VICTIM_STATE)
    (attackers,) = site.received("site-2")
    assert same(attackers, ATTACKER_STATE)  # its own transfer, reported from its own identity


async def test_a_raw_attacker_is_not_told_what_the_receiver_holds(site: Site) -> None:
    """The attacker opens the victim's id as a later attempt while the victim's transfer is
    interrupted: whatever the receiver answers holds none of the victim's chunks, and the
    victim still completes."""
    async with site.client("site-1") as victim:
        victim_peer = await victim.connect(site.url)
        probes: list[asyncio.Future[tuple[RawReceiver, Any]]] = []

        def cut_once(done: int, total: int) -> None:
            if not probes and done >= total // 2:
                victim_peer._link.abort(ConnectionClosedError("cut by the test"))
                frames = [open_frame(9, _manifest_of(victim))]
                probes.append(asyncio.ensure_future(site.raw("site-2", "site-2", frames)))

        result = await asyncio.wait_for(
            victim_peer.send_state_dict(VICTIM_STATE, transfer_id=TID, progress=cut_once), 60
        )
        assert result.resumes >= 1
        seen, connection = await asyncio.wait_for(probes[0], 10)
        await until(lambda: seen.credited.is_set(), "the attacker's transfer to be taken")
        connection.abort()
    resumes = [frame.header for frame in seen.frames() if frame.type is FrameType.RESUME]
    assert resumes, "the attacker's own (empty) transfer answers its attempt 9 with a RESUME"
    assert all(header.get("held") == [] for header in resumes)
    assert seen.goaway_code() is None  # an ordinary, empty transfer of its own: no verdict
    (victims,) = site.received("site-1")
    assert same(victims, VICTIM_STATE)


async def test_pre_emption_does_not_take_the_victims_transfer(site: Site) -> None:
    """The attacker opens the victim's id first and holds it open (never sends), then completes
    another transfer under it; the victim's transfer, started later, is its own and completes."""
    async with site.client("site-1") as victim, site.client("site-2") as attacker:
        manifest = _manifest_of(victim)
        held, connection = await site.raw("site-2", "site-2", [open_frame(0, manifest)])
        await until(lambda: held.credited.is_set(), "the attacker's transfer to be taken")
        await (await attacker.connect(site.url)).send_state_dict(ATTACKER_STATE, transfer_id=TID)
        victim_peer = await victim.connect(site.url)
        result = await asyncio.wait_for(
            victim_peer.send_state_dict(VICTIM_STATE, transfer_id=TID), 60
        )
        assert result.resumes == 0
        connection.abort()
        await until(lambda: len(site.received("site-1")) == 1, "the victim's transfer")
    (victims,) = site.received("site-1")
    assert same(victims, VICTIM_STATE)
    assert all(same(value, ATTACKER_STATE) for value in site.received("site-2"))


def _manifest_of(endpoint: Endpoint) -> object:
    source = StateDictSource(VICTIM_STATE, chunk_size=endpoint.config.chunk_size)
    return source.manifest.to_header()


async def test_a_certificate_cannot_claim_another_node_id(site: Site) -> None:
    """Under mutual TLS, a HELLO that claims another node id than the certificate's is refused
    before any stream, with a clear reason; an honest transfer beside it completes."""
    if site.scheme not in MUTUAL_TLS:
        pytest.skip("node ids are bound to certificates only under mutual TLS")
    seen, connection = await site.raw("site-1", "site-2", [open_frame(0, {"forged": True})])
    await asyncio.wait_for(seen.closed.wait(), 10)
    connection.abort()
    assert seen.goaway_code() == "unauthorized"
    goaway = next(frame for frame in seen.frames() if frame.type is FrameType.GOAWAY)
    assert "'site-2'" in str(goaway.header)
    assert "'site-1'" in str(goaway.header)
    async with site.client("site-1") as honest:
        await (await honest.connect(site.url)).send_state_dict(VICTIM_STATE, transfer_id=TID)
    await until(lambda: len(site.results) == 1, "the honest transfer")
    assert site.results[0][0] == "site-1"
    assert same(site.results[0][2], VICTIM_STATE)


async def test_peer_node_is_the_verified_identity(site: Site) -> None:
    """An endpoint configured with another node id than its certificate's is known by its
    certificate: it announces that name, and the application sees it on the transfer and peer."""
    async with site.client("site-1", node_id="site-2") as client:
        await (await client.connect(site.url)).send_state_dict(VICTIM_STATE, transfer_id=TID)
        await until(lambda: len(site.results) == 1, "the transfer")
        (peer,) = [p for p in site.server._peers.values() if p.node_id is not None]
    expected = "site-1" if site.scheme in MUTUAL_TLS else "site-2"  # without TLS: the node id
    assert site.results[0][0] == expected
    assert same(site.results[0][2], VICTIM_STATE)
    assert peer.node_id == expected
    if site.scheme in MUTUAL_TLS:
        assert peer.info is not None
        assert peer.info.peer_identity == "site-1"
