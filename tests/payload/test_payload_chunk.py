"""Chunk codec: every chunk is a safetensors blob; every way a received chunk is refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load

from tests.payload.helpers import random_tensor, same_bits, stream
from transport.exceptions import ChunkError, PayloadError
from transport.payload import (
    DTYPES,
    METADATA_KEY,
    Manifest,
    StateDictSink,
    StateDictSource,
    TensorSpec,
    decode_chunk,
    encode_chunk,
    plan_chunks,
)


def _blob(manifest: Manifest, index: int, fill: int = 7) -> bytes:
    chunk = plan_chunks(manifest)[index]
    views = [memoryview(bytes([fill]) * piece.nbytes) for piece in chunk.pieces]
    return b"".join(encode_chunk(manifest, chunk, views))


def _split_manifest() -> Manifest:
    return Manifest(
        (
            TensorSpec("a", "F32", (2, 3)),
            TensorSpec("big", "BF16", (5, 4)),
            TensorSpec("c", "U8", (3,)),
        ),
        chunk_size=16,
    )


def test_whole_and_range_pieces_load_with_safetensors() -> None:
    state = {"w": random_tensor("F32", (2, 3)), "big": random_tensor("I16", (13,))}
    source = StateDictSource(state, chunk_size=24)
    manifest = source.manifest
    chunks = plan_chunks(manifest)
    first = load(b"".join(encode_chunk(manifest, chunks[0], source.chunk_views(chunks[0]))))
    assert same_bits(first["w"], source._tensors[0])
    last = b"".join(encode_chunk(manifest, chunks[1], source.chunk_views(chunks[1])))
    loaded = load(last)
    assert set(loaded) == {"big@0"}
    assert loaded["big@0"].dtype == torch.uint8
    header_len = struct.unpack("<Q", last[:8])[0]
    assert (8 + header_len) % 8 == 0
    place = json.loads(json.loads(last[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
    assert place == {
        "chunk": 1,
        "ranges": {"big@0": {"tensor": "big", "offset": 0, "dtype": "I16", "shape": [13]}},
    }


def test_encode_does_not_copy_views() -> None:
    manifest = _split_manifest()
    chunk = plan_chunks(manifest)[0]
    views = [memoryview(bytearray(piece.nbytes)) for piece in chunk.pieces]
    parts = encode_chunk(manifest, chunk, views)
    assert all(a is b for a, b in zip(parts[1:], views, strict=True))


def test_decode_returns_zero_copy_slices() -> None:
    manifest = _split_manifest()
    blob = bytearray(_blob(manifest, 0))
    pieces = decode_chunk(manifest, plan_chunks(manifest)[0], blob)
    blob[-1] = 99
    assert pieces[-1][1][-1] == 99


def test_range_key_yields_to_a_tensor_with_that_name() -> None:
    manifest = Manifest(
        (TensorSpec("x@0", "U8", (1,)), TensorSpec("x", "U8", (40,))), chunk_size=30
    )
    chunk = plan_chunks(manifest)[1]
    blob = b"".join(
        encode_chunk(manifest, chunk, [memoryview(b"\1" * p.nbytes) for p in chunk.pieces])
    )
    assert set(load(blob)) == {"x@0"}  # the range only; the whole tensor was in chunk 0
    names = Manifest(
        (TensorSpec("big", "U8", (40,)), TensorSpec("big@30", "U8", (1,))), chunk_size=30
    )
    blob = _blob(names, 1)
    assert set(load(blob)) == {"big@30@", "big@30"}
    decode_chunk(names, plan_chunks(names)[1], blob)


def test_encode_refuses_wrong_views() -> None:
    manifest = _split_manifest()
    chunk = plan_chunks(manifest)[0]
    with pytest.raises(PayloadError, match="1 pieces but 0 views"):
        encode_chunk(manifest, chunk, [])
    with pytest.raises(PayloadError, match=r"'a' \[0, 16\) is 3 bytes, expected 16"):
        encode_chunk(manifest, chunk, [memoryview(b"abc")])


def _rewrite_header(blob: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + header_len :]


def _set_place(header: dict, **changes) -> None:  # type: ignore[no-untyped-def, type-arg]
    place = json.loads(header["__metadata__"][METADATA_KEY])
    place.update(changes)
    header["__metadata__"][METADATA_KEY] = json.dumps(place)


def test_reformatted_but_equal_header_accepted() -> None:
    manifest = _split_manifest()
    blob = _rewrite_header(_blob(manifest, 4), lambda header: None)  # default json spacing
    pieces = decode_chunk(manifest, plan_chunks(manifest)[4], blob)
    assert [bytes(view) for _, view in pieces] == [b"\7" * 8, b"\7" * 3]


BAD_CHUNKS = [
    ("short", lambda blob: blob[:5], "too short for a header length"),
    ("huge header", lambda blob: struct.pack("<Q", 2**60) + blob[8:],
     "announces a 1152921504606846976"),
    ("not json", lambda blob: blob[:8] + b"[" * 8 + blob[16:], "not valid JSON"),
    ("truncated data", lambda blob: blob[:-1], "the plan has 11 data bytes"),
    ("extra data", lambda blob: blob + b"x", "the plan has 11 data bytes"),
    ("reordered", lambda blob: _rewrite_header(blob, lambda h: _set_place(h, chunk=1)),
     "says it is chunk 1"),
    ("no metadata", lambda blob: _rewrite_header(blob, lambda h: h.pop("__metadata__")),
     "lacks the 'tensorwire' string"),
    ("range moved", lambda blob: _rewrite_header(
        blob, lambda h: _set_place(h, ranges={"big@32": {"tensor": "big", "offset": 0,
                                                          "dtype": "BF16", "shape": [5, 4]}})),
     "range metadata"),
    ("renamed", lambda blob: _rewrite_header(blob, lambda h: h.__setitem__("d", h.pop("c"))),
     r"missing \['c'\], unexpected \['d'\]"),
    ("dtype", lambda blob: _rewrite_header(blob, lambda h: h["c"].__setitem__("dtype", "I8")),
     "entry 'c' is .*I8.*the plan says"),
    ("offsets", lambda blob: _rewrite_header(
        blob, lambda h: h["c"].__setitem__("data_offsets", [7, 10])), "entry 'c'"),
    ("duplicate key", lambda blob: blob[:8] + blob[8:].replace(b'"c":', b'"c":{},"c":', 1),
     "repeats the key 'c'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "corrupt", "message"), BAD_CHUNKS, ids=[b[0] for b in BAD_CHUNKS]
)
def test_bad_chunk_refused(label: str, corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    manifest = _split_manifest()
    blob = _blob(manifest, 4)
    if label == "duplicate key":  # keep the header length right for this one
        header_len = struct.unpack("<Q", blob[:8])[0]
        text = blob[8 : 8 + header_len].rstrip().replace(b'"c":', b'"c":{},"c":', 1)
        text += b" " * (-len(text) % 8)
        blob = struct.pack("<Q", len(text)) + text + blob[8 + header_len :]
    else:
        blob = corrupt(blob)
    with pytest.raises(ChunkError, match=message):
        decode_chunk(manifest, plan_chunks(manifest)[4], blob)


def test_chunk_for_another_index_refused() -> None:
    manifest = _split_manifest()
    with pytest.raises(ChunkError, match="chunk 1"):
        decode_chunk(manifest, plan_chunks(manifest)[1], _blob(manifest, 0))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_dtype_round_trips_bit_exact(dtype: str) -> None:
    state = {
        "matrix": random_tensor(dtype, (7, 5), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 3), seed=3),
        "odd": random_tensor(dtype, (3, 1, 5, 2), seed=4),
        "strided": random_tensor(dtype, (6, 4), seed=5).t(),
    }
    out = stream(StateDictSource(state, chunk_size=24), StateDictSink(), check_safetensors=True)
    assert list(out) == list(state)
    for name, tensor in state.items():
        assert same_bits(out[name], tensor), name


_dtypes = st.sampled_from(list(DTYPES))
_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
_state_dicts = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="@"), min_size=1, max_size=8).filter(
        lambda name: name != "__metadata__"
    ),
    st.tuples(_dtypes, _shapes, st.booleans()),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_state_dicts, chunk_size=st.integers(1, 300), seed=st.integers(0, 1000))
def test_property_random_dicts_random_chunk_sizes(entries, chunk_size: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    state = {}
    for number, (name, (dtype, shape, transpose)) in enumerate(entries.items()):
        tensor = random_tensor(dtype, shape, seed=seed + number)
        state[name] = tensor.t() if transpose and tensor.dim() == 2 else tensor
    out = stream(StateDictSource(state, chunk_size=chunk_size), StateDictSink(),
                 check_safetensors=True)  # fmt: skip
    assert list(out) == list(state)
    for name, tensor in state.items():
        assert same_bits(out[name], tensor), name
