"""One test per way a frame can be malformed: the right FrameError, with the numbers, raised
before anything is allocated for the frame; and a failed parser stays failed."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from tests.wire.wire_helpers import (
    CountingAllocator,
    make_prefix,
    parse_by_buffers,
    parse_by_feed,
    raw_frame,
)
from transport.exceptions import (
    BadMagicError,
    ChecksumMismatchError,
    ConfigError,
    FrameError,
    FrameTooLargeError,
    HeaderDecodeError,
    PrefixChecksumError,
    TruncatedFrameError,
    UnknownFrameTypeError,
    UnsupportedVersionError,
)
from transport.wire import PREFIX_SIZE, Frame, FrameParser, FrameType, Limits, serialize

Parse = Callable[[FrameParser, list[bytes]], list[Frame]]
both_paths = pytest.mark.parametrize("parse", [parse_by_feed, parse_by_buffers])


def assert_refused(
    data: bytes, error: type[FrameError], match: str, parse: Parse, **options: Any
) -> FrameParser:
    parser = FrameParser(**options)
    with pytest.raises(error, match=match):
        parse(parser, [data])
    return parser


@both_paths
def test_bad_magic(parse: Parse) -> None:
    assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40, BadMagicError, "b'GE'", parse)


@both_paths
def test_bad_version(parse: Parse) -> None:
    assert_refused(make_prefix(version=2), UnsupportedVersionError, "version 2.*version 1", parse)


@both_paths
def test_prefix_crc(parse: Parse) -> None:
    good = bytearray(raw_frame(b"", b"abc"))
    good[8] ^= 0x01  # stream id 3 -> 2: a plausible prefix, but not the one that was sent
    assert_refused(
        bytes(good), PrefixChecksumError, "prefix crc32 0x[0-9a-f]{8} != computed", parse
    )


@both_paths
def test_unknown_type(parse: Parse) -> None:
    assert_refused(make_prefix(ftype=0x7F), UnknownFrameTypeError, "frame type 0x7f", parse)


@both_paths
def test_unknown_flag(parse: Parse) -> None:
    prefix = make_prefix(flags=0x8001)
    assert_refused(prefix, UnknownFrameTypeError, "unknown flag bits 0x8000 in flags 0x8001", parse)


@both_paths
def test_nonzero_reserved(parse: Parse) -> None:
    assert_refused(
        make_prefix(reserved=1), UnknownFrameTypeError, "reserved field is 0x0001", parse
    )


@pytest.mark.parametrize(
    ("first", "second", "error"),
    [
        ({"magic": b"XX"}, {"version": 9, "crc": 0}, BadMagicError),
        ({"version": 9}, {"crc": 0}, UnsupportedVersionError),
        ({"crc": 0}, {"ftype": 0x7F}, PrefixChecksumError),
        ({"ftype": 0x7F}, {"flags": 0x8000, "header_len": 2**32 - 1}, UnknownFrameTypeError),
        ({"flags": 0x8000}, {"header_len": 2**32 - 1}, UnknownFrameTypeError),
    ],
)
def test_checks_run_in_the_documented_order(
    first: dict[str, Any], second: dict[str, Any], error: type[FrameError]
) -> None:
    with pytest.raises(error):
        FrameParser().feed(make_prefix(**first, **second))


TOO_LARGE = [
    (
        {"header_len": 2**32 - 1},
        "header_len 4294967295 > max_header 16777216 \\(stream 3, type DATA\\)",
    ),
    (
        {"payload_len": 300_000_000},
        "payload_len 300000000 > max_payload 268435456 \\(stream 3, type DATA\\)",
    ),
    (
        {"header_len": 16 * 2**20, "payload_len": 256 * 2**20, "ftype": FrameType.OPEN},
        None,  # both within their own limits: refused by a smaller max_frame below
    ),
]


@both_paths
@pytest.mark.parametrize(("fields", "match"), TOO_LARGE)
def test_oversized_lengths_are_refused_before_any_allocation(
    parse: Parse, fields: dict[str, Any], match: str | None
) -> None:
    limits = Limits() if match else Limits(max_frame=100 * 2**20)
    match = match or "frame size 285212712 .* > max_frame 104857600 \\(stream 3, type OPEN\\)"
    allocate = CountingAllocator()
    tracemalloc.start()
    try:
        assert_refused(
            make_prefix(**fields),
            FrameTooLargeError,
            match,
            parse,
            limits=limits,
            allocate=allocate,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert allocate.requests == []
    assert peak < 1 * 2**20, f"{peak} bytes were allocated for a refused frame"


def test_each_length_limit_is_checked_separately() -> None:
    limits = Limits(max_header=100, max_payload=1000, max_frame=PREFIX_SIZE + 500)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"header_len": 101}, "header_len 101 > max_header 100"),
        ({"payload_len": 1001}, "payload_len 1001 > max_payload 1000"),
        ({"header_len": 50, "payload_len": 600}, "frame size 690 .* > max_frame 540"),
    ]
    for fields, match in cases:
        with pytest.raises(FrameTooLargeError, match=match):
            FrameParser(limits).feed(make_prefix(**fields))
    ok = raw_frame(b'{"a":1}', b"x" * 400)
    assert len(FrameParser(limits).feed(ok)) == 1


@both_paths
@pytest.mark.parametrize("direct_threshold", [1, 10**9])
@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (10, "after 10 of 40 bytes of a frame prefix"),
        (PREFIX_SIZE + 3, "after 43 of 1047 bytes of a frame \\(stream 3, type DATA\\)"),
        (PREFIX_SIZE + 7 + 500, "after 547 of 1047 bytes"),
        (1046, "after 1046 of 1047 bytes"),
    ],
)
def test_truncated_stream(parse: Parse, direct_threshold: int, cut: int, match: str) -> None:
    frame = raw_frame(b'{"a":1}', b"p" * 1000)
    parser = FrameParser(direct_threshold=direct_threshold)
    assert parse(parser, [frame, frame[:cut]])  # the first frame is whole
    assert parser.in_frame
    with pytest.raises(TruncatedFrameError, match=match):
        parser.eof()


def test_eof_on_a_frame_boundary_is_fine() -> None:
    parser = FrameParser()
    parser.feed(raw_frame(b"", b"abc"))
    assert not parser.in_frame
    parser.eof()


@both_paths
@pytest.mark.parametrize("direct_threshold", [1, 10**9])
@pytest.mark.parametrize("flip_at", [PREFIX_SIZE + 2, PREFIX_SIZE + 7 + 999, -1])
def test_checksum_mismatch(parse: Parse, direct_threshold: int, flip_at: int) -> None:
    frame = bytearray(raw_frame(b'{"a":1}', b"p" * 1000))
    frame[flip_at] ^= 0x20  # PREFIX_SIZE + 2 is inside the header, the others in the payload
    parser = FrameParser(direct_threshold=direct_threshold)
    with pytest.raises(ChecksumMismatchError, match="over 7 header \\+ 1000 payload bytes"):
        parse(parser, [bytes(frame)])


@both_paths
@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"[1,2]", "is a JSON list, not an object"),
        (b'"text"', "is a JSON str, not an object"),
        (b'{"a":"\xff\xfe"}', "not UTF-8 \\(bad byte at 6\\)"),
        (b'{"a":NaN}', "NaN is not valid JSON"),
        (b'{"a":-Infinity}', "-Infinity is not valid JSON"),
        (b'{"a":1e999}', "overflows"),
        (b"[" * 100_000, "not valid JSON"),
        ("\ufeff{}".encode(), "not valid JSON"),
    ],
)
def test_header_garbage_with_a_valid_checksum(parse: Parse, header: bytes, match: str) -> None:
    assert_refused(raw_frame(header, b"body"), HeaderDecodeError, match, parse)


@pytest.mark.parametrize(
    "use",
    [
        lambda parser: parser.feed(serialize(Frame(FrameType.PING))),
        lambda parser: parser.get_buffer(-1),
        lambda parser: parser.buffer_updated(0),
        lambda parser: parser.eof(),
    ],
)
def test_a_failed_parser_stays_failed(use: Callable[[FrameParser], object]) -> None:
    parser = FrameParser()
    with pytest.raises(BadMagicError):
        parser.feed(b"XX" + b"\0" * 38)
    with pytest.raises(FrameError, match=r"already failed \(BadMagicError: .*closed") as caught:
        use(parser)
    assert isinstance(caught.value.__cause__, BadMagicError)


def test_truncation_poisons_too() -> None:
    parser = FrameParser()
    parser.feed(b"TW")
    with pytest.raises(TruncatedFrameError):
        parser.eof()
    with pytest.raises(FrameError, match="already failed"):
        parser.feed(b"")


def test_allocate_must_return_a_big_enough_writable_buffer() -> None:
    frame = raw_frame(b"", b"z" * 100)
    with pytest.raises(ConfigError, match="allocate\\(100\\) returned a buffer of 99 bytes"):
        FrameParser(allocate=lambda n: bytearray(n - 1), direct_threshold=1).feed(frame[:50])
    readonly = memoryview(bytes(200))
    with pytest.raises(ConfigError, match="read-only"):
        FrameParser(allocate=lambda n: readonly, direct_threshold=1).feed(frame[:50])


def test_buffer_updated_cannot_claim_more_than_was_lent() -> None:
    parser = FrameParser(scratch_size=1000)
    lent = len(parser.get_buffer(-1))
    with pytest.raises(
        ConfigError, match=f"buffer_updated\\({lent + 1}\\) but .* lent {lent} bytes"
    ):
        parser.buffer_updated(lent + 1)


def test_bad_parser_options() -> None:
    with pytest.raises(ConfigError, match="direct_threshold=0"):
        FrameParser(direct_threshold=0)
    with pytest.raises(ConfigError, match="scratch_size=39 must be >= 40"):
        FrameParser(scratch_size=39)
