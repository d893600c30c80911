"""Sources: where the sender's tensor bytes come from, one chunk at a time, without copies.

A source owns a manifest and hands out, for a planned chunk, one uint8 memoryview per piece. The
views point into the tensors themselves (in-memory dict), into an mmap of the file (safetensors
files) or into a random pool (synthetic), so serving a chunk costs no copy on the CPU. The
exceptions are the few bytes that must move anyway: a non-contiguous tensor is made contiguous
(one at a time, while its chunks are sent) and a CUDA tensor is copied to the host through a
chunk-sized staging buffer.
"""

from __future__ import annotations

import contextlib
import json
import mmap
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np
import torch
import xxhash

from transport.exceptions import ManifestError, PayloadError
from transport.payload.aliases import find_aliases
from transport.payload.manifest import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_SIZES,
    DTYPES,
    Manifest,
    TensorSpec,
    dtype_name,
)
from transport.payload.plan import Chunk, Piece

__all__ = ["SafetensorsSource", "Source", "StateDictSource", "SyntheticSource", "tensor_bytes"]

# safetensors itself refuses headers above 100 MB; so do we, before reading one.
_MAX_FILE_HEADER: Final = 100_000_000
_INDEX_SUFFIX: Final = ".safetensors.index.json"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a flat uint8 memoryview (no copy, any dtype)."""
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat.numpy().data


def _is_zero_copy(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


def _checked(manifest: Manifest) -> Manifest:
    """Refuse now what a receiver with default limits would refuse once the stream opened."""
    try:
        Manifest.from_header(manifest.to_header())
    except ManifestError as exc:
        raise PayloadError(f"a receiver would refuse this source's manifest: {exc}") from exc
    return manifest


class Source(ABC):
    """Hands out the bytes of planned chunks; `manifest` describes every tensor it serves."""

    manifest: Manifest

    @abstractmethod
    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        """One flat uint8 view per piece of `chunk`, valid until `release(chunk)`."""

    def release(self, chunk: Chunk) -> None:  # noqa: B027 - optional hook, no-op by default
        """The views of `chunk` were sent and will not be read again."""

    def is_ready(self, chunk: Chunk) -> bool:
        """Whether `chunk` can be read now. A source still being filled (a relay forwarding
        what it receives: transport/payload/relaying.py) says False until it is; a sender then
        waits for a `when_ready` callback. Raises when the chunk will never come."""
        return True

    def when_ready(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from any thread) whenever more chunks may be ready; returns what
        stops it. A source that is always ready never calls it."""
        return _nothing

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Free what the source holds (files, mmaps, buffers)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def drop_pages(mapped: mmap.mmap, start: int, stop: int) -> None:
    """madvise(DONTNEED) the whole pages inside [start, stop) of a shared read-only map: they
    leave this process's RSS and are read again from the page cache if touched. Pages at the
    edges are kept: a neighbouring chunk may still be in flight."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = stop // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        with contextlib.suppress(OSError, ValueError):  # a closed map: nothing left to drop
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def _nothing() -> None:
    """What stops a callback that is never called."""


# --- in-memory state dict ------------------------------------------------------------------------


class _StagingPool:
    """Chunk-sized host buffers for device->host copies: one per chunk not yet released.

    A sender that releases each chunk before asking for the next reuses one buffer; a sender with
    several chunks in flight needs one per chunk, or a later copy would overwrite unsent bytes.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[torch.Tensor] = []
        self.busy: dict[int, torch.Tensor] = {}

    def take(self, chunk_index: int) -> torch.Tensor:
        if chunk_index not in self.busy:
            pinned = torch.cuda.is_available()
            fresh = self.free.pop() if self.free else None
            if fresh is None:
                fresh = torch.empty(self.size, dtype=torch.uint8, pin_memory=pinned)
            self.busy[chunk_index] = fresh
        return self.busy[chunk_index]

    def give_back(self, chunk_index: int) -> None:
        buffer = self.busy.pop(chunk_index, None)
        if buffer is not None:
            self.free.append(buffer)


def _spec_of(name: Any, tensor: Any) -> TensorSpec:
    if not isinstance(name, str):
        raise PayloadError(f"state dict key {name!r} is not a string")
    if not isinstance(tensor, torch.Tensor):
        raise PayloadError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided:
        raise PayloadError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors travel")
    if tensor.device.type == "meta":
        raise PayloadError(f"tensor {name!r} is on the meta device: it has no data to send")
    dtype = dtype_name(tensor.dtype)
    if dtype is None:
        raise PayloadError(
            f"tensor {name!r} has dtype {tensor.dtype}, which safetensors chunks cannot carry "
            f"(supported: {', '.join(DTYPES)})"
        )
    return TensorSpec(name, dtype, tuple(tensor.shape))


