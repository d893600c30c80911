"""Shared helpers for the codec tests: small state dicts with realistic or random bytes, and the
compress -> JSON -> decompress path a transfer takes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from tests.payload.helpers import random_tensor
from transport.codecs import ChunkCompressor, ChunkDecompressor, segments_for_chunk
from transport.payload import DTYPES, Manifest, StateDictSource, encode_chunk, plan_chunks
from transport.payload.plan import Chunk


def weights_like(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Trained-layer-like values (N(0, 0.02)) for floating dtypes; small ints otherwise."""
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_name]
    if dtype.is_floating_point or dtype.is_complex:
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.02
        return values.to(dtype)
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.randint(0, 4, shape, generator=generator).to(dtype)


def make_tensor(kind: str, dtype_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """`kind`: "random" (incompressible bits), "weights" (compressible) or "zeros"."""
    if kind == "random":
        return random_tensor(dtype_name, shape, seed)
    if kind == "weights":
        return weights_like(dtype_name, shape, seed)
    return torch.zeros(shape, dtype=DTYPES[dtype_name])


@dataclass
class Compressed:
    """One chunk after compression: what travels (header, joined payload) and the original blob."""

    chunk: Chunk
    header: dict[str, Any]
    payload: bytes
    blob: bytes


def compress_all(
    state_dict: dict[str, torch.Tensor], chunk_size: int, **options: Any
) -> tuple[Manifest, list[Compressed]]:
    """Plan, encode and compress every chunk; the header goes through JSON as on the wire."""
    level = options.pop("level", 1)
    source = StateDictSource(state_dict, chunk_size=chunk_size)
    manifest = source.manifest
    compressor = ChunkCompressor(level=level)
    results = []
    for chunk in plan_chunks(manifest):
        parts = encode_chunk(manifest, chunk, source.chunk_views(chunk))
        segments = segments_for_chunk(manifest, chunk, **options)
        header, payload = compressor.compress(segments, parts)
        wire_header = json.loads(json.dumps(header))
        blob = b"".join(bytes(part) for part in parts)
        results.append(Compressed(chunk, wire_header, b"".join(payload), blob))
    return manifest, results


def decompress(item: Compressed, slack: int = 0) -> bytes:
    """Decompress into a fresh buffer `slack` bytes larger than needed; return the written bytes."""
    out = bytearray(len(item.blob) + slack)
    written = ChunkDecompressor().decompress_into(item.header, item.payload, memoryview(out))
    return bytes(out[:written])
