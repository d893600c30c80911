"""Compress a chunk blob plane by plane with zstd, and decompress it into a caller's buffer.

The sender gives the parts that `transport.payload.encode_chunk` returned (header bytes, then one
view per piece) and the segments that describe them (`segments_for_chunk`); it gets back a codec
header for the frame header and the payload parts for one writev. The receiver gives the codec
header, the payload and a preallocated buffer; it gets the exact original blob in that buffer.

Copies, sender side: a grouped segment is gathered plane by plane into one reused plane buffer
(numpy strided copy) and compressed from there; a plane that does not shrink below 97% of its size
is sent raw: the payload takes the plane buffer itself, and the next plane gets a fresh one, so the
returned parts stay valid after the next call without a second copy. An ungrouped segment that does
not compress passes through as a view of the caller's part.
Receiver side: each zstd frame is decompressed once, then scattered (grouped) or copied into `out`;
raw planes are scattered or copied straight from the payload.

Threads: zstd, xxh3 and numpy's copies of uint8 arrays all run with the GIL released, and every
bulk copy here is a numpy copy (never `bytes(view)` or `view[:] = other`, which hold the GIL for
the whole memcpy), so one compressor or decompressor per thread scales with the cores.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from transport.codecs.header import (
    ALLOWED_PLANES,
    MAX_SEGMENTS,
    SegmentLayout,
    build_codec_header,
    read_codec_header,
)
from transport.codecs.segments import Segment
from transport.exceptions import ChunkError, ConfigError, PayloadError
from transport.wire.frames import Buffer

__all__ = [
    "DEFAULT_LEVEL",
    "MIN_COMPRESS_BYTES",
    "RAW_RATIO",
    "ChunkCompressor",
    "ChunkDecompressor",
]

DEFAULT_LEVEL: Final = 1
# A plane whose zstd frame is not below this fraction of its size travels raw: the receiver then
# skips a decompression that would save almost nothing on the wire.
RAW_RATIO: Final = 0.97
# Below this a zstd frame (>= 9 bytes of overhead) and a call cost more than they can save.
MIN_COMPRESS_BYTES: Final = 64
_NO_BUFFER: Final[npt.NDArray[np.uint8]] = np.empty(0, dtype=np.uint8)


def _byte_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


class ChunkCompressor:
    """Compresses chunk blobs; keeps its zstd context and plane buffer. One per thread."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        top = zstandard.MAX_COMPRESSION_LEVEL
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= top:
            raise ConfigError(f"zstd level must be an int in [1, {top}], got {level!r}")
        self.level = level
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._plane = _NO_BUFFER

    def compress(
        self, segments: Sequence[Segment], parts: Sequence[Buffer]
    ) -> tuple[dict[str, Any], list[Buffer]]:
        """(codec header, payload parts) for the blob made of `parts`, cut as `segments` say.

        The payload parts are fresh bytes or views of `parts` (valid as long as those are);
        none of them refers to this compressor's own buffers.
        """
        payload: list[Buffer] = []
        entries: list[list[Any]] = []
        digest = xxhash.xxh3_64()
        raw_bytes = 0
        for segment, view in _segment_views(segments, [_byte_view(part) for part in parts]):
            digest.update(view)
            entries.append(self._compress_segment(segment, view, payload))
            raw_bytes += segment.nbytes
        header = build_codec_header(
            level=self.level, raw_bytes=raw_bytes, digest=digest.intdigest(), segments=entries
        )
        return header, payload

    def _compress_segment(
        self, segment: Segment, view: memoryview, payload: list[Buffer]
    ) -> list[Any]:
        planes = segment.element_size if segment.grouped else 1
        if planes not in ALLOWED_PLANES:
            raise PayloadError(
                f"a grouped segment's element_size must be one of {sorted(ALLOWED_PLANES)}, "
                f"got {segment.element_size}"
            )
        count = segment.nbytes // planes
        if planes == 1 or count == 0:
            return [segment.nbytes, 1, [self._store(view, payload)]]
        elements = np.frombuffer(view, dtype=np.uint8, count=count * planes).reshape(count, planes)
        stored = []
        for index in range(planes):
            plane = self._plane_buffer(count)
            np.copyto(plane, elements[:, index])
            stored.append(self._store_plane(plane, payload))
        if segment.nbytes % planes:
            payload.append(view[count * planes :])
        return [segment.nbytes, planes, stored]

    def _store(self, data: memoryview, payload: list[Buffer]) -> int:
        """Append data's zstd frame (return its length) or data itself raw (return 0)."""
        if len(data) >= MIN_COMPRESS_BYTES:
            frame = self._zstd.compress(data)
            if len(frame) < RAW_RATIO * len(data):
                payload.append(frame)
                return len(frame)
        payload.append(data)
        return 0

    def _store_plane(self, plane: npt.NDArray[np.uint8], payload: list[Buffer]) -> int:
        stored = self._store(plane.data, payload)
        if stored == 0:
            # The payload now holds the plane buffer: give it away rather than copy the plane out
            # (bytes() would hold the GIL for the memcpy); the next plane gets a fresh buffer.
            self._plane = _NO_BUFFER
        return stored

    def _plane_buffer(self, size: int) -> npt.NDArray[np.uint8]:
        if len(self._plane) < size:
            self._plane = np.empty(size, dtype=np.uint8)
        return self._plane[:size]


