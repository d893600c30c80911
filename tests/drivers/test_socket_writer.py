"""Plain tcp and http send from the parts' own memory (transport/drivers/socket_writer.py): a send
the peer does not read leaves nothing in the loop's write buffer, on the stock loop as on uvloop,
and a connection closed under a blocked send fails that send at once."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from tests.drivers.conftest import Certs, DriverUnderTest, make_driver_under_test
from tests.drivers.receivers import RecordingReceiver
from transport.drivers.base import DriverConnection
from transport.exceptions import ConnectionClosedError

MiB = 1024 * 1024
PLAIN_KINDS = ("tcp", "http")


@pytest.fixture(params=PLAIN_KINDS)
async def plain(request: pytest.FixtureRequest, certs: Certs) -> AsyncIterator[DriverUnderTest]:
    under_test = make_driver_under_test(request.param, certs, small_buffers=True)
    try:
        yield under_test
    finally:
        await under_test.aclose()


async def _blocked_send(
    plain: DriverUnderTest, payload: bytes
) -> tuple[DriverConnection, DriverConnection, RecordingReceiver, asyncio.Task[None]]:
    """A send of `payload` to a peer that stopped reading, run until it waits for the kernel."""
    listener = await plain.listen()
    conn = await plain.connect(listener.url, RecordingReceiver())
    await conn.send([b"hello"])
    receiver = await plain.accepted_receiver()
    await receiver.wait_for_bytes(5)
    accepted = plain.accepted[0][0]
    accepted.pause_reading()
    sending = asyncio.ensure_future(conn.send([memoryview(payload)[:1], memoryview(payload)[1:]]))
    for _ in range(200):  # loop turns, not time: the send fills the kernel's buffers and waits
        await asyncio.sleep(0)
    return conn, accepted, receiver, sending


async def test_a_send_the_peer_does_not_read_copies_nothing_into_the_loops_buffer(
    plain: DriverUnderTest,
) -> None:
    payload = os.urandom(24 * MiB)
    conn, accepted, receiver, sending = await _blocked_send(plain, payload)
    assert not sending.done(), "24 MiB cannot fit in the kernel's buffers of a paused reader"
    assert conn._transport.get_write_buffer_size() == 0  # type: ignore[attr-defined]
    accepted.resume_reading()
    await receiver.wait_for_bytes(5 + len(payload), seconds=30)
    await asyncio.wait_for(sending, 10)
    assert bytes(receiver.data[5:]) == payload


async def test_closing_under_a_blocked_send_fails_it_at_once(plain: DriverUnderTest) -> None:
    conn, accepted, receiver, sending = await _blocked_send(plain, bytes(24 * MiB))
    assert not sending.done()
    conn.abort()
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(sending, 10)
    accepted.resume_reading()
    await asyncio.wait_for(receiver.lost, 10)  # and the peer, reading again, sees it end
