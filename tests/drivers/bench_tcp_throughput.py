"""Loopback throughput of the tcp driver against a plain socket, in one run (not a test).

    .venv/bin/python tests/drivers/bench_tcp_throughput.py [--gib 1] [--part-mib 8]

Sender: `send([small header, 8 MiB part])` per frame, the way the endpoint sends frames.
Receiver: writes every byte into one reused buffer. Baseline: `loop.sock_sendall` /
`loop.sock_recv_into` on raw non-blocking sockets, same loop. Each variant runs on the stdlib
asyncio loop and on uvloop; `writelines` is the driver with `transport.writelines()` instead of
one `transport.write()` per part, to show which copies less.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import Sequence

import uvloop

from transport.drivers import TcpDriver
from transport.drivers.base import Buffer, DriverConnection
from transport.drivers.tcp import TcpConnection
from transport.exceptions import TransportError

MiB = 1024 * 1024
HEADER = b"h" * 32


class CountingReceiver:
    """Writes received bytes into one reused buffer and signals when `expected` have arrived."""

    def __init__(self, expected: int) -> None:
        self.buffer = memoryview(bytearray(4 * MiB))
        self.received = 0
        self.expected = expected
        self.done = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: TransportError | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def send_writelines(conn: TcpConnection, parts: Sequence[Buffer]) -> None:
    """TcpConnection.send, but with one writelines() call."""
    conn._transport.writelines(parts)
    if not conn._protocol.can_write.is_set():
        await conn._protocol.can_write.wait()


async def run_driver(total: int, part: bytes, use_writelines: bool) -> float:
    frames = total // len(part)
    expected = frames * (len(part) + len(HEADER))
    receiver_holder: list[CountingReceiver] = []

    def accept(conn: DriverConnection) -> CountingReceiver:
        receiver_holder.append(CountingReceiver(expected))
        return receiver_holder[0]

    driver = TcpDriver()
    listener = await driver.listen("tcp://127.0.0.1:0", accept)
    conn = await driver.connect(listener.url, CountingReceiver(0))
    assert isinstance(conn, TcpConnection)
    view = memoryview(part)
    start = time.perf_counter()
    for _ in range(frames):
        if use_writelines:
            await send_writelines(conn, [HEADER, view])
        else:
            await conn.send([HEADER, view])
    await receiver_holder[0].done
    elapsed = time.perf_counter() - start
    await conn.close()
    await listener.close()
    return expected / elapsed


async def run_raw_socket(total: int, part: bytes) -> float:
    loop = asyncio.get_running_loop()
    frames = total // len(part)
    expected = frames * (len(part) + len(HEADER))
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    for sock in (client, peer):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def receive() -> None:
        buffer = memoryview(bytearray(4 * MiB))
        received = 0
        while received < expected:
            received += await loop.sock_recv_into(peer, buffer)

    start = time.perf_counter()
    receiving = asyncio.ensure_future(receive())
    for _ in range(frames):
        await loop.sock_sendall(client, HEADER)
        await loop.sock_sendall(client, part)
    await receiving
    elapsed = time.perf_counter() - start
    for sock in (client, peer, server):
        sock.close()
    return expected / elapsed


async def run_all(total: int, part: bytes, loop_name: str) -> None:
    raw = await run_raw_socket(total, part)
    write = await run_driver(total, part, use_writelines=False)
    lines = await run_driver(total, part, use_writelines=True)
    print(
        f"{loop_name:8s} raw socket {raw / MiB:7.0f} MiB/s | driver write() "
        f"{write / MiB:7.0f} MiB/s ({write / raw:4.0%}) | driver writelines() "
        f"{lines / MiB:7.0f} MiB/s ({lines / raw:4.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--part-mib", type=int, default=8)
    args = parser.parse_args()
    total = int(args.gib * 1024 * MiB)
    part = bytes(args.part_mib * MiB)
    asyncio.run(run_all(total, part, "asyncio"))
    uvloop.run(run_all(total, part, "uvloop"))


if __name__ == "__main__":
    main()
