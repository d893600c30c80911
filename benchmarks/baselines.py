"""The bare transports tensorwire is measured against, in the same run: what the machine and the
library can do without framing, checksums, flow control or chunking.

- tcp: a plain uvloop socket (TLS: the same through asyncio's ssl), the sender writing one reused
  8 MiB block, the receiver reading into one reused 1 MiB buffer, in two processes.
- grpc: bare grpc.aio streaming 8 MiB bytes messages (benchmarks/baselines_grpc.py).
- http: bare aiohttp streaming an 8 MiB-block request body (benchmarks/baselines_http.py).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import ssl
import time
from pathlib import Path
from typing import Any, cast

from benchmarks.probes import MIB, run_children, run_in_uvloop
from transport import TLSConfig, client_tls, server_tls

_HOST = "127.0.0.1"
_BLOCK = 8 * MIB


def raw_throughput(driver: str, size: int, tls_dir: str | None, timeout: float) -> float | None:
    """MB/s of the bare transport for `driver`; None where there is none (memory)."""
    if driver == "tcp":
        return _raw_tcp(size, tls_dir, timeout)
    if driver == "grpc":
        from benchmarks.baselines_grpc import bare_grpc_throughput

        return round(asyncio.run(bare_grpc_throughput(size, _BLOCK, _both_ends(tls_dir))), 1)
    if driver == "http":
        from benchmarks.baselines_http import bare_aiohttp_throughput

        tls = _both_ends(tls_dir, hostname=None)
        return round(asyncio.run(bare_aiohttp_throughput(size, _BLOCK, tls)), 1)
    return None


def _both_ends(tls_dir: str | None, hostname: str | None = "localhost") -> TLSConfig | None:
    """The bare grpc/aiohttp baselines take one TLSConfig for both ends: server-authenticated
    TLS with the server certificate (the client certificate handshake tensorwire adds costs
    nothing per byte)."""
    if tls_dir is None:
        return None
    server = server_tls(Path(tls_dir), require_client_cert=False)
    return TLSConfig(
        ca_file=server.ca_file,
        cert_file=server.cert_file,
        key_file=server.key_file,
        require_client_cert=False,
        server_hostname=hostname,
    )


def _client(tls_dir: str | None) -> TLSConfig | None:
    return client_tls(Path(tls_dir), "client") if tls_dir else None


def _raw_tcp(size: int, tls_dir: str | None, timeout: float) -> float:
    port_queue: Any = multiprocessing.get_context("spawn").Queue()
    receiver, sender = run_children(
        [
            (_raw_receiver_child, (size, tls_dir, port_queue)),
            (_raw_sender_child, (size, tls_dir, port_queue)),
        ],
        timeout=timeout,
    )
    seconds = receiver["finished_at"] - sender["started_at"]
    return round(size / seconds / 1e6, 1)


def _raw_receiver_child(queue: Any, size: int, tls_dir: str | None, port_queue: Any) -> None:
    run_in_uvloop("raw receiver", queue, lambda: _raw_receive(size, tls_dir, port_queue.put))


def _raw_sender_child(queue: Any, size: int, tls_dir: str | None, port_queue: Any) -> None:
    port = port_queue.get(timeout=120)
    run_in_uvloop("raw sender", queue, lambda: _raw_send(size, tls_dir, port))


class _RawSink(asyncio.BufferedProtocol):
    """Counts bytes into a reused buffer; once all arrived it answers one byte, so the sender
    knows (a sender that closed right after its last write could lose the TLS tail)."""

    def __init__(self, size: int, done: asyncio.Future[float]) -> None:
        self._buffer = bytearray(MIB)
        self._left = size
        self._done = done
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            why = f": {exc}" if exc else ""
            self._done.set_exception(ConnectionError(f"closed {self._left} bytes early{why}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self._left -= nbytes
        if self._left <= 0 and not self._done.done():
            self._done.set_result(time.time())
            cast(asyncio.Transport, self._transport).write(b"k")


def _server_context(tls_dir: str | None) -> ssl.SSLContext | None:
    return server_tls(Path(tls_dir)).server_context() if tls_dir else None


async def _raw_receive(size: int, tls_dir: str | None, publish_port: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    context = _server_context(tls_dir)
    server = await loop.create_server(lambda: _RawSink(size, done), _HOST, 0, ssl=context)
    publish_port(server.sockets[0].getsockname()[1])
    finished_at = await done
    server.close()
    return {"role": "raw receiver", "finished_at": finished_at}


async def _raw_send(size: int, tls_dir: str | None, port: int) -> dict[str, Any]:
    client = _client(tls_dir)
    context = client.client_context() if client else None
    hostname = "localhost" if context else None
    reader, writer = await asyncio.open_connection(
        _HOST, port, ssl=context, server_hostname=hostname
    )
    block = memoryview(bytearray(_BLOCK))
    started_at = time.time()
    left = size
    while left > 0:
        writer.write(block[: min(left, block.nbytes)])
        left -= block.nbytes
        await writer.drain()
    if await reader.readexactly(1) != b"k":
        raise ConnectionError("the raw receiver did not confirm")
    writer.close()
    await writer.wait_closed()
    return {"role": "raw sender", "started_at": started_at}
