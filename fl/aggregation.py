"""Aggregation: pure functions over tensors, and FedAvg accumulators fed one tensor at a time.

The accumulators are what makes streaming aggregation possible: a CallbackSink hands each client's
tensor to `add()` as soon as it has arrived, the accumulator folds it into a running weighted sum
and drops it, so the server holds one model's worth of sums (plus the transport window) instead of
one model per client. `FileAccumulator` keeps those sums in a file and touches it one slice at a
time, so a server can aggregate a model larger than its RAM.

Each tensor's average is over the clients whose copy of that tensor arrived whole (per-tensor
weight sums): a client that fails half way through its upload has its completed tensors counted and
no others, and nothing it sent is ever half-added.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fl.model import ParamsType

# Elements per slice when the sums live in a file: 4 Mi float32 = 16 MiB of RAM per busy thread.
FILE_SLICE_ELEMENTS = 4 * 2**20

BaseLookup = Callable[[str], torch.Tensor]


# --- pure functions ------------------------------------------------------------------------------


def weighted_average(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum(w_i * x_i) / sum(w_i), computed in float64 and returned in the inputs' dtype."""
    if not values or len(values) != len(weights):
        raise ValueError(f"need as many weights as values, got {len(values)} and {len(weights)}")
    check_weight(sum(weights))
    total = torch.zeros(values[0].shape, dtype=torch.float64)
    for value, weight in zip(values, weights, strict=True):
        total.add_(value.to(torch.float64), alpha=check_weight(weight))
    return total.div_(sum(weights)).to(values[0].dtype)


def apply_diff(base: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """The model a DIFF update describes: base + diff, in the base's dtype."""
    return (base.to(torch.float32) + diff.to(torch.float32)).to(base.dtype)


def as_params_type(
    tensor: torch.Tensor, have: ParamsType, want: ParamsType, base: torch.Tensor | None
) -> torch.Tensor:
    """Convert one tensor between FULL and DIFF against `base` (the model the client received)."""
    if have is want:
        return tensor
    if base is None:
        raise ValueError(f"cannot turn a {have.value} update into {want.value} without the base")
    if want is ParamsType.FULL:
        return apply_diff(base, tensor)
    return tensor.to(torch.float32) - base.to(torch.float32)


def check_weight(weight: float) -> float:
    """A weight must be a positive finite number (a sample count)."""
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"an aggregation weight must be positive and finite, got {weight!r}")
    return weight


# --- accumulators --------------------------------------------------------------------------------


class Accumulator:
    """Running weighted sums, one per tensor name; `add()` is safe from many threads at once."""

    def __init__(self, accumulate_dtype: torch.dtype = torch.float32) -> None:
        if not accumulate_dtype.is_floating_point:
            raise ValueError(f"accumulate_dtype must be a float dtype, got {accumulate_dtype}")
        self.accumulate_dtype = accumulate_dtype
        self.weights: dict[str, float] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._registry_lock = threading.Lock()
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor, weight: float) -> None:
        """Fold `weight * tensor` into the sum for `name`."""
        check_weight(weight)
        with self._registry_lock:
            if self._closed:
                raise RuntimeError(f"the accumulator is closed; {name!r} arrived too late")
            known = self.shapes.setdefault(name, (tensor.shape, tensor.dtype))
            lock = self._locks.setdefault(name, threading.Lock())
        if known[0] != tensor.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(known[0])}"
            )
        with lock:
            first = name not in self.weights
            self._accumulate(name, tensor.reshape(-1), weight, first)
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def close(self) -> None:
        """Refuse further adds (a straggler's late tensors must not change a finished average)."""
        with self._registry_lock:
            self._closed = True

    def _accumulate(self, name: str, flat: torch.Tensor, weight: float, first: bool) -> None:
        raise NotImplementedError


