"""The frame codec: frames -> bytes (`encode_frame`, `serialize`), bytes -> frames (`FrameParser`).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import xxhash

from transport.exceptions import (
    BadMagicError,
    ChecksumMismatchError,
    ConfigError,
    FrameError,
    FrameTooLargeError,
    HeaderDecodeError,
    PrefixChecksumError,
    TensorwireError,
    TruncatedFrameError,
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
    FrameFlags,
    FrameType,
    Limits,
)

__all__ = [
    "DEFAULT_LIMITS",
    "EncodedFrame",
    "FrameParser",
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


class FrameParser:
    """Turns a byte stream, split anywhere, into checked `Frame`s. One parser per connection.

    Two ways to give it bytes (do not interleave them within one frame):

    - `feed(data)`: for drivers that hand over chunks. A frame lying wholly inside `data` gets a
      memoryview slice of `data` as its payload (no copy): the caller must not modify or reuse
      `data` while it holds such frames. A frame split across calls is assembled in a buffer of
      its own (or in the scratch buffer when small).
    - `get_buffer(sizehint)` then `buffer_updated(nbytes)`: the `asyncio.BufferedProtocol` and
      `sock.recv_into` style. While a large payload (>= `direct_threshold` bytes) is arriving,
      `get_buffer` returns the rest of that payload's own buffer from `allocate(payload_len)`, so
      the socket writes straight into it. Everything else lands in a reusable scratch buffer of
      `scratch_size` bytes (grown, once the prefix has been checked, for a frame that needs more;
      shrunk back afterwards) and small payloads are copied out of it as `bytes`.

    Payloads of frames that were assembled here are exactly `payload_len` long: a larger buffer
    from `allocate` is sliced. Any error poisons the parser: every later call raises `FrameError`,
    because the byte stream has lost its frame boundaries and the connection must be closed.

    `pause_after=n` stops parsing after n frames: later bytes wait, unparsed, in the scratch
    (a `FrameTooLargeError` once it is full) until `resume(limits)`. A receiver parses a peer's
    first frame (its HELLO) under small limits and nothing after it until it has decided to
    accept that peer: an unauthenticated connection costs the scratch and no more.
    """

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        allocate: Callable[[int], bytearray | memoryview] | None = None,
        direct_threshold: int = 64 * 1024,
        scratch_size: int = 256 * 1024,
        pause_after: int | None = None,
    ) -> None:
        if direct_threshold < 1:
            raise ConfigError(f"direct_threshold={direct_threshold} must be >= 1")
        if scratch_size < PREFIX_SIZE:
            raise ConfigError(f"scratch_size={scratch_size} must be >= {PREFIX_SIZE}")
        self._limits = limits
        self._allocate: Callable[[int], bytearray | memoryview] = allocate or bytearray
        self._direct_threshold = direct_threshold
        self._scratch_size = scratch_size
        self._scratch = bytearray(scratch_size)
        self._start = 0  # unparsed bytes are self._scratch[self._start:self._end]
        self._end = 0
        self._prefix: _Prefix | None = None  # the checked prefix of the frame being assembled
        self._header = b""  # its header while its payload arrives in a buffer of its own
        self._payload: memoryview | None = None  # that buffer, exactly payload_len bytes
        self._filled = 0  # bytes of self._payload received so far
        self._hasher = xxhash.xxh3_64()
        self._lent = 0  # size of the buffer the last get_buffer() returned (0: none)
        self._lent_is_payload = False
        self._frames_parsed = 0
        self._pause_after = pause_after  # frames parsed at which parsing stops (None: never)
        self._failure: BaseException | None = None

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def paused(self) -> bool:
        """True once `pause_after` frames were parsed and until `resume()`."""
        return self._pause_after is not None and self._frames_parsed >= self._pause_after

    def resume(self, limits: Limits, scratch_size: int | None = None) -> list[Frame]:
        """Parse on under `limits` (and a scratch of `scratch_size` from now on); return the
        frames the bytes that waited meanwhile complete."""
        self._raise_if_failed()
        self._limits = limits
        self._pause_after = None
        if scratch_size is not None:
            self._scratch_size = scratch_size
        try:
            return self._drain_scratch()
        except BaseException as exc:
            self._failure = exc
            raise

    @property
    def in_frame(self) -> bool:
        """True while the bytes received so far end inside a frame."""
        return self._prefix is not None or self._end > self._start

    def feed(self, data: Buffer) -> list[Frame]:
        """Parse `data` (any split of the byte stream); return the frames it completed."""
        self._raise_if_failed()
        view = _byte_view(data, "data")
        self._lent = 0
        try:
            return self._feed_view(view)
        except BaseException as exc:
            self._failure = exc
            raise

    def get_buffer(self, sizehint: int) -> memoryview:
        """A writable buffer for the next bytes of the stream (`sizehint` is ignored)."""
        self._raise_if_failed()
        if self._payload is not None:
            buffer = self._payload[self._filled :]
            self._lent_is_payload = True
        else:
            if self.paused:
                self._compact()
            else:
                self._make_room()
            buffer = memoryview(self._scratch)[self._end :]
            self._lent_is_payload = False
            if self.paused and not buffer:
                self._failure = self._held_too_long()
                raise self._failure
        self._lent = len(buffer)
        return buffer

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """`nbytes` were written at the start of the last `get_buffer()`; return the frames done."""
        self._raise_if_failed()
        if not 0 <= nbytes <= self._lent:
            raise ConfigError(
                f"buffer_updated({nbytes}) but the last get_buffer() lent {self._lent} bytes"
            )
        self._lent = 0
        try:
            if self._lent_is_payload:
                frame = self._payload_received(nbytes)
                return [] if frame is None else [frame]
            self._end += nbytes
            return self._drain_scratch()
        except BaseException as exc:
            self._failure = exc
            raise

    def eof(self) -> None:
        """The byte stream ended: raise `TruncatedFrameError` if it ended inside a frame."""
        self._raise_if_failed()
        if not self.in_frame:
            return
        if self._prefix is None:
            got, expected, where = self._end - self._start, PREFIX_SIZE, "of a frame prefix"
        else:
            prefix = self._prefix
            expected = PREFIX_SIZE + prefix.header_len + prefix.payload_len
            got = PREFIX_SIZE + self._end - self._start + len(self._header) + self._filled
            where = f"of a frame {prefix.where}"
        failure = TruncatedFrameError(
            f"the byte stream ended after {got} of {expected} bytes {where}"
        )
        self._failure = failure
        raise failure

    # --- internals ---------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            failure = self._failure
            raise FrameError(
                f"the frame parser already failed ({type(failure).__name__}: {failure}); "
                "the connection must be closed"
            ) from failure

    def _held_too_long(self) -> FrameTooLargeError:
        return FrameTooLargeError(
            f"{self._end - self._start} bytes arrived after frame {self._frames_parsed} before "
            f"this side accepted the peer: at most {len(self._scratch)} may wait"
        )

    def _compact(self) -> None:
        buffered = self._end - self._start
        self._scratch[:buffered] = self._scratch[self._start : self._end]
        self._start, self._end = 0, buffered

    def _hold(self, view: memoryview, pos: int) -> int:
        """Paused: keep the bytes, unparsed, in the scratch; it does not grow for them."""
        self._compact()
        take = len(view) - pos
        if take > len(self._scratch) - self._end:
            self._end += len(self._scratch) - self._end  # counted in the error message
            raise self._held_too_long()
        self._scratch[self._end : self._end + take] = view[pos:]
        self._end += take
        return take

    def _feed_view(self, view: memoryview) -> list[Frame]:
        frames: list[Frame] = []
        pos, size = 0, len(view)
        while pos < size:
            if self.paused and self._prefix is None:
                pos += self._hold(view, pos)
            elif self._payload is not None:
                pos += self._feed_payload(view, pos, frames)
            elif not self.in_frame and size - pos >= PREFIX_SIZE:
                pos += self._feed_inline(view, pos, frames)
            else:
                pos += self._feed_scratch(view, pos, frames)
        return frames

    def _feed_payload(self, view: memoryview, pos: int, frames: list[Frame]) -> int:
        assert self._payload is not None
        take = min(len(self._payload) - self._filled, len(view) - pos)
        self._payload[self._filled : self._filled + take] = view[pos : pos + take]
        frame = self._payload_received(take)
        if frame is not None:
            frames.append(frame)
        return take

    def _feed_inline(self, view: memoryview, pos: int, frames: list[Frame]) -> int:
        """Parse a frame straight out of the caller's buffer; returns the bytes consumed."""
        prefix = _read_prefix(view, pos, self._limits, self._frames_parsed)
        body_start = pos + PREFIX_SIZE
        body_end = body_start + prefix.header_len + prefix.payload_len
        if body_end > len(view):
            self._prefix = prefix  # the rest goes to the scratch or the payload's own buffer
            return PREFIX_SIZE
        body = view[body_start:body_end]
        payload = body[prefix.header_len :] if prefix.payload_len else b""
        computed = xxhash.xxh3_64_intdigest(body)
        frames.append(self._complete(prefix, body[: prefix.header_len], payload, computed))
        return body_end - pos

    def _feed_scratch(self, view: memoryview, pos: int, frames: list[Frame]) -> int:
        """Copy into the scratch only what the current prefix or body still lacks."""
        self._make_room()
        lacking = self._wanted_in_scratch() - (self._end - self._start)
        take = min(lacking, len(view) - pos, len(self._scratch) - self._end)
        self._scratch[self._end : self._end + take] = view[pos : pos + take]
        self._end += take
        frames.extend(self._drain_scratch())
        return take

    def _wanted_in_scratch(self) -> int:
        """Bytes the current step needs contiguous in the scratch, counted from self._start."""
        prefix = self._prefix
        if prefix is None:
            return PREFIX_SIZE
        if prefix.payload_len >= self._direct_threshold:
            return prefix.header_len
        return prefix.header_len + prefix.payload_len

    def _make_room(self) -> None:
        """Make the scratch able to hold the current step, and leave room for a useful read."""
        wanted = self._wanted_in_scratch()
        capacity = len(self._scratch)
        buffered = self._end - self._start
        if buffered == 0:
            self._start = self._end = 0
            if capacity > self._scratch_size and wanted <= self._scratch_size:
                self._scratch = bytearray(self._scratch_size)  # give a one-off big header back
            elif wanted <= capacity:
                return
        if wanted > capacity:  # limits were checked: `wanted` is bounded by them
            grown = bytearray(max(wanted, self._scratch_size))
            grown[:buffered] = self._scratch[self._start : self._end]
            self._scratch, self._start, self._end = grown, 0, buffered
        elif self._start + wanted > capacity or capacity - self._end < capacity // 4:
            # `buffered` < `wanted`, which is small here: moving it is cheap.
            self._scratch[:buffered] = self._scratch[self._start : self._end]
            self._start, self._end = 0, buffered

    def _drain_scratch(self) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(self._scratch)
        while self._payload is None:
            if self._prefix is None:
                if self._end - self._start < PREFIX_SIZE or self.paused:
                    break
                self._prefix = _read_prefix(view, self._start, self._limits, self._frames_parsed)
                self._start += PREFIX_SIZE
            frame = self._take_body(view, self._prefix)
            if frame is None:
                break
            frames.append(frame)
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def _take_body(self, view: memoryview, prefix: _Prefix) -> Frame | None:
        """Complete the current frame from the scratch if it can; start a direct payload."""
        buffered = self._end - self._start
        if prefix.payload_len >= self._direct_threshold:
            if buffered < prefix.header_len:
                return None
            header_end = self._start + prefix.header_len
            self._begin_payload(prefix, bytes(view[self._start : header_end]))
            assert self._payload is not None
            take = min(self._end - header_end, prefix.payload_len)
            self._payload[:take] = view[header_end : header_end + take]
            self._start = header_end + take
            return self._payload_received(take)
        body_len = prefix.header_len + prefix.payload_len
        if buffered < body_len:
            return None
        body = view[self._start : self._start + body_len]
        self._start += body_len
        computed = xxhash.xxh3_64_intdigest(body)
        payload = bytes(body[prefix.header_len :])
        return self._complete(prefix, body[: prefix.header_len], payload, computed)

    def _begin_payload(self, prefix: _Prefix, header: bytes) -> None:
        size = prefix.payload_len
        buffer = _byte_view(self._allocate(size), f"allocate({size})'s result")
        if buffer.readonly or len(buffer) < size:
            raise ConfigError(
                f"allocate({size}) returned a {'read-only ' if buffer.readonly else ''}buffer "
                f"of {len(buffer)} bytes; it must be writable and at least {size} bytes"
            )
        self._payload = buffer[:size]
        self._filled = 0
        self._header = header
        self._hasher.reset()
        self._hasher.update(header)

    def _payload_received(self, nbytes: int) -> Frame | None:
        """Account for `nbytes` new payload bytes; complete the frame when all have arrived."""
        payload, prefix = self._payload, self._prefix
        assert payload is not None
        assert prefix is not None
        # Hash while the bytes are still in cache rather than in one pass at the end.
        self._hasher.update(payload[self._filled : self._filled + nbytes])
        self._filled += nbytes
        if self._filled < len(payload):
            return None
        header, self._header, self._payload, self._filled = self._header, b"", None, 0
        return self._complete(prefix, header, payload, self._hasher.intdigest())

    def _complete(self, prefix: _Prefix, header: Buffer, payload: Buffer, computed: int) -> Frame:
        if computed != prefix.checksum:
            raise ChecksumMismatchError(
                f"xxh3_64 0x{computed:016x} over {prefix.header_len} header + "
                f"{prefix.payload_len} payload bytes != 0x{prefix.checksum:016x} in the prefix "
                f"{prefix.where}"
            )
        decoded = _decode_header(header, prefix) if prefix.header_len else {}
        self._prefix = None
        self._frames_parsed += 1
        return Frame(
            type=prefix.type,
            stream_id=prefix.stream_id,
            offset=prefix.offset,
            flags=FrameFlags(prefix.flags),
            header=decoded,
            payload=payload,
            checksum=prefix.checksum,
            header_size=prefix.header_len,
        )
