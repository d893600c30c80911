"""Drivers move opaque bytes over one kind of connection, chosen by URL scheme.

    driver = driver_for("tcp://10.0.0.5:7000")
    conn = await driver.connect("tcp://10.0.0.5:7000", receiver)

Built in: tcp, tcps (TcpDriver), grpc, grpcs (GrpcDriver: one bidirectional gRPC stream per
connection), http, https (HttpDriver: one full-duplex streaming POST per connection on aiohttp),
memory (MemoryDriver, in-process). Another driver joins the registry with `register_driver`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from transport.drivers.base import (
    Buffer,
    ByteReceiver,
    Driver,
    DriverConnection,
    HandshakeGate,
    Listener,
    PeerInfo,
    TLSConfig,
    map_exceptions,
)
from transport.drivers.grpc import GrpcDriver, GrpcOptions
from transport.drivers.http import HttpDriver, HttpOptions
from transport.drivers.memory import MemoryDriver
from transport.drivers.tcp import TcpDriver, TcpOptions
from transport.exceptions import ConfigError

__all__ = [
    "Buffer",
    "ByteReceiver",
    "Driver",
    "DriverConnection",
    "GrpcDriver",
    "GrpcOptions",
    "HandshakeGate",
    "HttpDriver",
    "HttpOptions",
    "Listener",
    "MemoryDriver",
    "PeerInfo",
    "TLSConfig",
    "TcpDriver",
    "TcpOptions",
    "driver_for",
    "known_schemes",
    "map_exceptions",
    "register_driver",
]

_drivers_by_scheme: dict[str, Driver] = {}


def register_driver(driver: Driver) -> None:
    """Make `driver` the one `driver_for` returns for each of its schemes."""
    for scheme in driver.schemes:
        _drivers_by_scheme[scheme] = driver


def known_schemes() -> tuple[str, ...]:
    """The URL schemes that have a driver, sorted."""
    return tuple(sorted(_drivers_by_scheme))


def driver_for(url: str) -> Driver:
    """The driver for the URL's scheme; ConfigError listing the known schemes otherwise."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    driver = _drivers_by_scheme.get(scheme)
    if driver is None:
        what = f"unknown scheme {scheme!r}" if scheme else "no scheme"
        raise ConfigError(f"bad URL {url!r}: {what}; known schemes: {', '.join(known_schemes())}")
    return driver


register_driver(TcpDriver())
register_driver(GrpcDriver())
register_driver(HttpDriver())
register_driver(MemoryDriver())
