"""Who is on the other end of a connection, as far as it was verified.

A peer's node id is only a claim it makes in HELLO. Where it presented a client certificate, the
claim must be the certificate's name (its subject CN, what transport.certs writes and the drivers
report as `PeerInfo.peer_identity`): a connection that claims another is refused. Transfers belong
to the identity that opened them (the certificate name, else the auth token, else the node id):
the transfer layer keeps every identity's transfer ids apart, so one peer can neither resume,
feed nor pre-empt another's transfer, nor learn what the receiver holds of it.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from transport.drivers import TLSConfig
from transport.endpoint.link import Link


def certificate_name(tls: TLSConfig | None) -> str | None:
    """The name in our own certificate (its subject CN), which a server binds our node id to;
    None without one."""
    if tls is None or tls.cert_file is None:
        return None
    return _common_name(str(Path(tls.cert_file).resolve()))


@cache
def _common_name(path: str) -> str | None:
    certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def certified_name(link: Link) -> str | None:
    """The verified certificate name of the peer on `link` (None: it presented none)."""
    return link.peer.peer_identity if link.peer else None


def claim_refusal(link: Link) -> str | None:
    """Why the node id the peer claims in HELLO may not stand, or None."""
    certified = certified_name(link)
    if certified is not None and link.remote_node != certified:
        return (
            f"node id {link.remote_node!r} is not the identity {certified!r} of the peer's "
            "certificate"
        )
    return None


def verified_node(link: Link) -> str | None:
    """The peer's name: its certificate's, or (without one) the node id it announced."""
    return certified_name(link) or link.remote_node


def owner(link: Link) -> str:
    """The identity transfers opened on `link` belong to: the certificate name, else the auth
    token (hashed: it is a secret), else the node id of that connection."""
    certified = certified_name(link)
    if certified is not None:
        return f"cert:{certified}"
    token = link.remote_hello.get("token")
    if isinstance(token, str):
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return f"node:{link.remote_node or ''}"
