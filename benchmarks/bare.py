"""Bare baselines of the same work as benchmarks.samework: the dict's tensors sent from their own
memory and received into fresh tensors (or existing ones), with no tensorwire at all.

- socket: blocking sockets; a small header per tensor, `sendall` of the tensor's memory,
  `recv_into` the target tensor. The raw limit of this machine for this work (TLS: ssl sockets).
- grpc: bare grpc.aio, one bidi-streaming call; the tensors go as 4 MiB `bytes` messages (grpc's
  default message limit; grpc python takes only bytes, so each message is a copy, as for any
  grpc user), copied into the target tensors on arrival; one reply when all arrived.
- aiohttp: one streamed POST with a Content-Length body written from the tensors' memory in 8 MiB
  slices (`StreamWriter.write`), read with `content.readany()` and copied into the targets.

Every receiver checks the tensors against the sender's digests once its clock stopped.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.probes import MIB
from benchmarks.samework import byte_view

if TYPE_CHECKING:
    from benchmarks.samework import Side

_HOST = "127.0.0.1"
_HEADER = struct.Struct("!HQ")  # name length, tensor bytes
_GRPC_MESSAGE = 4 * MIB
_HTTP_SLICE = 8 * MIB
_SERVICE, _METHOD = "tensorwire.bench.Tensors", "Put"


def _shapes(state: dict[str, Any]) -> list[list[Any]]:
    return [[name, tensor.numel() * tensor.element_size()] for name, tensor in state.items()]


def _target(side: Side, shapes: list[list[Any]]) -> dict[str, Any]:
    """Where the tensors land: the existing ones (sink "into") or fresh ones, allocated as they
    arrive, as a receiver of a new dict does."""
    import torch

    existing = side.make_target()
    if existing is not None:
        return existing
    return {name: torch.empty(nbytes // 4, dtype=torch.float32) for name, nbytes in shapes}


# --- blocking sockets ----------------------------------------------------------------------------


def _contexts(side: Side) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    from transport import client_tls, server_tls

    tls_dir = side.settings.get("tls_dir")
    if not tls_dir:
        return None, None
    server = server_tls(Path(tls_dir)).server_context()
    return server, client_tls(Path(tls_dir), "client").client_context()


def send_socket(side: Side) -> dict[str, Any]:
    state = side.make_source()
    _, client_context = _contexts(side)
    sock = socket.create_connection(side.peer_address())
    if client_context is not None:
        sock = client_context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        started_at = time.time()
        sock.sendall(struct.pack("!I", len(state)))
        for name, tensor in state.items():
            view = byte_view(tensor)
            sock.sendall(_HEADER.pack(len(name), view.nbytes) + name.encode())
            sock.sendall(view)
        if sock.recv(1) != b"k":  # the receiver holds every byte
            raise ConnectionError("the bare receiver did not confirm")
        finished_at = time.time()
    return side.report(ready_at=started_at, started_at=started_at, finished_at=finished_at)


def receive_socket(side: Side) -> dict[str, Any]:
    import torch

    server_context, _ = _contexts(side)
    existing = side.make_target()
    with socket.create_server((_HOST, 0)) as listener:
        side.publish(listener.getsockname()[:2])
        sock, _ = listener.accept()
    if server_context is not None:
        sock = server_context.wrap_socket(sock, server_side=True)
    received: dict[str, Any] = {}
    with sock:
        (count,) = struct.unpack("!I", _recv_exactly(sock, 4))
        for _ in range(count):
            name_length, nbytes = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
            name = _recv_exactly(sock, name_length).decode()
            tensor = existing[name] if existing else torch.empty(nbytes // 4, dtype=torch.float32)
            _recv_into(sock, byte_view(tensor))
            received[name] = tensor
        finished_at = time.time()
        sock.sendall(b"k")
    side.check(received)
    return side.report(finished_at=finished_at)


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    buffer = bytearray(count)
    _recv_into(sock, memoryview(buffer))
    return bytes(buffer)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        count = sock.recv_into(view)
        if not count:
            raise ConnectionError("the bare sender closed early")
        view = view[count:]


# --- grpc.aio ------------------------------------------------------------------------------------


_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


async def send_grpc(side: Side) -> dict[str, Any]:
    import grpc.aio

    from benchmarks.baselines_grpc import _client_credentials

    state = side.make_source()
    address = f"{_HOST}:{side.peer_address()}"
    tls = _bare_tls(side)
    channel = (
        grpc.aio.secure_channel(address, _client_credentials(tls), options=_grpc_options(tls))
        if tls
        else grpc.aio.insecure_channel(address, options=_UNLIMITED)
    )
    async with channel:
        call = channel.stream_stream(f"/{_SERVICE}/{_METHOD}")()
        started_at = time.time()
        await call.write(json.dumps(_shapes(state)).encode())
        for tensor in state.values():
            view = byte_view(tensor)
            for start in range(0, view.nbytes, _GRPC_MESSAGE):
                await call.write(bytes(view[start : start + _GRPC_MESSAGE]))
        await call.done_writing()
        if await call.read() != b"k":
            raise ConnectionError("the bare grpc receiver did not confirm")
        finished_at = time.time()
    return side.report(ready_at=started_at, started_at=started_at, finished_at=finished_at)


def _bare_tls(side: Side) -> Any:
    """One TLSConfig for both ends of the bare grpc and aiohttp baselines (server-authenticated)."""
    from benchmarks.baselines import _both_ends

    return _both_ends(side.settings.get("tls_dir"))


def _grpc_options(tls: Any) -> list[tuple[str, Any]]:
    return [*_UNLIMITED, ("grpc.ssl_target_name_override", tls.server_hostname)]


async def receive_grpc(side: Side) -> dict[str, Any]:
    import asyncio

    import grpc.aio

    from benchmarks.baselines_grpc import _server_credentials

    done: asyncio.Future[tuple[dict[str, Any], float]] = asyncio.get_running_loop().create_future()

    async def put(requests: Any, _context: Any) -> Any:
        filler = _Filler(side, json.loads(await anext(requests)))
        async for message in requests:
            filler.add(message)
        done.set_result((filler.finish(), time.time()))
        yield b"k"

    server = grpc.aio.server(options=_UNLIMITED)
    handler = grpc.stream_stream_rpc_method_handler(put)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: handler}),)
    )
    tls = _bare_tls(side)
    address = f"{_HOST}:0"
    if tls:
        port = server.add_secure_port(address, _server_credentials(tls))
    else:
        port = server.add_insecure_port(address)
    await server.start()
    side.publish(port)
    received, finished_at = await done
    await server.stop(grace=5)
    side.check(received)
    return side.report(finished_at=finished_at)


class _Filler:
    """Copies a byte stream into the target tensors in order."""

    def __init__(self, side: Side, shapes: list[list[Any]]) -> None:
        self._target = _target(side, shapes)
        self._views = [byte_view(self._target[name]) for name, _ in shapes]
        self._index = 0
        self._offset = 0

    def add(self, data: Any) -> None:
        data = memoryview(data).cast("B")
        while data.nbytes:
            view = self._views[self._index]
            count = min(data.nbytes, view.nbytes - self._offset)
            view[self._offset : self._offset + count] = data[:count]
            data = data[count:]
            self._offset += count
            if self._offset == view.nbytes:
                self._index, self._offset = self._index + 1, 0

    def finish(self) -> dict[str, Any]:
        if self._index != len(self._views):
            raise ConnectionError(f"the stream ended at tensor {self._index} of {len(self._views)}")
        return self._target


# --- aiohttp -------------------------------------------------------------------------------------


async def send_aiohttp(side: Side) -> dict[str, Any]:
    import aiohttp

    state = side.make_source()
    tls = _bare_tls(side)
    context: Any = False
    if tls is not None:
        from transport import TLSConfig

        context = TLSConfig(ca_file=tls.ca_file, server_hostname=None).client_context()
    body = _tensor_body([byte_view(tensor) for tensor in state.values()])
    headers = {"x-tensors": json.dumps(_shapes(state))}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context), timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        started_at = time.time()
        async with session.post(side.peer_address(), data=body, headers=headers) as response:
            if await response.read() != b"k":
                raise ConnectionError(f"the bare aiohttp receiver answered {response.status}")
        finished_at = time.time()
    return side.report(ready_at=started_at, started_at=started_at, finished_at=finished_at)


def _tensor_body(views: list[memoryview]) -> Any:
    from aiohttp.payload import Payload

    class TensorBody(Payload):
        """The tensors' memory as a Content-Length body, written slice by slice."""

        def __init__(self) -> None:
            super().__init__(None, content_type="application/octet-stream")
            self._size = sum(view.nbytes for view in views)

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            raise TypeError("binary body")

        async def write(self, writer: Any) -> None:
            for view in views:
                for start in range(0, view.nbytes, _HTTP_SLICE):
                    await writer.write(view[start : start + _HTTP_SLICE])

    return TensorBody()


async def receive_aiohttp(side: Side) -> dict[str, Any]:
    import asyncio

    from aiohttp import web

    done: asyncio.Future[tuple[dict[str, Any], float]] = asyncio.get_running_loop().create_future()

    async def put(request: web.Request) -> web.Response:
        filler = _Filler(side, json.loads(request.headers["x-tensors"]))
        while data := await request.content.readany():
            filler.add(data)
        done.set_result((filler.finish(), time.time()))
        return web.Response(body=b"k")

    app = web.Application()
    app.router.add_post("/tensors", put)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    tls = _bare_tls(side)
    site = web.TCPSite(runner, _HOST, 0, ssl_context=tls.server_context() if tls else None)
    await site.start()
    scheme = "https" if tls else "http"
    side.publish(f"{scheme}://{_HOST}:{runner.addresses[0][1]}/tensors")
    received, finished_at = await done
    await runner.cleanup()  # waits for the response to go out
    side.check(received)
    return side.report(finished_at=finished_at)


SENDERS = {"socket": send_socket, "grpc": send_grpc, "aiohttp": send_aiohttp}
RECEIVERS = {"socket": receive_socket, "grpc": receive_grpc, "aiohttp": receive_aiohttp}
