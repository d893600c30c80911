"""`tcp://host:port` and `tcps://host:port` (TLS, optionally mutual) over asyncio or uvloop.

Receiving uses `asyncio.BufferedProtocol`: `get_buffer`/`buffer_updated` go straight to the
endpoint's `ByteReceiver`, so the kernel copies received bytes directly into the receiver's memory
(no StreamReader and its intermediate bytearray).

Sending on plain tcp does not go through the loop's transport: CPython 3.11's selector transport
copies whatever the kernel did not take at once into a bytearray (most of each 8 MiB chunk on a
busy machine), and `writelines()` joins the parts into one new bytes object. `SocketWriter`
instead writes the parts straight from their memory with `sendmsg` on a duplicate of the
connection's socket descriptor, keeping references (not copies) to what the kernel has not taken
and waiting above the high-water mark, whatever the loop. TLS goes through
the transport (encryption makes new buffers anyway): each part goes to `transport.write()`
separately, and back-pressure is the FlowControlMixin idea: `pause_writing()` clears an event,
`resume_writing()` sets it, `send()` waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from transport.drivers.base import (
    AcceptCallback,
    Buffer,
    ByteReceiver,
    Driver,
    DriverConnection,
    HandshakeGate,
    HostPort,
    Listener,
    PeerInfo,
    TLSConfig,
    describe_error,
    format_host_port,
    map_exceptions,
    parse_host_port_url,
    socket_peer_info,
)
from transport.drivers.socket_writer import SocketWriter, plain_socket_writer
from transport.exceptions import (
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    TransportError,
)

__all__ = ["DEFAULT_WRITE_HIGH_WATER", "TcpConnection", "TcpDriver", "TcpListener", "TcpOptions"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_WRITE_HIGH_WATER = 4 * MiB

# Errors of a connection attempt: refused, unreachable, name not resolved, TLS refused, timeout.
_CONNECT_ERRORS: dict[type[BaseException], type[TransportError]] = {
    OSError: ConnectError,
    asyncio.TimeoutError: ConnectError,
}
# Errors of a write on an established connection (uvloop raises on a closed handle).
_SEND_ERRORS: dict[type[BaseException], type[TransportError]] = {
    OSError: ConnectionClosedError,
    RuntimeError: ConnectionClosedError,
}


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """Tuning knobs of the tcp driver.

    `write_high_water`/`write_low_water`: send() waits while more than the high-water mark is
    buffered in user space, until it drains below the low-water mark (default: a quarter of it).
    `send_buffer_size`/`recv_buffer_size`: SO_SNDBUF/SO_RCVBUF; None leaves the kernel's
    autotuning alone (setting them disables it on Linux).
    `congestion_control`: TCP_CONGESTION per socket (Linux), e.g. "bbr", which holds its rate
    under random loss on a long link where cubic collapses; None keeps the system default. A name
    the kernel does not offer makes connect() and listen() fail with an error naming it.
    """

    write_high_water: int = DEFAULT_WRITE_HIGH_WATER
    write_low_water: int | None = None
    send_buffer_size: int | None = None
    recv_buffer_size: int | None = None
    congestion_control: str | None = None

    def __post_init__(self) -> None:
        if self.write_high_water < 1:
            raise ConfigError(f"write_high_water must be >= 1, got {self.write_high_water}")
        low = self.write_low_water
        if low is not None and not 0 <= low <= self.write_high_water:
            raise ConfigError(
                f"write_low_water must be in [0, write_high_water={self.write_high_water}], "
                f"got {low}"
            )
        for name in ("send_buffer_size", "recv_buffer_size"):
            size = getattr(self, name)
            if size is not None and size < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {size}")
        _check_congestion_control(self.congestion_control)

    @property
    def low_water(self) -> int:
        """The effective low-water mark."""
        return self.write_high_water // 4 if self.write_low_water is None else self.write_low_water

    @property
    def opens_own_socket(self) -> bool:
        """True when an option must be set before connect() (so the driver opens the socket)."""
        wanted = (self.send_buffer_size, self.recv_buffer_size, self.congestion_control)
        return any(option is not None for option in wanted)

    def apply_to_socket(self, sock: Any) -> None:
        """Set TCP_NODELAY, the congestion control and the requested buffer sizes (on a socket
        or uvloop's stand-in)."""
        if sock is None:
            return
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Frames are written whole; Nagle would only delay the small control frames.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.congestion_control is not None:
                _set_congestion_control(sock, self.congestion_control)
        if self.send_buffer_size is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_size)
        if self.recv_buffer_size is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.recv_buffer_size)


