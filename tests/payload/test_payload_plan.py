"""The plan: grouping, splitting, empty and 0-d tensors, and speed at scale."""

from __future__ import annotations

import time

from transport.payload import Chunk, Manifest, Piece, TensorSpec, plan_chunks


def _u8(name: str, nbytes: int) -> TensorSpec:
    return TensorSpec(name, "U8", (nbytes,))


def _check_covers(manifest: Manifest, chunks: list[Chunk]) -> None:
    """Every tensor's bytes appear exactly once, in order, and no chunk is over chunk_size."""
    position = dict.fromkeys(range(len(manifest.tensors)), 0)
    seen = set()
    for number, chunk in enumerate(chunks):
        assert chunk.index == number
        assert chunk.nbytes <= manifest.chunk_size
        for piece in chunk.pieces:
            assert piece.start == position[piece.tensor]
            position[piece.tensor] = piece.stop
            seen.add(piece.tensor)
    assert seen == set(range(len(manifest.tensors)))
    assert all(position[i] == spec.nbytes for i, spec in enumerate(manifest.tensors))


def test_small_tensors_are_grouped() -> None:
    manifest = Manifest((_u8("a", 4), _u8("b", 4), _u8("c", 4)), chunk_size=8)
    assert plan_chunks(manifest) == [
        Chunk(0, (Piece(0, 0, 4), Piece(1, 0, 4))),
        Chunk(1, (Piece(2, 0, 4),)),
    ]


def test_large_tensor_split_and_tail_shared() -> None:
    manifest = Manifest((_u8("a", 3), _u8("big", 20), _u8("c", 2)), chunk_size=8)
    assert plan_chunks(manifest) == [
        Chunk(0, (Piece(0, 0, 3),)),
        Chunk(1, (Piece(1, 0, 8),)),
        Chunk(2, (Piece(1, 8, 16),)),
        Chunk(3, (Piece(1, 16, 20), Piece(2, 0, 2))),
    ]


def test_empty_and_scalar_tensors_get_pieces() -> None:
    manifest = Manifest(
        (_u8("e0", 0), TensorSpec("s", "F32", ()), TensorSpec("e1", "F32", (3, 0))), chunk_size=4
    )
    assert plan_chunks(manifest) == [Chunk(0, (Piece(0, 0, 0), Piece(1, 0, 4), Piece(2, 0, 0)))]


def test_empty_tensors_share_the_first_range_of_a_split_tensor() -> None:
    manifest = Manifest((_u8("e", 0), _u8("big", 10)), chunk_size=4)
    chunks = plan_chunks(manifest)
    assert chunks[0] == Chunk(0, (Piece(0, 0, 0), Piece(1, 0, 4)))
    _check_covers(manifest, chunks)


def test_exact_multiple_leaves_no_tail() -> None:
    manifest = Manifest((_u8("big", 16), _u8("c", 1)), chunk_size=8)
    assert plan_chunks(manifest) == [
        Chunk(0, (Piece(0, 0, 8),)),
        Chunk(1, (Piece(0, 8, 16),)),
        Chunk(2, (Piece(1, 0, 1),)),
    ]


def test_no_tensors_no_chunks() -> None:
    assert plan_chunks(Manifest(())) == []


def test_deterministic() -> None:
    manifest = Manifest(tuple(_u8(f"t{i}", (i * 37) % 101) for i in range(500)), chunk_size=64)
    assert plan_chunks(manifest) == plan_chunks(Manifest.from_header(manifest.to_header()))
    _check_covers(manifest, plan_chunks(manifest))


def test_ten_thousand_tensors_fast() -> None:
    manifest = Manifest(tuple(_u8(f"layer.{i}.weight", 4096) for i in range(10_000)))
    started = time.perf_counter()
    chunks = plan_chunks(manifest)
    assert time.perf_counter() - started < 1.0
    _check_covers(manifest, chunks)
    assert len(chunks) == 5  # 2048 tensors of 4 KiB per 8 MiB chunk


def test_128_gib_manifest_plans_every_chunk() -> None:
    # No time bound here (the machine is shared): the stream benchmarks plan such manifests.
    specs = tuple(TensorSpec(f"w{i}", "BF16", (8192, 8192)) for i in range(1024))  # 128 MiB each
    manifest = Manifest(specs)
    assert manifest.total_bytes == 128 * 2**30
    chunks = plan_chunks(manifest)
    assert len(chunks) == 16_384
    assert chunks[-1].pieces[-1] == Piece(1023, 128 * 2**20 - 8 * 2**20, 128 * 2**20)


def test_offsets_beyond_4_gib_are_plain_ints() -> None:
    manifest = Manifest((TensorSpec("huge", "F32", (2**31,)),), chunk_size=2**28)  # 8 GiB
    chunks = plan_chunks(manifest)
    assert len(chunks) == 32
    assert chunks[-1].pieces[0] == Piece(0, 2**33 - 2**28, 2**33)
