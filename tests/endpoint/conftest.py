import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from transport import Endpoint, IncomingTransfer, Peer

DRIVERS = ["memory", "tcp"]


@pytest.fixture(params=DRIVERS)
def listen_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)
    return "tcp://127.0.0.1:0"


@pytest.fixture
async def pair(listen_url: str) -> AsyncIterator[tuple[Endpoint, Endpoint, Peer]]:
    """A listening server endpoint, a client endpoint, and the client's peer for the server."""
    async with Endpoint(chunk_size=1 << 20, stream_window=4 << 20) as server:
        url = await server.listen(listen_url)
        async with Endpoint(chunk_size=1 << 20, stream_window=4 << 20) as client:
            peer = await client.connect(url)
            yield server, client, peer


async def next_transfer(server: Endpoint) -> IncomingTransfer:
    return await anext(server.incoming())


def receive_with(server: Endpoint, how: Callable[[IncomingTransfer], Any]) -> Any:
    """Start receiving the next incoming transfer with `how` in a task."""
    import asyncio

    async def receive() -> Any:
        return await how(await next_transfer(server))

    return asyncio.ensure_future(receive())
