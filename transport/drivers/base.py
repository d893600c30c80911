"""The driver contract: open a connection to a URL or accept connections, move opaque bytes, close.

A driver knows nothing of frames. The endpoint hands it a `ByteReceiver` per connection and the
driver pushes every received byte into it (`get_buffer` / `buffer_updated`, the shape of
`asyncio.BufferedProtocol`, so a socket driver can let the kernel write straight into the
receiver's memory). Sending is `DriverConnection.send(parts)`: a scatter-gather list of buffers
written in order without joining them, followed by a wait while the driver's write buffer is above
its high-water mark.

Buffer ownership: a driver may keep references to the parts passed to `send()` until their bytes
have been handed to the kernel (or to the peer, for the memory driver), which can be after `send()`
returns. Callers must not mutate those buffers afterwards: pass `bytes`, fresh buffers, or views of
read-only memory (an mmap of a safetensors file).

Every native error (OSError, ssl.SSLError, asyncio errors, gaierror) is mapped at the I/O call
that raised it onto `transport.exceptions`, with a message naming the URL or peer
(`map_exceptions`, the idea of httpcore's `_backends/base.py`).
"""

from __future__ import annotations

import ssl
from abc import ABC, abstractmethod
from asyncio import BaseTransport
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol
from urllib.parse import urlsplit

from transport.exceptions import ConfigError, TensorwireError, TransportError

__all__ = [
    "Buffer",
    "ByteReceiver",
    "Driver",
    "DriverConnection",
    "HandshakeGate",
    "Listener",
    "PeerInfo",
    "TLSConfig",
    "byte_view",
    "map_exceptions",
    "parse_host_port_url",
]

Buffer = bytes | bytearray | memoryview
"""One part of a scatter-gather send."""


