"""The frame: what travels on every connection, whatever the driver.

A frame is a fixed 40-byte prefix, then `header_len` bytes of header (a UTF-8 JSON object, often
empty), then `payload_len` bytes of payload (opaque: a safetensors chunk, a file block, a request
body). All integers are big-endian. docs/wire.md specifies the format byte by byte.

    offset size field
    0      2    magic          b"TW"
    2      1    version        1
    3      1    type           FrameType
    4      2    flags          FrameFlags bits; unknown bits are an error
    6      2    reserved       0
    8      4    stream_id      u32; 0 = the connection itself
    12     8    offset         u64; meaning depends on the type (chunk index, credit, nonce, ...)
    20     4    header_len     u32, <= Limits.max_header
    24     4    payload_len    u32, <= Limits.max_payload
    28     8    checksum       xxh3_64 over header bytes then payload bytes
    36     4    prefix_crc     crc32 (zlib) of bytes 0..35, checked before any length is trusted
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from transport.exceptions import ConfigError

__all__ = [
    "KNOWN_FLAGS",
    "MAGIC",
    "PREFIX",
    "PREFIX_SIZE",
    "VERSION",
    "Buffer",
    "Frame",
    "FrameFlags",
    "FrameType",
    "Limits",
]

MAGIC: Final = b"TW"
VERSION: Final = 1
# magic, version, type, flags, reserved, stream_id, offset, header_len, payload_len, checksum
PREFIX: Final = struct.Struct(">2sBBHHIQIIQ")
PREFIX_SIZE: Final = PREFIX.size + 4  # + prefix_crc (u32)

Buffer = bytes | bytearray | memoryview


class FrameType(enum.IntEnum):
    """What a frame means. Values are stable wire constants: never renumber."""

    HELLO = 0x01  # header: protocol version, node id, capabilities, auth token
    GOAWAY = 0x02  # header: reason; the sender will open no new streams
    PING = 0x03  # offset: opaque nonce echoed by PONG
    PONG = 0x04
    OPEN = 0x10  # header: stream kind and manifest
    DATA = 0x11  # offset: chunk index; payload: the chunk
    CREDIT = 0x12  # offset: bytes of credit granted (stream_id 0: the connection's window)
    ACK = 0x13  # offset: count of chunks the receiver holds durably (resume point)
    END = 0x14  # header: chunk count, byte count, whole-stream digest
    RESET = 0x15  # header: code, reason
    RESUME = 0x16  # header: chunks the receiver already holds
    REQUEST = 0x20  # stream_id: request id; header: request fields; payload: body
    RESPONSE = 0x21  # stream_id: request id it answers; flags may carry ERROR


class FrameFlags(enum.IntFlag):
    """Flag bits. Any bit not named here is refused by the parser."""

    NONE = 0
    COMPRESSED = 0x0001  # payload is codec-encoded; the header names the codec
    ERROR = 0x0002  # RESPONSE: the request failed; header carries the reason


KNOWN_FLAGS: Final = int(FrameFlags.COMPRESSED | FrameFlags.ERROR)


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds checked against length fields before any allocation."""

    max_header: int = 16 * 1024 * 1024
    max_payload: int = 256 * 1024 * 1024
    max_frame: int = 256 * 1024 * 1024 + 16 * 1024 * 1024 + PREFIX_SIZE

    def __post_init__(self) -> None:
        # header_len and payload_len are u32 fields: a limit beyond that could never be reached.
        for name in ("max_header", "max_payload"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFFFFFF:
                raise ConfigError(f"Limits.{name}={value} is outside the u32 length field's range")
        if self.max_frame < PREFIX_SIZE:
            raise ConfigError(f"Limits.max_frame={self.max_frame} is smaller than a frame prefix")


@dataclass(frozen=True, slots=True)
class Frame:
    """One parsed (or to-be-serialized) frame.

    `payload` is a view, not a copy: on the receiving side it points into the buffer the bytes were
    read into, so a consumer that keeps it must not let that buffer be reused.
    `checksum` is filled in by the parser (the value verified on the wire); it is ignored when
    serializing.
    """

    type: FrameType
    stream_id: int = 0
    offset: int = 0
    flags: int = 0
    header: Mapping[str, Any] = field(default_factory=dict)
    payload: Buffer = b""
    checksum: int = 0
    # Bytes of the encoded header on the wire (parser-filled; not compared: not part of the
    # frame's meaning).
    header_size: int = field(default=0, compare=False)
