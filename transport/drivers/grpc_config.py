"""Settings of the grpc driver: channel and server options (GrpcOptions) and TLS credentials.

Kept apart from transport/drivers/grpc.py, which moves the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from transport.drivers.base import HandshakeGate, TLSConfig
from transport.exceptions import ConfigError

__all__ = [
    "GrpcOptions",
    "OptionList",
    "channel_credentials",
    "refuse_tls_for_plain",
    "server_credentials",
]

OptionList = list[tuple[str, Any]]

MiB = 1024 * 1024
# Our call's metadata (path, authority, content type, user agent, the ready marker, a status
# message) is well under 1 KiB; grpc's own ceiling would let a peer's headers hold 16 KiB.
_MAX_METADATA_SIZE = 8 * 1024
_GRPC_MAX_INT = 2**31 - 1


@dataclass(frozen=True, slots=True)
class GrpcOptions:
    """Tuning knobs of the grpc driver; None leaves grpc's default.

    `connect_timeout`: seconds connect() waits for the server to accept the call.
    `stream_window`: the initial HTTP/2 stream window (`grpc.http2.lookahead_bytes`); with
    `bdp_probe` grpc grows windows to the measured bandwidth-delay product.
    `max_frame_size`: the largest HTTP/2 DATA frame we accept (16 KiB .. 16 MiB - 1).
    `write_buffer_size`: bytes grpc gathers before a socket write (`grpc.http2.write_buffer_size`).
    `keepalive_time`/`keepalive_timeout`: HTTP/2 pings on idle connections, seconds.
    `max_message_size`: the largest grpc message sent (send() splits bigger ones) and accepted
    (grpc buffers a whole message before handing it over, so this bounds what one message can
    make a receiver hold); both sides must use the same value, as the default does.
    """

    connect_timeout: float = 20.0
    stream_window: int | None = None
    bdp_probe: bool = True
    max_frame_size: int | None = None
    write_buffer_size: int | None = None
    keepalive_time: float = 30.0
    keepalive_timeout: float = 20.0
    max_message_size: int = 4 * MiB

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "keepalive_time", "keepalive_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"GrpcOptions.{name} must be > 0, got {getattr(self, name)}")
        for name in ("stream_window", "write_buffer_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"GrpcOptions.{name} must be >= 1 or None, got {value}")
        if not 1 <= self.max_message_size <= _GRPC_MAX_INT:
            raise ConfigError(
                f"GrpcOptions.max_message_size must be in [1, {_GRPC_MAX_INT}], "
                f"got {self.max_message_size}"
            )
        frame = self.max_frame_size
        if frame is not None and not 16 * 1024 <= frame <= (1 << 24) - 1:
            raise ConfigError(
                f"GrpcOptions.max_frame_size must be in [16384, 16777215], got {frame}"
            )

    def common_options(self) -> OptionList:
        """Options that apply to both the channel and the server."""
        options: OptionList = [
            ("grpc.max_send_message_length", self.max_message_size),
            ("grpc.max_receive_message_length", self.max_message_size),
            ("grpc.max_metadata_size", _MAX_METADATA_SIZE),
            ("grpc.absolute_max_metadata_size", _MAX_METADATA_SIZE),
            ("grpc.http2.bdp_probe", int(self.bdp_probe)),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            # Our calls live for hours; pings during a long quiet stretch are not abuse.
            ("grpc.http2.max_pings_without_data", 0),
        ]
        for key, value in (
            ("grpc.http2.lookahead_bytes", self.stream_window),
            ("grpc.http2.max_frame_size", self.max_frame_size),
            ("grpc.http2.write_buffer_size", self.write_buffer_size),
        ):
            if value is not None:
                options.append((key, value))
        return options

    def channel_options(self) -> OptionList:
        """Options of a client channel (one per connection)."""
        return [
            *self.common_options(),
            ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per tensorwire connection
            ("grpc.enable_retries", 0),  # retries would buffer (copy) every message we send
        ]

    def server_options(self, gate: HandshakeGate | None = None) -> OptionList:
        """Options of a listening server; `gate` bounds connections before their call starts."""
        min_ping_ms = int(min(self.keepalive_time, 10.0) * 1000)
        return [
            *self.common_options(),
            ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
            ("grpc.so_reuseport", 0),  # a second listener on a used port must fail, not share it
            # One tensorwire connection is one call on its own TCP connection: a peer that opens
            # more streams on one connection is not our client, and each stream would be a
            # connection the TCP connection cap below does not see.
            ("grpc.max_concurrent_streams", 1),
            *_admission_options(gate),
        ]


def _admission_options(gate: HandshakeGate | None) -> OptionList:
    """grpc's own bounds for the connections it accepts, from the listener's gate.

    grpc core accepts and handshakes connections where Python cannot see them, so they cannot be
    counted in the gate. Instead: TLS and the HTTP/2 preface and SETTINGS must be done within
    gate.timeout of the accept (`server_handshake_timeout_ms`), a connection that then starts no
    call or leaves its HEADERS unfinished is closed after gate.timeout (`max_connection_idle_ms`;
    ours start their call at once), and with gate.limit no more than that many TCP connections
    are held at once, handshaking or not (`max_allowed_incoming_connections`: grpc closes the
    ones above it at accept)."""
    if gate is None:
        return []
    timeout_ms = min(max(1, round(gate.timeout * 1000)), _GRPC_MAX_INT)
    options: OptionList = [
        ("grpc.server_handshake_timeout_ms", timeout_ms),
        ("grpc.max_connection_idle_ms", timeout_ms),
    ]
    if gate.limit is not None:
        options.append(("grpc.max_allowed_incoming_connections", gate.limit))
    return options


# --- TLS ----------------------------------------------------------------------------------------


def refuse_tls_for_plain(tls: TLSConfig | None, url: str) -> None:
    """ConfigError when TLS settings come with a plain grpc:// URL."""
    if tls is not None:
        raise ConfigError(f"{url!r}: TLS settings given for a plain grpc:// URL; use grpcs://")


def _read_pem(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"TLSConfig: cannot load {field}={path!r}: {exc}") from exc


def channel_credentials(tls: TLSConfig, url: str) -> grpc.ChannelCredentials:
    """Client credentials; the files are first checked with the ssl module for clear errors."""
    if not tls.verify_peer:
        raise ConfigError(
            f"{url!r}: grpcs:// cannot skip server verification (verify_peer=False): grpc has "
            "no such option; give ca_file instead"
        )
    tls.client_context()  # ConfigError naming the file that does not load
    key_path = tls.key_file or tls.cert_file  # a cert_file may hold the key too
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem("ca_file", tls.ca_file) if tls.ca_file else None,
        private_key=_read_pem("key_file", key_path) if key_path else None,
        certificate_chain=_read_pem("cert_file", tls.cert_file) if tls.cert_file else None,
    )


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Server credentials; with require_client_cert, clients need a cert signed by ca_file.

    grpc python cannot verify an optional client certificate (ssl's CERT_OPTIONAL): without
    require_client_cert no client certificate is asked for and peer_identity stays None.
    """
    tls.server_context()  # ConfigError naming what is missing or does not load
    assert tls.cert_file is not None  # server_context() refused None
    key = _read_pem("key_file", tls.key_file or tls.cert_file)
    chain = _read_pem("cert_file", tls.cert_file)
    root = _read_pem("ca_file", tls.ca_file) if tls.require_client_cert and tls.ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=root, require_client_auth=tls.require_client_cert
    )
