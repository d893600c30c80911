"""Memory amplification: what a hostile peer's announcements may make the receiver hold.

Each attack runs over every driver beside an honest transfer that must complete, and the
process's Python memory (tracemalloc: exact, so the figure does not flake; it includes the
attacker's own small receive buffers, counted in ATTACKER) is checked against the bound
docs/operations.md ("Memory under attack") writes down. Native buffers (OpenSSL, grpc core) are
bounded separately: see that section.
"""

from __future__ import annotations

import asyncio
import gc
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from transport.endpoint.link import Link
from transport.exceptions import TransportError
from transport.wire import FrameType

from .conftest import MIB, Arena, RawReceiver, first_of, hello, raw

KIB = 1 << 10
# What one connection may cost the endpoint before its peer is accepted: the frame parser's
# 64 KiB scratch and the link's objects (measured: ~70 KiB).
PRE_ACCEPT_BOUND = 96 * KIB
# The honest transfer running beside the attacks: its chunks in flight (window 4 MiB each way).
HONEST_SLACK = 24 * MIB
# How much the honest transfer's memory differs between two moments (chunks in flight).
HONEST_JITTER = 8 * MIB
# The attacker's side of each connection, in the same process (a 64 KiB receive buffer).
ATTACKER = 80 * KIB


@dataclass
class Traced:
    """Python memory above the start (tracemalloc: exact, so the bounds cannot flake)."""

    start: int = 0

    def begin(self) -> None:
        gc.collect()
        self.start = tracemalloc.get_traced_memory()[0]

    def now(self) -> int:
        return tracemalloc.get_traced_memory()[0] - self.start


@contextmanager
def traced() -> Iterator[Traced]:
    tracemalloc.start(1)
    probe = Traced()
    try:
        probe.begin()
        yield probe
    finally:
        tracemalloc.stop()


def _prefix(ftype: FrameType, header_len: int, payload_len: int = 0) -> bytes:
    """A frame prefix announcing lengths whose body never comes (checksum is of nothing)."""
    frame = bytearray(raw(ftype)[:40])
    frame[20:24] = struct.pack(">I", header_len)
    frame[24:28] = struct.pack(">I", payload_len)
    frame[36:40] = struct.pack(">I", zlib.crc32(bytes(frame[:36])))
    return bytes(frame)


def _open(
    stream_id: int, tensors: list[dict[str, object]], chunk_size: int = MIB, **meta: object
) -> bytes:
    total = sum(4 * _numel(t["shape"]) for t in tensors)  # type: ignore[arg-type]
    manifest = {
        "format": 1,
        "digest": "xxh3-128-tree",
        "chunk_size": chunk_size,
        "tensors": tensors,
        "total_bytes": total,
    }
    header = {"kind": "state_dict", "manifest": manifest, "meta": meta}
    return raw(FrameType.OPEN, stream_id=stream_id, header=header)


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _tensors(count: int, shape: list[int] | None = None) -> list[dict[str, object]]:
    return [
        {"name": f"model.layers.{i}.mlp.weight", "dtype": "F32", "shape": shape or [4]}
        for i in range(count)
    ]


async def test_unaccepted_connections_cost_the_scratch_only(arena: Arena) -> None:
    """41 bytes announcing a 16 MiB header used to hold 16-26 MiB per connection. Now a
    connection that has not said hello is parsed under 16 KiB of header in a 64 KiB scratch."""
    count = 32
    with traced() as memory:
        big = await asyncio.gather(
            *(arena.connect([_prefix(FrameType.HELLO, 16 * MIB), b"{" * 1000]) for _ in range(24))
        )
        for seen, connection in big:
            await arena.hung_up(seen, connection)
            assert seen.goaway_code() in {"FrameTooLargeError", "reset"}
        # Announced within the limits, a body that never comes: held until hello_timeout.
        opened = await asyncio.gather(
            *(
                arena.connect([_prefix(FrameType.HELLO, 16 * KIB - 1), b"{" * 8000])
                for _ in range(count)
            )
        )
        await asyncio.wait_for(asyncio.gather(*(seen.greeted.wait() for seen, _ in opened)), 10)
        held = memory.now()
        await arena.clock.advance(1.0)
        for seen, connection in opened:
            await arena.hung_up(seen, connection)
            assert seen.goaway_code() == "hello_timeout"
        del big, opened, seen, connection  # the attacker's ends of them
        await _until(lambda: len(arena.server._links) <= 1, "the held connections closed")
        await asyncio.sleep(0)  # the drivers' connection_lost callbacks
        gc.collect()
        cost = held - memory.now()  # what the held connections cost, the honest transfer aside
        per_connection = PRE_ACCEPT_BOUND + ATTACKER + _driver_buffers(arena.url)
        assert cost < count * per_connection + HONEST_JITTER, (cost / count, per_connection)
        # The refused ones left nothing, the honest transfer's chunks aside.
        if memory.now() > HONEST_SLACK:
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:8]:
                print("TOP", stat)
        assert memory.now() < HONEST_SLACK
    await arena.honest_completes()