def _check_congestion_control(name: str | None) -> None:
    if name is None:
        return
    # The kernel's names are short ASCII words (TCP_CA_NAME_MAX is 16 with the NUL).
    if not (name.isascii() and name.isprintable() and 0 < len(name) < 16 and " " not in name):
        raise ConfigError(f"congestion_control must be a kernel algorithm name, got {name!r}")
    if not hasattr(socket, "TCP_CONGESTION"):
        raise ConfigError("congestion_control needs TCP_CONGESTION, which this platform lacks")


def _set_congestion_control(sock: Any, name: str) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot use TCP congestion control {name!r} ({exc.strerror}); this kernel offers: "
            f"{_available_congestion_control()}",
        ) from exc


def _available_congestion_control() -> str:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as listing:
            return listing.read().strip() or "?"
    except OSError:
        return "?"


class _TcpProtocol(asyncio.BufferedProtocol):
    """Bridges an asyncio transport to a TcpConnection and the endpoint's ByteReceiver."""

    def __init__(
        self,
        scheme: str,
        options: TcpOptions,
        receiver_for: Callable[[TcpConnection], ByteReceiver],
        gate: HandshakeGate | None = None,
    ) -> None:
        self._scheme = scheme
        self._options = options
        self._receiver_for = receiver_for
        self._receiver: ByteReceiver | None = None
        self.connection: TcpConnection | None = None
        self._transport: asyncio.Transport | None = None
        self.reading_paused = False
        # Bytes read while paused (see get_buffer), delivered first on resume.
        self._stashed: deque[memoryview] = deque()
        self._stash_buffer: memoryview | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.writer: SocketWriter | None = None  # plain tcp: sends bypass the transport
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        # A listener builds the protocol when the kernel hands it the socket, before the TLS
        # handshake: from then until connection_made() (or the handshake's deadline, when the
        # loop closes a failed or stalled handshake without telling us) it counts in the gate.
        self._handshake_ended: Callable[[], None] | None = None
        self._handshake_deadline: asyncio.TimerHandle | None = None
        if gate is not None:
            self._handshake_ended = gate.started()
            self._handshake_deadline = loop.call_later(gate.timeout, self._end_handshake)

    def _end_handshake(self) -> None:
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
            self._handshake_deadline = None
        if self._handshake_ended is not None:
            self._handshake_ended()
            self._handshake_ended = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._end_handshake()
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        try:
            self._options.apply_to_socket(transport.get_extra_info("socket"))
        except OSError as exc:
            logger.warning("cannot set socket options on %s: %s", transport, exc)
        transport.set_write_buffer_limits(self._options.write_high_water, self._options.low_water)
        self.writer = plain_socket_writer(
            transport, self._options.write_high_water, self._options.low_water
        )
        self.connection = TcpConnection(transport, self, socket_peer_info(self._scheme, transport))
        try:
            self._receiver = self._receiver_for(self.connection)
        except Exception:
            logger.exception("accept callback failed for %s; closing it", self.connection.peer)
            transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.reading_paused:
            # uvloop starts reading right after connection_made(), even when accept() paused
            # reading in it: hold these bytes until resume_reading(), pause again once they are
            # in (pausing inside get_buffer() crashes uvloop).
            self._stash_buffer = memoryview(bytearray(sizehint if sizehint > 0 else 64 * 1024))
            return self._stash_buffer
        assert self._receiver is not None
        return self._receiver.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._stash_buffer is not None:
            self._stashed.append(self._stash_buffer[:nbytes])
            self._stash_buffer = None
            self._transport_pause_reading()
            return
        assert self._receiver is not None
        self._receiver.buffer_updated(nbytes)

    def pause_reading(self) -> None:
        """Stop delivering to the receiver (see TcpConnection.pause_reading)."""
        self.reading_paused = True
        self._transport_pause_reading()

    def resume_reading(self) -> None:
        """Deliver bytes held while paused, then read from the socket again."""
        self.reading_paused = False
        while self._stashed and not self.reading_paused and self._receiver is not None:
            self._deliver_stashed(self._receiver)
        if not self.reading_paused and self._transport and not self._transport.is_closing():
            self._transport.resume_reading()

    def _deliver_stashed(self, receiver: ByteReceiver) -> None:
        head = self._stashed[0]
        buffer = receiver.get_buffer(len(head))
        count = min(len(buffer), len(head))
        buffer[:count] = head[:count]
        if count == len(head):
            self._stashed.popleft()
        else:
            self._stashed[0] = head[count:]
        receiver.buffer_updated(count)

    def _transport_pause_reading(self) -> None:
        if self._transport and not self._transport.is_closing():
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        if self._receiver is not None:
            self._receiver.eof_received()
        return False  # let the transport close: a half-closed connection is of no use to us

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def close_writer(self) -> None:
        """Release the writer's descriptor (before the transport closes: see SocketWriter)."""
        if self.writer is not None:
            self.writer.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_handshake()
        self.close_writer()
        self.can_write.set()  # wake senders; they see the connection closed
        self._stashed.clear()  # nothing is delivered after connection_lost
        self.reading_paused = False
        if not self.lost.done():
            self.lost.set_result(None)
        if self._receiver is None:
            return
        error: TransportError | None = None
        if isinstance(exc, TransportError):
            error = exc
        elif exc is not None:
            peer = self.connection.peer.address if self.connection else "?"
            error = ConnectionClosedError(
                f"{self._scheme} connection to {peer} lost: {describe_error(exc)}"
            )
            error.__cause__ = exc
        receiver, self._receiver = self._receiver, None
        receiver.connection_lost(error)
        # Nothing is delivered from now on. Without these references the connection and its
        # transport (a TLS session and its 256 KiB buffer) go by reference counting once the
        # receiver lets go of the connection, not whenever the cyclic collector runs.
        self._transport = None
        self.connection = None


