"""Frame codec throughput: encode, parse (read in place) and both, against memcpy in the same run.

    python -m benchmarks codec --json [--payload-mib 4] [--total-gib 4]

- serialize: `encode_frame` on DATA frames (checksum + prefix); its parts would go to one writev,
  so the payload is not copied.
- parse: a preserialized stream (a window of distinct frames, replayed until `--total-gib` bytes)
  is written into `FrameParser.get_buffer()` in 1 MiB socket-sized reads, as `recv_into` would,
  then `buffer_updated()`; `allocate` hands out buffers from a small pool, as a receiver that
  recycles chunk buffers would. Includes that one copy, which stands for kernel -> user.
- roundtrip: encode, then the parse path fed from the encoded parts.
- memcpy: the same 1 MiB copies from the same source into the same kind of destination, with no
  codec: the ceiling parse is compared against in this run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from transport.wire import EncodedFrame, FrameParser, FrameType, encode_frame

MIB = 1 << 20
READ_SIZE = 1 * MIB  # what one socket read returns on a fast link
WINDOW_BYTES = 64 * MIB  # distinct frames kept in memory; replayed to reach the total
POOL_SIZE = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m benchmarks codec`."""
    parser.add_argument("--payload-mib", type=float, default=4.0, help="payload per frame (MiB)")
    parser.add_argument("--total-gib", type=float, default=4.0, help="bytes per measurement (GiB)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every path on the same frames; figures in GB/s (1e9 bytes/s) of payload."""
    payload_bytes = max(1, int(args.payload_mib * MIB))
    frames = max(1, int(args.total_gib * (1 << 30)) // payload_bytes)
    window = min(frames, max(1, WINDOW_BYTES // payload_bytes))
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(payload_bytes) for _ in range(window)]
    stream = b"".join(b"".join(_encode(payloads, i).parts) for i in range(window))
    total = frames * payload_bytes

    def rate(seconds: float) -> float:
        return round(total / seconds / 1e9, 3)

    return {
        "benchmark": "codec",
        "payload_bytes": payload_bytes,
        "frames": frames,
        "serialize_gb_s": rate(_timed(lambda: _serialize(payloads, frames))),
        "parse_gb_s": rate(_timed(lambda: _parse(stream, window, frames, payload_bytes))),
        "roundtrip_gb_s": rate(_timed(lambda: _roundtrip(payloads, frames, payload_bytes))),
        "memcpy_gb_s": rate(_timed(lambda: _memcpy(stream, total, payload_bytes))),
    }


def _timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _encode(payloads: list[bytes], index: int) -> EncodedFrame:
    payload = payloads[index % len(payloads)]
    return encode_frame(
        FrameType.DATA, stream_id=1, offset=index, header={"chunk": index}, payload=payload
    )


def _serialize(payloads: list[bytes], frames: int) -> None:
    for index in range(frames):
        _encode(payloads, index)


class _BufferPool:
    """allocate() for the parser: recycles a few payload buffers, as a receiver would."""

    def __init__(self, size: int) -> None:
        self._buffers = [bytearray(size) for _ in range(POOL_SIZE)]
        self._next = 0

    def __call__(self, size: int) -> bytearray:
        buffer = self._buffers[self._next]
        self._next = (self._next + 1) % POOL_SIZE
        if size > len(buffer):
            raise AssertionError(f"pool buffers hold {len(buffer)} bytes, asked for {size}")
        return buffer


def _receive(parser: FrameParser, data: memoryview) -> int:
    """Write `data` into the parser's buffers in socket-sized reads; return frames completed."""
    completed = 0
    while data:
        buffer = parser.get_buffer(READ_SIZE)
        count = min(len(buffer), READ_SIZE, len(data))
        buffer[:count] = data[:count]
        data = data[count:]
        completed += len(parser.buffer_updated(count))
    return completed


def _parse(stream: bytes, window: int, frames: int, payload_bytes: int) -> None:
    parser = FrameParser(allocate=_BufferPool(payload_bytes))
    completed = 0
    for _ in range(frames // window):
        completed += _receive(parser, memoryview(stream))
    if frames % window:  # the window starts on a frame edge: replay whole frames only
        completed += _receive(
            parser, memoryview(stream)[: len(stream) * (frames % window) // window]
        )
    if completed != frames:
        raise AssertionError(f"parsed {completed} frames, expected {frames}")


def _roundtrip(payloads: list[bytes], frames: int, payload_bytes: int) -> None:
    parser = FrameParser(allocate=_BufferPool(payload_bytes))
    completed = 0
    for index in range(frames):
        for part in _encode(payloads, index).parts:
            completed += _receive(parser, memoryview(part))
    if completed != frames:
        raise AssertionError(f"parsed {completed} frames, expected {frames}")


def _memcpy(stream: bytes, total_bytes: int, payload_bytes: int) -> None:
    """The parse path's copies alone: same reads, same source, a target as big as the pool."""
    source = memoryview(stream)
    target = memoryview(bytearray(payload_bytes * POOL_SIZE))
    copied = 0
    while copied < total_bytes:
        start = copied % len(source)
        slot = copied % len(target)
        count = min(READ_SIZE, len(source) - start, len(target) - slot, total_bytes - copied)
        target[slot : slot + count] = source[start : start + count]
        copied += count
