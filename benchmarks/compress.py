"""Per-chunk compression: ratio and speed of plain zstd vs byte-grouped zstd on realistic weights.

    python -m benchmarks compress --dtype bf16 --json [--mib 64] [--train-steps 200] [--repeat 3]

Two state dicts, cast to `--dtype`:
- normal: N(0, 0.02) matrices, like trained linear layers (`--mib` of them);
- trained: a small Transformer language model trained `--train-steps` Adam steps on generated
  token sequences, so its weights are no longer pristine init (embeddings, attention, MLP, norms).

Each is planned into `--chunk-mib` chunks with transport.payload and compressed with
transport.codecs, per method ("zstd": no grouping; "bytegroup": planes for float dtypes), zstd level
and thread count (a ThreadPoolExecutor over chunks, one ChunkCompressor / ChunkDecompressor per
thread: the codec releases the GIL). Speeds are MB/s (1e6 bytes/s) of raw chunk bytes, min and max
over `--repeat` runs because this machine is shared; the thread counts take turns within each run,
so they see the same load. Each thread count above the first also gets `speedup`: its best compress
and decompress rates over the first count's best (2.0 for 2 threads is perfect scaling; the best
runs are the least disturbed by other processes). `load` is the 1-minute load average before and
after, to judge how busy the machine was. The ratio is raw / compressed bytes.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from transport.codecs import ChunkCompressor, ChunkDecompressor, Segment, segments_for_chunk
from transport.payload import StateDictSource, encode_chunk, plan_chunks
from transport.wire.frames import Buffer

MIB = 1 << 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = {"zstd": False, "bytegroup": True}  # method -> byte_grouping


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m benchmarks compress`."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--mib", type=float, default=64.0, help="size of the normal state dict")
    parser.add_argument("--chunk-mib", type=float, default=8.0, help="chunk size (MiB)")
    parser.add_argument("--train-steps", type=int, default=200, help="steps for the trained model")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 3], help="zstd levels")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (min, max kept)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (data, method, level, threads) combination; see the module docstring."""
    dtype = DTYPES[args.dtype]
    chunk_size = max(1, int(args.chunk_mib * MIB))
    result: dict[str, Any] = {
        "benchmark": "compress",
        "dtype": args.dtype,
        "chunk_size": chunk_size,
        "load": [round(os.getloadavg()[0], 2)],
    }
    datasets = {
        "normal": normal_weights(int(args.mib * MIB), dtype),
        "trained": trained_transformer(args.train_steps, dtype),
    }
    for data_name, state_dict in datasets.items():
        for method, grouping in METHODS.items():
            chunks = list(_encoded_chunks(state_dict, chunk_size, grouping))
            result[f"{data_name}_bytes"] = sum(_blob_size(parts) for _, parts in chunks)
            # More threads than chunks cannot help: the speedup is bounded by this.
            result[f"{data_name}_chunks"] = len(chunks)
            for level in args.levels:
                figures = _measure(chunks, level, args.threads, args.repeat)
                for threads, figure in figures.items():
                    result[f"{data_name}/{method}/L{level}/T{threads}"] = figure
    result["load"].append(round(os.getloadavg()[0], 2))
    return result


# --- data ----------------------------------------------------------------------------------------


