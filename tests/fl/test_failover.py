"""A site's client fails over to its fallback URLs when its upstream (a relay, here an FLServer)
is gone, over real loopback sockets with real FLServers.

Failing over: a task being received from the lost upstream is dropped and received again from
the next one; a result being sent is sent again, same transfer id; a task the site already
delivered is refused when the next upstream sends it again. Without fallbacks nothing changes:
the server is waited for until idle_timeout. The fallbacks travel through the environment and
the client config. Hooks for relays: heartbeat_extra and next_task_async.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import fl.client_core
from fl.client import ClientSettings, FLClient, ServerLost
from fl.config import ClientConfig
from fl.daemons import client_settings as settings_of
from fl.model import FLModel
from fl.protocol import HEARTBEAT, HELLO, kind_of
from fl.server import FLServer, Task
from tests.fl.helpers import client_settings, new_server
from transport import Manifest, StateDictSink, StateDictSource, TransferRejectedError

TASK = "job/round-1"


def small_model(value: float = 1.0) -> dict[str, torch.Tensor]:
    """4 MiB and more: several 1 MiB chunks (helpers.SMALL), more than a stream's first grant."""
    return {"w": torch.full((1024, 1024), value), "b": torch.full((16,), value)}


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class StalledSource(StateDictSource):
    """Serves its first chunk only: the transfer stays under way until its sender goes away."""

    def is_ready(self, chunk: Any) -> bool:
        return bool(chunk.index == 0)


class OpenedSink(StateDictSink):
    """Says when a receive began (the client took the transfer and placed its manifest)."""

    opened: asyncio.Event

    def open(self, manifest: Manifest) -> None:
        super().open(manifest)
        OpenedSink.opened.set()


async def start(server: FLServer, url: str = "tcp://127.0.0.1:0") -> str:
    (bound,) = await server.start([url])
    return bound


async def failing_over(url: str, fallbacks: list[str], **changes: object) -> FLClient:
    """A started client of `url` that turns to `fallbacks` after 0.5 s without an answer."""
    changes = {"failover_after": 0.5, "fallback_urls": tuple(fallbacks), **changes}
    client = FLClient(client_settings(url, "site", **changes))
    await client.start_async()
    return client


def expect_result(server: FLServer, task_id: str) -> asyncio.Future[Any]:
    """Make `server` expect the site's result for `task_id` without sending the task (as a
    server that saw the heartbeat's task does); the future gets the result's transfer."""
    expected = Task(task_id, "train", ["site"])
    expected.arrivals["site"] = asyncio.get_running_loop().create_future()
    server.tasks[task_id] = expected
    return expected.arrivals["site"]


def filled_with(params: Mapping[str, torch.Tensor], value: float) -> bool:
    return all(bool((tensor == value).all()) for tensor in params.values())


async def test_a_task_being_received_when_its_upstream_dies_comes_from_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    OpenedSink.opened = asyncio.Event()
    monkeypatch.setattr(fl.client_core, "StateDictSink", OpenedSink)
    first, second = new_server(job="job"), new_server(job="job")
    url_a, url_b = await start(first), await start(second)
    client = await failing_over(url_a, [url_b])
    try:
        assert await first.wait_for_clients(1, 10) == ["site"]
        stalled = StalledSource(small_model(1.0), chunk_size=1 << 20)
        sent_by_a = first.send_model(FLModel(params=stalled), ["site"], task_id=TASK)
        receiving = asyncio.ensure_future(client.receive_async())
        await asyncio.wait_for(OpenedSink.opened.wait(), 10)  # the model is on its way

        await first.close(stop_clients=False)  # gone without a word: no STOP
        assert await second.wait_for_clients(1, 10) == ["site"]  # the client failed over
        assert not receiving.done()  # the script's receive still waits, without an error
        second.send_model(FLModel(params=small_model(5.0), current_round=0), ["site"], task_id=TASK)

        received = await asyncio.wait_for(receiving, 10)
        assert client.current is not None
        assert client.current.task_id == TASK
        assert isinstance(received.params, dict)
        assert filled_with(received.params, 5.0)  # B's model, whole
        sent_by_a.sends["site"].cancel()
    finally:
        await client.close_async()
        await first.close(stop_clients=False)
        await second.close(stop_clients=False)


