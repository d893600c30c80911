"""The codec header: what a compressed chunk's frame header says about its payload, and its checks.

    {"codec": "zstd-planes", "version": 1, "level": 1, "raw_bytes": 8389120,
     "xxh3": "9f1c0a6e3b2d4c57",
     "segments": [[232, 1, [141]], [4194304, 2, [0, 1502113]], [3, 2, [0]], ...]}

- `raw_bytes`: length of the original blob; `xxh3`: its XXH3-64 digest (16 hex digits), checked
  after decompression so a corruption anywhere (a raw plane included) can never yield a wrong blob.
- `level`: the zstd level the sender used (informative: decompression needs no setting).
- `segments`: in blob order, `[nbytes, planes, stored]`. The segment's bytes were split into
  `planes` byte planes (1: not split) of `nbytes // planes` bytes each; `stored[k]` is the length
  of plane k's zstd frame in the payload, or 0 when the plane travels raw (a zstd frame is never
  empty). A grouped segment's last `nbytes % planes` bytes follow its planes raw.

The payload is every segment's planes (then tail) back to back, in that order. `read_codec_header`
checks every number against the payload's and the output buffer's sizes before anything is
decompressed, and names the field that is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from transport.exceptions import ChunkError

__all__ = [
    "ALLOWED_PLANES",
    "CODEC_NAME",
    "CODEC_VERSION",
    "MAX_SEGMENTS",
    "CodecHeader",
    "SegmentLayout",
    "build_codec_header",
    "read_codec_header",
]

CODEC_NAME: Final = "zstd-planes"
CODEC_VERSION: Final = 1
ALLOWED_PLANES: Final = frozenset({1, 2, 4, 8})
# A chunk has one segment per piece (plus the header and alignment heads); beyond this the
# header itself is the attack.
MAX_SEGMENTS: Final = 1 << 20
_DIGEST_HEX_DIGITS: Final = 16


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    """One validated segment: `nbytes` of output from `planes` planes; stored sizes (0 = raw)."""

    nbytes: int
    planes: int
    stored: tuple[int, ...]

    @property
    def plane_bytes(self) -> int:
        """Decompressed length of each plane."""
        return self.nbytes // self.planes

    @property
    def tail_bytes(self) -> int:
        """Raw bytes after the planes (a grouped segment that ends mid-element)."""
        return self.nbytes % self.planes

    @property
    def payload_bytes(self) -> int:
        """How many payload bytes this segment occupies."""
        plane = self.plane_bytes
        return sum(size or plane for size in self.stored) + self.tail_bytes


@dataclass(frozen=True, slots=True)
class CodecHeader:
    """A codec header that passed every check."""

    raw_bytes: int
    digest: int
    segments: tuple[SegmentLayout, ...]


def build_codec_header(
    *, level: int, raw_bytes: int, digest: int, segments: list[list[Any]]
) -> dict[str, Any]:
    """The JSON-able header of a compressed chunk (the sender's side of `read_codec_header`)."""
    return {
        "codec": CODEC_NAME,
        "version": CODEC_VERSION,
        "level": level,
        "raw_bytes": raw_bytes,
        "xxh3": f"{digest:0{_DIGEST_HEX_DIGITS}x}",
        "segments": segments,
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_codec_header(
    obj: Any, *, payload_bytes: int, out_bytes: int, max_segments: int = MAX_SEGMENTS
) -> CodecHeader:
    """Validate a received codec header against the payload and output sizes; ChunkError if bad."""
    if not isinstance(obj, Mapping):
        raise ChunkError(f"codec header must be a JSON object, got {type(obj).__name__}")
    if obj.get("codec") != CODEC_NAME or obj.get("version") != CODEC_VERSION:
        raise ChunkError(
            f"codec {obj.get('codec')!r:.40} version {obj.get('version')!r:.20} is not supported "
            f"(this side decodes {CODEC_NAME!r} version {CODEC_VERSION})"
        )
    raw_bytes: Any = obj.get("raw_bytes")
    if not _is_int(raw_bytes) or not 0 <= raw_bytes <= out_bytes:
        raise ChunkError(
            f"codec header raw_bytes {raw_bytes!r:.40} is not an int in [0, {out_bytes}] "
            "(the size of the buffer for this chunk)"
        )
    segments = _read_segments(obj.get("segments"), max_segments)
    _check_totals(segments, raw_bytes, payload_bytes)
    return CodecHeader(raw_bytes, _read_digest(obj.get("xxh3")), segments)


def _read_digest(value: Any) -> int:
    if not isinstance(value, str) or len(value) != _DIGEST_HEX_DIGITS:
        raise ChunkError(f"codec header xxh3 {value!r:.40} is not {_DIGEST_HEX_DIGITS} hex digits")
    try:
        return int(value, 16)
    except ValueError:
        raise ChunkError(f"codec header xxh3 {value!r} is not hexadecimal") from None


def _read_segments(value: Any, max_segments: int) -> tuple[SegmentLayout, ...]:
    if not isinstance(value, list):
        raise ChunkError(f"codec header segments must be a JSON array, got {value!r:.60}")
    if len(value) > max_segments:
        raise ChunkError(
            f"codec header lists {len(value)} segments, over the limit of {max_segments}"
        )
    return tuple(_read_segment(position, entry) for position, entry in enumerate(value))


def _read_segment(position: int, entry: Any) -> SegmentLayout:
    if not isinstance(entry, list) or len(entry) != 3:
        raise ChunkError(
            f"codec segment #{position} must be [nbytes, planes, stored], got {entry!r:.80}"
        )
    nbytes, planes, stored = entry
    if not _is_int(nbytes) or nbytes < 0:
        raise ChunkError(f"codec segment #{position}: nbytes {nbytes!r:.40} is not an int >= 0")
    if not _is_int(planes) or planes not in ALLOWED_PLANES:
        raise ChunkError(
            f"codec segment #{position}: planes {planes!r:.40} is not one of "
            f"{sorted(ALLOWED_PLANES)}"
        )
    if not isinstance(stored, list) or len(stored) != planes:
        raise ChunkError(
            f"codec segment #{position}: stored must list {planes} plane sizes, got {stored!r:.80}"
        )
    for size in stored:
        if not _is_int(size) or size < 0:
            raise ChunkError(
                f"codec segment #{position}: stored size {size!r:.40} is not an int >= 0"
            )
    return SegmentLayout(nbytes, planes, tuple(stored))


def _check_totals(segments: tuple[SegmentLayout, ...], raw_bytes: int, payload_bytes: int) -> None:
    output = sum(segment.nbytes for segment in segments)
    if output != raw_bytes:
        raise ChunkError(f"codec segments add up to {output} bytes, but raw_bytes says {raw_bytes}")
    stored = sum(segment.payload_bytes for segment in segments)
    if stored != payload_bytes:
        raise ChunkError(
            f"codec segments occupy {stored} payload bytes, but the payload is {payload_bytes}"
        )
