"""The server's global model as a safetensors file: read by mmap, written slice by slice.

The server never holds the global model in anonymous memory: the model of round r is a file in the
job's state directory, sent to the clients by mmap (a transport SafetensorsSource), read by the
aggregator as tensors that are views of that mmap (page cache, which the kernel can reclaim), and
the next round's model is written into a new file one slice at a time as each tensor is finished.

A file is written under `<name>.partial`, fsynced and renamed into place by `commit()`, so a process
killed at any moment leaves either the whole new file or none of it, never a torn model.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fl.aggregation import TensorLayout
from transport import DTYPES, dtype_name

# A header larger than this is not a model file this server wrote (refuse before reading it).
_MAX_HEADER = 100 * 2**20


class ModelFileError(ValueError):
    """A model file is missing, truncated or not a safetensors file this server can read."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _header(layouts: Mapping[str, TensorLayout]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The length-prefixed JSON header and each tensor's (begin, end) within the data section."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    places: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, layout in layouts.items():
        code = dtype_name(layout.dtype)
        if code is None:
            raise ModelFileError(f"tensor {name!r} has dtype {layout.dtype}, not a safetensors one")
        size = _numel(layout.shape) * _itemsize(layout.dtype)
        entries[name] = {
            "dtype": code,
            "shape": list(layout.shape),
            "data_offsets": [offset, offset + size],
        }
        places[name] = (offset, offset + size)
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, places


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class ModelFileWriter:
    """Writes a model file slice by slice, in any order, then commits it atomically."""

    def __init__(self, path: str | os.PathLike[str], layouts: Mapping[str, TensorLayout]) -> None:
        self.path = Path(path)
        self.layouts = dict(layouts)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header, self._places = _header(self.layouts)
        self._data_start = len(header)
        total = self._data_start + max((end for _, end in self._places.values()), default=0)
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(self._fd, total)  # sparse: only written slices take disk blocks
            _pwrite_all(self._fd, memoryview(header), 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Write `values` (flat, in the tensor's dtype) at element `start` of tensor `name`."""
        layout = self.layouts[name]
        if values.dtype != layout.dtype:
            raise ModelFileError(f"{name}: writing {values.dtype} into a {layout.dtype} tensor")
        begin, end = self._places[name]
        offset = begin + start * _itemsize(layout.dtype)
        data = _bytes_of(values)
        if offset + data.nbytes > end:
            raise ModelFileError(f"{name}: a slice at element {start} runs past the tensor's end")
        _pwrite_all(self._fd, data, self._data_start + offset)

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.write(name, 0, tensor.reshape(-1))

    def commit(self) -> Path:
        """Flush to disk and rename into place; returns the final path."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.partial.replace(self.path)
        fsync_directory(self.path.parent)
        return self.path

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.partial.unlink(missing_ok=True)


def write_model_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a state dict as a model file (atomically)."""
    layouts = {
        name: TensorLayout(tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()
    }
    writer = ModelFileWriter(path, layouts)
    try:
        for name, tensor in tensors.items():
            writer.write_tensor(name, tensor.detach().cpu().contiguous())
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


class ModelFile:
    """A safetensors file opened by mmap: its layouts, and tensors that are views of the mapping.

    The mapping is private copy-on-write, so the tensors are writable in type but a write would
    only copy that page privately; nothing here writes to them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.layouts, self._places, data_start = _read_layouts(self.path)
        size = self.path.stat().st_size
        self._map: mmap.mmap | None = None
        if size > data_start:
            with self.path.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self._data_start = data_start

    @property
    def nbytes(self) -> int:
        return sum(end - begin for begin, end in self._places.values())

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` as a view of the mapping (a copy only when its offset is misaligned)."""
        layout = self.layouts[name]
        begin, end = self._places[name]
        if begin == end or self._map is None:
            return torch.empty(layout.shape, dtype=layout.dtype)
        offset = self._data_start + begin
        view = memoryview(self._map)[offset : self._data_start + end]
        if offset % _itemsize(layout.dtype):
            view = memoryview(bytearray(view))
        return torch.frombuffer(view, dtype=layout.dtype).reshape(layout.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.layouts}

    def load(self) -> dict[str, torch.Tensor]:
        """The whole model copied into memory (for small models: evaluation, tests)."""
        return {name: tensor.clone() for name, tensor in self.tensors().items()}

    def copy_to(self, target: str | os.PathLike[str]) -> Path:
        """Copy this file to `target` atomically (the kernel copies it; nothing is loaded)."""
        return copy_file(self.path, Path(target))

    def close(self) -> None:
        """Unmap (tensors handed out before keep the mapping alive until they are freed)."""
        self._map = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layouts)


def copy_file(source: Path, target: Path) -> Path:
    """Copy `source` to `target` via `<target>.partial`, fsync, rename."""
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.copyfile(source, partial)
        with partial.open("rb+") as handle:
            os.fsync(handle.fileno())
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target


def _read_layouts(
    path: Path,
) -> tuple[dict[str, TensorLayout], dict[str, tuple[int, int]], int]:
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelFileError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise ModelFileError(f"{path}: a {length}-byte header is not a model file's")
            header = json.loads(handle.read(length))
    except OSError as error:
        raise ModelFileError(f"cannot read model file {path}: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: the safetensors header is not JSON: {error}") from None
    header.pop("__metadata__", None)
    layouts: dict[str, TensorLayout] = {}
    places: dict[str, tuple[int, int]] = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ModelFileError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}")
        layouts[name] = TensorLayout(tuple(int(size) for size in entry["shape"]), dtype)
        places[name] = (int(entry["data_offsets"][0]), int(entry["data_offsets"][1]))
    data_end = 8 + length + max((end for _, end in places.values()), default=0)
    if path.stat().st_size < data_end:
        raise ModelFileError(f"{path} is truncated: {path.stat().st_size} of {data_end} bytes")
    return layouts, places, 8 + length


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    view: memoryview = flat.view(torch.uint8).numpy().data
    return view


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)
