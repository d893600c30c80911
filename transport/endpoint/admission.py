"""Who may take a connection slot: the pure bookkeeping behind the endpoint's admission checks.

Time is an input (`now`, from the endpoint's clock), so a test of a five-minute lockout takes no
five minutes. Nothing here touches a socket.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from transport.drivers import PeerInfo

# Schemes whose bytes no one on the path can read: an auth token may travel only over these
# (memory:// never leaves the process). The library's own client sends a token only there.
PRIVATE_SCHEMES = frozenset({"tcps", "grpcs", "https", "memory"})

# Sources tracked at once; the least recently failing ones are forgotten beyond this, so a flood
# of spoofed-looking sources cannot grow the table without bound.
MAX_TRACKED_SOURCES = 4096


def source_of(peer: PeerInfo | None) -> str:
    """The address a connection came from, without its port (`[::1]:5000` -> `::1`)."""
    if peer is None:
        return "?"
    if peer.scheme == "memory":
        return "memory"  # in-process: one source
    address = peer.address
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, separator, port = address.rpartition(":")
    return host if separator and port.isdigit() else address


def token_travels_in_clear(peer: PeerInfo | None) -> bool:
    """True when a token that arrived on this connection crossed the network unencrypted."""
    return peer is None or peer.scheme not in PRIVATE_SCHEMES


class AuthFailures:
    """Failed authentications per source address, and the lockouts they earn.

    `limit` failures within `window` seconds lock the source out for `lockout` seconds: its
    connections are then refused at once, whatever token they carry.
    """

    def __init__(self, limit: int, window: float, lockout: float) -> None:
        self.limit = limit
        self.window = window
        self.lockout = lockout
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked_until: OrderedDict[str, float] = OrderedDict()

    def failed(self, source: str, now: float) -> bool:
        """Count a failure from `source`; True when it locks the source out."""
        times = self._failures.pop(source, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            self._locked_until.pop(source, None)
            self._locked_until[source] = now + self.lockout
            _bound(self._locked_until)
            return True
        self._failures[source] = times
        _bound(self._failures)
        return False

    def locked(self, source: str, now: float) -> float | None:
        """Seconds left of `source`'s lockout, or None when it may try."""
        until = self._locked_until.get(source)
        if until is None:
            return None
        if until <= now:
            del self._locked_until[source]
            return None
        return until - now


def _bound(table: OrderedDict[str, Any]) -> None:
    while len(table) > MAX_TRACKED_SOURCES:
        table.popitem(last=False)


# What a transfer opened but not taken yet may cost per byte of its OPEN header: the decoded
# JSON and the parsed manifest together measured ~8x the header (466 + 372 bytes per tensor
# entry of ~82 bytes), plus the objects every transfer has.
QUEUED_COST_PER_HEADER_BYTE = 8
QUEUED_COST_BASE = 4096


def queued_cost(header_size: int) -> int:
    """The memory a queued (untaken) transfer with an OPEN header of `header_size` may hold."""
    return QUEUED_COST_BASE + QUEUED_COST_PER_HEADER_BYTE * header_size


class QueuedBudget:
    """Per identity, what its transfers that the application has not taken yet may cost.

    A peer can open transfers faster than a busy application takes them; each queued one holds
    its manifest. One queued transfer is always admitted (however large its manifest: the frame
    limits bound it), more only within `limit` bytes together.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}  # owner -> cost queued
        self._entries: dict[int, tuple[str, int]] = {}  # transfer key -> (owner, cost)

    def admit(self, key: int, owner: str, cost: int) -> bool:
        held = self._held.get(owner, 0)
        if held and held + cost > self.limit:
            return False
        self._held[owner] = held + cost
        self._entries[key] = (owner, cost)
        return True

    def release(self, key: int) -> None:
        """The transfer was taken, or ended: it no longer counts (idempotent)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        owner, cost = entry
        left = self._held[owner] - cost
        if left:
            self._held[owner] = left
        else:
            del self._held[owner]

    def held(self, owner: str) -> int:
        return self._held.get(owner, 0)
