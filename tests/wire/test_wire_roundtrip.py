"""Round trips: any frames, encoded then parsed under any split of the byte stream, come back
bit-exactly, through feed() and through get_buffer()/buffer_updated()."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire.wire_helpers import CountingAllocator, parse_by_buffers, parse_by_feed, pieces
from transport.wire import (
    KNOWN_FLAGS,
    PREFIX_SIZE,
    EncodedFrame,
    Frame,
    FrameFlags,
    FrameParser,
    FrameType,
    Limits,
    encode_frame,
    serialize,
)

PAYLOAD_MAX = 200 * 1024
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
headers = st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=6)
# Small payloads are common on the wire (credit, ack, requests); large ones take the direct path.
payload_sizes = st.one_of(st.integers(0, 300), st.integers(0, PAYLOAD_MAX))


@dataclass
class Spec:
    """One frame to send, and what it encodes to."""

    ftype: FrameType
    stream_id: int
    offset: int
    flags: int
    header: dict[str, Any] | None
    payload: bytes
    payload_parts: list[bytes]

    def encode(self, limits: Limits) -> EncodedFrame:
        return encode_frame(
            self.ftype, stream_id=self.stream_id, offset=self.offset, flags=self.flags,
            header=self.header, payload=self.payload_parts, limits=limits,
        )  # fmt: skip


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    size = draw(payload_sizes)
    payload = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=3)))
    parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
    return Spec(
        ftype=draw(st.sampled_from(FrameType)),
        stream_id=draw(st.integers(0, 2**32 - 1)),
        offset=draw(st.integers(0, 2**64 - 1)),
        flags=draw(st.sampled_from(range(KNOWN_FLAGS + 1))),
        header=draw(headers),
        payload=payload,
        payload_parts=parts,
    )


@st.composite
def limits_for(draw: st.DrawFn, frames: list[Spec]) -> Limits:
    """Random limits that every frame in `frames` still fits."""
    sized = [frame.encode(Limits()) for frame in frames]
    header_max = max(
        encoded.size - PREFIX_SIZE - len(f.payload)
        for encoded, f in zip(sized, frames, strict=True)
    )
    payload_max = max(len(f.payload) for f in frames)
    frame_max = max(encoded.size for encoded in sized)
    slack = st.integers(0, 1000)
    return Limits(
        max_header=header_max + draw(slack),
        max_payload=payload_max + draw(slack),
        max_frame=frame_max + draw(slack),
    )


parser_options = st.fixed_dictionaries(
    {
        "direct_threshold": st.sampled_from([1, 100, 4096, 64 * 1024, 10**9]),
        "scratch_size": st.sampled_from([PREFIX_SIZE, 64, 1000, 256 * 1024]),
        "extra": st.sampled_from([0, 0, 17, 4096]),
    }
)


def check_frames(parsed: list[Frame], frames: list[Spec], encoded: list[EncodedFrame]) -> None:
    assert len(parsed) == len(frames)
    for got, want, sent in zip(parsed, frames, encoded, strict=True):
        assert got.type is want.ftype
        assert (got.stream_id, got.offset, got.flags) == (want.stream_id, want.offset, want.flags)
        assert got.header == (want.header or {})
        assert bytes(got.payload) == want.payload
        assert got.checksum == sent.checksum
        # Bit-exact: the parsed frame serializes back to the very bytes that were sent.
        assert serialize(got) == b"".join(sent.parts)


@SETTINGS
@given(data=st.data(), frames=st.lists(specs(), min_size=1, max_size=4), options=parser_options)
def test_any_frames_round_trip_under_any_split(
    data: st.DataObject, frames: list[Spec], options: dict[str, int]
) -> None:
    limits = data.draw(limits_for(frames))
    encoded = [frame.encode(limits) for frame in frames]
    stream = b"".join(b"".join(e.parts) for e in encoded)
    chunks = pieces(stream, data.draw(st.lists(st.integers(0, 2**31), max_size=30)))
    for parse in (parse_by_feed, parse_by_buffers):
        allocate = CountingAllocator(extra=options["extra"])
        parser = FrameParser(
            limits, allocate=allocate, direct_threshold=options["direct_threshold"],
            scratch_size=options["scratch_size"],
        )  # fmt: skip
        check_frames(parse(parser, chunks), frames, encoded)
        assert not parser.in_frame
        parser.eof()
        assert all(size <= limits.max_payload for size in allocate.requests)


def small_stream() -> tuple[bytes, list[Spec], list[EncodedFrame]]:
    frames = [
        Spec(FrameType.HELLO, 0, 0, 0, {"protocol": 1, "node": "a"}, b"", []),
        Spec(FrameType.DATA, 7, 2, 1, {"c": "zstd"}, bytes(range(200)), [bytes(range(200))]),
        Spec(FrameType.CREDIT, 0, 1 << 40, 0, None, b"", []),
        Spec(FrameType.RESPONSE, 9, 0, 2, None, b"xyz" * 30, [b"xyz" * 30]),
    ]
    encoded = [frame.encode(Limits()) for frame in frames]
    return b"".join(b"".join(e.parts) for e in encoded), frames, encoded


@pytest.mark.parametrize("parse", [parse_by_feed, parse_by_buffers])
@pytest.mark.parametrize("direct_threshold", [1, 150, 10**9])
def test_every_single_cut_point(parse: Any, direct_threshold: int) -> None:
    stream, frames, encoded = small_stream()
    for cut in range(len(stream) + 1):
        parser = FrameParser(direct_threshold=direct_threshold, scratch_size=PREFIX_SIZE)
        check_frames(parse(parser, pieces(stream, [cut])), frames, encoded)


@pytest.mark.parametrize("parse", [parse_by_feed, parse_by_buffers])
def test_one_byte_at_a_time(parse: Any) -> None:
    stream, frames, encoded = small_stream()
    parser = FrameParser(direct_threshold=100)
    check_frames(parse(parser, pieces(stream, range(len(stream)))), frames, encoded)


def test_feed_gives_whole_frames_a_view_of_the_callers_buffer() -> None:
    payload = random.Random(1).randbytes(100_000)
    data = bytearray(serialize(Frame(FrameType.DATA, stream_id=1, payload=payload)) * 2)
    allocate = CountingAllocator()
    frames = FrameParser(allocate=allocate).feed(data)
    assert [bytes(f.payload) == payload for f in frames] == [True, True]
    assert all(isinstance(f.payload, memoryview) and f.payload.obj is data for f in frames)
    assert allocate.requests == []


def test_socket_reads_straight_into_the_allocated_payload_buffer() -> None:
    payload = random.Random(2).randbytes(300_000)
    stream = serialize(Frame(FrameType.DATA, stream_id=1, header={"i": 0}, payload=payload))
    allocate = CountingAllocator(extra=1000)
    parser = FrameParser(allocate=allocate, scratch_size=4096)
    first = parser.get_buffer(-1)
    first[:4096] = stream[:4096]
    assert parser.buffer_updated(4096) == []
    assert allocate.requests == [len(payload)]
    direct = parser.get_buffer(-1)
    assert direct.obj is allocate.buffers[0]  # the socket writes into the payload's own buffer
    assert len(direct) == len(stream) - 4096  # exactly what the payload still lacks
    direct[:] = stream[4096:]
    (frame,) = parser.buffer_updated(len(direct))
    assert isinstance(frame.payload, memoryview)
    assert frame.payload.obj is allocate.buffers[0]
    assert len(frame.payload) == len(payload)  # the larger buffer is sliced to payload_len
    assert frame.payload == payload
    assert frame.checksum == xxhash.xxh3_64_intdigest(b'{"i":0}' + payload)


def test_small_payloads_are_copied_out_of_the_scratch() -> None:
    stream = serialize(Frame(FrameType.ACK, stream_id=5, offset=12, payload=b"abc"))
    parser = FrameParser()
    (frame,) = parse_by_buffers(parser, [stream])
    assert type(frame.payload) is bytes
    assert frame.payload == b"abc"


def test_big_header_grows_the_scratch_only_for_that_frame() -> None:
    big = {"manifest": "x" * 1_000_000}
    stream = serialize(Frame(FrameType.OPEN, stream_id=1, header=big))
    stream += serialize(Frame(FrameType.PING, offset=42))
    parser = FrameParser(scratch_size=64 * 1024)
    frames = parse_by_buffers(parser, pieces(stream, range(0, len(stream), 50_000)))
    assert [f.type for f in frames] == [FrameType.OPEN, FrameType.PING]
    assert frames[0].header == big
    assert len(parser.get_buffer(-1)) <= 64 * 1024  # the grown scratch was given back


def test_header_is_compact_json_and_empty_header_has_no_bytes() -> None:
    assert encode_frame(FrameType.PING).parts[0].__len__() == PREFIX_SIZE
    assert encode_frame(FrameType.PING, header={}).size == PREFIX_SIZE
    encoded = encode_frame(FrameType.GOAWAY, header={"code": "bye", "reason": "é"})
    header = bytes(encoded.parts[0][PREFIX_SIZE:])
    assert (
        header
        == json.dumps(
            {"code": "bye", "reason": "é"}, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    (frame,) = FrameParser().feed(b"".join(encoded.parts))
    assert frame.header == {"code": "bye", "reason": "é"}
    assert frame.flags == FrameFlags.NONE