async def test_a_task_queued_and_not_taken_when_its_upstream_dies_comes_from_the_next() -> None:
    first, second = new_server(job="job"), new_server(job="job")
    url_a, url_b = await start(first), await start(second)
    client = await failing_over(url_a, [url_b])
    try:
        assert await first.wait_for_clients(1, 10) == ["site"]
        first.send_model(FLModel(params=small_model(1.0), current_round=0), ["site"], task_id=TASK)
        assert await asyncio.wait_for(client.is_running_async(), 10)  # queued, not taken

        await first.close(stop_clients=False)
        assert await second.wait_for_clients(1, 10) == ["site"]
        second.send_model(FLModel(params=small_model(5.0), current_round=0), ["site"], task_id=TASK)
        received = await asyncio.wait_for(client.receive_async(), 10)
        assert isinstance(received.params, dict)
        assert filled_with(received.params, 5.0)  # A's dead transfer was refused, not received
    finally:
        await client.close_async()
        await first.close(stop_clients=False)
        await second.close(stop_clients=False)


async def test_a_result_being_sent_when_its_upstream_dies_goes_to_the_next() -> None:
    first, second = new_server(job="job"), new_server(job="job")
    url_a, url_b = await start(first), await start(second)
    arrival_at_b = expect_result(second, TASK)
    client = await failing_over(url_a, [url_b])
    try:
        assert await first.wait_for_clients(1, 10) == ["site"]
        at_a = first.send_model(
            FLModel(params=small_model(), current_round=0), ["site"], task_id=TASK
        )
        await asyncio.wait_for(client.receive_async(), 10)
        result = FLModel(params=small_model(2.0), metrics={"loss": 0.5}, meta={"sample_count": 7})
        sending = asyncio.ensure_future(client.send_async(result))
        # Nobody gathers at A: the result arrives and waits there, its sender out of credit.
        await asyncio.wait_for(asyncio.shield(at_a.arrivals["site"]), 10)

        await first.close(stop_clients=False)
        transfer = await asyncio.wait_for(arrival_at_b, 10)
        assert transfer.transfer_id == f"{TASK}/site/result"  # the same transfer, again
        assert transfer.meta["metrics"] == {"loss": 0.5}
        assert transfer.meta["meta"] == {"sample_count": 7}
        assert not sending.done()  # sent once B commits it, not before
        again = await asyncio.wait_for(transfer.receive_into(StateDictSink()), 10)
        assert filled_with(again, 2.0)
        assert await asyncio.wait_for(sending, 10) is not None
        assert client.sent_task_id == TASK
    finally:
        await client.close_async()
        await first.close(stop_clients=False)
        await second.close(stop_clients=False)


async def test_a_task_the_site_already_delivered_is_refused_by_it_after_a_failover() -> None:
    first, second = new_server(job="job"), new_server(job="job")
    url_a, url_b = await start(first), await start(second)
    client = await failing_over(url_a, [url_b])
    try:
        assert await first.wait_for_clients(1, 10) == ["site"]
        at_a = first.send_model(
            FLModel(params=small_model(), current_round=0), ["site"], task_id=TASK
        )
        await asyncio.wait_for(client.receive_async(), 10)
        sending = asyncio.ensure_future(client.send_async(FLModel(params=small_model(2.0))))
        (gathered,) = await asyncio.wait_for(first.gather(at_a), 10)
        assert gathered.ok, gathered.error
        assert await asyncio.wait_for(sending, 10) is not None

        await first.close(stop_clients=False)
        assert await second.wait_for_clients(1, 10) == ["site"]
        again = second.send_model(
            FLModel(params=small_model(), current_round=0), ["site"], task_id=TASK
        )
        with pytest.raises(TransferRejectedError, match="already holds task"):
            await asyncio.wait_for(again.sends["site"], 10)
        assert client.sent_task_id == TASK  # still offered, for a RESEND
        assert client._next is None  # the script is not handed it to train again
    finally:
        await client.close_async()
        await first.close(stop_clients=False)
        await second.close(stop_clients=False)


async def test_a_site_whose_first_url_is_down_joins_the_fallback() -> None:
    async with new_server() as server:
        url = await start(server)
        client = await failing_over(dead_url(), [url], connect_timeout=10.0)
        try:
            assert await server.wait_for_clients(1, 10) == ["site"]
            assert client._upstreams is not None
            assert client._upstreams.url == url
        finally:
            await client.close_async()