def byte_view(part: Buffer) -> memoryview:
    """`part` as a flat byte view, without a copy: sizes and slices count bytes, not items
    (asyncio's transports and len() count items)."""
    view = part if isinstance(part, memoryview) else memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class ByteReceiver(Protocol):
    """Supplied by the endpoint, one per connection; the driver pushes received bytes into it.

    `get_buffer(sizehint)` returns a writable, non-empty buffer (sizehint is a suggestion, -1 means
    "any size"); the driver fills its first `nbytes` and calls `buffer_updated(nbytes)`.
    `eof_received()` is called once when the peer closed its sending side, then
    `connection_lost(None)`; `connection_lost(exc)` alone when the connection failed.
    """

    def get_buffer(self, sizehint: int) -> memoryview:
        """Return a writable buffer for the next received bytes."""
        ...

    def buffer_updated(self, nbytes: int) -> None:
        """The first `nbytes` of the last buffer returned by get_buffer() now hold new bytes."""
        ...

    def eof_received(self) -> None:
        """The peer will send nothing more."""
        ...

    def connection_lost(self, exc: TransportError | None) -> None:
        """The connection is gone: `None` for an orderly close, else what went wrong."""
        ...


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who is on the other end of a connection."""

    scheme: str
    address: str
    peer_identity: str | None = None
    """The subject CN of the peer's TLS certificate, when it was verified; else None."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS settings for `tcps://` (and the other TLS schemes).

    Client: verifies the server against `ca_file` (the system store when None) unless
    `verify_peer` is False, and presents `cert_file`/`key_file` when given (mutual TLS).
    Server: presents `cert_file`/`key_file`; with `require_client_cert` it refuses clients without
    a certificate signed by `ca_file`.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_peer: bool = True
    require_client_cert: bool = False
    server_hostname: str | None = None

    def client_context(self) -> ssl.SSLContext:
        """An SSLContext for the connecting side; ConfigError when a file cannot be loaded."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.verify_peer:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_file is not None:
            self._load(context.load_verify_locations, "ca_file", self.ca_file)
        if self.cert_file is not None:
            self._load_cert_chain(context)
        elif self.key_file is not None:
            raise ConfigError(f"TLSConfig: key_file={self.key_file!r} given without cert_file")
        return context

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for the listening side; ConfigError when cert/key/CA are missing."""
        if self.cert_file is None:
            raise ConfigError("TLSConfig: a TLS listener needs cert_file (and key_file)")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_cert_chain(context)
        if self.require_client_cert:
            if self.ca_file is None:
                raise ConfigError("TLSConfig: require_client_cert=True needs ca_file")
            self._load(context.load_verify_locations, "ca_file", self.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        elif self.ca_file is not None and self.verify_peer:
            # A client certificate is checked (and its CN reported) when offered, not required.
            self._load(context.load_verify_locations, "ca_file", self.ca_file)
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def _load_cert_chain(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(self.cert_file or "", self.key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"TLSConfig: cannot load cert_file={self.cert_file!r} "
                f"key_file={self.key_file!r}: {exc}"
            ) from exc

    @staticmethod
    def _load(loader: Callable[[str], None], field: str, path: str) -> None:
        try:
            loader(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"TLSConfig: cannot load {field}={path!r}: {exc}") from exc


class DriverConnection(ABC):
    """One open connection: send buffers, control reading, close."""

    peer: PeerInfo

    @abstractmethod
    async def send(self, parts: Sequence[Buffer]) -> None:
        """Write all parts in order (scatter-gather, no joining), then wait while the write buffer
        is above its high-water mark. Raises ConnectionClosedError when the connection is closed
        or closes while waiting."""

    @abstractmethod
    def pause_reading(self) -> None:
        """Stop delivering bytes to the receiver (receive back-pressure) until resume_reading()."""

    @abstractmethod
    def resume_reading(self) -> None:
        """Deliver bytes to the receiver again."""

    @abstractmethod
    async def close(self) -> None:
        """Flush what was sent, then close; idempotent. Cancelling it aborts the connection."""

    @abstractmethod
    def abort(self) -> None:
        """Close immediately, dropping unsent bytes."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once the connection is closed, closing, or lost."""


class Listener(ABC):
    """A bound, accepting endpoint. Closing it stops accepting; open connections stay open."""

    url: str
    """The real bound URL, e.g. tcp://127.0.0.1:54321 when port 0 was asked."""

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting connections and release the address; idempotent."""


AcceptCallback = Callable[[DriverConnection], ByteReceiver]
"""Called when a connection arrives, before any byte is delivered; returns its receiver."""


class HandshakeGate:
    """A listener's admission budget: connections taken from the kernel that are not yet handed
    to the accept callback (their TLS handshake, for http(s) also their request headers).

    Until accept() sees a connection it holds a file descriptor and memory all the same. A
    listener given a gate counts each such connection in `pending` from the moment it is
    accepted until accept() takes it over (or it failed, or the peer left: then at once), and
    closes it if that phase lasts longer than `timeout` seconds. The endpoint counts `pending`
    against its connection limit; `limit`, when set, is that limit, for drivers that can only
    enforce it themselves.

    What each driver does with it:
    - tcps:// counts the TLS handshake (a handshake that fails is released at its deadline:
      asyncio reports no failed server-side handshake to the protocol).
    - http(s):// counts the TLS handshake, the request line and the headers, and releases a
      connection the moment that phase ends, fails or is cut.
    - grpc(s):// cannot count: grpc core accepts connections and runs TLS and HTTP/2 setup where
      Python cannot see them, so `pending` stays 0. The gate's numbers become grpc's own bounds
      instead: TLS plus the HTTP/2 preface and SETTINGS must end within `timeout` of the accept
      (`grpc.server_handshake_timeout_ms`), a connection that then starts no call, or leaves
      its call's HEADERS unfinished, is closed after `timeout` (`grpc.max_connection_idle_ms`),
      and once the call runs accept() has it and the endpoint's own hello_timeout applies. One
      TCP connection carries one call (`grpc.max_concurrent_streams`), and with `limit` grpc
      holds at most that many TCP connections, handshaking or established
      (`grpc.max_allowed_incoming_connections`; connections above it are closed at accept,
      before any byte is read).
    - plain tcp:// and memory:// have no phase before accept() and leave the gate alone.
    """

    def __init__(self, timeout: float, *, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ConfigError(f"HandshakeGate: limit must be >= 1 or None, got {limit}")
        self.timeout = timeout
        self.limit = limit
        self.pending = 0

    def started(self) -> Callable[[], None]:
        """Count one connection; returns the function that ends its count (idempotent)."""
        self.pending += 1
        done = False

        def ended() -> None:
            nonlocal done
            if not done:
                done = True
                self.pending -= 1

        return ended


class Driver(ABC):
    """Opens and accepts connections for the URL schemes it lists."""

    schemes: ClassVar[tuple[str, ...]]

    @abstractmethod
    async def connect(
        self, url: str, receiver: ByteReceiver, *, tls: TLSConfig | None = None
    ) -> DriverConnection:
        """Connect to `url`; received bytes go to `receiver`. Raises ConnectError, ConfigError."""

    @abstractmethod
    async def listen(
        self,
        url: str,
        accept: AcceptCallback,
        *,
        tls: TLSConfig | None = None,
        gate: HandshakeGate | None = None,
    ) -> Listener:
        """Accept connections on `url`; `accept(conn)` returns each one's receiver. With `gate`,
        connections still in their handshake are counted there and cut at its timeout."""


# --- helpers shared by the drivers --------------------------------------------------------------


@contextmanager
def map_exceptions(
    mapping: Mapping[type[BaseException], type[TensorwireError]], context: str
) -> Iterator[None]:
    """Re-raise a native exception as the first matching tensorwire class, prefixed by `context`.

    Tensorwire errors and anything not in `mapping` (CancelledError above all) pass through.
    Put subclasses before their bases in `mapping` (ssl.SSLError before OSError).
    """
    try:
        yield
    except TensorwireError:
        raise
    except Exception as exc:
        for native_class, tensorwire_class in mapping.items():
            if isinstance(exc, native_class):
                raise tensorwire_class(f"{context}: {describe_error(exc)}") from exc
        raise


def describe_error(exc: BaseException) -> str:
    """`ClassName: message`, with a placeholder for the many asyncio errors with no message."""
    text = str(exc) or "(no message)"
    return f"{type(exc).__name__}: {text}"


class HostPort(NamedTuple):
    """A parsed `scheme://host:port` URL."""

    scheme: str
    host: str
    port: int


def parse_host_port_url(url: str, schemes: Sequence[str], *, allow_port_zero: bool) -> HostPort:
    """Split `scheme://host:port` (IPv6 hosts in brackets); ConfigError naming what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad URL {url!r}: {exc}") from exc
    if parts.scheme not in schemes:
        raise ConfigError(f"bad URL {url!r}: scheme must be one of {', '.join(schemes)}")
    if not parts.hostname:
        raise ConfigError(f"bad URL {url!r}: no host (expected {parts.scheme}://host:port)")
    if port is None:
        raise ConfigError(f"bad URL {url!r}: no port (expected {parts.scheme}://host:port)")
    if port == 0 and not allow_port_zero:
        raise ConfigError(f"bad URL {url!r}: port 0 is only valid for listening")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"bad URL {url!r}: only {parts.scheme}://host:port is allowed")
    return HostPort(parts.scheme, parts.hostname, port)


def format_host_port(host: str, port: int) -> str:
    """`host:port`, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_peer_info(scheme: str, transport: BaseTransport) -> PeerInfo:
    """Address and, when TLS verified it, certificate CN of the far end of a socket transport
    (tcp and http drivers)."""
    peername = transport.get_extra_info("peername")
    address = format_host_port(str(peername[0]), int(peername[1])) if peername else "?"
    return PeerInfo(scheme, address, _subject_common_name(transport.get_extra_info("peercert")))


def _subject_common_name(peercert: Any) -> str | None:
    """The CN of a *verified* peer certificate (getpeercert() is empty when not verified)."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
