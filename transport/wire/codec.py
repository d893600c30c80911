"""The frame codec: frames -> bytes (`encode_frame`, `serialize`), and the prefix and header checks
the parser (parser.py: bytes -> frames) shares.

Pure: no asyncio, no sockets, no torch. docs/wire.md specifies the format; frames.py holds its
constants. Two promises shape this module:

- Nothing is allocated for a frame before its prefix passed every check (magic, version, prefix
  CRC, type, flags, reserved, lengths against `Limits`), so a hostile length field costs nothing.
- Tensor bytes are copied as little as possible. The encoder never joins payload parts: it returns
  them for a scatter-gather write (`writev`, `transport.writelines`). The parser hands each large
  payload (>= `direct_threshold`) its own buffer and, through `get_buffer()`, lets the socket read
  straight into it; small frames are parsed out of one reusable scratch buffer.

Local misuse of the encoder (a stream id that does not fit u32, a header that is not JSON, a frame
beyond the limits) raises `ConfigError`, never `FrameTooLargeError`: the latter is a
`ProtocolError`, which means "the peer broke the rules, disconnect it", and a frame we have not sent
yet is not the peer's fault.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import xxhash

from transport.exceptions import (
    BadMagicError,
    ConfigError,
    FrameTooLargeError,
    HeaderDecodeError,
    PrefixChecksumError,
    TensorwireError,
    UnknownFrameTypeError,
    UnsupportedVersionError,
)
from transport.wire.frames import (
    KNOWN_FLAGS,
    MAGIC,
    PREFIX,
    PREFIX_SIZE,
    VERSION,
    Buffer,
    Frame,
    FrameType,
    Limits,
)

__all__ = [
    "DEFAULT_LIMITS",
    "EncodedFrame",
    "encode_frame",
    "serialize",
]

DEFAULT_LIMITS: Final = Limits()

_CRC: Final = struct.Struct(">I")
_CRC_COVERS: Final = PREFIX.size  # the CRC covers every prefix byte before itself
_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
_TYPES_BY_VALUE: Final = {int(frame_type): frame_type for frame_type in FrameType}

# --- encoding ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """A frame ready to write: `parts` in order, ideally with one scatter-gather call.

    `parts[0]` is the prefix and header as one `bytes` object; the rest are the caller's payload
    buffers (never copied; empty ones dropped; non-byte memoryviews cast to bytes). The caller must
    not modify a payload buffer until the frame has been written.
    """

    parts: list[Buffer]
    checksum: int  # the xxh3_64 written into the frame
    size: int  # total bytes on the wire


def encode_frame(
    ftype: FrameType,
    *,
    stream_id: int = 0,
    offset: int = 0,
    flags: int = 0,
    header: Mapping[str, Any] | None = None,
    payload: Buffer | Sequence[Buffer] = b"",
    limits: Limits = DEFAULT_LIMITS,
) -> EncodedFrame:
    """Encode one frame without copying its payload; raises `ConfigError` on any bad argument.

    `limits` should be the peer's limits: a frame beyond them is refused here rather than by the
    peer. A payload given as a sequence of buffers is checksummed part by part, never joined.
    """
    frame_type = _checked_type(ftype)
    _check_uint("stream_id", stream_id, _U32_MAX)
    _check_uint("offset", offset, _U64_MAX)
    _check_uint("flags", flags, 0xFFFF)
    if flags & ~KNOWN_FLAGS:
        raise ConfigError(f"flags 0x{flags:04x} carry unknown bits 0x{flags & ~KNOWN_FLAGS:04x}")
    header_bytes = _encode_header(header)
    payload_parts = _payload_parts(payload)
    payload_len = sum(len(part) for part in payload_parts)
    where = f"(stream {stream_id}, type {frame_type.name})"
    _check_lengths(ConfigError, limits, len(header_bytes), payload_len, where)
    hasher = xxhash.xxh3_64(header_bytes)
    for part in payload_parts:
        hasher.update(part)
    checksum = hasher.intdigest()
    fixed = PREFIX.pack(
        MAGIC, VERSION, frame_type, flags, 0, stream_id, offset,
        len(header_bytes), payload_len, checksum,
    )  # fmt: skip
    head = fixed + _CRC.pack(zlib.crc32(fixed)) + header_bytes
    return EncodedFrame([head, *payload_parts], checksum, len(head) + payload_len)


def serialize(frame: Frame, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode `frame` as one `bytes` object (joins, so copies the payload: for tests, small frames).

    `frame.checksum` is ignored: the checksum is always computed.
    """
    encoded = encode_frame(
        frame.type,
        stream_id=frame.stream_id,
        offset=frame.offset,
        flags=frame.flags,
        header=frame.header,
        payload=frame.payload,
        limits=limits,
    )
    return b"".join(encoded.parts)


def _checked_type(ftype: object) -> FrameType:
    if isinstance(ftype, int) and not isinstance(ftype, bool) and ftype in _TYPES_BY_VALUE:
        return _TYPES_BY_VALUE[ftype]
    raise ConfigError(f"frame type {ftype!r} is not a FrameType")


