"""The chunk codec: a planned chunk <-> a safetensors blob, without copying tensor bytes.

A chunk is an ordinary safetensors blob: 8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the pieces' bytes back to back in plan order. A whole tensor
travels under its own name, dtype and shape. A byte range of a larger tensor travels as a 1-D "U8"
tensor under the key "<name>@<start>", and its place is recorded in the header's `__metadata__`:

    {"__metadata__": {"tensorwire": "{\"chunk\":3,\"ranges\":{\"w@8\":{\"tensor\":\"w\",
     \"offset\":8,\"dtype\":\"F32\",\"shape\":[4,4]}}}"}, "w@8": {"dtype": "U8", ...}, ...}

The receiver knows the plan, so it rebuilds the exact header it expects and compares: equal bytes
is the fast path; anything else is parsed only to say precisely what differs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any, Final

from transport.exceptions import ChunkError, PayloadError
from transport.payload.manifest import Manifest
from transport.payload.plan import Chunk, Piece, is_whole
from transport.wire.frames import Buffer

__all__ = ["METADATA_KEY", "chunk_header", "decode_chunk", "encode_chunk", "pack_header"]

METADATA_KEY: Final = "tensorwire"
_LENGTH: Final = struct.Struct("<Q")
# Room for a peer that formats the same header differently; beyond this it is not our header.
_HEADER_SLACK: Final = 4096


def pack_header(header: dict[str, Any]) -> bytes:
    """Length prefix + compact UTF-8 JSON padded with spaces to a multiple of 8 (as safetensors)."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return _LENGTH.pack(len(text)) + text


def _range_key(name: str, start: int, taken: set[str]) -> str:
    # The suffix after the last "@" is an int, so range keys of different tensors never collide;
    # a whole tensor that happens to be called like a range key pushes it aside deterministically.
    key = f"{name}@{start}"
    while key in taken:
        key += "@"
    return key


def chunk_header(manifest: Manifest, chunk: Chunk) -> dict[str, Any]:
    """The safetensors header (as a dict, in key order) that the plan dictates for this chunk."""
    whole_names = {
        manifest.tensors[piece.tensor].name for piece in chunk.pieces if is_whole(manifest, piece)
    }
    entries: dict[str, Any] = {}
    ranges: dict[str, Any] = {}
    offset = 0
    for piece in chunk.pieces:
        spec = manifest.tensors[piece.tensor]
        end = offset + piece.nbytes
        if is_whole(manifest, piece):
            entry = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, end]}
            entries[spec.name] = entry
        else:
            key = _range_key(spec.name, piece.start, whole_names)
            entries[key] = {"dtype": "U8", "shape": [piece.nbytes], "data_offsets": [offset, end]}
            ranges[key] = {
                "tensor": spec.name,
                "offset": piece.start,
                "dtype": spec.dtype,
                "shape": list(spec.shape),
            }
        offset = end
    place = json.dumps({"chunk": chunk.index, "ranges": ranges}, separators=(",", ":"))
    return {"__metadata__": {METADATA_KEY: place}, **entries}


def encode_chunk(manifest: Manifest, chunk: Chunk, views: Sequence[memoryview]) -> list[Buffer]:
    """[header bytes, *views]: joined, they form the chunk's safetensors blob; views not copied."""
    if len(views) != len(chunk.pieces):
        raise PayloadError(
            f"chunk {chunk.index} has {len(chunk.pieces)} pieces but {len(views)} views were given"
        )
    for piece, view in zip(chunk.pieces, views, strict=True):
        if view.nbytes != piece.nbytes:
            name = manifest.tensors[piece.tensor].name
            raise PayloadError(
                f"chunk {chunk.index}: view for {name!r} [{piece.start}, {piece.stop}) is "
                f"{view.nbytes} bytes, expected {piece.nbytes}"
            )
    return [pack_header(chunk_header(manifest, chunk)), *views]


def decode_chunk(manifest: Manifest, chunk: Chunk, blob: Buffer) -> list[tuple[Piece, memoryview]]:
    """Check a received blob against the planned chunk; return zero-copy slices, one per piece."""
    data = memoryview(blob)
    if data.ndim != 1 or data.format != "B":
        data = data.cast("B")
    expected = pack_header(chunk_header(manifest, chunk))
    header_len = _read_header_len(chunk, data, len(expected))
    data_start = _LENGTH.size + header_len
    if data[: len(expected)] != expected:
        _explain_header(manifest, chunk, data[_LENGTH.size : data_start])
    if len(data) != data_start + chunk.nbytes:
        raise ChunkError(
            f"chunk {chunk.index} is {len(data)} bytes: header {header_len} + data "
            f"{len(data) - data_start}, but the plan has {chunk.nbytes} data bytes"
        )
    slices: list[tuple[Piece, memoryview]] = []
    offset = data_start
    for piece in chunk.pieces:
        slices.append((piece, data[offset : offset + piece.nbytes]))
        offset += piece.nbytes
    return slices


def _read_header_len(chunk: Chunk, data: memoryview, expected_len: int) -> int:
    if len(data) < _LENGTH.size:
        raise ChunkError(f"chunk {chunk.index} is {len(data)} bytes, too short for a header length")
    (header_len,) = _LENGTH.unpack(data[: _LENGTH.size])
    limit = min(len(data) - _LENGTH.size, 2 * expected_len + _HEADER_SLACK)
    if header_len > limit:
        raise ChunkError(
            f"chunk {chunk.index} announces a {header_len}-byte header; at most {limit} is "
            f"possible (blob {len(data)} bytes, planned header {expected_len - _LENGTH.size})"
        )
    return int(header_len)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ChunkError(f"header repeats the key {key!r}")
        result[key] = value
    return result


def _parse_json(chunk: Chunk, raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ChunkError(f"chunk {chunk.index}: {what} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ChunkError(f"chunk {chunk.index}: {what} is not a JSON object")
    return parsed


def _explain_header(manifest: Manifest, chunk: Chunk, raw: memoryview) -> None:
    """Raise ChunkError naming the first difference; return if only the formatting differs."""
    actual = _parse_json(chunk, bytes(raw), "header")
    expected = chunk_header(manifest, chunk)
    actual_meta = actual.pop("__metadata__", None)
    expected_meta = expected.pop("__metadata__")
    _compare_place(chunk, expected_meta, actual_meta)
    missing = [key for key in expected if key not in actual]
    unexpected = [key for key in actual if key not in expected]
    if missing or unexpected:
        raise ChunkError(
            f"chunk {chunk.index}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, entry in expected.items():
        if actual[key] != entry:
            raise ChunkError(
                f"chunk {chunk.index}: entry {key!r} is {actual[key]!r:.200}, "
                f"the plan says {entry!r}"
            )


def _compare_place(chunk: Chunk, expected_meta: dict[str, str], actual_meta: Any) -> None:
    if not isinstance(actual_meta, dict) or not isinstance(actual_meta.get(METADATA_KEY), str):
        raise ChunkError(f"chunk {chunk.index}: __metadata__ lacks the {METADATA_KEY!r} string")
    actual = _parse_json(chunk, actual_meta[METADATA_KEY], "range metadata")
    expected = json.loads(expected_meta[METADATA_KEY])
    if actual.get("chunk") != chunk.index:
        raise ChunkError(
            f"chunk {chunk.index}: blob says it is chunk {actual.get('chunk')!r} (reordered?)"
        )
    if actual.get("ranges") != expected["ranges"]:
        raise ChunkError(
            f"chunk {chunk.index}: range metadata {actual.get('ranges')!r:.300} differs from the "
            f"plan {expected['ranges']!r:.300}"
        )
