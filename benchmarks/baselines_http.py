"""The http driver against bare aiohttp moving the same bytes the same way, in one run.

    python -m benchmarks.baselines_http --size 1GiB --block-size 8MiB [--json]

`bare_aiohttp_throughput` is the limit the driver is measured against: one POST whose chunked
request body streams client->server (chunks framed by hand and written by reference to the
transport), read on the server with `request.content.readany()` and copied into one reused
buffer, with the driver's buffer sizes: the I/O path of `HttpDriver` without tensorwire.
`driver_throughput` sends `[small header, block]` per call through `HttpDriver`, the way the
endpoint sends frames, into a receiver that writes into one reused buffer. `endpoint_throughput`
runs `send_state_dict` of a SyntheticSource into a DigestSink over http:// between two spawned
processes (the halves of `benchmarks.stream`). The first two run both ends in this process, on
uvloop; MB/s is 10^6 bytes/s. The module has the `add_arguments`/`run` shape of the other
benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.payload import Payload

from benchmarks.probes import MIB, parse_size
from transport.drivers import TLSConfig
from transport.drivers.base import DriverConnection
from transport.drivers.http import CONNECT_PATH, HttpDriver, HttpOptions
from transport.exceptions import TransportError

_HOST = "127.0.0.1"
_HEADER = b"h" * 32  # stands in for a frame header
# The driver's defaults (HttpOptions), so the baseline reads and writes the same way.
_READ_BUFSIZE = HttpOptions().read_buffer_size
_WRITE_HIGH_WATER = HttpOptions().write_high_water


async def bare_aiohttp_throughput(nbytes: int, block_size: int, tls: TLSConfig | None) -> float:
    """MB/s of `nbytes` through one streaming aiohttp POST on loopback (no tensorwire).

    With `tls`, the server presents its cert_file/key_file and the client verifies against
    ca_file (and presents cert_file too: the same TLSConfig serves both ends).
    """
    blocks = max(1, nbytes // block_size)
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    runner, url = await _start_bare_server(blocks * block_size, done, tls)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=_client_context(tls)),
            timeout=aiohttp.ClientTimeout(total=None),
            read_bufsize=_READ_BUFSIZE,
        ) as session:
            started = time.perf_counter()
            async with session.post(url, data=_BlockBody(block_size, blocks)) as response:
                await response.read()
            finished = await done
    finally:
        await runner.cleanup()
    return blocks * block_size / (finished - started) / 1e6


def _client_context(tls: TLSConfig | None) -> ssl.SSLContext | bool:
    """The client verifies the server against ca_file and presents no certificate of its own
    (the one TLSConfig carries the server's, which is not valid for client authentication)."""
    if tls is None:
        return False
    return TLSConfig(ca_file=tls.ca_file, server_hostname=tls.server_hostname).client_context()


class _BlockBody(Payload):
    """`blocks` times one block, each as an HTTP chunk framed by hand and written by reference
    straight to the transport (aiohttp's chunked writer would join size line, block and CRLF
    into a new bytes object: a full copy of every block)."""

    def __init__(self, block_size: int, blocks: int) -> None:
        super().__init__(None, content_type="application/octet-stream")
        self._block = memoryview(bytearray(block_size))
        self._blocks = blocks

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("binary body")

    async def write(self, writer: Any) -> None:
        writer.send_headers()
        writer.chunked = False  # the headers announce chunked: we write that framing ourselves
        transport = writer.transport
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER, _WRITE_HIGH_WATER // 4)
        size_line = b"%x\r\n" % self._block.nbytes
        for _ in range(self._blocks):
            transport.write(size_line)
            transport.write(self._block)
            transport.write(b"\r\n")
            await writer.drain()
        transport.write(b"0\r\n\r\n")


async def _start_bare_server(
    expected: int, done: asyncio.Future[float], tls: TLSConfig | None
) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        buffer = memoryview(bytearray(MIB))
        received = 0
        while data := await request.content.readany():
            view = memoryview(data)
            while view.nbytes:  # copy into a reused buffer, as the driver copies into a receiver
                count = min(view.nbytes, buffer.nbytes)
                buffer[:count] = view[:count]
                view = view[count:]
            received += len(data)
        if not done.done():
            done.set_result(time.perf_counter())
        return web.Response(text=str(received))

    app = web.Application(client_max_size=0)
    app.router.add_post(CONNECT_PATH, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, read_bufsize=_READ_BUFSIZE)
    await runner.setup()
    site = web.TCPSite(runner, _HOST, 0, ssl_context=tls.server_context() if tls else None)
    await site.start()
    scheme = "https" if tls else "http"
    return runner, f"{scheme}://{_HOST}:{runner.addresses[0][1]}{CONNECT_PATH}"


class _CountingReceiver:
    """Writes received bytes into one reused buffer; `done` resolves once `expected` arrived."""

    def __init__(self, expected: int) -> None:
        self._buffer = memoryview(bytearray(4 * MIB))
        self._left = expected
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._left -= nbytes
        if self._left <= 0 and not self.done.done():
            self.done.set_result(time.perf_counter())

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: TransportError | None) -> None:
        if self._left > 0 and not self.done.done():
            self.done.set_exception(exc or TransportError("connection closed before the end"))


