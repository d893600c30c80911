"""The endpoint's settings, checked once at construction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TypedDict

from transport import sfm
from transport.codecs import CompressionMode, CompressionPolicy
from transport.drivers import TLSConfig
from transport.exceptions import ConfigError
from transport.payload import DEFAULT_CHUNK_SIZE, ManifestLimits
from transport.wire import PREFIX_SIZE, Limits

# The safetensors header of a chunk is small, but a chunk of many tiny tensors carries one JSON
# entry per tensor; credit and buffers leave this much room above chunk_size for it.
CHUNK_HEADER_ROOM = 1024 * 1024


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """Everything an endpoint can be tuned by; the defaults are meant to be left alone.

    `idle_timeout` is the one timeout: a wait fails when nothing moved for that long, never
    because a large transfer takes long. A dropped connection is retried (backoff with jitter)
    until the same idle_timeout passes without a new one.
    """

    node_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    chunk_size: int = DEFAULT_CHUNK_SIZE
    stream_window: int = 32 * 2**20
    connection_window: int = 128 * 2**20
    max_streams: int = 64
    idle_timeout: float = 120.0
    heartbeat_interval: float = 30.0
    reconnect_initial_delay: float = 0.05
    reconnect_max_delay: float = 5.0
    tls: TLSConfig | None = None
    # Identity. A client may present a token (sent only under TLS); a server may accept only
    # known tokens and/or only the certificate identities (subject CN) it lists. None = anyone the
    # transport let in (under mutual TLS: anyone with a certificate from the trusted CA).
    token: str | None = None
    auth_tokens: frozenset[str] | None = None
    allowed_identities: frozenset[str] | None = None
    # Lossless compression of chunks: "auto" compresses when the measured link is slower than
    # the codec (it is on slow WAN links, not on loopback); "on", "off"; zstd level; threads.
    compression: str = "auto"
    compression_level: int = 1
    compression_threads: int = 2
    # Parallel connections a state dict is striped over when we dialed the peer. 1 fills most
    # links (the window grows to the BDP); more help on a long fat pipe whose loss or per-flow
    # limits hold one TCP flow back.
    streams: int = 1
    # Hostile-peer bounds: connections held at once, and the time a new one has to say hello.
    max_connections: int = 1024
    hello_timeout: float = 10.0
    # Token guessing: `auth_failure_limit` failed authentications from one source address within
    # `auth_failure_window` seconds lock that address out for `auth_lockout` seconds (its
    # connections are refused at once). Other addresses are not affected.
    auth_failure_limit: int = 10
    auth_failure_window: float = 60.0
    auth_lockout: float = 300.0
    # Slow loris: once a frame has begun, the peer must keep sending it at `min_frame_rate`
    # bytes/s on average (counted from the frame's first byte, for as long as the bytes keep
    # ending inside a frame); it gets `frame_grace` seconds before that is checked. 0 disables.
    min_frame_rate: float = 1024.0
    frame_grace: float = 10.0
    limits: Limits | None = None  # None: derived from chunk_size and max_header
    # Memory a peer's announcements may cost (docs/operations.md, "Memory under attack"): the
    # largest frame header (an OPEN's manifest: ~80 bytes a tensor), the most chunks one
    # transfer may plan (~250 bytes each, planned when the application takes it), and what the
    # transfers one identity opened but the application has not taken yet may hold together.
    max_header: int = 16 * 2**20
    max_chunks: int = 2**18
    max_queued_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        room = self.chunk_size + CHUNK_HEADER_ROOM
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.stream_window < room or self.connection_window < room:
            raise ConfigError(
                f"stream_window ({self.stream_window}) and connection_window "
                f"({self.connection_window}) must hold one chunk plus its header ({room} bytes)"
            )
        if self.compression not in ("auto", "on", "off"):
            raise ConfigError(f"compression must be auto, on or off, got {self.compression!r}")
        if self.compression_threads <= 0:
            raise ConfigError(
                f"compression_threads must be positive, got {self.compression_threads}"
            )
        if not 1 <= self.streams <= 64:
            raise ConfigError(f"streams must be in 1..64, got {self.streams}")
        for name in ("max_header", "max_chunks", "max_queued_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_connections <= 0:
            raise ConfigError(f"max_connections must be positive, got {self.max_connections}")
        if self.min_frame_rate < 0:
            raise ConfigError(f"min_frame_rate must be >= 0, got {self.min_frame_rate}")
        if self.auth_failure_limit <= 0:
            raise ConfigError(f"auth_failure_limit must be positive, got {self.auth_failure_limit}")
        for name in (
            "idle_timeout",
            "reconnect_initial_delay",
            "reconnect_max_delay",
            "hello_timeout",
            "auth_failure_window",
            "auth_lockout",
            "frame_grace",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def protocol_config(self, *, is_initiator: bool) -> sfm.ConnectionConfig:
        return sfm.ConnectionConfig(
            is_initiator=is_initiator,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_streams=self.max_streams,
            limits=self.frame_limits,
            # A transfer the application has not taken holds no credit (it would block the
            # connection window for the ones being received), and a stream's final ACK is the
            # receiving application's verdict that it committed the transfer.
            stream_credit=0,
            ack_on_end=False,
            # A peer that dialed us is authenticated (endpoint._greeted) before anything it sent
            # after its HELLO is even parsed.
            hold_hello=not is_initiator,
        )

    @property
    def frame_limits(self) -> Limits:
        """No frame may be larger than a chunk plus its header room: anything bigger could
        never fit the credit window, and refusing it at the length field means a hostile peer
        cannot make us allocate more than a chunk per connection."""
        if self.limits is not None:
            return self.limits
        payload = self.chunk_size + CHUNK_HEADER_ROOM
        header = self.max_header
        return Limits(
            max_header=header, max_payload=payload, max_frame=PREFIX_SIZE + header + payload
        )

    @property
    def manifest_limits(self) -> ManifestLimits:
        """What a received manifest may announce: chunks no larger than ours (a larger one could
        never arrive in one frame) and at most max_chunks of them."""
        largest = self.frame_limits.max_payload - CHUNK_HEADER_ROOM
        return ManifestLimits(max_chunk_bytes=max(largest, 1), max_chunks=self.max_chunks)

    def compression_policy(self) -> CompressionPolicy:
        """A fresh policy (one per transfer: each measures its own link and data)."""
        mode: CompressionMode = self.compression  # type: ignore[assignment]
        return CompressionPolicy(mode, self.compression_level, threads=self.compression_threads)

    def replace(self, **changes: object) -> EndpointConfig:
        unknown = set(changes) - set(EndpointConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown Endpoint option(s) {sorted(unknown)}; the options are EndpointConfig's "
                f"fields: {sorted(EndpointConfig.__dataclass_fields__)}"
            )
        fields = {name: getattr(self, name) for name in EndpointConfig.__dataclass_fields__}
        return EndpointConfig(**{**fields, **changes})


class EndpointOptions(TypedDict, total=False):
    """EndpointConfig's fields as keyword options of `Endpoint(...)` (typed for checkers)."""

    node_id: str
    chunk_size: int
    stream_window: int
    connection_window: int
    max_streams: int
    idle_timeout: float
    heartbeat_interval: float
    reconnect_initial_delay: float
    reconnect_max_delay: float
    tls: TLSConfig | None
    token: str | None
    auth_tokens: frozenset[str] | None
    allowed_identities: frozenset[str] | None
    compression: str
    compression_level: int
    compression_threads: int
    streams: int
    max_connections: int
    hello_timeout: float
    auth_failure_limit: int
    auth_failure_window: float
    auth_lockout: float
    min_frame_rate: float
    frame_grace: float
    limits: Limits | None
    max_header: int
    max_chunks: int
    max_queued_bytes: int
