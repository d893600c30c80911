"""`http://host:port` and `https://host:port` (TLS, optionally mutual) on aiohttp.

A connection is one HTTP/1.1 exchange, `POST /tensorwire/v1/connect`, used as a full-duplex pipe:
the request body streams client->server, the response body (prepared at once) streams
server->client, both chunked, both at the same time on the same TCP connection
(see `transport.drivers.http_connection` for sending, receiving and closing).

Why one streaming POST and not a websocket: measured on loopback (2 cores, shared, uvloop,
aiohttp 3.14, 1 GiB each way in 8 MiB blocks, 4 runs; raw socket 2300-2640 MiB/s in the same runs):

    websocket, client->server   530-610 MiB/s   (the client masks every byte: two extra copies)
    websocket, server->client  1190-1520 MiB/s
    streaming POST, upload     1240-1390 MiB/s
    streaming POST, download   1220-1380 MiB/s
    streaming POST, both ways  1100-1220 MiB/s  (sum of both directions, at the same time)

The websocket's masked client->server direction is half as fast, and it would add its own message
framing on top of ours; the streaming POST is symmetric, needs no upgrade, and a chunked body has a
clean end (the zero-size last chunk) that tells a close from a cut. docs/http-driver.md has the
details. The server refuses requests without the `Tensorwire-Driver` header, with a body encoding
(compression), or on another path, so a stray HTTP client gets an HTTP error, not our stream.
Buffering HTTP proxies between the sites break the full duplex; use CONNECT tunnels or none.

Admission: until the handler runs, an accepted connection is an `_Admission` (TLS handshake,
request line, headers). It counts in the listener's HandshakeGate from accept, is cut at
gate.timeout, and frees its slot the moment it ends: a failed handshake or a peer that left at
once, a stalled one at the deadline. The request line and headers are capped (`_MAX_HEADERS`
fields of `_MAX_FIELD_SIZE`), so header bytes cost at most about 64 KiB per connection however
slowly they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import aiohttp
from aiohttp import web
from aiohttp.http import StreamWriter
from aiohttp.payload import Payload
from aiohttp.web_protocol import RequestHandler

from transport.drivers.base import (
    AcceptCallback,
    ByteReceiver,
    Driver,
    HandshakeGate,
    HostPort,
    Listener,
    TLSConfig,
    describe_error,
    format_host_port,
    map_exceptions,
    parse_host_port_url,
    socket_peer_info,
)
from transport.drivers.http_connection import HttpConnection, plain_body_writer
from transport.exceptions import ConfigError, ConnectError, TransportError

__all__ = ["CONNECT_PATH", "HttpDriver", "HttpListener", "HttpOptions"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
CONNECT_PATH = "/tensorwire/v1/connect"
PROTOCOL_HEADER = "Tensorwire-Driver"
PROTOCOL_VERSION = "http/1"
CONTENT_TYPE = "application/x-tensorwire"

# Our request has a short request line and under ten headers; a proxy adds a few. 32 fields of at
# most 2 KiB (name and value together) bound what a peer's headers can make the parser hold.
_MAX_LINE_SIZE = 2048
_MAX_FIELD_SIZE = 2048
_MAX_HEADERS = 32
# Without a gate (a listener outside an Endpoint) the admission phase still ends: asyncio's own
# default TLS handshake timeout.
_UNGATED_ADMISSION_TIMEOUT = 60.0
_BACKLOG = 128  # what aiohttp's TCPSite asked for
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_DELAY = 1.0  # asyncio's own servers wait as long after running out of fds
_AdmissionFactory = Callable[[socket.socket], None]

# Errors of a connection attempt: refused, unreachable, TLS refused, server gone, timeout.
_CONNECT_ERRORS: dict[type[BaseException], type[TransportError]] = {
    aiohttp.ClientError: ConnectError,
    OSError: ConnectError,
    asyncio.TimeoutError: ConnectError,
}


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """Tuning knobs of the http driver.

    `write_high_water`: send() waits while more than this is buffered in user space (until a
    quarter of it is left). `read_buffer_size`: aiohttp's read buffer limit; it stops reading
    the socket at twice this while the receiver is paused or slow. `connect_timeout`: seconds
    for TCP, TLS and the server's response headers together (None: no limit). `close_linger`:
    seconds close() waits for the peer to end its body before it aborts.
    """

    write_high_water: int = 4 * MiB
    read_buffer_size: int = 1 * MiB
    connect_timeout: float | None = 30.0
    close_linger: float = 10.0

    def __post_init__(self) -> None:
        for name in ("write_high_water", "read_buffer_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.connect_timeout is not None and self.connect_timeout <= 0:
            raise ConfigError(f"connect_timeout must be > 0 or None, got {self.connect_timeout}")
        if self.close_linger <= 0:
            raise ConfigError(f"close_linger must be > 0, got {self.close_linger}")

    def apply_to_transport(self, transport: asyncio.Transport) -> None:
        """Set the write buffer limits that send()'s back-pressure waits on."""
        transport.set_write_buffer_limits(self.write_high_water, self.write_high_water // 4)


class HttpListener(Listener):
    """A listening socket whose connections go, through admission, to an aiohttp server; see
    Listener."""

    def __init__(
        self, runner: web.AppRunner, sock: socket.socket, url: str, admit: _AdmissionFactory
    ) -> None:
        self._runner = runner  # kept: accepted connections live on after close()
        self._sock = sock
        self.url = url
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever(admit))

    def __repr__(self) -> str:
        return f"<HttpListener {self.url}>"

    async def close(self) -> None:
        """Stop accepting and release the port; accepted connections stay open."""
        if not self._accepting.done():
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        self._sock.close()

    async def _accept_forever(self, admit: _AdmissionFactory) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except ConnectionAbortedError:
                continue  # the peer gave up before accept() took its connection
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    logger.error("%r stops accepting: %s", self, describe_error(exc))
                    return
                # Out of fds or memory: accepting more would fail the same way; let some
                # connections end first.
                logger.warning("%r cannot accept: %s", self, describe_error(exc))
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            admit(sock)


