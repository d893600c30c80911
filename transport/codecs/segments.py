"""Segments: how a chunk's blob is cut for the codec, and which parts get byte grouping.

A chunk blob is the safetensors header followed by the pieces' bytes (see transport.payload.chunk).
The codec sees it as consecutive segments, each compressed on its own:

- the header bytes: one ungrouped segment;
- one segment per piece. A piece of a floating dtype is *grouped*: byte k of every element goes to
  plane k, so the sign+exponent bytes of a bf16 tensor (its second byte in memory, little-endian)
  form one plane that compresses well while the noisy mantissa bytes form another;
- a byte range of a large tensor whose start falls inside an element first gets a short ungrouped
  segment up to the next element boundary, so the planes of the rest stay aligned.

Integers and bools are not grouped unless asked (`group_integers=True`); 1-byte dtypes never are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from transport.payload.chunk import chunk_header, pack_header
from transport.payload.manifest import DTYPE_SIZES, Manifest
from transport.payload.plan import Chunk, Piece

__all__ = ["FLOAT_PLANES", "INTEGER_PLANES", "Segment", "plane_count", "segments_for_chunk"]

# Number of byte planes a grouped element splits into. A complex64 is two float32s, so it groups
# like one: 4 planes. fp8 dtypes have a single byte, nothing to group.
FLOAT_PLANES: Final[Mapping[str, int]] = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "C64": 4}
INTEGER_PLANES: Final[Mapping[str, int]] = {
    name: size
    for name, size in DTYPE_SIZES.items()
    if name[0] in "IU" and size > 1  # I16..U64; U8/I8 have one byte
}


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of `nbytes` bytes of the blob; `grouped` ones split into `element_size` byte planes.

    `element_size` is the unit that is split (4 for a complex64, whose halves are float32s). A
    grouped segment whose length is not a multiple of it keeps its last `nbytes % element_size`
    bytes raw.
    """

    nbytes: int
    element_size: int
    grouped: bool


def plane_count(dtype: str, *, group_integers: bool = False) -> int:
    """How many byte planes a `dtype` element is split into (1: not grouped)."""
    if dtype in FLOAT_PLANES:
        return FLOAT_PLANES[dtype]
    if group_integers and dtype in INTEGER_PLANES:
        return INTEGER_PLANES[dtype]
    return 1


def segments_for_chunk(
    manifest: Manifest,
    chunk: Chunk,
    *,
    byte_grouping: bool = True,
    group_integers: bool = False,
) -> list[Segment]:
    """The header segment, then the segments of every piece, in blob order.

    They describe the parts that `transport.payload.encode_chunk` returns for the same chunk; a
    segment never spans two parts. `byte_grouping=False` gives plain per-segment zstd.
    """
    header_bytes = len(pack_header(chunk_header(manifest, chunk)))
    segments = [Segment(header_bytes, 1, grouped=False)]
    for piece in chunk.pieces:
        dtype = manifest.tensors[piece.tensor].dtype
        planes = plane_count(dtype, group_integers=group_integers) if byte_grouping else 1
        segments.extend(_piece_segments(piece, DTYPE_SIZES[dtype], planes))
    return segments


def _piece_segments(piece: Piece, dtype_size: int, planes: int) -> list[Segment]:
    if planes == 1:
        return [Segment(piece.nbytes, dtype_size, grouped=False)]
    # A range piece may start mid-element (chunk_size need not be a multiple of the element size).
    misalignment = piece.start % planes
    head = min(piece.nbytes, (planes - misalignment) % planes)
    segments = [Segment(head, planes, grouped=False)] if head else []
    segments.append(Segment(piece.nbytes - head, planes, grouped=True))
    return segments
