"""Corrupt, truncated and inconsistent input: always ChunkError naming the problem, never a wrong
blob, never another exception, never an allocation sized by the peer."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.codecs.helpers import Compressed, compress_all, make_tensor
from transport.codecs import ChunkCompressor, ChunkDecompressor, Segment
from transport.exceptions import ChunkError, ConfigError, PayloadError


def _sample() -> Compressed:
    """One chunk with raw and zstd planes, tails, an ungrouped int segment and the header."""
    state_dict = {
        "w": make_tensor("weights", "BF16", (48, 40), seed=1),
        "noise": make_tensor("random", "F32", (301,), seed=2),
        "ids": make_tensor("weights", "I64", (50,), seed=3),
        "odd": make_tensor("weights", "F16", (7,), seed=4),
    }
    _, [item] = compress_all(state_dict, chunk_size=1 << 20)
    return item


SAMPLE = _sample()


def _outcome(header: Any, payload: bytes, out_size: int | None = None) -> bytes | ChunkError:
    out = bytearray(len(SAMPLE.blob) if out_size is None else out_size)
    try:
        written = ChunkDecompressor().decompress_into(header, payload, memoryview(out))
    except ChunkError as exc:
        return exc
    return bytes(out[:written])


def test_sample_has_every_kind_of_plane() -> None:
    stored = [size for segment in SAMPLE.header["segments"] for size in segment[2]]
    assert 0 in stored
    assert any(stored)
    assert _outcome(SAMPLE.header, SAMPLE.payload) == SAMPLE.blob


@settings(max_examples=300, deadline=None)
@given(position=st.data(), mask=st.integers(1, 255))
def test_any_flipped_byte_is_an_error_or_harmless(position: st.DataObject, mask: int) -> None:
    index = position.draw(st.integers(0, len(SAMPLE.payload) - 1))
    payload = bytearray(SAMPLE.payload)
    payload[index] ^= mask
    result = _outcome(SAMPLE.header, bytes(payload))
    # A few zstd bits do not change the output (e.g. the frame descriptor's unused bit): the blob
    # then still matches its digest. Anything else must be an error, never a different blob.
    assert isinstance(result, ChunkError) or result == SAMPLE.blob


def test_a_flip_in_a_raw_plane_is_caught_by_the_digest() -> None:
    first_raw_plane = SAMPLE.header["segments"][0][2][0] or SAMPLE.header["segments"][0][0]
    payload = bytearray(SAMPLE.payload)
    payload[first_raw_plane] ^= 1  # segment 1 starts with its raw mantissa plane
    result = _outcome(SAMPLE.header, bytes(payload))
    assert isinstance(result, ChunkError)
    assert "xxh3" in str(result)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_truncated_or_extended_payload_is_an_error(data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(SAMPLE.payload) - 1))
    extra = data.draw(st.binary(min_size=1, max_size=20))
    assert isinstance(_outcome(SAMPLE.header, SAMPLE.payload[:cut]), ChunkError)
    assert isinstance(_outcome(SAMPLE.header, SAMPLE.payload + extra), ChunkError)


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(0, 3000),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5000), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _replaced(header: dict[str, Any], path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    mutated = copy.deepcopy(header)
    parent = mutated
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return mutated


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), value=json_values)
def test_any_header_field_replaced_is_an_error_or_the_same_blob(
    data: st.DataObject, value: Any
) -> None:
    path = data.draw(st.sampled_from(_paths(SAMPLE.header)))
    result = _outcome(_replaced(SAMPLE.header, path, value), SAMPLE.payload)
    # "level" is informative only; every other change must be caught.
    assert isinstance(result, ChunkError) or result == SAMPLE.blob


def _with_segment(index: int, entry: Any) -> dict[str, Any]:
    header = copy.deepcopy(SAMPLE.header)
    header["segments"][index] = entry
    return header


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"codec": "gzip"}, "not supported"),
        ({"version": 2}, "not supported"),
        ({"raw_bytes": 2**62}, "raw_bytes"),
        ({"raw_bytes": -1}, "raw_bytes"),
        ({"raw_bytes": "12"}, "raw_bytes"),
        ({"xxh3": "zz" * 8}, "xxh3"),
        ({"xxh3": 0}, "xxh3"),
        ({"segments": {}}, "segments must be"),
        ({"segments": [[1, 1, [0]]] * 10}, "add up to"),
    ],
)
def test_bad_envelope_fields_are_named(change: dict[str, Any], message: str) -> None:
    result = _outcome({**SAMPLE.header, **change}, SAMPLE.payload)
    assert isinstance(result, ChunkError)
    assert message in str(result)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ([2**62, 2, [0, 0]], "add up to"),
        ([-4, 1, [0]], "nbytes"),
        ([4, 3, [0, 0, 0]], "planes"),
        ([4, 2, [0]], "must list 2"),
        ([4, 2, [0, -1]], "stored size"),
        ([48 * 40 * 2, 2, [0, 2**62]], "payload bytes"),  # the real size of segment 1
        ("x", "must be [nbytes"),
    ],
)
def test_bad_segments_are_named(entry: Any, message: str) -> None:
    result = _outcome(_with_segment(1, entry), SAMPLE.payload)
    assert isinstance(result, ChunkError)
    assert message in str(result)


def test_output_buffer_too_small_is_refused_before_decompressing() -> None:
    result = _outcome(SAMPLE.header, SAMPLE.payload, out_size=len(SAMPLE.blob) - 1)
    assert isinstance(result, ChunkError)
    assert "raw_bytes" in str(result)


def test_a_zstd_bomb_is_refused_by_its_announced_size() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * 2**20))  # ~2 KiB that inflate to 64 MiB
    header = {**SAMPLE.header, "raw_bytes": 100, "segments": [[100, 1, [len(bomb)]]]}
    header["xxh3"] = "0" * 16
    result = _outcome(header, bomb, out_size=100)
    assert isinstance(result, ChunkError)
    assert "announces 67108864 bytes" in str(result)


def test_a_frame_without_content_size_is_refused() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100))
    header = {**SAMPLE.header, "raw_bytes": 100, "segments": [[100, 1, [len(frame)]]]}
    result = _outcome(header, frame, out_size=100)
    assert isinstance(result, ChunkError)
    assert "does not announce" in str(result)


def test_header_that_is_not_an_object_is_refused() -> None:
    result = _outcome(json.loads("[1, 2]"), SAMPLE.payload)
    assert isinstance(result, ChunkError)
    assert "JSON object" in str(result)


def test_local_misuse_is_a_local_error() -> None:
    with pytest.raises(PayloadError, match="writable"):
        ChunkDecompressor().decompress_into(SAMPLE.header, SAMPLE.payload, bytes(len(SAMPLE.blob)))
    with pytest.raises(ConfigError, match="level"):
        ChunkCompressor(level=0)
    compressor = ChunkCompressor()
    with pytest.raises(PayloadError, match="cover"):
        compressor.compress([Segment(5, 1, grouped=False)], [b"abcd"])
    with pytest.raises(PayloadError, match="spans two parts"):
        compressor.compress([Segment(1, 1, False), Segment(4, 1, False)], [b"ab", b"cde"])
    with pytest.raises(PayloadError, match="element_size"):
        compressor.compress([Segment(6, 3, grouped=True)], [b"abcdef"])


def test_empty_chunk_round_trips() -> None:
    header, payload = ChunkCompressor().compress([Segment(0, 1, False)], [b""])
    assert ChunkDecompressor().decompress_into(header, b"".join(payload), bytearray(0)) == 0