class StateDictSource(Source):
    """Serves an in-memory state dict (CPU or CUDA); contiguous CPU tensors are never copied.

    An entry that is the very same tensor as an earlier one (tied weights) becomes an alias in the
    manifest and is sent once, under the earlier name. Entries that only share part of a storage
    are sent separately, with a SharedStorageWarning.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        specs = tuple(_spec_of(name, tensor) for name, tensor in state_dict.items())
        aliases = find_aliases(state_dict)
        self.manifest = _checked(Manifest(specs, chunk_size, dict(metadata or {}), aliases))
        self._tensors = list(state_dict.values())
        # The one tensor currently made contiguous (a copy), kept while its chunks are sent.
        self._dense: tuple[int, torch.Tensor] | None = None
        self._staging = _StagingPool(chunk_size)

    def _flat_bytes(self, position: int) -> torch.Tensor:
        tensor = self._tensors[position]
        if not _is_zero_copy(tensor):
            if self._dense is None or self._dense[0] != position:
                dense = tensor.detach().resolve_conj().resolve_neg().contiguous()
                self._dense = (position, dense)
            tensor = self._dense[1]
        return tensor.detach().reshape(-1).view(torch.uint8)

    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        """One view per piece: slices of the tensors, or of a staging buffer for CUDA tensors."""
        views: list[memoryview] = []
        offset = 0
        for piece in chunk.pieces:
            flat = self._flat_bytes(piece.tensor)
            if flat.device.type == "cpu":
                views.append(flat.numpy().data[piece.start : piece.stop])
            else:
                views.append(self._stage(chunk.index, offset, flat, piece))
            offset += piece.nbytes
        return views

    def _stage(self, chunk_index: int, offset: int, flat: torch.Tensor, piece: Piece) -> memoryview:
        staging = self._staging.take(chunk_index)
        window = staging[offset : offset + piece.nbytes]
        window.copy_(flat[piece.start : piece.stop])  # blocking: the bytes are ready on return
        return window.numpy().data

    def release(self, chunk: Chunk) -> None:
        """Recycle the chunk's staging buffer; drop the dense copy once its last piece was sent."""
        self._staging.give_back(chunk.index)
        if self._dense is None:
            return
        position = self._dense[0]
        nbytes = self.manifest.tensors[position].nbytes
        if any(p.tensor == position and p.stop == nbytes for p in chunk.pieces):
            self._dense = None

    def close(self) -> None:
        """Forget the dense copy and the staging buffers (the state dict itself is the caller's)."""
        self._dense = None
        self._staging = _StagingPool(self._staging.size)


# --- safetensors files via mmap ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FileEntry:
    spec: TensorSpec
    begin: int  # offset in the data section


def _read_file_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Header length and parsed header of a safetensors file; PayloadError naming what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise PayloadError(f"{path}: {size} bytes, too short for a safetensors file")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(_MAX_FILE_HEADER, size - 8):
            raise PayloadError(f"{path}: header length {header_len} impossible in {size} bytes")
        raw = file.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"{path}: header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError(f"{path}: header is not a JSON object")
    return header_len, header


