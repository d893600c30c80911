"""The same work as benchmarks/peers/peer_child.py (kept apart: a Flower App bundle carries only
its own directory)."""

from __future__ import annotations

import ctypes
import json
import os
import time
import zlib
from pathlib import Path

import torch

TENSOR_SHAPE = (8192, 8192)  # 256 MiB of float32
_CRC_BLOCK = 64 * 1024 * 1024


def build_dict(count: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i:02d}.weight": torch.randn(TENSOR_SHAPE, generator=gen) for i in range(count)}


def crc(t: torch.Tensor) -> int:
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    view = memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")
    value = 0
    for start in range(0, len(view), _CRC_BLOCK):
        value = zlib.crc32(view[start : start + _CRC_BLOCK], value)
    return value


def describe(sd: dict[str, torch.Tensor]) -> dict[str, list[object]]:
    return {
        name: [crc(t), str(t.dtype), list(t.shape), t.numel() * t.element_size()]
        for name, t in sd.items()
    }


def report(out_dir: str, name: str, **fields: object) -> None:
    """Write one event file for run.py (written whole, then renamed into place)."""
    path = Path(out_dir) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **fields}))
    tmp.rename(path)


def wait_release(out_dir: str, timeout: float = 600.0) -> None:
    """Stay alive until run.py has read this process's VmHWM."""
    release = Path(out_dir) / "release"
    deadline = time.time() + timeout
    while not release.exists() and time.time() < deadline:
        time.sleep(0.05)
