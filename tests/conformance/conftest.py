"""The conformance suite runs every test over every driver, with TLS off and on (but the 2 GiB
stream, which runs once per driver family: see test_a_2_gib_stream)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from transport import Endpoint, EndpointConfig, TLSConfig, client_tls, create_pki, server_tls

MIB = 1 << 20

# (scheme, uses TLS). memory:// never leaves the process, so it has no TLS variant.
TRANSPORTS = [
    ("memory", False),
    ("tcp", False),
    ("tcps", True),
    ("grpc", False),
    ("grpcs", True),
    ("http", False),
    ("https", True),
]


@dataclass(frozen=True)
class Setup:
    """How to build a server and clients for one (driver, TLS) combination."""

    scheme: str
    tls: bool
    pki: Path
    name: str

    def listen_url(self) -> str:
        return (
            f"memory://{self.name}" if self.scheme == "memory" else f"{self.scheme}://127.0.0.1:0"
        )

    def server(self, **settings: object) -> Endpoint:
        return Endpoint(EndpointConfig(tls=self._tls(server_tls)), **settings)

    def client(self, name: str = "site-1", **settings: object) -> Endpoint:
        return Endpoint(
            EndpointConfig(tls=self._tls(lambda pki: client_tls(pki, name))), **settings
        )

    def _tls(self, make: Callable[[Path], TLSConfig]) -> TLSConfig | None:
        return make(self.pki) if self.tls else None


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    create_pki(directory, clients=("site-1", "site-2"))
    return directory


@pytest.fixture(params=TRANSPORTS, ids=[scheme for scheme, _ in TRANSPORTS])
def setup(request: pytest.FixtureRequest, pki: Path) -> Setup:
    scheme, tls = request.param
    return Setup(scheme, tls, pki, re.sub(r"[^A-Za-z0-9]+", "-", request.node.name))
