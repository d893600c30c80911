"""Shared helpers for the payload tests: random tensors of every dtype, a full round trip, and a
model with tied weights."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load

from transport.payload import DTYPES, Sink, Source, decode_chunk, encode_chunk, plan_chunks


def random_tensor(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns of any dtype (bool stays 0/1 so it is a valid bool tensor)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_name]
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for dim in shape:
        numel *= dim
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def same_bits(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Bit-exact equality, valid for NaNs and every dtype."""
    if left.dtype != right.dtype or left.shape != right.shape:
        return False
    left_bytes = left.contiguous().reshape(-1).view(torch.uint8)
    right_bytes = right.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(left_bytes, right_bytes)


def stream(source: Source, sink: Sink, *, check_safetensors: bool = False) -> Any:
    """What a transfer does, minus the network: plan, encode, join, decode, write, commit."""
    manifest = source.manifest
    sink.open(manifest)
    for chunk in plan_chunks(manifest):
        blob = b"".join(encode_chunk(manifest, chunk, source.chunk_views(chunk)))
        if check_safetensors:
            load(blob)
        sink.write(chunk, decode_chunk(manifest, chunk, blob))
        source.release(chunk)
    return sink.commit()


class TiedLM(torch.nn.Module):
    """The smallest language model with tied input and output embeddings."""

    def __init__(self, vocab: int = 50, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        # Seeded without touching torch's global generator, which other tests may rely on.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():  # the tied weight once
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