def _file_entry(path: Path, name: str, entry: Any, data_size: int) -> _FileEntry:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        found = entry.get("dtype") if isinstance(entry, dict) else entry
        raise PayloadError(f"{path}: tensor {name!r} has unsupported dtype {found!r}")
    shape: Any = entry.get("shape")
    offsets: Any = entry.get("data_offsets")
    valid = (
        isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
    )
    if not valid:
        raise PayloadError(
            f"{path}: tensor {name!r} has invalid shape {shape} or offsets {offsets}"
        )
    spec = TensorSpec(name, entry["dtype"], tuple(shape))
    begin, end = offsets
    if not 0 <= begin <= end <= data_size or end - begin != spec.nbytes:
        raise PayloadError(
            f"{path}: tensor {name!r} {spec.dtype}{list(spec.shape)} needs {spec.nbytes} bytes but "
            f"data_offsets are [{begin}, {end}] in a {data_size}-byte data section"
        )
    return _FileEntry(spec, begin)


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read and, for a sharded checkpoint, its weight map (tensor -> file name)."""
    if path.is_dir():
        indexes = sorted(path.glob("*" + _INDEX_SUFFIX))
        if len(indexes) == 1:
            return _shard_files(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise PayloadError(f"{path}: no *.safetensors files in this directory")
        return files, None
    if path.name.endswith(_INDEX_SUFFIX):
        try:
            weight_map = json.loads(path.read_text("utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PayloadError(f"{path}: not a safetensors index with a weight_map: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise PayloadError(f"{path}: weight_map must map tensor names to file names")
        return [path.parent / name for name in sorted(set(weight_map.values()))], weight_map
    return [path], None


class SafetensorsSource(Source):
    """Serves one safetensors file, a directory of them, or a sharded checkpoint's index, by mmap.

    Tensors are sent file by file (in sorted file order), each file's tensors in on-disk order, so
    the kernel's readahead streams the mmap. For a single file its string `__metadata__` becomes the
    manifest's metadata. With an index, a tensor named in the weight map but absent from its file is
    an error; tensors in the files but not in the map are not sent.
    """

    def __init__(self, path: str | Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        files, weight_map = _shard_files(Path(path))
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._places: list[tuple[int, int]] = []  # per tensor: (file number, absolute offset)
        specs: list[TensorSpec] = []
        metadata: dict[str, str] = {}
        try:
            for number, file in enumerate(files):
                wanted = (
                    None
                    if weight_map is None
                    else {name for name, shard in weight_map.items() if shard == file.name}
                )
                file_meta = self._add_file(number, file, wanted, specs)
                if len(files) == 1 and weight_map is None:
                    metadata = file_meta
            self.manifest = _checked(Manifest(tuple(specs), chunk_size, metadata))
        except BaseException:
            self.close()
            raise

    def _add_file(
        self, number: int, file: Path, wanted: set[str] | None, specs: list[TensorSpec]
    ) -> dict[str, str]:
        if not file.is_file():
            raise PayloadError(f"{file}: no such safetensors file")
        header_len, header = _read_file_header(file)
        data_start = 8 + header_len
        data_size = file.stat().st_size - data_start
        file_meta = header.pop("__metadata__", None) or {}
        entries = [_file_entry(file, name, entry, data_size) for name, entry in header.items()]
        if wanted is not None:
            missing = wanted - {entry.spec.name for entry in entries}
            if missing:
                raise PayloadError(f"{file}: the index names tensors not in it: {sorted(missing)}")
            entries = [entry for entry in entries if entry.spec.name in wanted]
        entries.sort(key=lambda entry: entry.begin)
        with file.open("rb") as handle:
            self._maps.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
        self._views.append(memoryview(self._maps[-1]))
        for entry in entries:
            specs.append(entry.spec)
            self._places.append((number, data_start + entry.begin))
        strings = all(isinstance(k, str) and isinstance(v, str) for k, v in file_meta.items())
        return dict(file_meta) if isinstance(file_meta, dict) and strings else {}

    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        """Slices of the files' mmaps: no copy, the page cache is the only buffer."""
        views: list[memoryview] = []
        for piece in chunk.pieces:
            number, base = self._places[piece.tensor]
            views.append(self._views[number][base + piece.start : base + piece.stop])
        return views

    def release(self, chunk: Chunk) -> None:
        """Let the chunk's pages go from this process: a model sent from a file would otherwise
        stay mapped, its whole size counted in the sender's RSS. The page cache keeps them."""
        for piece in chunk.pieces:
            number, base = self._places[piece.tensor]
            if number < len(self._maps):
                drop_pages(self._maps[number], base + piece.start, base + piece.stop)

    def close(self) -> None:
        """Unmap the files; a map still exported by a live view is left for the GC to close."""
        for view in self._views:
            view.release()
        for mapped in self._maps:
            # A caller still holding a chunk view keeps the map open until that view dies.
            with contextlib.suppress(BufferError):
                mapped.close()
        self._views, self._maps = [], []


# --- synthetic -----------------------------------------------------------------------------------


