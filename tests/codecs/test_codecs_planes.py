"""Byte planes on raw bytes: split and join round-trip for any plane count, tail and part layout,
whether each plane travels compressed or raw, and a payload stays valid after later calls."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.codecs import ChunkCompressor, ChunkDecompressor, Segment
from transport.wire.frames import Buffer

# Per byte position of an element: noisy (stays raw), few values (compresses) or constant.
PLANE_KINDS = ("noise", "few", "constant")


def element_bytes(count: int, kinds: list[str], tail: int, seed: int) -> bytes:
    """`count` elements of len(kinds) bytes, byte k drawn as kinds[k] says, then `tail` bytes."""
    rng = np.random.default_rng(seed)
    columns = [
        rng.integers(0, 256, count, dtype=np.uint8)
        if kind == "noise"
        else rng.integers(60, 64, count, dtype=np.uint8)
        if kind == "few"
        else np.full(count, 7, dtype=np.uint8)
        for kind in kinds
    ]
    elements = np.stack(columns, axis=1) if columns else np.empty((count, 0), np.uint8)
    return elements.tobytes() + rng.integers(0, 256, tail, dtype=np.uint8).tobytes()


@st.composite
def grouped_chunks(draw: st.DrawFn) -> tuple[list[Segment], list[bytes]]:
    """One part per segment: an ungrouped lead, then grouped segments of 2, 4 or 8 planes."""
    segments = [Segment(draw(st.integers(0, 300)), 1, grouped=False)]
    parts = [draw(st.binary(min_size=segments[0].nbytes, max_size=segments[0].nbytes))]
    for _ in range(draw(st.integers(1, 3))):
        planes = draw(st.sampled_from([2, 4, 8]))
        kinds = draw(st.lists(st.sampled_from(PLANE_KINDS), min_size=planes, max_size=planes))
        count = draw(st.integers(0, 3000))
        tail = draw(st.integers(0, planes - 1))
        data = element_bytes(count, kinds, tail, seed=draw(st.integers(0, 2**32 - 1)))
        segments.append(Segment(len(data), planes, grouped=True))
        parts.append(data)
    return segments, parts


def decompressed(header: dict[str, object], payload: list[Buffer], size: int) -> bytes:
    """What the receiver rebuilds from the header (through JSON, as on the wire) and payload."""
    wire = json.loads(json.dumps(header))
    out = bytearray(size)
    joined = b"".join(bytes(memoryview(part)) for part in payload)
    written = ChunkDecompressor().decompress_into(wire, joined, memoryview(out))
    return bytes(out[:written])


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(grouped_chunks(), min_size=1, max_size=4), level=st.sampled_from([1, 3]))
def test_planes_round_trip_and_payloads_survive_later_calls(
    chunks: list[tuple[list[Segment], list[bytes]]], level: int
) -> None:
    compressor = ChunkCompressor(level=level)
    # All payloads are kept, unjoined, until every chunk is compressed: a raw plane handed to one
    # payload must not be overwritten by the planes of a later call.
    results = [compressor.compress(segments, parts) for segments, parts in chunks]
    for (_segments, parts), (header, payload) in zip(chunks, results, strict=True):
        blob = b"".join(parts)
        assert decompressed(header, list(payload), len(blob)) == blob
