"""Fuzz the chunk decoder: random bytes and mutated valid chunks raise ChunkError, nothing else,
and never yield a view outside the blob."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.exceptions import ChunkError
from transport.payload import StateDictSource, decode_chunk, encode_chunk, plan_chunks

_STATE = {
    "a": torch.arange(300, dtype=torch.float32),
    "b": torch.ones(7, 3, dtype=torch.bfloat16),
    "c": torch.zeros((), dtype=torch.int64),
    "big": torch.arange(1000, dtype=torch.int16),
}
_SOURCE = StateDictSource(_STATE, chunk_size=512)
_MANIFEST = _SOURCE.manifest
_CHUNKS = plan_chunks(_MANIFEST)
_BLOBS = [
    b"".join(bytes(p) for p in encode_chunk(_MANIFEST, chunk, _SOURCE.chunk_views(chunk)))
    for chunk in _CHUNKS
]


def _decode_or_chunk_error(index: int, blob: bytes) -> None:
    try:
        pieces = decode_chunk(_MANIFEST, _CHUNKS[index], blob)
    except ChunkError:
        return
    for piece, view in pieces:
        assert view.nbytes == piece.stop - piece.start


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(_CHUNKS) - 1), blob=st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(index: int, blob: bytes) -> None:
    _decode_or_chunk_error(index, blob)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(_CHUNKS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_mutated_chunks_are_refused_or_decode_in_bounds(
    index: int, flips: list[tuple[int, int]], cut: int | None
) -> None:
    blob = bytearray(_BLOBS[index])
    for position, xor in flips:
        blob[position % len(blob)] ^= xor
    if cut is not None:
        del blob[cut % len(blob) :]
    _decode_or_chunk_error(index, bytes(blob))
