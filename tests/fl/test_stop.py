"""Ending a job reaches every client: one that missed the server's STOP (its connection was being
replaced just then) learns it from the answer to its next heartbeat, or to its hello if it only
joins after the job ended, instead of waiting for a task forever."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fl.client import FLClient
from fl.protocol import STOP, kind_of
from tests.fl.helpers import client_settings, new_server


async def test_a_client_that_missed_the_stop_ends_at_its_next_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        client = FLClient(client_settings(url, "deaf"))
        original = client._serve_request

        async def lose_the_stop(peer: Any, header: Any, body: bytes) -> Any:
            if kind_of(header) == STOP:  # the fault: the STOP never reaches the client
                return {"fl": STOP}, b""
            return await original(peer, header, body)

        monkeypatch.setattr(client, "_serve_request", lose_the_stop)
        await client.start_async()
        try:
            await server.wait_for_clients(1, 10)
            await server.stop_clients("job finished")
            assert client.stop_reason is None  # it missed it...
            running = await asyncio.wait_for(client.is_running_async(), 10)
            assert running is False  # ...and learnt it from a heartbeat (every 0.2 s here)
            assert client.stop_reason == "job finished"
        finally:
            await client.close_async()


async def test_a_client_joining_after_the_job_ended_is_told_at_once() -> None:
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        await server.stop_clients("job finished")  # nobody connected yet
        client = FLClient(client_settings(url, "late", heartbeat_interval=3600.0))
        await client.start_async()
        try:
            assert await asyncio.wait_for(client.is_running_async(), 10) is False
            assert client.stop_reason == "job finished"
        finally:
            await client.close_async()