async def test_without_fallbacks_the_server_is_waited_for_until_idle_timeout() -> None:
    server = new_server()
    url = await start(server)
    settings = client_settings(url, "site", idle_timeout=2.0, failover_after=0.3)
    client = FLClient(settings)
    await client.start_async()
    peer = client.peer
    try:
        assert await server.wait_for_clients(1, 10) == ["site"]
        await server.close(stop_clients=False)
        gone = time.monotonic()
        with pytest.raises(ServerLost, match=f"no answer from {url}"):
            await asyncio.wait_for(client.is_running_async(), 30)
        assert time.monotonic() - gone >= 2.0 - 0.2  # idle_timeout, not failover_after
        assert client.peer is peer  # never left it
    finally:
        await client.close_async()


async def test_with_every_upstream_gone_the_server_is_lost_after_idle_timeout() -> None:
    server = new_server()
    url = await start(server)
    client = await failing_over(url, [dead_url()], idle_timeout=2.0)
    try:
        assert await server.wait_for_clients(1, 10) == ["site"]
        await server.close(stop_clients=False)
        gone = time.monotonic()
        with pytest.raises(ServerLost, match="no answer from any of"):
            await asyncio.wait_for(client.is_running_async(), 30)
        assert time.monotonic() - gone >= 2.0 - 0.2  # idle_timeout since the last heartbeat
    finally:
        await client.close_async()


async def test_heartbeat_extra_goes_with_every_hello_and_heartbeat() -> None:
    async with new_server() as server:
        seen: list[dict[str, Any]] = []
        both = asyncio.Event()
        original = server._serve_request

        async def recording(peer: Any, header: Mapping[str, Any], body: bytes) -> Any:
            seen.append(dict(header))
            if {kind_of(h) for h in seen} >= {HELLO, HEARTBEAT}:
                both.set()
            return await original(peer, header, body)

        server._serve_request = recording  # type: ignore[method-assign]
        url = await start(server)  # (which hands the endpoint the recording one)
        client = FLClient(client_settings(url, "site"))
        client.heartbeat_extra = lambda: {"sites": ["s1", "s2"], "fl": "not-this"}
        await client.start_async()
        try:
            await asyncio.wait_for(both.wait(), 10)
            for header in seen[:2]:
                assert header["sites"] == ["s1", "s2"]
                assert kind_of(header) in (HELLO, HEARTBEAT)  # the protocol's fields win
                assert header["task_id"] is None
                assert header["sent"] is None
        finally:
            await client.close_async()


async def test_next_task_async_says_what_comes_without_taking_it() -> None:
    async with new_server() as server:
        url = await start(server)
        client = FLClient(client_settings(url, "site"))
        await client.start_async()
        try:
            await server.wait_for_clients(1, 10)
            server.send_model(
                FLModel(params=small_model(3.0), current_round=2), ["site"], task_id=TASK
            )
            info = await asyncio.wait_for(client.next_task_async(), 10)
            assert info is not None
            assert (info.task_id, info.round) == (TASK, 2)
            assert await client.next_task_async() == info  # still there
            received = await asyncio.wait_for(client.receive_async(), 10)
            assert isinstance(received.params, dict)
            assert filled_with(received.params, 3.0)
            await server.stop_clients("done")
            assert await asyncio.wait_for(client.next_task_async(), 10) is None
        finally:
            await client.close_async()


def test_fallbacks_travel_through_the_environment_and_the_client_config() -> None:
    settings = ClientSettings(
        server_url="tcps://relay.example:8770",
        site="site-7",
        fallback_urls=("tcps://server.example:8765", "tcps://relay-2.example:8770"),
        failover_after=1.5,
    )
    env = settings.environment()
    assert env["TENSORWIRE_FALLBACKS"] == "tcps://server.example:8765 tcps://relay-2.example:8770"
    assert ClientSettings.from_env(env) == settings
    plain = ClientSettings(server_url="tcp://s:1", site="x")
    assert ClientSettings.from_env(plain.environment()) == plain  # none, and the default delay
    assert plain.failover_delay() == 3 * plain.heartbeat_interval
    assert settings.failover_delay() == 1.5

    config = ClientConfig.model_validate(
        {
            "server": "tcps://relay.example:8770",
            "fallbacks": ["tcps://server.example:8765"],
            "site": "site-7",
            "script": "train.py",
        }
    )
    assert settings_of(config).fallback_urls == ("tcps://server.example:8765",)