class TcpConnection(DriverConnection):
    """A tcp or tcps connection; see DriverConnection."""

    def __init__(self, transport: asyncio.Transport, protocol: _TcpProtocol, peer: PeerInfo):
        self._transport = transport
        self._protocol = protocol
        self.peer = peer

    def __repr__(self) -> str:
        return f"<TcpConnection {self.peer.scheme}://{self.peer.address} closed={self.closed}>"

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Write the parts in order, then wait while the write buffer is above high water."""
        self._raise_if_closed()
        writer = self._protocol.writer
        with map_exceptions(_SEND_ERRORS, f"cannot send to {self._describe_peer()}"):
            if writer is not None:
                await writer.write(parts)
                self._raise_if_closed()
                return
            write = self._transport.write
            for part in parts:
                write(part)
        if not self._protocol.can_write.is_set():
            await self._protocol.can_write.wait()
        self._raise_if_closed()

    def pause_reading(self) -> None:
        """Stop reading from the socket; the kernel's buffer then throttles the peer."""
        self._protocol.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again."""
        self._protocol.resume_reading()

    async def close(self) -> None:
        """Flush buffered bytes, close, and wait until the connection is gone."""
        writer = self._protocol.writer
        if writer is not None and not self._transport.is_closing():
            try:
                await writer.flush()
            except OSError:
                pass  # a failed socket: connection_lost follows
            except asyncio.CancelledError:
                self.abort()  # a close given up on (a shutdown's deadline) must not linger
                raise
        if not self._transport.is_closing():
            self._protocol.close_writer()
            self._transport.close()
        try:
            await asyncio.shield(self._protocol.lost)
        except asyncio.CancelledError:
            self._transport.abort()
            raise

    def abort(self) -> None:
        """Close now; buffered bytes are dropped."""
        self._protocol.close_writer()
        self._transport.abort()

    @property
    def closed(self) -> bool:
        """True once closing, closed or lost."""
        return self._transport.is_closing() or self._protocol.lost.done()

    def _describe_peer(self) -> str:
        return f"{self.peer.scheme}://{self.peer.address}"

    def _raise_if_closed(self) -> None:
        if self.closed:
            raise ConnectionClosedError(
                f"cannot send to {self._describe_peer()}: the connection is closed"
            )


class TcpListener(Listener):
    """A listening tcp/tcps server; see Listener."""

    def __init__(self, server: asyncio.AbstractServer, url: str) -> None:
        self._server = server
        self.url = url

    def __repr__(self) -> str:
        return f"<TcpListener {self.url}>"

    async def close(self) -> None:
        """Stop accepting and release the port; accepted connections stay open.

        Server.wait_closed() is not awaited: on newer loops it waits for every accepted connection
        to end, which is the endpoint's business, not the listener's.
        """
        self._server.close()
        await asyncio.sleep(0)


class TcpDriver(Driver):
    """tcp:// and tcps:// connections; `options` tunes buffers and back-pressure."""

    schemes: ClassVar[tuple[str, ...]] = ("tcp", "tcps")

    def __init__(self, options: TcpOptions | None = None) -> None:
        self.options = options or TcpOptions()

    async def connect(
        self, url: str, receiver: ByteReceiver, *, tls: TLSConfig | None = None
    ) -> TcpConnection:
        """Connect to tcp://host:port or tcps://host:port; ConnectError names the URL."""
        target = parse_host_port_url(url, self.schemes, allow_port_zero=False)
        context = _tls_context(target.scheme, tls, url, server_side=False)
        hostname = (tls.server_hostname if tls else None) or target.host
        with map_exceptions(_CONNECT_ERRORS, f"cannot connect to {url}"):
            sock = await self._open_socket(target)
            _, protocol = await _create_connection(
                lambda: _TcpProtocol(target.scheme, self.options, lambda _conn: receiver),
                target,
                sock,
                context,
                hostname,
            )
        assert protocol.connection is not None
        return protocol.connection

    async def listen(
        self,
        url: str,
        accept: AcceptCallback,
        *,
        tls: TLSConfig | None = None,
        gate: HandshakeGate | None = None,
    ) -> TcpListener:
        """Listen on tcp://host:port (port 0: any free port; see Listener.url). With `gate`, a
        tcps:// connection counts there during its TLS handshake, which gets gate.timeout."""
        target = parse_host_port_url(url, self.schemes, allow_port_zero=True)
        context = _tls_context(target.scheme, tls, url, server_side=True)
        handshake_gate = gate if context is not None else None
        extra: dict[str, Any] = {}
        if handshake_gate is not None:
            extra["ssl_handshake_timeout"] = handshake_gate.timeout
        loop = asyncio.get_running_loop()
        with map_exceptions({OSError: TransportError}, f"cannot listen on {url}"):
            server = await loop.create_server(
                lambda: _TcpProtocol(target.scheme, self.options, accept, handshake_gate),
                target.host,
                target.port,
                ssl=context,
                start_serving=False,
                **extra,
            )
            # Accepted sockets inherit the listening socket's buffer sizes, which must be set
            # before the handshake for the window scale to match them.
            for listening_socket in server.sockets:
                self.options.apply_to_socket(listening_socket)
            await server.start_serving()
        bound = server.sockets[0].getsockname()
        return TcpListener(server, f"{target.scheme}://{format_host_port(bound[0], bound[1])}")

    async def _open_socket(self, target: HostPort) -> socket.socket | None:
        """A connected socket with buffer sizes and congestion control set before connect(), or
        None when the kernel defaults are wanted (then the loop opens the socket, happy eyeballs
        and all)."""
        options = self.options
        if not options.opens_own_socket:
            return None
        loop = asyncio.get_running_loop()
        addresses = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        last_error: OSError = OSError(f"no address found for {target.host}")
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                options.apply_to_socket(sock)
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                last_error = exc
            except BaseException:
                sock.close()
                raise
        raise last_error