def _check_uint(name: str, value: object, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ConfigError(f"{name}={value} is outside 0..{maximum}")


def _encode_header(header: Mapping[str, Any] | None) -> bytes:
    if header is None or len(header) == 0:
        return b""
    if not isinstance(header, Mapping):
        raise ConfigError(f"frame header must be a Mapping, got {type(header).__name__}")
    as_dict = header if isinstance(header, dict) else dict(header)
    try:
        text = json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise ConfigError(f"frame header is not encodable as UTF-8 JSON: {exc}") from exc


def _payload_parts(payload: Buffer | Sequence[Buffer]) -> list[Buffer]:
    if isinstance(payload, str):
        raise ConfigError("payload is a str; encode it to bytes first")
    parts: list[Buffer] = []
    for index, item in enumerate(_payload_items(payload)):
        part = (
            item
            if isinstance(item, bytes | bytearray)
            else _byte_view(item, f"payload part {index}")
        )
        if len(part):
            parts.append(part)
    return parts


def _payload_items(payload: Buffer | Sequence[Buffer]) -> list[Buffer]:
    """One buffer (anything with the buffer protocol: numpy arrays too) or a sequence of them."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return [payload]
    try:
        return [memoryview(payload)]  # type: ignore[arg-type]
    except TypeError:
        return list(payload)


def _byte_view(data: object, what: str) -> memoryview:
    """A flat unsigned-byte view of `data`, so that len() counts bytes whatever its item format."""
    try:
        view = data if isinstance(data, memoryview) else memoryview(data)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"{what} is a {type(data).__name__}, not a bytes-like object") from exc
    if not view.c_contiguous:
        raise ConfigError(f"{what} is not a C-contiguous buffer (shape {view.shape})")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _check_lengths(
    error: type[TensorwireError], limits: Limits, header_len: int, payload_len: int, where: str
) -> None:
    """Raise `error` when a length is beyond `limits`; shared by the encoder and the parser."""
    if header_len > limits.max_header:
        raise error(f"header_len {header_len} > max_header {limits.max_header} {where}")
    if payload_len > limits.max_payload or payload_len > _U32_MAX:
        maximum = min(limits.max_payload, _U32_MAX)
        raise error(f"payload_len {payload_len} > max_payload {maximum} {where}")
    frame_size = PREFIX_SIZE + header_len + payload_len
    if frame_size > limits.max_frame:
        raise error(
            f"frame size {frame_size} (prefix {PREFIX_SIZE} + header_len {header_len} + "
            f"payload_len {payload_len}) > max_frame {limits.max_frame} {where}"
        )


# --- decoding ----------------------------------------------------------------------------------


class _Prefix(NamedTuple):
    """The checked fields of a frame prefix."""

    type: FrameType
    flags: int
    stream_id: int
    offset: int
    header_len: int
    payload_len: int
    checksum: int

    @property
    def where(self) -> str:
        return f"(stream {self.stream_id}, type {self.type.name})"


def _read_prefix(view: memoryview, pos: int, limits: Limits, frame_index: int) -> _Prefix:
    """Check the PREFIX_SIZE bytes at `pos` in the documented order; nothing is allocated."""
    fields = PREFIX.unpack_from(view, pos)
    magic, version, type_value, flags, reserved, stream_id = fields[:6]
    if magic != MAGIC:
        raise BadMagicError(
            f"frame #{frame_index} starts with {bytes(magic)!r}, not the magic {MAGIC!r}: "
            "the peer does not speak tensorwire, or the byte stream lost a frame boundary"
        )
    if version != VERSION:
        raise UnsupportedVersionError(
            f"frame #{frame_index} uses wire version {version}; this side speaks version {VERSION}"
        )
    (stored_crc,) = _CRC.unpack_from(view, pos + _CRC_COVERS)
    computed_crc = zlib.crc32(view[pos : pos + _CRC_COVERS])
    if stored_crc != computed_crc:
        raise PrefixChecksumError(
            f"frame #{frame_index}: prefix crc32 0x{stored_crc:08x} != computed "
            f"0x{computed_crc:08x}: the fixed header is corrupted"
        )
    frame_type = _TYPES_BY_VALUE.get(type_value)
    if frame_type is None:
        raise UnknownFrameTypeError(f"unknown frame type 0x{type_value:02x} (stream {stream_id})")
    prefix = _Prefix(frame_type, flags, stream_id, *fields[6:])
    _check_flags_and_reserved(prefix, reserved)
    _check_lengths(FrameTooLargeError, limits, prefix.header_len, prefix.payload_len, prefix.where)
    return prefix


def _check_flags_and_reserved(prefix: _Prefix, reserved: int) -> None:
    unknown = prefix.flags & ~KNOWN_FLAGS
    if unknown:
        raise UnknownFrameTypeError(
            f"unknown flag bits 0x{unknown:04x} in flags 0x{prefix.flags:04x} {prefix.where}"
        )
    if reserved:
        raise UnknownFrameTypeError(f"reserved field is 0x{reserved:04x}, must be 0 {prefix.where}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows to {value}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode_header(raw: Buffer, prefix: _Prefix) -> dict[str, Any]:
    """The header as a dict; anything but a UTF-8 JSON object is a HeaderDecodeError."""
    size = prefix.header_len
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderDecodeError(
            f"header of {size} bytes is not UTF-8 (bad byte at {exc.start}) {prefix.where}"
        ) from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise HeaderDecodeError(
            f"header of {size} bytes is not valid JSON: {exc} {prefix.where}"
        ) from exc
    if not isinstance(value, dict):
        raise HeaderDecodeError(
            f"header of {size} bytes is a JSON {type(value).__name__}, not an object {prefix.where}"
        )
    return value
