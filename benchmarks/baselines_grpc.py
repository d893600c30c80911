"""grpc throughput on loopback: bare grpc.aio, the tensorwire grpc driver, and the full Endpoint.

    .venv/bin/python -m benchmarks.baselines_grpc --size 1GiB --message-size 8MiB [--tls]

Each measurement has a receiving grpc server in a spawned child process and the sender in this
process (under uvloop), so the two sides do not share a core's event loop:

- `bare_grpc_throughput`: plain grpc.aio, one client-streaming call of `message_size` bytes messages
  (no tensorwire at all: no framing, no checksums); the raw grpc limit in this run.
- `driver_throughput`: GrpcDriver connections, `send([header, part])` per frame as the endpoint
  sends frames; the receiver copies every byte into one reused buffer.
- `endpoint_throughput`: `Peer.send_state_dict(SyntheticSource)` into a `DigestSink` over grpc://,
  via benchmarks.stream's halves.

The sender's clock runs from the first write until the receiver confirmed it had every byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
import traceback
from typing import Any

import grpc
import grpc.aio

from transport.drivers import TLSConfig

MIB = 1024 * 1024
_HOST = "127.0.0.1"
_SERVICE, _METHOD = "tensorwire.bench.Bytes", "Sink"
# 8 MiB messages exceed grpc's default 4 MB receive limit; nothing else is tuned for the baseline.
_UNLIMITED: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


# --- bare grpc ----------------------------------------------------------------------------------


async def bare_grpc_throughput(nbytes: int, message_size: int, tls: TLSConfig | None) -> float:
    """MB/s of `nbytes` streamed as `message_size`-byte messages over a plain grpc.aio call.

    With `tls`, the server presents cert_file/key_file (and requires a client certificate signed
    by ca_file when require_client_cert), the client verifies against ca_file (server_hostname
    overrides the checked name) and presents the same cert_file/key_file.
    """
    port, answer, child = _start_child(_bare_receiver_child, (tls,))
    try:
        seconds = await _bare_send(port, nbytes, message_size, tls)
        await _child_result(answer)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    return round(nbytes / seconds / 1e6, 1)


async def _bare_send(port: int, nbytes: int, message_size: int, tls: TLSConfig | None) -> float:
    address = f"{_HOST}:{port}"
    if tls is None:
        channel = grpc.aio.insecure_channel(address, options=_UNLIMITED)
    else:
        options = list(_UNLIMITED)
        if tls.server_hostname:
            options.append(("grpc.ssl_target_name_override", tls.server_hostname))
        channel = grpc.aio.secure_channel(address, _client_credentials(tls), options=options)
    async with channel:
        call = channel.stream_unary(f"/{_SERVICE}/{_METHOD}")()
        message = bytes(message_size)
        started = time.perf_counter()
        left = nbytes
        while left > 0:
            await call.write(message if left >= message_size else message[:left])
            left -= message_size
        await call.done_writing()
        received = int(await call)
        seconds = time.perf_counter() - started
    if received != nbytes:
        raise RuntimeError(f"bare grpc receiver got {received} bytes, expected {nbytes}")
    return seconds


def _bare_receiver_child(port_queue: Any, answer: Any, tls: TLSConfig | None) -> None:
    async def serve() -> None:
        done = asyncio.get_running_loop().create_future()

        async def sink(requests: Any, _context: Any) -> bytes:
            count = 0
            async for message in requests:
                count += len(message)
            done.set_result(None)
            return str(count).encode()

        handler = grpc.stream_unary_rpc_method_handler(sink)
        server = grpc.aio.server(options=_UNLIMITED)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: handler}),)
        )
        address = f"{_HOST}:0"
        port = (
            server.add_insecure_port(address)
            if tls is None
            else server.add_secure_port(address, _server_credentials(tls))
        )
        await server.start()
        port_queue.put(port)
        await done
        await server.stop(grace=5)

    _run_child(answer, serve)


def _client_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file) if tls.require_client_cert else None,
        certificate_chain=_read(tls.cert_file) if tls.require_client_cert else None,
    )


def _server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=_read(tls.ca_file) if tls.require_client_cert else None,
        require_client_auth=tls.require_client_cert,
    )


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


# --- the tensorwire driver ----------------------------------------------------------------------


async def driver_throughput(
    nbytes: int, part_size: int, options: dict[str, Any] | None = None
) -> float:
    """MB/s of `nbytes` through GrpcDriver (grpc://), `send([32-byte header, part])` per frame."""
    from transport.drivers.grpc import GrpcDriver, GrpcOptions

    port, answer, child = _start_child(_driver_receiver_child, (nbytes, options or {}))
    try:
        done = asyncio.get_running_loop().create_future()
        receiver = _CountingReceiver(0, done)
        driver = GrpcDriver(GrpcOptions(**(options or {})))
        conn = await driver.connect(f"grpc://{_HOST}:{port}", receiver)
        header, part = b"h" * 32, memoryview(bytearray(part_size))
        started = time.perf_counter()
        left = nbytes
        while left > 0:
            await conn.send([header, part[: max(0, min(part_size, left - 32))]])
            left -= 32 + part_size
        await done  # the receiver closes the connection once it has every byte
        seconds = time.perf_counter() - started
        await conn.close()
        await _child_result(answer)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    return round(nbytes / seconds / 1e6, 1)


class _CountingReceiver:
    """Copies into one reused buffer; resolves `done` when `expected` bytes arrived or on close."""

    def __init__(self, expected: int, done: asyncio.Future[None]) -> None:
        self.buffer = memoryview(bytearray(4 * MIB))
        self.received = 0
        self.expected = expected
        self.done = done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.expected and self.received >= self.expected and not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _driver_receiver_child(
    port_queue: Any, answer: Any, nbytes: int, options: dict[str, Any]
) -> None:
    async def serve() -> None:
        from transport.drivers.grpc import GrpcDriver, GrpcOptions

        done = asyncio.get_running_loop().create_future()
        connections: list[Any] = []

        def accept(conn: Any) -> _CountingReceiver:
            connections.append(conn)
            return _CountingReceiver(nbytes, done)

        driver = GrpcDriver(GrpcOptions(**options))
        listener = await driver.listen(f"grpc://{_HOST}:0", accept)
        port_queue.put(int(listener.url.rsplit(":", 1)[1]))
        await done
        await connections[0].close()
        await listener.close()

    _run_child(answer, serve)


# --- the full endpoint --------------------------------------------------------------------------


def endpoint_throughput(nbytes: int, timeout: float = 3600.0) -> dict[str, Any]:
    """The whole endpoint over grpc://: `python -m benchmarks stream --driver grpc`."""
    import argparse

    from benchmarks import stream

    options = argparse.Namespace(
        driver="grpc", size=nbytes, chunk_size=None, window=None, dtype="BF16", seed=0,
        baseline=False, tls=False, timeout=timeout, cut_every=None, compression="auto",
        values="bytes",
    )  # fmt: skip
    return stream.run(options)


# --- child processes ----------------------------------------------------------------------------


def _start_child(target: Any, args: tuple[Any, ...]) -> tuple[int, Any, Any]:
    """Spawn `target(port_queue, answer_queue, *args)`; return the port it listens on."""
    context = multiprocessing.get_context("spawn")
    port_queue, answer = context.Queue(), context.Queue()
    child = context.Process(target=target, args=(port_queue, answer, *args), daemon=True)
    child.start()
    port = port_queue.get(timeout=120)
    return int(port), answer, child


async def _child_result(answer: Any) -> None:
    result = await asyncio.get_running_loop().run_in_executor(None, answer.get, True, 120)
    if result is not None:
        raise RuntimeError(f"receiver child failed: {result}")


def _run_child(answer: Any, body: Any) -> None:
    try:
        import uvloop

        uvloop.run(body())
        answer.put(None)
    except BaseException:
        answer.put(traceback.format_exc())


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Print one JSON object with the three figures (MB/s) and any option sweeps asked for."""
    from benchmarks.probes import parse_size

    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines_grpc")
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--message-size", type=parse_size, default=parse_size("8MiB"))
    parser.add_argument("--sweep", action="store_true", help="also try GrpcOptions variants")
    parser.add_argument("--skip-endpoint", action="store_true")
    args = parser.parse_args(argv)
    import uvloop

    result: dict[str, Any] = {
        "bytes": args.size,
        "bare_grpc_mb_s": uvloop.run(bare_grpc_throughput(args.size, args.message_size, None)),
        "driver_mb_s": uvloop.run(driver_throughput(args.size, args.message_size)),
    }
    if not args.skip_endpoint:
        result["endpoint_mb_s"] = endpoint_throughput(args.size)["throughput_mb_s"]
    if args.sweep:
        result["sweep"] = {
            json.dumps(variant): uvloop.run(
                driver_throughput(args.size, args.message_size, variant)
            )
            for variant in _SWEEP
        }
    print(json.dumps(result))


_SWEEP: list[dict[str, Any]] = [
    {"bdp_probe": False},
    {"max_frame_size": 1024 * 1024},
    {"max_frame_size": 16 * 1024 * 1024 - 1},
    {"stream_window": 16 * MIB},
    {"stream_window": 16 * MIB, "bdp_probe": False},
    {"write_buffer_size": 8 * MIB},
    {"max_frame_size": 16 * 1024 * 1024 - 1, "stream_window": 16 * MIB},
]

if __name__ == "__main__":
    main()
