"""Manifest: header round trip and every way a received header is refused."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from transport.exceptions import ManifestError
from transport.payload import (
    DTYPE_SIZES,
    DTYPES,
    Manifest,
    ManifestLimits,
    TensorSpec,
)


def _manifest() -> Manifest:
    return Manifest(
        (
            TensorSpec("w", "F32", (3, 4)),
            TensorSpec("scalar", "BF16", ()),
            TensorSpec("empty", "I64", (0, 7)),
        ),
        chunk_size=1024,
        metadata={"round": "3"},
    )


def test_spec_sizes() -> None:
    assert TensorSpec("a", "F32", (3, 4)).nbytes == 48
    assert TensorSpec("a", "BF16", ()).numel == 1
    assert TensorSpec("a", "BF16", ()).nbytes == 2
    assert TensorSpec("a", "I64", (0, 7)).nbytes == 0
    # Python ints all the way: nothing caps at 2**32.
    assert TensorSpec("a", "F64", (2**20, 2**20)).nbytes == 2**43


def test_every_dtype_size_matches_torch() -> None:
    for name, dtype in DTYPES.items():
        assert DTYPE_SIZES[name] == torch.empty((), dtype=dtype).element_size()


def test_header_round_trip() -> None:
    manifest = _manifest()
    header = manifest.to_header()
    assert header["format"] == 1
    assert header["digest"] == "xxh3-128-tree"
    assert Manifest.from_header(header) == manifest
    assert manifest.total_bytes == 50
    assert manifest.index_of("empty") == 2
    with pytest.raises(KeyError):
        manifest.index_of("nope")


def test_duplicate_names_refused_at_construction() -> None:
    with pytest.raises(ManifestError, match="'a' appears twice"):
        Manifest((TensorSpec("a", "F32", ()), TensorSpec("a", "F32", ())))


def _edit(path: list[Any], value: Any) -> dict[str, Any]:
    header = copy.deepcopy(_manifest().to_header())
    target: Any = header
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return header


_DELETE = object()

BAD_HEADERS = [
    (["format"], 2, "format 2"),
    (["digest"], "md5", "digest algorithm 'md5'"),
    (["chunk_size"], 0, "chunk_size 0"),
    (["chunk_size"], 2**40, "chunk_size 1099511627776"),
    (["chunk_size"], "8", "chunk_size '8'"),
    (["chunk_size"], True, "chunk_size True"),
    (["total_bytes"], 49, "total_bytes says 49"),
    (["metadata"], {"a": 1}, "metadata must be"),
    (["metadata"], {"a": "x" * 70_000}, "metadata is 70001 bytes"),
    (["tensors"], {"w": 1}, "tensors must be a JSON array"),
    (["tensors", 0], "w", "tensor #0 must be a JSON object"),
    (["tensors", 0, "name"], 5, "tensor #0 name must be"),
    (["tensors", 0, "name"], "", "tensor #0 name must be"),
    (["tensors", 0, "name"], "x" * 1025, "name is 1025 bytes"),
    (["tensors", 0, "name"], "\ud800", "not valid UTF-8"),
    (["tensors", 0, "name"], "__metadata__", "reserved name"),
    (["tensors", 1, "name"], "w", "'w' appears twice"),
    (["tensors", 0, "dtype"], "F128", "tensor 'w' has unknown dtype 'F128'"),
    (["tensors", 0, "dtype"], _DELETE, "tensor 'w' has unknown dtype None"),
    (["tensors", 0, "shape"], "3x4", "tensor 'w' shape must be"),
    (["tensors", 0, "shape"], [3, -4], "invalid dimension -4"),
    (["tensors", 0, "shape"], [3, 4.0], "invalid dimension 4.0"),
    (["tensors", 0, "shape"], [3, True], "invalid dimension True"),
    (["tensors", 2, "shape"], [0, 10**30], "invalid dimension 10000"),
    (["tensors", 0, "shape"], [1] * 17, "17 dimensions"),
    (["tensors", 0, "shape"], [2**25, 2**25], "is over 1125899906842624 bytes"),
    (["tensors", 0, "shape"], [2**24] * 16, "is over"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_HEADERS)
def test_bad_header_refused(path: list[Any], value: Any, message: str) -> None:
    header = _edit(path, value)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        Manifest.from_header(header)


def test_not_an_object_refused() -> None:
    with pytest.raises(ManifestError, match="must be a JSON object, got list"):
        Manifest.from_header([1, 2])


def test_total_over_limit_refused() -> None:
    header = Manifest((TensorSpec("a", "U8", (600,)), TensorSpec("b", "U8", (600,)))).to_header()
    limits = ManifestLimits(max_total_bytes=1000)
    with pytest.raises(ManifestError, match="manifest totals 1200 bytes, over the limit of 1000"):
        Manifest.from_header(header, limits)


def test_too_many_tensors_refused_before_reading_them() -> None:
    header = _manifest().to_header()
    with pytest.raises(ManifestError, match="lists 3 tensors, over the limit of 2"):
        Manifest.from_header(header, ManifestLimits(max_tensors=2))


def test_tiny_chunks_of_a_huge_total_refused() -> None:
    header = Manifest((TensorSpec("a", "U8", (2**40,)),), chunk_size=1).to_header()
    with pytest.raises(ManifestError, match="at least 1099511627776 chunks"):
        Manifest.from_header(header)


def test_the_largest_chunk_is_held_to_the_receivers_own() -> None:
    # A small dict announced with a large chunk_size plans small chunks: accepted.
    limits = ManifestLimits(max_chunk_bytes=1 << 20)
    small = Manifest((TensorSpec("a", "U8", (1000,)),), chunk_size=8 << 20).to_header()
    assert Manifest.from_header(small, limits).total_bytes == 1000
    # A large one would make the receiver decompress into 8 MiB buffers: refused at once.
    large = Manifest((TensorSpec("a", "U8", (64 << 20,)),), chunk_size=8 << 20).to_header()
    with pytest.raises(ManifestError, match=r"chunks of up to 8388608 bytes.*at most 1048576"):
        Manifest.from_header(large, limits)
