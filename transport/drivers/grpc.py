"""`grpc://host:port` and `grpcs://host:port` (TLS, optionally mutual) over grpc.aio.

One tensorwire connection is ONE bidirectional streaming RPC, `/tensorwire.Transport/Frames`, on
its own channel (and so its own TCP connection: the channel uses a local subchannel pool instead of
grpc's process-wide one, which would multiplex every connection to a host onto one socket and
defeat striping). Each message is opaque frame bytes: one `send()` call is one message, or several
when it is larger than the message size limit.

No protobuf: the method is registered with `grpc.method_handlers_generic_handler` and called with
`channel.stream_stream(...)`, both with no (de)serializers, so grpc passes `bytes` through. Nothing
is generated at build time and the install stays one command (grpcio alone, no grpcio-tools).

Copies, each unavoidable with grpc python: `send()` joins the parts into bytes objects (grpc
takes one `bytes` per message); grpc copies them into its own slices; on receipt grpc hands a new
`bytes` per message, which is copied into the receiver's `get_buffer()` memory (in pieces when the
receiver's buffer is smaller than the message).

Back-pressure: `send()` awaits grpc's write, which completes only once HTTP/2 flow control took
the message, so a peer that pauses reading (stops pulling messages from the call) stops its
window updates and blocks our `send()`. Messages are pieces of a byte stream, not frames: a
`send()` larger than `GrpcOptions.max_message_size` goes out as several messages, and the receiver
refuses bigger ones (grpc holds a whole message in memory before handing it over, so that size is
what one message can cost a receiver, before any HELLO). There is no 2-4 GB ceiling on a send.

Admission: grpc core accepts connections and runs TLS and HTTP/2 setup out of Python's sight; the
listener turns its HandshakeGate into grpc's own limits instead (see HandshakeGate).

Life cycle, mirroring tcp: the server sends initial metadata (a marker that it speaks tensorwire)
right after `accept()`, and `connect()` waits for it, so a closed port or a refused TLS handshake is
a ConnectError at connect time. `close()` half-closes our side (client: done_writing; server: end
of the response stream) and waits for the call to end; the peer sees `eof_received()` and
`connection_lost(None)` and ends its side in turn. `abort()` cancels the call (server: ends it with
status ABORTED); the peer sees `connection_lost(ConnectionClosedError)` naming the grpc status.

Peer identities: the server reports the verified client certificate's subject CN (grpcs with
`require_client_cert`). grpc python does not expose the server's certificate to the client, so
`PeerInfo.peer_identity` is None on the connecting side (the server was still verified against
`ca_file` and the host name, or `server_hostname`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import unquote

import grpc
import grpc.aio

from transport.drivers.base import (
    AcceptCallback,
    Buffer,
    ByteReceiver,
    Driver,
    DriverConnection,
    HandshakeGate,
    Listener,
    PeerInfo,
    TLSConfig,
    byte_view,
    describe_error,
    format_host_port,
    parse_host_port_url,
)
from transport.drivers.grpc_config import (
    GrpcOptions,
    channel_credentials,
    refuse_tls_for_plain,
    server_credentials,
)
from transport.exceptions import (
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    TransportError,
)

__all__ = ["GrpcConnection", "GrpcDriver", "GrpcListener", "GrpcOptions"]

logger = logging.getLogger(__name__)

SERVICE_NAME = "tensorwire.Transport"
METHOD_NAME = "Frames"
METHOD_PATH = f"/{SERVICE_NAME}/{METHOD_NAME}"
# Initial metadata the server sends once it accepted the call: proof that a tensorwire server
# answered (not some other grpc service) and that the RPC is established.
_READY_KEY = "tensorwire-ready"
# Listener.close() stops accepting but must leave open connections alone; grpc's stop(grace)
# cancels every call when the grace ends, so the grace is effectively forever.
_LISTENER_CLOSE_GRACE_S = 365 * 24 * 3600.0
# What grpc.aio raises from a call that broke under it. grpc.aio.BaseError covers UsageError and
# the InternalError / ExecuteBatchError a write on a call reset mid-message raises.
_RPC_ERRORS = (grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError, RuntimeError)

# --- connections --------------------------------------------------------------------------------


class GrpcConnection(DriverConnection):
    """One streaming RPC seen from one side; see DriverConnection.

    Subclasses supply the four native operations (read, write, half-close, cancel); this class
    does delivery into the receiver, pausing, closing and error mapping.
    """

    def __init__(self, peer: PeerInfo, describe: str, message_limit: int) -> None:
        self.peer = peer
        self._describe = describe
        self._message_limit = message_limit
        self._receiver: ByteReceiver | None = None
        self._write_lock = asyncio.Lock()
        self._may_read = asyncio.Event()
        self._may_read.set()
        self._closing = False  # close() or abort() called here: deliver nothing more
        self._aborted = False
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._describe} closed={self.closed}>"

    # --- the native call, per side ------------------------------------------------------------

    @abstractmethod
    async def _read_message(self) -> bytes | None:
        """The next message, or None at the peer's orderly end of stream."""

    @abstractmethod
    async def _write_message(self, message: bytes) -> None:
        """Write one message; returns once grpc (and HTTP/2 flow control) took it."""

    @abstractmethod
    async def _end_writing(self) -> None:
        """Half-close our sending side; the call ends once the peer ends its side."""

    @abstractmethod
    def _cancel_call(self) -> None:
        """End the call now, dropping what is in flight."""

    # --- sending -----------------------------------------------------------------------------

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Send the parts as grpc messages (one unless they exceed the message size limit);
        returns once grpc's flow control took the last."""
        messages = _messages(parts, self._message_limit)
        self._raise_if_closed()
        async with self._write_lock:
            self._raise_if_closed()
            try:
                for message in messages:
                    await self._write_message(message)
            except asyncio.CancelledError:
                if _current_task_cancelling():
                    raise
                # grpc raises CancelledError from a write on a call cancelled by abort().
                raise self._send_failed("the call was cancelled") from None
            except _RPC_ERRORS as exc:
                raise self._send_failed(_describe_rpc_error(exc)) from exc

    def _send_failed(self, why: str) -> ConnectionClosedError:
        return ConnectionClosedError(f"cannot send to {self._describe}: {why}")

    def _raise_if_closed(self) -> None:
        if self.closed:
            raise self._send_failed("the connection is closed")

    # --- receiving ---------------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop pulling messages from the call; grpc's flow control then throttles the peer."""
        self._may_read.clear()

    def resume_reading(self) -> None:
        """Pull messages again."""
        self._may_read.set()

    def _start_reading(self, receiver: ByteReceiver) -> None:
        self._receiver = receiver
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    message = await self._next_message()
                except _RPC_ERRORS as exc:
                    self._finish(None if self._aborted else self._lost_error(exc))
                    return
                if message is None:
                    break
                await self._deliver(message)
        except asyncio.CancelledError:
            if not self._closing:
                self._finish(ConnectionClosedError(f"{self._describe}: the call was cancelled"))
            raise
        except Exception as exc:
            logger.exception("receiver of %r failed; aborting the connection", self)
            self._finish(self._lost_error(exc))
            self._abort_call()
            return
        await self._peer_ended()

    async def _next_message(self) -> bytes | None:
        if not self._may_read.is_set():
            await self._may_read.wait()
        return await self._read_message()

    async def _deliver(self, message: bytes) -> None:
        """Copy one message into the receiver's buffers, stopping while reading is paused."""
        view = memoryview(message)
        offset = 0
        while offset < len(view):
            if not self._may_read.is_set():
                await self._may_read.wait()
            if self._closing or self._receiver is None:
                return  # closed here: what still arrives is drained and dropped
            buffer = self._receiver.get_buffer(len(view) - offset)
            count = min(len(buffer), len(view) - offset)
            if count == 0:
                raise ValueError("get_buffer() returned an empty buffer")
            buffer[:count] = view[offset : offset + count]
            offset += count
            self._receiver.buffer_updated(count)

    async def _peer_ended(self) -> None:
        """The peer half-closed: report eof, then end our side too (a half-open call is of no
        use to us, as with tcp)."""
        if not self._closing and self._receiver is not None:
            self._closing = True
            # grpc hands over the end of stream together with the last message; a socket sees
            # it in a later loop turn. Do the same, so tasks woken by the last bytes run before
            # eof fails what is still waiting.
            await asyncio.sleep(0)
            self._receiver.eof_received()
        await self._half_close()
        self._on_read_side_done()

    def _on_read_side_done(self) -> None:
        """Called once the peer's stream ended in order; subclasses finish when the call is."""

    def _lost_error(self, exc: BaseException) -> ConnectionClosedError:
        error = ConnectionClosedError(f"{self._describe} lost: {_describe_rpc_error(exc)}")
        error.__cause__ = exc
        return error

    # --- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Half-close our side after the write in flight, then wait until the call ended."""
        if not self._lost.done():
            self._closing = True
            self._may_read.set()  # drain (and drop) the rest so the peer can finish
            try:
                await self._half_close()
                await asyncio.shield(self._lost)
            except asyncio.CancelledError:
                self.abort()
                raise

    async def _half_close(self) -> None:
        async with self._write_lock:
            with contextlib.suppress(*_RPC_ERRORS):
                await self._end_writing()

    def abort(self) -> None:
        """Cancel the call now; the peer gets connection_lost(ConnectionClosedError)."""
        if self._lost.done():
            return
        self._closing = self._aborted = True
        self._may_read.set()
        self._abort_call()
        self._finish(None)

    def _abort_call(self) -> None:
        self._cancel_call()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()

    def _finish(self, error: TransportError | None) -> None:
        """The connection is over: tell the receiver once, wake close() and senders."""
        if self._lost.done():
            return
        self._closing = True
        self._lost.set_result(None)
        self._may_read.set()
        if self._receiver is not None:
            asyncio.get_running_loop().call_soon(self._receiver.connection_lost, error)
        self._release()

    def _release(self) -> None:
        """Free per-connection resources (the client's channel)."""

    @property
    def closed(self) -> bool:
        """True once close() or abort() was called, or the call ended."""
        return self._closing or self._lost.done()


