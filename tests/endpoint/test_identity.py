"""Identity: a client is known by its certificate (mutual TLS) or a token over TLS; an unknown
client is refused before it can open a stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from transport import (
    ConfigError,
    Endpoint,
    RemoteError,
    StateDictSink,
    client_tls,
    create_pki,
    server_tls,
)

STATE = {"w": torch.arange(1000, dtype=torch.float32)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    create_pki(directory, clients=("site-1", "site-2"))
    return directory


async def _send_one(server: Endpoint, client: Endpoint, url: str) -> dict[str, torch.Tensor]:
    async def receive() -> dict[str, torch.Tensor]:
        return await (await anext(server.incoming())).receive_into(StateDictSink())

    receiving = asyncio.ensure_future(receive())
    peer = await client.connect(url)
    await peer.send_state_dict(STATE)
    return await asyncio.wait_for(receiving, 10)


async def test_allowed_certificate_identity_is_served(pki: Path) -> None:
    allowed = frozenset({"site-1"})
    async with Endpoint(tls=server_tls(pki), allowed_identities=allowed) as server:
        url = await server.listen("tcps://127.0.0.1:0")
        async with Endpoint(tls=client_tls(pki, "site-1")) as client:
            received = await _send_one(server, client, url)
            # Taken while connected: a peer gone before accepted() took it is dropped.
            peer = await asyncio.wait_for(anext(server.accepted()), 10)
    assert torch.equal(received["w"], STATE["w"])
    assert peer.info is not None
    assert peer.info.peer_identity == "site-1"


async def test_unlisted_certificate_identity_is_refused_before_any_stream(pki: Path) -> None:
    allowed = frozenset({"site-1"})
    async with Endpoint(tls=server_tls(pki), allowed_identities=allowed) as server:
        url = await server.listen("tcps://127.0.0.1:0")
        async with Endpoint(tls=client_tls(pki, "site-2")) as client:
            peer = await client.connect(url)
            with pytest.raises(RemoteError, match="site-2") as refused:
                await peer.send_state_dict(STATE)
        assert refused.value.code == "unauthorized"
        assert server._incoming.empty()


async def test_token_over_tls(pki: Path) -> None:
    tokens = frozenset({"s3cret-token"})
    async with Endpoint(
        tls=server_tls(pki, require_client_cert=False), auth_tokens=tokens
    ) as server:
        url = await server.listen("tcps://127.0.0.1:0")
        good = Endpoint(tls=client_tls(pki, "site-1"), token="s3cret-token")
        async with good:
            received = await _send_one(server, good, url)
        assert torch.equal(received["w"], STATE["w"])
        async with Endpoint(tls=client_tls(pki, "site-1"), token="wrong") as bad:
            peer = await bad.connect(url)
            with pytest.raises(RemoteError, match="no valid auth token"):
                await peer.send_state_dict(STATE)


async def test_token_is_never_sent_in_the_clear() -> None:
    async with Endpoint() as server:
        url = await server.listen("tcp://127.0.0.1:0")
        async with Endpoint(token="s3cret-token") as client:
            with pytest.raises(ConfigError, match="without TLS"):
                await client.connect(url)