class _Admission(asyncio.Protocol):
    """One accepted connection until the request handler takes it: TLS handshake (https), then
    request line and headers, all within `gate.timeout` of the accept.

    It counts in the gate for exactly that long. TLS is done by `connect_accepted_socket`, which
    raises when the handshake fails (a server's own handshakes fail silently, holding the slot
    until the deadline). Once TLS is up it stands between the transport and aiohttp's
    RequestHandler, forwarding to it, so it sees the connection end at once; `admitted()` (the
    request handler started) takes it out of the data path with `transport.set_protocol`.
    """

    def __init__(self, make_handler: Callable[[], RequestHandler], gate: HandshakeGate) -> None:
        self._make_handler = make_handler
        self._end_count: Callable[[], None] | None = gate.started()
        self._deadline: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            gate.timeout, self.cut
        )
        self._timeout = gate.timeout
        self._transport: asyncio.Transport | None = None
        self._handler: RequestHandler | None = None
        self._opening: asyncio.Task[None] | None = None

    def start(self, sock: socket.socket, context: ssl.SSLContext | None) -> asyncio.Task[None]:
        """Take over `sock`: its TLS handshake (with `context`), then aiohttp's parser."""
        self._opening = asyncio.get_running_loop().create_task(self._open(sock, context))
        return self._opening

    async def _open(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        extra: dict[str, Any] = {} if context is None else {"ssl_handshake_timeout": self._timeout}
        try:
            # The transport owns `sock` from here on, also when this fails: never close it here.
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self, sock, ssl=context, **extra
            )
        except Exception as exc:
            logger.debug("an accepted connection failed its handshake: %s", describe_error(exc))
            self.cut()  # a failed handshake frees its slot now, not at the deadline
        except asyncio.CancelledError:  # cut() during the handshake
            self._end()
            raise

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._handler = self._make_handler()
        self._handler.connection_made(transport)

    def admitted(self) -> None:
        """The request handler runs: the connection leaves the gate and this protocol the path."""
        self._end()
        if self._transport is not None and self._handler is not None:
            self._transport.set_protocol(self._handler)

    def cut(self) -> None:
        """Close the connection (its deadline passed, or its handshake failed)."""
        if self._end_count is not None:
            if self._transport is not None:
                self._transport.abort()
            elif self._opening is not None and self._opening is not asyncio.current_task():
                self._opening.cancel()  # the handshake is not done: its transport closes
        self._end()

    def _end(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._end_count is not None:
            self._end_count()
            self._end_count = None

    # --- forwarded to the handler while the connection is being admitted --------------------

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> None:
        if self._handler is not None:
            self._handler.eof_received()

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        if self._handler is not None:
            self._handler.connection_lost(exc)


async def _listening_socket(target: HostPort) -> socket.socket:
    """A non-blocking socket listening on the first address `target.host` resolves to."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    sock = socket.create_server(address[:2], family=family, backlog=_BACKLOG)
    sock.setblocking(False)
    return sock


def _admit(request: web.BaseRequest) -> None:
    """Tell the request's connection that it is a tensorwire connection now."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, _Admission):
        protocol.admitted()


class HttpDriver(Driver):
    """http:// and https:// connections on aiohttp; `options` tunes buffers and timeouts."""

    schemes: ClassVar[tuple[str, ...]] = ("http", "https")

    def __init__(self, options: HttpOptions | None = None) -> None:
        self.options = options or HttpOptions()

    async def connect(
        self, url: str, receiver: ByteReceiver, *, tls: TLSConfig | None = None
    ) -> HttpConnection:
        """POST to http(s)://host:port/tensorwire/v1/connect; ConnectError names the URL."""
        target = parse_host_port_url(url, self.schemes, allow_port_zero=False)
        context = _tls_context(target.scheme, tls, url, server_side=False)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context if context else False, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=None),
            auto_decompress=False,
            read_bufsize=self.options.read_buffer_size,
        )
        try:
            with map_exceptions(_CONNECT_ERRORS, f"cannot connect to {url}"):
                async with asyncio.timeout(self.options.connect_timeout):
                    conn = await self._open_exchange(url, target, session, tls)
        except BaseException:
            await session.close()
            raise
        conn.start(receiver)
        return conn

    async def _open_exchange(
        self, url: str, target: HostPort, session: aiohttp.ClientSession, tls: TLSConfig | None
    ) -> HttpConnection:
        body = _DuplexBody()
        extra: dict[str, Any] = {}
        if tls is not None and tls.server_hostname:
            extra["server_hostname"] = tls.server_hostname
        response = await session.post(
            f"{target.scheme}://{format_host_port(target.host, target.port)}{CONNECT_PATH}",
            data=body,
            headers={PROTOCOL_HEADER: PROTOCOL_VERSION},
            **extra,
        )
        if response.status != 200 or response.headers.get(PROTOCOL_HEADER) != PROTOCOL_VERSION:
            response.close()
            raise ConnectError(
                f"cannot connect to {url}: the server answered HTTP {response.status} "
                f"{response.reason or ''}, not a tensorwire {PROTOCOL_VERSION} stream".rstrip()
            )
        writer = await body.writer
        transport = _established(writer.transport)
        self.options.apply_to_transport(transport)
        return HttpConnection(
            socket_peer_info(target.scheme, transport),
            writer,
            transport,
            response.content,
            linger=self.options.close_linger,
            on_body_end=body.end,
            release=functools.partial(_release_client, response, session),
        )

    async def listen(
        self,
        url: str,
        accept: AcceptCallback,
        *,
        tls: TLSConfig | None = None,
        gate: HandshakeGate | None = None,
    ) -> HttpListener:
        """Listen on http(s)://host:port (port 0: any free port; see Listener.url). With `gate`,
        each connection counts there until its request is being served (TLS handshake, request
        line, headers), and is closed if that takes longer than gate.timeout."""
        target = parse_host_port_url(url, self.schemes, allow_port_zero=True)
        context = _tls_context(target.scheme, tls, url, server_side=True)
        app = web.Application(client_max_size=0)  # 0: no ceiling (we never read() a body whole)
        app.router.add_post(CONNECT_PATH, functools.partial(self._serve, target.scheme, accept))
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            read_bufsize=self.options.read_buffer_size,
            max_line_size=_MAX_LINE_SIZE,
            max_field_size=_MAX_FIELD_SIZE,
            max_headers=_MAX_HEADERS,
        )
        await runner.setup()
        try:
            with map_exceptions({OSError: TransportError}, f"cannot listen on {url}"):
                sock = await _listening_socket(target)
        except BaseException:
            await runner.cleanup()
            raise
        make_handler = cast(Callable[[], RequestHandler], runner.server)
        admission_gate = gate or HandshakeGate(_UNGATED_ADMISSION_TIMEOUT)
        admitting: set[asyncio.Task[None]] = set()

        def admit(accepted: socket.socket) -> None:
            task = _Admission(make_handler, admission_gate).start(accepted, context)
            admitting.add(task)  # a task nobody references may be collected mid-way
            task.add_done_callback(admitting.discard)

        bound = sock.getsockname()
        url = f"{target.scheme}://{format_host_port(bound[0], bound[1])}"
        return HttpListener(runner, sock, url, admit)

    async def _serve(
        self, scheme: str, accept: AcceptCallback, request: web.Request
    ) -> web.StreamResponse:
        """One accepted connection: runs as long as the connection does."""
        refusal = _refusal(request)
        if refusal is not None:
            answer = web.Response(status=400, text=refusal + "\n")
            answer.force_close()  # a kept-alive stray would start an uncounted header phase
            return answer
        _admit(request)
        response = web.StreamResponse(
            headers={PROTOCOL_HEADER: PROTOCOL_VERSION, "Content-Type": CONTENT_TYPE}
        )
        response.enable_chunked_encoding()
        response.force_close()  # one exchange per TCP connection: no keep-alive reuse
        writer = plain_body_writer(await response.prepare(request))
        handler_done = asyncio.get_running_loop().create_future()
        conn = self._server_connection(scheme, request, writer, handler_done)
        try:
            receiver = accept(conn)
        except Exception:
            logger.exception("accept callback failed for %s; closing it", conn.peer)
            conn.abort()
            return response
        conn.start(receiver)
        try:
            await handler_done
        except asyncio.CancelledError:  # the server is shutting down
            conn.abort()
            raise
        return response

    def _server_connection(
        self,
        scheme: str,
        request: web.Request,
        writer: StreamWriter,
        handler_done: asyncio.Future[None],
    ) -> HttpConnection:
        transport = _established(request.transport)
        self.options.apply_to_transport(transport)
        return HttpConnection(
            socket_peer_info(scheme, transport),
            writer,
            transport,
            request.content,
            linger=self.options.close_linger,
            on_body_end=lambda: None,
            release=functools.partial(_resolve, handler_done),
        )