async def driver_throughput(nbytes: int, block_size: int, tls: TLSConfig | None) -> float:
    """MB/s of `nbytes` sent as send([header, block]) through HttpDriver on loopback."""
    block = memoryview(bytearray(block_size))
    blocks = max(1, nbytes // block_size)
    expected = blocks * (len(_HEADER) + block_size)
    receivers: list[_CountingReceiver] = []

    def accept(conn: DriverConnection) -> _CountingReceiver:
        receivers.append(_CountingReceiver(expected))
        return receivers[-1]

    driver = HttpDriver()
    scheme = "https" if tls else "http"
    listener = await driver.listen(f"{scheme}://{_HOST}:0", accept, tls=tls)
    conn = await driver.connect(listener.url, _CountingReceiver(0), tls=tls)
    started = time.perf_counter()
    for _ in range(blocks):
        await conn.send([_HEADER, block])
    finished = await receivers[0].done
    await conn.close()
    await listener.close()
    return expected / (finished - started) / 1e6


# --- the alternative that lost: a websocket ----------------------------------------------------


async def websocket_throughput(nbytes: int, block_size: int) -> tuple[float, float]:
    """MB/s (client->server, server->client) of `nbytes` each way as binary websocket messages
    (max_msg_size=0, no compression), one direction after the other on one connection."""
    block = memoryview(bytearray(block_size))
    blocks = max(1, nbytes // block_size)
    marks: dict[str, float] = {}

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, compress=False)
        await ws.prepare(request)
        for _ in range(blocks):
            await ws.receive_bytes()
        marks["uploaded"] = marks["download_started"] = time.perf_counter()
        for _ in range(blocks):
            await ws.send_bytes(block)
        await ws.receive()  # the client's close
        return ws

    app = web.Application()
    app.router.add_get(CONNECT_PATH, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, _HOST, 0).start()
    url = f"http://{_HOST}:{runner.addresses[0][1]}{CONNECT_PATH}"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, max_msg_size=0, compress=0) as ws,
        ):
            started = time.perf_counter()
            for _ in range(blocks):
                await ws.send_bytes(block)
            for _ in range(blocks):
                await ws.receive_bytes()
            downloaded = time.perf_counter()
    finally:
        await runner.cleanup()
    moved = blocks * block_size / 1e6
    return moved / (marks["uploaded"] - started), moved / (downloaded - marks["download_started"])


# --- the whole endpoint, two processes ------------------------------------------------------------


def endpoint_throughput(nbytes: int, timeout: float = 3600.0) -> dict[str, Any]:
    """The whole endpoint over http://: `python -m benchmarks stream --driver http`."""
    import argparse

    from benchmarks import stream

    options = argparse.Namespace(
        driver="http", size=nbytes, chunk_size=None, window=None, dtype="BF16", seed=0,
        baseline=False, tls=False, timeout=timeout, cut_every=None, compression="auto",
        values="bytes",
    )  # fmt: skip
    return stream.run(options)


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--block-size", type=parse_size, default=parse_size("8MiB"))
    parser.add_argument("--no-endpoint", action="store_true", help="skip the two-process run")
    parser.add_argument(
        "--websocket", action="store_true", help="also measure the websocket alternative"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    result: dict[str, Any] = {"benchmark": "baselines_http", "bytes": args.size}
    result["bare_aiohttp_mb_s"] = round(
        uvloop.run(bare_aiohttp_throughput(args.size, args.block_size, None)), 1
    )
    result["driver_mb_s"] = round(
        uvloop.run(driver_throughput(args.size, args.block_size, None)), 1
    )
    if args.websocket:
        upload, download = uvloop.run(websocket_throughput(args.size, args.block_size))
        result["websocket_upload_mb_s"] = round(upload, 1)
        result["websocket_download_mb_s"] = round(download, 1)
    if not args.no_endpoint:
        whole = endpoint_throughput(args.size)
        result["endpoint_mb_s"] = whole["throughput_mb_s"]
        result["endpoint_digest_ok"] = whole["digest_ok"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    add_arguments(parser)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
