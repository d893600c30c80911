"""The parser's pause after the first frame (a peer's HELLO) and its resume under other limits:
a receiver parses nothing a peer sent after its HELLO until it accepted that peer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.exceptions import FrameTooLargeError
from transport.wire import PREFIX_SIZE, FrameParser, FrameType, Limits, serialize
from transport.wire.frames import Frame

SMALL = Limits(max_header=1024, max_payload=0, max_frame=PREFIX_SIZE + 1024)
FULL = Limits()


def _stream(payload_sizes: list[int]) -> tuple[bytes, list[Frame]]:
    frames = [Frame(FrameType.HELLO, header={"node": "peer"})]
    frames += [
        Frame(FrameType.DATA, stream_id=1, offset=i, payload=bytes([i % 251]) * size)
        for i, size in enumerate(payload_sizes)
    ]
    return b"".join(serialize(frame) for frame in frames), frames


def _same(got: list[Frame], want: list[Frame]) -> None:
    assert [(f.type, f.offset, bytes(f.payload), dict(f.header)) for f in got] == [
        (f.type, f.offset, bytes(f.payload), dict(f.header)) for f in want
    ]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 200_000), max_size=4),
    cut=st.integers(1, 400),
    feed_mode=st.booleans(),
)
def test_paused_bytes_wait_and_parse_alike_after_resume(
    sizes: list[int], cut: int, feed_mode: bool
) -> None:
    data, frames = _stream(sizes)
    parser = FrameParser(SMALL, scratch_size=64 * 1024, pause_after=1)
    hello_end = len(serialize(frames[0]))
    first = min(len(data), hello_end + cut)  # the HELLO and a little of what follows
    got = _deliver(parser, data[:first], feed_mode)
    assert [f.type for f in got] == [FrameType.HELLO]
    assert parser.paused
    got += parser.resume(FULL, scratch_size=256 * 1024)
    got += _deliver(parser, data[first:], feed_mode)
    _same(got, frames)


def _deliver(parser: FrameParser, data: bytes, feed_mode: bool) -> list[Frame]:
    if feed_mode:
        return parser.feed(data) if data else []
    frames: list[Frame] = []
    position = 0
    while position < len(data):
        buffer = parser.get_buffer(-1)
        count = min(len(buffer), len(data) - position)
        buffer[:count] = data[position : position + count]
        frames += parser.buffer_updated(count)
        position += count
    return frames


def test_the_first_frame_is_held_to_the_small_limits() -> None:
    big_hello = serialize(Frame(FrameType.HELLO, header={"pad": "x" * 2000}))
    parser = FrameParser(SMALL, pause_after=1)
    with pytest.raises(FrameTooLargeError, match="max_header 1024"):
        parser.feed(big_hello[:PREFIX_SIZE])


@pytest.mark.parametrize("feed_mode", [True, False])
def test_more_than_the_scratch_before_acceptance_is_refused(feed_mode: bool) -> None:
    data, _ = _stream([100_000])
    parser = FrameParser(SMALL, scratch_size=64 * 1024, pause_after=1)
    with pytest.raises(FrameTooLargeError, match="before this side accepted the peer"):
        _deliver(parser, data, feed_mode)