async def test_manifests_are_held_to_the_receivers_limits(arena: Arena) -> None:
    """A chunk_size larger than the receiver's (a 1 KiB compressed frame made it allocate
    257 MiB) and a chunk_size of 1 (4 Mi planned chunks, +1.7 GiB) are refused at the OPEN."""
    with traced() as memory:
        huge_chunks = _open(1, _tensors(1, [64 * MIB]), chunk_size=256 * MIB)
        seen = await arena.attack([hello(), huge_chunks])
        assert seen.goaway_code() == "ManifestError"
        tiny_chunks = _open(1, _tensors(1, [MIB]), chunk_size=1)
        seen = await arena.attack([hello(), tiny_chunks])
        assert seen.goaway_code() == "ManifestError"
        assert memory.now() < HONEST_SLACK
    await arena.honest_completes()


async def test_queued_transfers_stay_within_the_peers_budget(arena: Arena) -> None:
    """Transfers the application does not take (15 MiB manifests used to cost 215 MiB each,
    without limit) count against max_queued_bytes (16 MiB in the arena): beyond it, 'busy'."""
    manifest_tensors = 12_000  # an OPEN header of ~1 MiB: costs ~8 MiB queued
    frames = [hello()]
    frames += [_open(1 + 2 * k, _tensors(manifest_tensors), hold=True) for k in range(6)]
    with traced() as memory:
        seen, connection = await arena.connect(frames)
        await _until(lambda: _resets(seen) >= 4, "four of six transfers refused")
        queued = memory.now()
        # Two admitted (8 + 8 MiB estimated), the decoding of one header in passing.
        assert queued < 16 * MIB + 8 * MIB + HONEST_SLACK, queued
        assert set(_reset_codes(seen)) == {"busy"}
        connection.abort()
    await arena.honest_completes()


async def test_empty_data_frames_use_up_the_window(arena: Arena) -> None:
    """300k empty DATA frames with new indices cost +62 MiB without using credit. Now every
    frame takes at least min_data_credit (256 B): the window holds at most 4 MiB / 256 of them."""
    opening = [hello(), _open(1, _tensors(1, [16 * MIB // 4]))]
    flood = b"".join(raw(FrameType.DATA, stream_id=1, offset=i) for i in range(20_000))
    with traced() as memory:
        seen = await arena.attack(opening, once_credited=[flood])
        assert seen.goaway_code() in {"FlowControlError", "ChunkError"}
        assert memory.now() < 16 * KIB * 256 + HONEST_SLACK
    await arena.honest_completes()


async def test_a_storm_of_brief_peers_leaves_nothing_behind(arena: Arena) -> None:
    """600 HELLOs with new node ids used to leave 600 peers and 599 links for good."""
    links_before = _live_links()
    greeted = 0
    for wave in range(8):
        opened = await asyncio.gather(
            *(arena.connect([hello(f"storm-{wave}-{i}")]) for i in range(25))
        )
        await asyncio.wait_for(
            asyncio.gather(*(first_of(seen.greeted, seen.closed) for seen, _ in opened)), 10
        )
        greeted += sum(seen.greeted.is_set() for seen, _ in opened)
        for _, connection in opened:
            connection.abort()
        del opened  # the attacker's ends (the in-process driver's reach the server's links)
        await _until(lambda: len(arena.server._links) <= 1, "every storm connection closed")
    assert greeted >= 100
    gc.collect()
    # Nobody takes accepted() here: only the honest peer (still connected) may wait there.
    assert len(arena.server._accepted) <= 1
    assert not [key for key in arena.server._peers_by_identity if key[1].startswith("storm-")]
    assert _live_links() <= links_before + 1
    await arena.honest_completes()


async def test_pings_without_reading_the_pongs_are_refused(arena: Arena) -> None:
    """Unread PONGs piled up (85 B a PING). A peer that stops reading is refused once 64
    PONGs wait behind a blocked write; its memory stays bounded meanwhile."""
    seen, connection = await arena.connect([hello()])
    await asyncio.wait_for(seen.greeted.wait(), 10)
    connection.pause_reading()  # deaf from now on: the PONGs fill the buffers, then wait
    pings = b"".join(raw(FrameType.PING, offset=nonce) for nonce in range(1, 4097))
    with traced() as memory:
        for _ in range(400):  # up to 1.6 M PINGs (64 MiB): far beyond what buffers hold
            if len(arena.server._links) <= 1:
                break  # refused (only the honest link is left)
            try:
                await asyncio.wait_for(connection.send([pings]), 5)
            except (TransportError, TimeoutError):
                break  # refused, or our own writes block: the server stopped reading us
        assert memory.now() < HONEST_SLACK
    await _until(lambda: len(arena.server._links) <= 1, "the deaf peer refused")
    connection.abort()
    await arena.honest_completes()


def _driver_buffers(url: str) -> int:
    """Python-level buffers the driver itself holds per connection, both ends counted (the
    attacker runs in this process): asyncio's TLS layer reads into a 256 KiB buffer, and its
    SSL objects (measured: ~600 KiB a connection end in all)."""
    scheme = url.split(":", 1)[0]
    return {"tcps": 2 * 640 * KIB, "https": 2 * 640 * KIB}.get(scheme, 0)


async def _until(condition: object, what: str) -> None:
    async def wait() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(wait(), 60)  # generous: tracemalloc slows a busy machine
    except TimeoutError:
        raise AssertionError(f"not within 60 s: {what}") from None


def _resets(seen: RawReceiver) -> int:
    return len(_reset_codes(seen))


def _reset_codes(seen: RawReceiver) -> list[str]:
    return [str(f.header.get("code")) for f in seen.frames() if f.type is FrameType.RESET]


def _live_links() -> int:
    gc.collect()
    return sum(isinstance(obj, Link) for obj in gc.get_objects())
