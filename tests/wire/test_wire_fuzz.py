"""Fuzzing the parser: whatever the bytes, it raises only FrameError subclasses and never asks
allocate() for more than the limits allow."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire.wire_helpers import make_prefix, parse_by_buffers, parse_by_feed, pieces, raw_frame
from transport.exceptions import FrameError
from transport.wire import PREFIX_SIZE, Frame, FrameParser, FrameType, Limits, serialize

LIMITS = Limits(max_header=4096, max_payload=100_000, max_frame=102_000)
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class BoundedAllocator:
    """Fails the test if the parser ever asks for a payload buffer beyond the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.calls = 0

    def __call__(self, size: int) -> bytearray:
        assert 0 < size <= self.limits.max_payload, f"allocate({size}) beyond {self.limits}"
        self.calls += 1
        return bytearray(size)


def parse_everything(stream: bytes, cuts: list[int], by_buffers: bool) -> None:
    parser = FrameParser(LIMITS, allocate=BoundedAllocator(LIMITS), direct_threshold=1000)
    parse = parse_by_buffers if by_buffers else parse_by_feed
    try:
        parse(parser, pieces(stream, cuts))
        parser.eof()
    except FrameError:
        pass  # the only acceptable failure; anything else fails the test


def valid_stream(seed: int) -> bytes:
    rng = random.Random(seed)
    frames = [
        Frame(FrameType.OPEN, stream_id=1, header={"kind": "bytes", "meta": {"n": [1, 2.5, None]}}),
        Frame(FrameType.DATA, stream_id=1, offset=0, payload=rng.randbytes(rng.randrange(3000))),
        Frame(FrameType.DATA, stream_id=1, offset=1, payload=rng.randbytes(rng.randrange(300))),
        Frame(FrameType.END, stream_id=1, header={"chunks": 2, "bytes": 9, "digest": "ab"}),
    ]
    return b"".join(serialize(frame) for frame in frames)


cuts = st.lists(st.integers(0, 2**20), max_size=8)


@FUZZ
@given(stream=st.binary(max_size=2000), cuts=cuts, by_buffers=st.booleans())
def test_random_bytes(stream: bytes, cuts: list[int], by_buffers: bool) -> None:
    parse_everything(stream, cuts, by_buffers)


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete"]),
            st.integers(0, 2**20),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=cuts,
    by_buffers=st.booleans(),
)
def test_mutated_valid_frames(
    seed: int, edits: list[tuple[str, int, int]], cuts: list[int], by_buffers: bool
) -> None:
    stream = bytearray(valid_stream(seed))
    for kind, where, value in edits:
        where %= len(stream)
        if kind == "flip":
            stream[where] ^= value or 1
        elif kind == "insert":
            stream.insert(where, value)
        else:
            del stream[where]
    parse_everything(bytes(stream), cuts, by_buffers)


@FUZZ
@given(
    ftype=st.integers(0, 255),
    flags=st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3]),
    header_len=st.integers(0, 2**32 - 1) | st.integers(0, 5000),
    payload_len=st.integers(0, 2**32 - 1) | st.integers(0, 110_000),
    tail=st.binary(max_size=3000),
    cuts=cuts,
    by_buffers=st.booleans(),
)
def test_prefixes_with_valid_crc_and_any_fields(
    ftype: int, flags: int, header_len: int, payload_len: int, tail: bytes, cuts: list[int],
    by_buffers: bool,
) -> None:  # fmt: skip
    prefix = make_prefix(ftype=ftype, flags=flags, header_len=header_len, payload_len=payload_len)
    parse_everything(prefix + tail, cuts, by_buffers)


@FUZZ
@given(header=st.binary(max_size=200), payload=st.binary(max_size=50), by_buffers=st.booleans())
def test_any_header_bytes_with_a_valid_checksum(
    header: bytes, payload: bytes, by_buffers: bool
) -> None:
    parse_everything(raw_frame(header, payload), [PREFIX_SIZE + 1], by_buffers)