class SyntheticSource(Source):
    """A model that is never stored: deterministic random bytes for benchmarks and tests.

    Tensor i's byte b is pool[(base_i + b) mod P], where the pool is P random bytes drawn from
    numpy's Generator(seed) and base_i a hash of (seed, i). The pool is stored twice back to back,
    so every piece (at most chunk_size <= P bytes) is one contiguous slice: serving any amount of
    data costs P * 2 bytes of memory and no copy. The bytes depend on seed, dtype, tensor_bytes and
    P = max(pool_bytes, chunk_size); `materialize()` builds the same tensors for small sizes.

    `values="bytes"` draws uniform random bytes (incompressible: a worst case for codecs);
    `values="weights"` draws N(0, 0.02) numbers of the dtype, like trained layers, so compression
    benchmarks see realistic data. Tensor starts are element-aligned in the pool either way.
    """

    def __init__(
        self,
        total_bytes: int,
        *,
        seed: int = 0,
        dtype: str = "BF16",
        tensor_bytes: int = 64 * 2**20,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pool_bytes: int = 32 * 2**20,
        values: str = "bytes",
    ) -> None:
        self._check_arguments(total_bytes, dtype, tensor_bytes, pool_bytes)
        if values not in ("bytes", "weights"):
            raise PayloadError(f"values must be 'bytes' or 'weights', got {values!r}")
        itemsize = DTYPE_SIZES[dtype]
        full, rest = divmod(total_bytes, tensor_bytes)
        sizes = [tensor_bytes] * full + ([rest] if rest else [])
        specs = tuple(
            TensorSpec(f"synthetic.{i:06d}", dtype, (size // itemsize,))
            for i, size in enumerate(sizes)
        )
        self.manifest = _checked(Manifest(specs, chunk_size, {"synthetic_seed": str(seed)}))
        self.seed = seed
        self._itemsize = itemsize
        self.pool_size = -(-max(pool_bytes, chunk_size) // itemsize) * itemsize
        random = _pool_bytes(self.pool_size, seed, dtype, values)
        self._pool = np.frombuffer(random * 2, dtype=np.uint8)
        self._pool_view = self._pool.data

    @staticmethod
    def _check_arguments(total_bytes: int, dtype: str, tensor_bytes: int, pool_bytes: int) -> None:
        if dtype not in DTYPES:
            raise PayloadError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        itemsize = DTYPE_SIZES[dtype]
        if total_bytes < 0 or total_bytes % itemsize:
            raise PayloadError(
                f"total_bytes {total_bytes} is not a non-negative multiple of {itemsize} ({dtype})"
            )
        if tensor_bytes < itemsize or tensor_bytes % itemsize:
            raise PayloadError(
                f"tensor_bytes {tensor_bytes} is not a positive multiple of {itemsize} ({dtype})"
            )
        if pool_bytes < 1:
            raise PayloadError(f"pool_bytes must be >= 1, got {pool_bytes}")

    def _base(self, position: int) -> int:
        digest = xxhash.xxh64_intdigest(
            position.to_bytes(8, "little"), seed=self.seed & (2**64 - 1)
        )
        return int(digest % (self.pool_size // self._itemsize)) * self._itemsize

    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        """Slices of the doubled pool at each piece's derived offset; no per-byte cost."""
        views: list[memoryview] = []
        for piece in chunk.pieces:
            begin = (self._base(piece.tensor) + piece.start) % self.pool_size
            views.append(self._pool_view[begin : begin + piece.nbytes])
        return views

    def materialize(self, max_bytes: int = 2**30) -> dict[str, torch.Tensor]:
        """The tensors this source streams, built in memory (refused above `max_bytes`)."""
        if self.manifest.total_bytes > max_bytes:
            raise PayloadError(
                f"materializing {self.manifest.total_bytes} bytes is over max_bytes={max_bytes}"
            )
        return {spec.name: self.tensor(spec.name) for spec in self.manifest.tensors}

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor of this source, built in memory (for checks against what a sink received)."""
        position = self.manifest.index_of(name)
        spec = self.manifest.tensors[position]
        flat = np.empty(spec.nbytes, dtype=np.uint8)
        for start in range(0, spec.nbytes, self.pool_size):
            stop = min(start + self.pool_size, spec.nbytes)
            begin = (self._base(position) + start) % self.pool_size
            flat[start:stop] = self._pool[begin : begin + stop - start]
        return torch.from_numpy(flat).view(spec.torch_dtype).reshape(spec.shape)


def _pool_bytes(size: int, seed: int, dtype: str, values: str) -> bytes:
    """`size` bytes of uniform random bytes, or of N(0, 0.02) values of a floating `dtype`."""
    torch_dtype = DTYPES[dtype]
    if values == "bytes" or not torch_dtype.is_floating_point:
        return np.random.Generator(np.random.PCG64(seed)).bytes(size)
    generator = torch.Generator().manual_seed(seed)
    numbers = torch.randn(size // DTYPE_SIZES[dtype], generator=generator) * 0.02
    return numbers.to(torch_dtype).view(torch.uint8).numpy().tobytes()
