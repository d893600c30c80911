"""Two sfm Connections wired back to back in memory, and raw frames from a hand-driven peer."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from transport.sfm import Connection, ConnectionConfig, Event
from transport.wire import Buffer, Frame, FrameParser, FrameType, encode_frame

PEER_SETTINGS = {
    "stream_window": 1 << 20,
    "connection_window": 4 << 20,
    "max_streams": 8,
    "max_pending_requests": 8,
}


def raw(ftype: FrameType, **fields: Any) -> bytes:
    """One frame as bytes, as a (possibly misbehaving) peer would write it."""
    return b"".join(bytes(part) for part in encode_frame(ftype, **fields).parts)


def raw_hello(**settings: int) -> bytes:
    """A peer HELLO announcing PEER_SETTINGS, overridden by `settings`."""
    header = {"protocol": 1, "node": "raw-peer", "sfm": {**PEER_SETTINGS, **settings}}
    return raw(FrameType.HELLO, header=header)


def sent_frames(conn: Connection) -> list[Frame]:
    """Parse and take everything `conn` queued for its peer."""
    data = b"".join(bytes(part) for part in conn.data_to_send())
    return FrameParser().feed(data)


def deliver(data: bytes, dst: Connection, rng: random.Random | None) -> None:
    """Feed `data` to `dst` in random pieces, alternating receive_data and get_buffer."""
    if rng is None:
        dst.receive_data(data)
        return
    pos = 0
    while pos < len(data):
        size = rng.randint(1, max(1, min(len(data) - pos, rng.choice((7, 64, 4096, 1 << 20)))))
        piece = data[pos : pos + size]
        if rng.random() < 0.5:
            dst.receive_data(piece)
            pos += size
            continue
        buffer = dst.get_buffer(size)
        written = min(len(buffer), size)
        buffer[:written] = piece[:written]
        dst.buffer_updated(written)
        pos += written


def pump(src: Connection, dst: Connection, rng: random.Random | None = None) -> int:
    """Move everything src has queued into dst; return the number of bytes moved."""
    data = b"".join(bytes(part) for part in src.data_to_send())
    deliver(data, dst, rng)
    return len(data)


def settle(a: Connection, b: Connection, rng: random.Random | None = None) -> None:
    """Pump both ways until neither side has anything left to say."""
    while pump(a, b, rng) + pump(b, a, rng):
        pass


def connected_pair(
    rng: random.Random | None = None, **config: Any
) -> tuple[Connection, Connection]:
    """An initiator and an acceptor that exchanged HELLOs."""
    a = Connection(ConnectionConfig(is_initiator=True, **config))
    b = Connection(ConnectionConfig(is_initiator=False, **config))
    a.send_hello({"node": "a"})
    b.send_hello({"node": "b"})
    settle(a, b, rng)
    a.events_received()
    b.events_received()
    return a, b


def acceptor_after_hello(**config: Any) -> Connection:
    """An acceptor that sent its HELLO and got a raw peer's HELLO; its outbox is empty."""
    conn = Connection(ConnectionConfig(is_initiator=False, **config))
    conn.send_hello({"node": "acceptor"})
    conn.receive_data(raw_hello())
    conn.data_to_send()
    conn.events_received()
    return conn


def of_type(events: Sequence[Event], kind: type) -> list[Any]:
    """The events of one class, in order."""
    return [event for event in events if isinstance(event, kind)]


def goaway_code(conn: Connection) -> Mapping[str, Any]:
    """The header of the last GOAWAY `conn` queued."""
    goaways = [f for f in sent_frames(conn) if f.type is FrameType.GOAWAY]
    assert goaways, "no GOAWAY was queued"
    return goaways[-1].header


def payload_parts(data: Buffer, pieces: int) -> list[memoryview]:
    """`data` as `pieces` memoryview slices (a scatter-gather payload)."""
    view = memoryview(data)
    step = max(1, len(view) // pieces)
    return [view[i : i + step] for i in range(0, len(view), step)]
