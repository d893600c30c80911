"""bytes -> frames: the incremental `FrameParser` (the codec's checks are in codec.py).

Pure: no asyncio, no sockets. Nothing is allocated for a frame before its prefix passed every
check; large payloads get a buffer of their own that the socket reads straight into.
"""

from __future__ import annotations

from collections.abc import Callable

import xxhash

from transport.exceptions import (
    ChecksumMismatchError,
    ConfigError,
    FrameError,
    FrameTooLargeError,
    TruncatedFrameError,
)
from transport.wire.codec import (
    DEFAULT_LIMITS,
    _byte_view,
    _decode_header,
    _Prefix,
    _read_prefix,
)
from transport.wire.frames import PREFIX_SIZE, Buffer, Frame, FrameFlags, Limits

__all__ = ["FrameParser"]


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