def _segment_views(
    segments: Sequence[Segment], views: list[memoryview]
) -> Iterator[tuple[Segment, memoryview]]:
    """Each segment with its slice of the parts; PayloadError if they do not describe the parts."""
    total = sum(len(view) for view in views)
    covered = sum(segment.nbytes for segment in segments)
    if covered != total or any(segment.nbytes < 0 for segment in segments):
        raise PayloadError(
            f"segments cover {covered} bytes but the parts hold {total}: "
            "they describe another chunk"
        )
    part, part_start, position = 0, 0, 0
    for segment in segments:
        end = position + segment.nbytes
        while part_start + len(views[part]) < end:
            part_start += len(views[part])
            part += 1
        if position < part_start:
            raise PayloadError(
                f"a {segment.nbytes}-byte segment at offset {position} spans two parts "
                f"(part {part} starts at {part_start})"
            )
        yield segment, views[part][position - part_start : end - part_start]
        position = end


class ChunkDecompressor:
    """Rebuilds chunk blobs from codec header + payload; keeps its zstd context. One per thread."""

    def __init__(self, max_segments: int = MAX_SEGMENTS) -> None:
        self.max_segments = max_segments
        self._zstd = zstandard.ZstdDecompressor()

    def decompress_into(self, codec_header: Mapping[str, Any], payload: Buffer, out: Buffer) -> int:
        """Write the original blob into `out`; return its length.

        Every size in the header is checked against `len(payload)` and `len(out)` before anything
        is decompressed; corrupt, truncated or inconsistent input raises ChunkError, and the blob's
        digest is verified, so a wrong blob is never returned as right.
        """
        source = _byte_view(payload)
        target = _byte_view(out)
        if target.readonly:
            raise PayloadError("decompress_into needs a writable output buffer")
        header = read_codec_header(
            codec_header,
            payload_bytes=len(source),
            out_bytes=len(target),
            max_segments=self.max_segments,
        )
        read = written = 0
        for position, segment in enumerate(header.segments):
            end = written + segment.nbytes
            read = self._segment_into(position, segment, source, read, target[written:end])
            written = end
        if xxhash.xxh3_64_intdigest(target[:written]) != header.digest:
            raise ChunkError(
                f"decompressed chunk ({written} bytes) does not match its xxh3 digest "
                f"{header.digest:016x}: the payload was corrupted"
            )
        return written

    def _segment_into(
        self,
        position: int,
        segment: SegmentLayout,
        source: memoryview,
        read: int,
        target: memoryview,
    ) -> int:
        """Rebuild one segment into `target` from source[read:]; return the new read offset."""
        count = segment.plane_bytes
        if segment.planes == 1:
            return self._plane_into(position, 0, segment.stored[0], source, read, target)
        elements = np.frombuffer(target, dtype=np.uint8, count=count * segment.planes)
        columns = elements.reshape(count, segment.planes)
        for index, stored in enumerate(segment.stored):
            size = stored or count
            plane = source[read : read + size]
            if stored:
                plane = memoryview(self._inflate(position, index, plane, count))
            columns[:, index] = np.frombuffer(plane, dtype=np.uint8)
            read += size
        tail = segment.tail_bytes
        target[count * segment.planes :] = source[read : read + tail]
        return read + tail

    def _plane_into(
        self,
        position: int,
        index: int,
        stored: int,
        source: memoryview,
        read: int,
        target: memoryview,
    ) -> int:
        if stored == 0:
            _copy(target, source[read : read + len(target)])
            return read + len(target)
        _copy(target, self._inflate(position, index, source[read : read + stored], len(target)))
        return read + stored

    def _inflate(self, position: int, index: int, frame: memoryview, expected: int) -> bytes:
        where = f"codec segment #{position} plane {index}"
        try:
            announced = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise ChunkError(f"{where}: not a zstd frame ({exc})") from exc
        if announced < 0:  # the frame header omits the content size
            raise ChunkError(
                f"{where}: zstd frame does not announce its size (expected {expected})"
            )
        if announced != expected:
            raise ChunkError(
                f"{where}: zstd frame announces {announced} bytes, the header says {expected}"
            )
        try:
            data = self._zstd.decompress(frame, max_output_size=expected, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise ChunkError(
                f"{where}: zstd frame of {len(frame)} bytes is corrupt: {exc}"
            ) from exc
        if len(data) != expected:
            raise ChunkError(f"{where}: zstd frame gave {len(data)} bytes, expected {expected}")
        return data


def _copy(target: memoryview, data: Buffer) -> None:
    """target[:] = data as a numpy copy: it releases the GIL, a memoryview assignment does not."""
    np.copyto(np.frombuffer(target, dtype=np.uint8), np.frombuffer(data, dtype=np.uint8))