def _established(transport: asyncio.BaseTransport | None) -> asyncio.Transport:
    """The connection's transport (uvloop's implement asyncio.Transport without subclassing)."""
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the connection closed during the HTTP exchange")
    return cast(asyncio.Transport, transport)


def _refusal(request: web.Request) -> str | None:
    """Why `request` is not a tensorwire connection, or None when it is."""
    if request.headers.get(PROTOCOL_HEADER) != PROTOCOL_VERSION:
        return f"not a tensorwire client: expected the header {PROTOCOL_HEADER}: {PROTOCOL_VERSION}"
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        return f"unsupported Content-Encoding {encoding!r}: tensorwire bodies are not encoded"
    return None


class _DuplexBody(Payload):
    """The client's request body: hands aiohttp's writer to the connection, then waits.

    aiohttp runs write() in its own task right after the request headers; the connection writes
    through the writer from send(), and end() lets write() return so aiohttp finishes the request.
    """

    def __init__(self) -> None:
        super().__init__(None, content_type=CONTENT_TYPE)
        loop = asyncio.get_running_loop()
        self.writer: asyncio.Future[StreamWriter] = loop.create_future()
        self._ended: asyncio.Future[None] = loop.create_future()

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a streaming tensorwire body has no text form")

    async def write(self, writer: Any) -> None:
        if not self.writer.done():
            self.writer.set_result(plain_body_writer(writer))
        await self._ended

    def end(self) -> None:
        """Our last chunk is written: let aiohttp finish the request."""
        _resolve_now(self._ended)


async def _release_client(response: aiohttp.ClientResponse, session: aiohttp.ClientSession) -> None:
    response.close()
    await session.close()


async def _resolve(future: asyncio.Future[None]) -> None:
    _resolve_now(future)


def _resolve_now(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _tls_context(
    scheme: str, tls: TLSConfig | None, url: str, *, server_side: bool
) -> ssl.SSLContext | None:
    """The SSLContext a URL needs: none for http://, one from `tls` (or defaults) for https://."""
    if scheme == "http":
        if tls is not None:
            raise ConfigError(f"{url!r}: TLS settings given for a plain http:// URL; use https://")
        return None
    if server_side:
        if tls is None:
            raise ConfigError(f"{url!r}: an https:// listener needs a TLSConfig with cert_file")
        return tls.server_context()
    return (tls or TLSConfig()).client_context()