def normal_weights(nbytes: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """1024-wide N(0, 0.02) matrices totalling about `nbytes` in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    rows = max(1, nbytes // (1024 * dtype.itemsize) // 8)
    return {
        f"layer{index}.weight": (torch.randn(rows, 1024, generator=generator) * 0.02).to(dtype)
        for index in range(8)
    }


class _TinyLM(nn.Module):
    """Embedding -> Transformer encoder (causal) -> vocabulary head: a small language model."""

    def __init__(self, vocab: int = 2048, width: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


def trained_transformer(steps: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A _TinyLM (~5M parameters) trained `steps` Adam steps on a generated Markov-chain corpus."""
    torch.manual_seed(0)
    model = _TinyLM()
    vocab = model.embed.num_embeddings
    # Each token has 4 likely successors: a learnable structure, so gradients stay informative.
    successors = torch.randint(0, vocab, (vocab, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        tokens = _markov_batch(successors, batch=8, length=32)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}


def _markov_batch(successors: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, successors.shape[0], (batch,))
    for position in range(1, length):
        choice = torch.randint(0, successors.shape[1], (batch,))
        tokens[:, position] = successors[tokens[:, position - 1], choice]
    return tokens


# --- measurement ---------------------------------------------------------------------------------


@dataclass
class _Compressed:
    header: dict[str, Any]
    payload: Buffer
    raw_bytes: int


def _encoded_chunks(
    state_dict: dict[str, torch.Tensor], chunk_size: int, grouping: bool
) -> Iterator[tuple[list[Segment], list[Buffer]]]:
    source = StateDictSource(state_dict, chunk_size=chunk_size)
    manifest = source.manifest
    for chunk in plan_chunks(manifest):
        parts = encode_chunk(manifest, chunk, source.chunk_views(chunk))
        yield segments_for_chunk(manifest, chunk, byte_grouping=grouping), parts


def _blob_size(parts: list[Buffer]) -> int:
    return sum(memoryview(part).nbytes for part in parts)


def _per_thread(factory: Callable[[], Any]) -> Callable[[], Any]:
    local = threading.local()

    def get() -> Any:
        if not hasattr(local, "value"):
            local.value = factory()
        return local.value

    return get


def _measure(
    chunks: list[tuple[list[Segment], list[Buffer]]],
    level: int,
    thread_counts: list[int],
    repeat: int,
) -> dict[int, dict[str, Any]]:
    """Figures per thread count; the counts take turns within each of the `repeat` runs."""
    raw = sum(_blob_size(parts) for _, parts in chunks)
    rates: dict[int, dict[str, list[float]]] = {
        threads: {"compress": [], "decompress": []} for threads in thread_counts
    }
    compressed: list[_Compressed] = []
    pools = {threads: ThreadPoolExecutor(max_workers=threads) for threads in thread_counts}
    try:
        for _ in range(max(1, repeat)):
            for threads, pool in pools.items():
                seconds, compressed = _timed(partial(_compress_all, pool, chunks, level))
                rates[threads]["compress"].append(raw / seconds / 1e6)
                seconds, _ = _timed(partial(_decompress_all, pool, compressed))
                rates[threads]["decompress"].append(raw / seconds / 1e6)
    finally:
        for pool in pools.values():
            pool.shutdown()
    stored = sum(memoryview(item.payload).nbytes for item in compressed)
    figures = {threads: _figure(raw / stored, rates[threads]) for threads in thread_counts}
    for threads in thread_counts[1:]:
        figures[threads]["speedup"] = {
            kind: round(max(rates[threads][kind]) / max(rates[thread_counts[0]][kind]), 2)
            for kind in ("compress", "decompress")
        }
    return figures


def _figure(ratio: float, rates: dict[str, list[float]]) -> dict[str, Any]:
    figure: dict[str, Any] = {"ratio": round(ratio, 3)}
    for kind, values in rates.items():
        figure[f"{kind}_mb_s"] = [round(min(values)), round(max(values))]
    return figure


def _timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = work()
    return time.perf_counter() - started, value


def _compress_all(
    pool: ThreadPoolExecutor, chunks: list[tuple[list[Segment], list[Buffer]]], level: int
) -> list[_Compressed]:
    compressor = _per_thread(lambda: ChunkCompressor(level=level))

    def one(chunk: tuple[list[Segment], list[Buffer]]) -> _Compressed:
        segments, parts = chunk
        header, payload = compressor().compress(segments, parts)
        # The join stands for the socket write, which reads every payload byte once and, like
        # numpy's concatenate (unlike b"".join), releases the GIL while it does.
        joined = np.concatenate([np.frombuffer(part, dtype=np.uint8) for part in payload])
        return _Compressed(header, joined, _blob_size(parts))

    return list(pool.map(one, chunks))


def _decompress_all(pool: ThreadPoolExecutor, compressed: list[_Compressed]) -> None:
    largest = max(item.raw_bytes for item in compressed)
    state = _per_thread(lambda: (ChunkDecompressor(), memoryview(bytearray(largest))))

    def one(item: _Compressed) -> None:
        decompressor, out = state()
        if decompressor.decompress_into(item.header, item.payload, out) != item.raw_bytes:
            raise AssertionError("decompressed size differs from the original chunk")

    for _ in pool.map(one, compressed):
        pass