def _messages(parts: Sequence[Buffer], limit: int) -> list[bytes]:
    """The parts as messages of at most `limit` bytes. grpc python takes one bytes object per
    message: each byte is copied once (joined), unless a single part already is one message."""
    if len(parts) == 1 and isinstance(parts[0], bytes) and 0 < len(parts[0]) <= limit:
        return [parts[0]]
    messages: list[bytes] = []
    pieces: list[memoryview] = []
    size = 0
    for part in parts:
        view = byte_view(part)
        while view.nbytes:
            take = min(limit - size, view.nbytes)
            pieces.append(view[:take])
            view = view[take:]
            size += take
            if size == limit:
                messages.append(b"".join(pieces))
                pieces, size = [], 0
    if pieces:
        messages.append(b"".join(pieces))
    return messages


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe_rpc_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc status {exc.code().name}: {exc.details() or '(no details)'}"
    return describe_error(exc)


class _ClientConnection(GrpcConnection):
    """The connecting side: a StreamStreamCall on a channel of its own."""

    def __init__(
        self, peer: PeerInfo, url: str, channel: grpc.aio.Channel, call: Any, message_limit: int
    ) -> None:
        super().__init__(peer, url, message_limit)
        self._channel = channel
        self._call = call

    async def _read_message(self) -> bytes | None:
        message = await self._call.read()
        return None if message is grpc.aio.EOF else bytes(message)

    async def _write_message(self, message: bytes) -> None:
        await self._call.write(message)

    async def _end_writing(self) -> None:
        await self._call.done_writing()

    def _cancel_call(self) -> None:
        self._call.cancel()

    def _on_read_side_done(self) -> None:
        # Read EOF means the server sent its status: the call is over.
        self._finish(None)

    def _release(self) -> None:
        task = asyncio.get_running_loop().create_task(self._channel.close())
        _background_tasks.add(task)
        task.add_done_callback(_background_tasks.discard)


