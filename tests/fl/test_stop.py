"""How a client's job ends, and what it keeps for a server that restarts, over real loopback
sockets with a real FLServer.

Told to stop: a client that missed the server's STOP (its connection was being replaced just
then) learns it from the answer to its next heartbeat, or to its hello if it only joins after the
job ended; a send the closing server cuts off after its STOP ends the job, it is no error.
Vanished: a server that goes away without a STOP is waited for (a restarted server continues the
job) and given up only after idle_timeout. Restarted: the client reports the result it delivered
last in its heartbeats and sends it again, with the same transfer id, when asked (RESEND).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from fl.client import FLClient, JobStopped, ServerLost
from fl.model import FLModel
from fl.protocol import HEARTBEAT, RESEND, STOP, kind_of
from fl.server import FLServer, Task
from tests.fl.helpers import client_settings, new_server
from transport import StateDictSink


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


def small_model(value: float = 1.0) -> dict[str, torch.Tensor]:
    """A model of 4 MiB: more than the client may send before the server takes it (see
    helpers.SMALL: the server grants a stream 4 MiB before its application takes the transfer)."""
    return {"w": torch.full((1024, 1024), value), "b": torch.full((16,), value)}


async def joined(url: str, site: str, server: FLServer, **changes: object) -> FLClient:
    client = FLClient(client_settings(url, site, **changes))
    await client.start_async()
    assert await server.wait_for_clients(1, 10) == [site]
    return client


async def test_a_send_the_closing_server_cuts_after_its_stop_ends_the_job() -> None:
    server = new_server()
    (url,) = await server.start(["tcp://127.0.0.1:0"])
    client = await joined(url, "site", server)
    try:
        task = server.send_model(FLModel(params=small_model()), ["site"])
        assert await asyncio.wait_for(client.is_running_async(), 10)
        received = await asyncio.wait_for(client.receive_async(), 10)
        assert isinstance(received.params, dict)
        sending = asyncio.ensure_future(client.send_async(FLModel(params=small_model(2.0))))
        # Nobody gathers: the result arrives and waits, its sender stalled without credit.
        await asyncio.wait_for(asyncio.shield(task.arrivals["site"]), 10)
        assert not sending.done()
        await server.close(reason="server stopped")  # STOP, then the endpoint closes
        with pytest.raises(JobStopped, match="server stopped"):
            await asyncio.wait_for(sending, 10)
        assert client.lost_reason is None
        assert await client.is_running_async() is False
    finally:
        await client.close_async()
        await server.close(stop_clients=False)


async def test_a_server_gone_without_a_stop_is_waited_for_then_given_up() -> None:
    server = new_server()
    (url,) = await server.start(["tcp://127.0.0.1:0"])
    client = await joined(url, "patient", server, idle_timeout=2.0)
    try:
        await server.close(stop_clients=False)  # gone without a word: it may come back
        gone = time.monotonic()
        with pytest.raises(ServerLost, match="no answer from"):
            await asyncio.wait_for(client.is_running_async(), 30)
        assert time.monotonic() - gone >= 2.0  # redialled for idle_timeout before giving up
        assert client.stop_reason is None
    finally:
        await client.close_async()


class Heartbeats:
    """Records the heartbeats a server gets; `wait(sent=...)` until one says that."""

    def __init__(self, server: FLServer) -> None:
        self.seen: list[Mapping[str, Any]] = []
        self._arrived = asyncio.Event()
        original = server._serve_request

        async def recording(peer: Any, header: Mapping[str, Any], body: bytes) -> Any:
            if kind_of(header) == HEARTBEAT:
                self.seen.append(dict(header))
                self._arrived.set()
            return await original(peer, header, body)

        server._serve_request = recording  # type: ignore[method-assign]

    async def wait(self, sent: str | None, within: float = 10) -> Mapping[str, Any]:
        async def one_saying_it() -> Mapping[str, Any]:
            while True:
                said = [header for header in self.seen if header.get("sent") == sent]
                if said:
                    return said[-1]
                self._arrived.clear()
                await self._arrived.wait()

        return await asyncio.wait_for(one_saying_it(), within)


def sent_task(client: FLClient) -> str | None:
    return client.sent_task_id  # (read anew: mypy would narrow the attribute to the last value)


async def test_a_restarted_server_gets_the_last_result_again_when_it_asks() -> None:
    first = new_server()
    (url,) = await first.start(["tcp://127.0.0.1:0"])
    client = await joined(url, "site", first)
    second: FLServer | None = None
    try:
        # The first server process: a task, its result delivered and committed.
        task = first.send_model(FLModel(params=small_model(), current_round=2), ["site"])
        assert await asyncio.wait_for(client.is_running_async(), 10)
        await asyncio.wait_for(client.receive_async(), 10)
        result = FLModel(params=small_model(3.0), metrics={"loss": 0.5}, meta={"sample_count": 7})
        sending = asyncio.ensure_future(client.send_async(result))
        (gathered,) = await asyncio.wait_for(first.gather(task), 10)
        assert gathered.ok, gathered.error
        assert await asyncio.wait_for(sending, 10) is not None
        assert client.sent_task_id == task.task_id

        # It dies without a word (a crash); the next one listens on the same address.
        await first.close(stop_clients=False)
        second = new_server(job="next")  # (whose task ids differ: its next task is newer)
        heartbeats = Heartbeats(second)
        await second.start([url])
        beat = await heartbeats.wait(sent=task.task_id)  # the client redialled, and says so
        assert beat["task_id"] is None  # no task open on the client

        # The restarted server expects that task's result again (as a resumed round would).
        loop = asyncio.get_running_loop()
        expected = Task(task.task_id, "train", ["site"])
        expected.arrivals["site"] = loop.create_future()
        second.tasks[task.task_id] = expected
        peer = second.clients["site"].peer
        answer, _ = await peer.request({"fl": RESEND, "task_id": "job/some-other-task"})
        assert answer == {"fl": RESEND, "ok": False}
        answer, _ = await peer.request({"fl": RESEND, "task_id": task.task_id})
        assert answer == {"fl": RESEND, "ok": True}

        transfer = await asyncio.wait_for(expected.arrivals["site"], 10)
        assert transfer.transfer_id == f"{task.task_id}/site/result"  # the same transfer
        assert transfer.meta["task_id"] == task.task_id
        assert transfer.meta["metrics"] == {"loss": 0.5}
        assert transfer.meta["meta"] == {"sample_count": 7}
        again = await asyncio.wait_for(transfer.receive_into(StateDictSink()), 10)
        assert set(again) == {"w", "b"}
        assert all(torch.equal(again[name], small_model(3.0)[name]) for name in again)

        # A newer task arrives: the old result is let go, and no longer offered.
        newer = second.send_model(FLModel(params=small_model(4.0), current_round=3), ["site"])
        assert await asyncio.wait_for(client.is_running_async(), 10)
        assert sent_task(client) is None
        await asyncio.wait_for(client.receive_async(), 10)
        await asyncio.wait_for(newer.sends["site"], 10)
        await heartbeats.wait(sent=None)
        answer, _ = await peer.request({"fl": RESEND, "task_id": task.task_id})
        assert answer == {"fl": RESEND, "ok": False}
    finally:
        await client.close_async()
        await first.close(stop_clients=False)
        if second is not None:
            await second.close(stop_clients=False)