def _tls_context(
    scheme: str, tls: TLSConfig | None, url: str, *, server_side: bool
) -> ssl.SSLContext | None:
    """The SSLContext a URL needs: none for tcp://, one from `tls` (or defaults) for tcps://."""
    if scheme == "tcp":
        if tls is not None:
            raise ConfigError(f"{url!r}: TLS settings given for a plain tcp:// URL; use tcps://")
        return None
    if server_side:
        if tls is None:
            raise ConfigError(f"{url!r}: a tcps:// listener needs a TLSConfig with cert_file")
        return tls.server_context()
    return (tls or TLSConfig()).client_context()


async def _create_connection(
    protocol_factory: Callable[[], _TcpProtocol],
    target: HostPort,
    sock: socket.socket | None,
    context: ssl.SSLContext | None,
    hostname: str,
) -> tuple[asyncio.BaseTransport, _TcpProtocol]:
    """loop.create_connection() on our own socket when we opened one, else by host and port."""
    loop = asyncio.get_running_loop()
    server_hostname = hostname if context else None
    if sock is not None:
        return await loop.create_connection(
            protocol_factory, sock=sock, ssl=context, server_hostname=server_hostname
        )
    return await loop.create_connection(
        protocol_factory, target.host, target.port, ssl=context, server_hostname=server_hostname
    )