class _ServerConnection(GrpcConnection):
    """The accepting side: the servicer context of one call, its handler waiting in serve()."""

    def __init__(
        self, peer: PeerInfo, context: grpc.aio.ServicerContext[Any, Any], message_limit: int
    ) -> None:
        super().__init__(peer, f"{peer.scheme}://{peer.address}", message_limit)
        self._context = context
        # Set when the handler should end the call: False for OK, True for ABORTED.
        self._handler_outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def serve(self, accept: AcceptCallback) -> None:
        """The RPC handler's body: accept, announce readiness, then wait for the end."""
        self._context.add_done_callback(self._call_done)
        async with self._write_lock:
            self._start_reading(accept(self))
            await self._context.send_initial_metadata(((_READY_KEY, "1"),))
        try:
            abort = await self._handler_outcome
        finally:
            if self._reader is not None:
                self._reader.cancel()
        if abort:
            await self._context.abort(grpc.StatusCode.ABORTED, "tensorwire connection aborted")

    async def _read_message(self) -> bytes | None:
        message = await self._context.read()
        return None if message is grpc.aio.EOF else bytes(message)

    async def _write_message(self, message: bytes) -> None:
        await self._context.write(message)

    async def _end_writing(self) -> None:
        self._end_handler(abort=False)

    def _cancel_call(self) -> None:
        self._end_handler(abort=True)

    def _end_handler(self, *, abort: bool) -> None:
        if not self._handler_outcome.done():
            self._handler_outcome.set_result(abort)

    def _call_done(self, context: Any) -> None:
        if self._closing or not context.cancelled():
            self._finish(None)
        else:
            self._finish(ConnectionClosedError(f"{self._describe}: the client cancelled the call"))
        if self._reader is not None:
            self._reader.cancel()


