"""Round trips: every dtype, random shapes and chunk plans, bit-exact; raw and compressed planes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load

from tests.codecs.helpers import compress_all, decompress, make_tensor
from tests.payload.helpers import same_bits
from transport.codecs import ChunkCompressor, segments_for_chunk
from transport.payload import DTYPES, StateDictSource, decode_chunk, encode_chunk, plan_chunks

KINDS = ("random", "weights", "zeros")

tensor_specs = st.lists(
    st.tuples(
        st.sampled_from(sorted(DTYPES)),
        st.lists(st.integers(0, 13), min_size=0, max_size=3).map(tuple),
        st.sampled_from(KINDS),
    ),
    min_size=1,
    max_size=6,
)


def build_state_dict(specs: list[tuple[str, tuple[int, ...], str]]) -> dict[str, torch.Tensor]:
    return {
        f"t{index}.{dtype}": make_tensor(kind, dtype, shape, seed=index)
        for index, (dtype, shape, kind) in enumerate(specs)
    }


@settings(max_examples=300, deadline=None)
@given(
    specs=tensor_specs,
    chunk_size=st.integers(7, 1024) | st.integers(1024, 40000),
    level=st.sampled_from([1, 3]),
    byte_grouping=st.booleans(),
    group_integers=st.booleans(),
    slack=st.integers(0, 9),
)
def test_round_trip_is_bit_exact(
    specs: list[tuple[str, tuple[int, ...], str]],
    chunk_size: int,
    level: int,
    byte_grouping: bool,
    group_integers: bool,
    slack: int,
) -> None:
    state_dict = build_state_dict(specs)
    manifest, items = compress_all(
        state_dict,
        chunk_size,
        level=level,
        byte_grouping=byte_grouping,
        group_integers=group_integers,
    )
    for item in items:
        blob = decompress(item, slack)
        assert blob == item.blob
        decode_chunk(manifest, item.chunk, blob)  # still the blob the plan expects


@settings(max_examples=30, deadline=None)
@given(specs=tensor_specs)
def test_decompressed_chunks_load_with_safetensors(
    specs: list[tuple[str, tuple[int, ...], str]],
) -> None:
    state_dict = build_state_dict(specs)
    _, items = compress_all(state_dict, chunk_size=1 << 20)  # whole tensors: named as in the dict
    loaded: dict[str, torch.Tensor] = {}
    for item in items:
        loaded.update(load(decompress(item)))
    assert loaded.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        assert same_bits(loaded[name], tensor), name


def test_random_bits_travel_raw_and_weights_compress() -> None:
    state_dict = {
        "noise": make_tensor("random", "BF16", (64, 64), seed=1),
        "weights": make_tensor("weights", "BF16", (64, 64), seed=2),
        "zeros": make_tensor("zeros", "F32", (64, 64), seed=3),
    }
    _, [item] = compress_all(state_dict, chunk_size=1 << 20)
    _, noise, weights, zeros = item.header["segments"]
    assert noise == [64 * 64 * 2, 2, [0, 0]]  # both planes raw
    assert weights[2][0] == 0
    assert weights[2][1] > 0
    assert all(size > 0 for size in zeros[2])  # every plane compressed
    assert decompress(item) == item.blob


def test_bf16_weights_compress_better_grouped_than_plain() -> None:
    state_dict = {"w": make_tensor("weights", "BF16", (256, 256), seed=4)}
    _, [grouped] = compress_all(state_dict, chunk_size=1 << 20)
    _, [plain] = compress_all(state_dict, chunk_size=1 << 20, byte_grouping=False)
    assert len(grouped.blob) / len(grouped.payload) > 1.35
    assert len(grouped.payload) < len(plain.payload)


def test_odd_tails_and_misaligned_ranges_round_trip() -> None:
    # chunk_size 1001 cuts the F32 tensor mid-element: heads and tails stay raw, planes aligned.
    state_dict = {
        "flag": torch.ones(3, dtype=torch.bool),
        "w": make_tensor("weights", "F32", (40, 30), seed=5),
        "h": make_tensor("weights", "F16", (333,), seed=6),
    }
    _manifest, items = compress_all(state_dict, chunk_size=1001)
    assert any(
        len(segment) == 3 and segment[0] % 4
        for item in items
        for segment in item.header["segments"]
    )
    for item in items:
        assert decompress(item) == item.blob


def test_raw_parts_are_views_of_the_source_and_survive_the_next_call() -> None:
    state_dict = {
        "ids": make_tensor("random", "U8", (5000,), seed=7),
        "w": make_tensor("random", "BF16", (3000,), seed=8),
    }
    source = StateDictSource(state_dict, chunk_size=1 << 20)
    manifest = source.manifest
    [chunk] = plan_chunks(manifest)
    parts = encode_chunk(manifest, chunk, source.chunk_views(chunk))
    compressor = ChunkCompressor()
    _header, payload = compressor.compress(segments_for_chunk(manifest, chunk), parts)
    ids_view = payload[1]
    assert isinstance(ids_view, memoryview)
    assert ids_view.obj is parts[1].obj
    first = b"".join(payload)
    # Reusing the compressor must not change what the first call returned (plane buffer reuse).
    other = {"w": make_tensor("random", "BF16", (3000,), seed=9)}
    other_source = StateDictSource(other, chunk_size=1 << 20)
    [other_chunk] = plan_chunks(other_source.manifest)
    compressor.compress(
        segments_for_chunk(other_source.manifest, other_chunk),
        encode_chunk(other_source.manifest, other_chunk, other_source.chunk_views(other_chunk)),
    )
    assert b"".join(payload) == first
