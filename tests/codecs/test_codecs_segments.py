"""segments_for_chunk: which bytes are grouped, and that segments describe encode_chunk's parts."""

from __future__ import annotations

import torch

from tests.codecs.helpers import make_tensor
from transport.codecs import Segment, plane_count, segments_for_chunk
from transport.payload import StateDictSource, encode_chunk, plan_chunks


def _segments_and_parts(
    state_dict: dict[str, torch.Tensor], chunk_size: int, **options: bool
) -> list[tuple[list[Segment], list[int]]]:
    source = StateDictSource(state_dict, chunk_size=chunk_size)
    manifest = source.manifest
    result = []
    for chunk in plan_chunks(manifest):
        parts = encode_chunk(manifest, chunk, source.chunk_views(chunk))
        sizes = [len(memoryview(part).cast("B")) for part in parts]
        result.append((segments_for_chunk(manifest, chunk, **options), sizes))
    return result


def test_plane_counts() -> None:
    assert [plane_count(name) for name in ("BF16", "F16", "F32", "F64", "C64")] == [2, 2, 4, 8, 4]
    assert [plane_count(name) for name in ("F8_E4M3", "U8", "BOOL", "I32", "U64")] == [1] * 5
    assert plane_count("I32", group_integers=True) == 4
    assert plane_count("I8", group_integers=True) == 1


def test_header_then_one_segment_per_piece() -> None:
    state_dict = {
        "w": make_tensor("weights", "BF16", (10, 3), seed=1),
        "n": make_tensor("weights", "I64", (5,), seed=2),
        "b": make_tensor("weights", "F8_E4M3", (9,), seed=3),
    }
    [(segments, sizes)] = _segments_and_parts(state_dict, chunk_size=1 << 20)
    assert segments[0] == Segment(sizes[0], 1, grouped=False)
    assert segments[1:] == [Segment(60, 2, True), Segment(40, 8, False), Segment(9, 1, False)]
    assert [segment.nbytes for segment in segments] == sizes


def test_misaligned_range_gets_a_raw_head_so_planes_stay_aligned() -> None:
    state_dict = {"w": make_tensor("weights", "F32", (100,), seed=4)}  # 400 bytes
    chunks = _segments_and_parts(state_dict, chunk_size=150)
    pieces = [segments[1:] for segments, _ in chunks]
    # Ranges [0,150) [150,300) [300,400): starts 150 and 300 fall 2 and 0 bytes into an element.
    assert pieces[0] == [Segment(150, 4, True)]
    assert pieces[1] == [Segment(2, 4, False), Segment(148, 4, True)]
    assert pieces[2] == [Segment(100, 4, True)]
    for segments, sizes in chunks:
        assert sum(segment.nbytes for segment in segments) == sum(sizes)


def test_grouping_can_be_switched_off_or_extended_to_integers() -> None:
    state_dict = {"w": make_tensor("weights", "F32", (8,), seed=5), "n": torch.arange(4)}
    [(plain, _)] = _segments_and_parts(state_dict, 1 << 20, byte_grouping=False)
    assert not any(segment.grouped for segment in plain)
    [(ints, _)] = _segments_and_parts(state_dict, 1 << 20, group_integers=True)
    assert ints[1:] == [Segment(32, 4, True), Segment(32, 8, True)]