_background_tasks: set[asyncio.Task[Any]] = set()


# --- listening ----------------------------------------------------------------------------------


class GrpcListener(Listener):
    """A grpc.aio server with the tensorwire method; see Listener."""

    def __init__(self, server: grpc.aio.Server, url: str) -> None:
        self._server = server
        self.url = url
        self._stopping: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<GrpcListener {self.url}>"

    async def close(self) -> None:
        """Stop accepting and release the port; calls in progress go on until they end."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(
                self._server.stop(_LISTENER_CLOSE_GRACE_S)
            )
            _background_tasks.add(self._stopping)
            self._stopping.add_done_callback(_background_tasks.discard)
        await asyncio.sleep(0)


class GrpcDriver(Driver):
    """grpc:// and grpcs:// connections: one bidirectional streaming RPC per connection."""

    schemes: ClassVar[tuple[str, ...]] = ("grpc", "grpcs")

    def __init__(self, options: GrpcOptions | None = None) -> None:
        self.options = options or GrpcOptions()

    async def connect(
        self, url: str, receiver: ByteReceiver, *, tls: TLSConfig | None = None
    ) -> GrpcConnection:
        """Open a channel and the call, and wait until the server accepted it."""
        target = parse_host_port_url(url, self.schemes, allow_port_zero=False)
        options = self.options.channel_options()
        address = format_host_port(target.host, target.port)
        if target.scheme == "grpcs":
            credentials = channel_credentials(tls or TLSConfig(), url)
            if tls is not None and tls.server_hostname:
                options.append(("grpc.ssl_target_name_override", tls.server_hostname))
            channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            refuse_tls_for_plain(tls, url)
            channel = grpc.aio.insecure_channel(address, options=options)
        try:
            call = await self._open_call(channel, url)
        except BaseException:
            await channel.close()
            raise
        connection = _ClientConnection(
            PeerInfo(target.scheme, address), url, channel, call, self.options.max_message_size
        )
        connection._start_reading(receiver)
        return connection

    async def _open_call(self, channel: grpc.aio.Channel, url: str) -> Any:
        method = channel.stream_stream(
            METHOD_PATH, request_serializer=None, response_deserializer=None
        )
        call = method(wait_for_ready=False)
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                metadata = tuple(await call.initial_metadata() or ())
                if (_READY_KEY, "1") not in metadata:
                    await _raise_not_accepted(call, url)
        except TimeoutError:
            call.cancel()
            raise ConnectError(
                f"cannot connect to {url}: no answer within {self.options.connect_timeout} s"
            ) from None
        except _RPC_ERRORS as exc:
            call.cancel()
            raise ConnectError(f"cannot connect to {url}: {_describe_rpc_error(exc)}") from exc
        return call

    async def listen(
        self,
        url: str,
        accept: AcceptCallback,
        *,
        tls: TLSConfig | None = None,
        gate: HandshakeGate | None = None,
    ) -> GrpcListener:
        """Serve the tensorwire method on host:port (port 0: any free port; see Listener.url).
        With `gate`, grpc's handshake timeout, idle timeout and connection cap come from it (grpc
        cannot count its handshakes there; see HandshakeGate)."""
        target = parse_host_port_url(url, self.schemes, allow_port_zero=True)
        credentials = None
        if target.scheme == "grpcs":
            if tls is None:
                raise ConfigError(f"{url!r}: a grpcs:// listener needs a TLSConfig with cert_file")
            credentials = server_credentials(tls)
        else:
            refuse_tls_for_plain(tls, url)
        server = grpc.aio.server(options=self.options.server_options(gate))
        handler = _generic_handler(target.scheme, accept, self.options.max_message_size)
        server.add_generic_rpc_handlers((handler,))
        address = format_host_port(target.host, target.port)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
            if port == 0:
                raise RuntimeError("grpc could not bind the address")
            await server.start()
        except RuntimeError as exc:
            await server.stop(None)
            raise TransportError(f"cannot listen on {url}: {describe_error(exc)}") from exc
        return GrpcListener(server, f"{target.scheme}://{format_host_port(target.host, port)}")