class MemoryAccumulator(Accumulator):
    """Sums in RAM: one accumulate_dtype tensor per model tensor."""

    def __init__(self, accumulate_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(accumulate_dtype)
        self._sums: dict[str, torch.Tensor] = {}

    def _accumulate(self, name: str, flat: torch.Tensor, weight: float, first: bool) -> None:
        if first:
            total = torch.empty(flat.shape, dtype=self.accumulate_dtype)
            self._sums[name] = total.copy_(flat).mul_(weight)
        else:
            self._sums[name].add_(flat, alpha=weight)

    def average(self, base: BaseLookup | None = None) -> dict[str, torch.Tensor]:
        """Each tensor's weighted average in its own dtype (base + average when base is given,
        i.e. the sums were DIFFs). The sums are divided in place and then released."""
        self.close()
        averaged: dict[str, torch.Tensor] = {}
        for name in list(self._sums):
            shape, dtype = self.shapes[name]
            mean = self._sums.pop(name).div_(self.weights[name]).reshape(shape)
            averaged[name] = mean.to(dtype) if base is None else apply_diff(base(name), mean)
        return averaged


class FileAccumulator(Accumulator):
    """Sums in one file (a region per tensor), read and written a slice at a time with
    pread/pwrite, so RAM holds one slice per busy thread whatever the model size. The dirty pages
    sit in the kernel's page cache, which it writes back and reclaims as it needs."""

    def __init__(self, path: str | os.PathLike[str], accumulate_dtype: torch.dtype = torch.float32):
        super().__init__(accumulate_dtype)
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._offsets: dict[str, int] = {}
        self._end = 0
        self._itemsize = torch.empty((), dtype=accumulate_dtype).element_size()
        self._buffers = threading.local()

    def _slice_buffer(self) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self._buffers, "tensor", None)
        if buffer is None:
            buffer = torch.empty(FILE_SLICE_ELEMENTS, dtype=self.accumulate_dtype)
            self._buffers.tensor = buffer
        return buffer

    def _region(self, name: str, numel: int) -> int:
        with self._registry_lock:
            if name not in self._offsets:
                self._offsets[name] = self._end
                self._end += -(-numel * self._itemsize // 64) * 64  # 64-byte aligned regions
            return self._offsets[name]

    def _accumulate(self, name: str, flat: torch.Tensor, weight: float, first: bool) -> None:
        region = self._region(name, flat.numel())
        buffer = self._slice_buffer()
        for start in range(0, flat.numel(), FILE_SLICE_ELEMENTS):
            piece = flat[start : start + FILE_SLICE_ELEMENTS]
            sums = buffer[: piece.numel()]
            offset = region + start * self._itemsize
            if first:
                sums.copy_(piece).mul_(weight)
            else:
                _read_exact(self._fd, sums, offset)
                sums.add_(piece, alpha=weight)
            _write_all(self._fd, sums, offset)

    def write_average(self, target: str | os.PathLike[str], base: BaseLookup | None = None) -> Path:
        """Write each tensor's weighted average (base + average when base is given) to a
        safetensors file at `target`, slice by slice; returns its path."""
        self.close()
        names = list(self.weights)
        header, data_start = _safetensors_header({name: self.shapes[name] for name in names})
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(out, header, 0)
            position = data_start
            for name in names:
                position = self._write_tensor(out, position, name, base)
        finally:
            os.close(out)
        return Path(target)

    def _write_tensor(self, out: int, position: int, name: str, base: BaseLookup | None) -> int:
        shape, dtype = self.shapes[name]
        numel = shape.numel()
        base_flat = base(name).reshape(-1) if base is not None else None
        buffer = self._slice_buffer()
        for start in range(0, numel, FILE_SLICE_ELEMENTS):
            sums = buffer[: min(FILE_SLICE_ELEMENTS, numel - start)]
            _read_exact(self._fd, sums, self._offsets[name] + start * self._itemsize)
            mean = sums.div_(self.weights[name])
            if base_flat is not None:
                mean = apply_diff(base_flat[start : start + sums.numel()], mean)
            piece = mean.to(dtype)
            _write_all(out, piece, position)
            position += piece.numel() * piece.element_size()
        return position

    def close_file(self) -> None:
        """Close and delete the sums file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)


# --- file helpers --------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _safetensors_header(
    specs: Mapping[str, tuple[torch.Size, torch.dtype]],
) -> tuple[bytes, int]:
    """The length prefix and JSON header of a safetensors file laying tensors out in order."""
    entries: dict[str, object] = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
        size = shape.numel() * torch.empty((), dtype=dtype).element_size()
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, 8 + len(text)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _read_exact(fd: int, into: torch.Tensor, offset: int) -> None:
    view = _bytes_of(into)
    done = 0
    while done < view.nbytes:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(f"accumulator file ended at byte {offset + done}")
        done += count


def _write_all(fd: int, tensor: torch.Tensor, offset: int) -> None:
    view = _bytes_of(tensor.contiguous())
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)
