"""Helpers shared by the wire tests: build raw frames, and deliver a byte stream in pieces."""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import xxhash

from transport.wire import MAGIC, PREFIX, PREFIX_SIZE, VERSION, Frame, FrameParser, FrameType

_CRC = struct.Struct(">I")


def make_prefix(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    ftype: int = FrameType.DATA,
    flags: int = 0,
    reserved: int = 0,
    stream_id: int = 3,
    offset: int = 0,
    header_len: int = 0,
    payload_len: int = 0,
    checksum: int = 0,
    crc: int | None = None,
) -> bytes:
    """A prefix with any field values; its CRC is valid unless `crc` is given."""
    fixed = PREFIX.pack(
        magic, version, ftype, flags, reserved, stream_id, offset, header_len, payload_len,
        checksum,
    )  # fmt: skip
    return fixed + _CRC.pack(zlib.crc32(fixed) if crc is None else crc)


def raw_frame(header: bytes = b"", payload: bytes = b"", **fields: Any) -> bytes:
    """A frame with raw header bytes (valid or not) and a valid checksum and prefix CRC."""
    checksum = xxhash.xxh3_64_intdigest(header + payload)
    prefix = make_prefix(
        header_len=len(header), payload_len=len(payload), checksum=checksum, **fields
    )
    assert len(prefix) == PREFIX_SIZE
    return prefix + header + payload


def pieces(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`stream` cut at the given positions (taken modulo its length; duplicates ignored)."""
    positions = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(positions)]


def parse_by_feed(parser: FrameParser, chunks: Sequence[bytes]) -> list[Frame]:
    """Feed each chunk (as a fresh bytearray, like a driver's receive buffer)."""
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(parser.feed(bytearray(chunk)))
    return frames


def parse_by_buffers(parser: FrameParser, chunks: Sequence[bytes]) -> list[Frame]:
    """Act as a socket: each chunk arrives at once and is written into as many buffers as needed."""
    frames: list[Frame] = []
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            buffer = parser.get_buffer(-1)
            assert len(buffer) > 0, "get_buffer() returned an empty buffer"
            count = min(len(buffer), len(view))
            buffer[:count] = view[:count]
            view = view[count:]
            frames.extend(parser.buffer_updated(count))
    return frames


class CountingAllocator:
    """An allocate() that records every request and may hand out larger buffers than asked."""

    def __init__(self, extra: int = 0) -> None:
        self.requests: list[int] = []
        self.extra = extra
        self.buffers: list[bytearray] = []

    def __call__(self, size: int) -> bytearray:
        self.requests.append(size)
        buffer = bytearray(size + self.extra)
        self.buffers.append(buffer)
        return buffer