async def _raise_not_accepted(call: Any, url: str) -> None:
    """The call answered without the server's ready marker: say why it failed."""
    code = await call.code()  # waits for the status of a failed call
    details = await call.details()
    call.cancel()
    if code == grpc.StatusCode.OK:
        details = "the server is not a tensorwire grpc endpoint"
    raise ConnectError(f"cannot connect to {url}: grpc status {code.name}: {details}")


def _generic_handler(
    scheme: str, accept: AcceptCallback, message_limit: int
) -> grpc.GenericRpcHandler:
    async def frames(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = PeerInfo(scheme, _peer_address(context.peer()), _client_identity(context))
        await _ServerConnection(peer, context, message_limit).serve(accept)

    handler = grpc.stream_stream_rpc_method_handler(
        frames, request_deserializer=None, response_serializer=None
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD_NAME: handler})


def _peer_address(grpc_peer: str) -> str:
    """`ipv4:127.0.0.1:5000` / `ipv6:%5B::1%5D:5000` -> `127.0.0.1:5000` / `[::1]:5000`."""
    scheme, _, rest = grpc_peer.partition(":")
    return unquote(rest) if scheme in ("ipv4", "ipv6") else grpc_peer


def _client_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The subject CN of the client's certificate; grpc only has one when it verified it."""
    names = context.auth_context().get("x509_common_name")
    if not names:
        return None
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)
