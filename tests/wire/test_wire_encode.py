"""The encoder: exact bytes, no payload copies, and ConfigError (with the numbers) on misuse."""

from __future__ import annotations

import array
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from transport.exceptions import ConfigError
from transport.wire import (
    MAGIC,
    PREFIX,
    PREFIX_SIZE,
    VERSION,
    FrameFlags,
    FrameParser,
    FrameType,
    Limits,
    encode_frame,
)


def test_prefix_layout_byte_by_byte() -> None:
    encoded = encode_frame(
        FrameType.DATA, stream_id=0x01020304, offset=0x0506070809101112,
        flags=FrameFlags.COMPRESSED, header={"c": "zstd"}, payload=b"payload",
    )  # fmt: skip
    head = encoded.parts[0]
    assert isinstance(head, bytes)
    checksum = xxhash.xxh3_64_intdigest(b'{"c":"zstd"}payload')
    expected = (
        MAGIC + bytes([VERSION, 0x11]) + b"\x00\x01" + b"\x00\x00" + b"\x01\x02\x03\x04"
        + bytes.fromhex("0506070809101112") + struct.pack(">I", 12) + struct.pack(">I", 7)
        + struct.pack(">Q", checksum)
    )  # fmt: skip
    assert head[: PREFIX.size] == expected
    assert head[PREFIX.size : PREFIX_SIZE] == struct.pack(">I", zlib.crc32(expected))
    assert head[PREFIX_SIZE:] == b'{"c":"zstd"}'
    assert encoded.checksum == checksum
    assert encoded.size == PREFIX_SIZE + 12 + 7


def test_payload_parts_are_passed_through_not_copied() -> None:
    first, second = bytearray(b"a" * 1000), memoryview(b"b" * 500)
    encoded = encode_frame(FrameType.DATA, payload=[first, b"", second])
    assert encoded.parts[1] is first
    assert encoded.parts[2] is second
    assert len(encoded.parts) == 3  # the empty part is dropped
    assert encoded.checksum == xxhash.xxh3_64_intdigest(b"a" * 1000 + b"b" * 500)
    assert encoded.size == PREFIX_SIZE + 1500


def test_tensor_memory_is_sent_as_bytes_without_a_copy() -> None:
    tensor = torch.arange(1000, dtype=torch.float32)
    view = tensor.numpy().data  # format "f": len() would count floats, not bytes
    encoded = encode_frame(FrameType.DATA, payload=view)
    part = encoded.parts[1]
    assert isinstance(part, memoryview)
    assert (part.format, len(part)) == ("B", 4000)
    assert np.shares_memory(np.frombuffer(part, dtype=np.uint8), tensor.numpy())
    (frame,) = FrameParser().feed(b"".join(encoded.parts))
    assert torch.equal(torch.frombuffer(bytearray(frame.payload), dtype=torch.float32), tensor)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stream_id": 2**32}, "stream_id=4294967296 is outside 0..4294967295"),
        ({"stream_id": -1}, "stream_id=-1 is outside"),
        ({"stream_id": True}, "stream_id must be an int, got bool"),
        ({"offset": 2**64}, "offset=18446744073709551616 is outside 0..18446744073709551615"),
        ({"flags": 0x0004}, "unknown bits 0x0004"),
        ({"header": {"a": object()}}, "not encodable as UTF-8 JSON: Object of type object"),
        ({"header": {"a": float("nan")}}, "not encodable as UTF-8 JSON"),
        ({"header": {"a": "\ud800"}}, "not encodable as UTF-8 JSON"),
        ({"header": ["not", "a", "mapping"]}, "must be a Mapping, got list"),
        ({"payload": "text"}, "payload is a str"),
        ({"payload": [b"ok", 42]}, "payload part 1 is a int, not a bytes-like object"),
        ({"payload": memoryview(b"abcdef")[::2]}, "payload part 0 is not a C-contiguous buffer"),
    ],
)
def test_encoder_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        encode_frame(FrameType.DATA, **kwargs)


def test_encoder_refuses_unknown_type() -> None:
    with pytest.raises(ConfigError, match="frame type 127 is not a FrameType"):
        encode_frame(127)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"header": {"k": "x" * 200}},
            r"header_len 208 > max_header 100 \(stream 5, type REQUEST\)",
        ),
        ({"payload": [b"x" * 600, b"y" * 500]}, r"payload_len 1100 > max_payload 1000 \(stream 5"),
        (
            {"header": {"k": "x" * 80}, "payload": b"x" * 900},
            r"frame size 1028 \(prefix 40 \+ header_len 88 \+ payload_len 900\) > max_frame 1000",
        ),
    ],
)
def test_encoder_refuses_frames_beyond_the_limits(kwargs: dict[str, Any], match: str) -> None:
    limits = Limits(max_header=100, max_payload=1000, max_frame=1000)
    with pytest.raises(ConfigError, match=match):
        encode_frame(FrameType.REQUEST, stream_id=5, limits=limits, **kwargs)


def test_int_type_and_array_payload_are_accepted() -> None:
    floats = array.array("d", [1.0, 2.0])
    encoded = encode_frame(FrameType(0x11), payload=floats)  # type: ignore[arg-type]  # any buffer
    assert encoded.size == PREFIX_SIZE + 16
