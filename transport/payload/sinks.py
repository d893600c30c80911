"""Sinks: where the receiver puts decoded pieces, chunk by chunk, with memory bounded by a chunk.

Call order: `open(manifest)` once, `write(chunk, pieces)` per chunk (possibly from worker threads,
possibly concurrently for different chunks), then `commit()` only after the stream's digest was
verified, or `abort(error)` on any failure. A sink never holds more than the chunk it is writing,
except CallbackSink, which assembles one split tensor at a time in a buffer of that tensor's size.

Aliases (tied tensors, `manifest.aliases`) arrive as their target's bytes, once; each sink restores
them its own way: a new dict maps the alias to the very same tensor object as its target; an
in-place fill copies into an alias tensor of `into` only when it does not already share the
target's storage; a safetensors file, which cannot store shared tensors, holds the bytes under both
names (what `save_file` writes for two equal tensors); a callback is called for the alias with the
same tensor object right after its target.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from transport.exceptions import PayloadError, SinkMismatchError, TransportError
from transport.payload.aliases import same_view
from transport.payload.chunk import pack_header
from transport.payload.journal import ProgressJournal
from transport.payload.manifest import Manifest, TensorSpec, dtype_name
from transport.payload.plan import Chunk, Piece, is_whole, plan_chunks

__all__ = [
    "CallbackSink",
    "DigestSink",
    "DigestStats",
    "SafetensorsFileSink",
    "Sink",
    "StateDictSink",
    "safetensors_file_header",
]

# safetensors' Rust Dtype enum order (ascending); save_file lays tensors out by this rank
# descending, then by name, so a file we write matches save_file byte for byte.
_DTYPE_RANK: Final = {
    name: rank
    for rank, name in enumerate(
        [
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "F8_E8M0",
            "F8_E4M3FNUZ",
            "F8_E5M2FNUZ",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "C64",
            "F64",
            "I64",
            "U64",
        ]
    )
}


class Sink(ABC):
    """Receives the pieces of a stream and turns them into a result."""

    # True when write() is cheap enough to run on the event loop instead of a worker thread.
    inline_writes: bool = False

    @abstractmethod
    def open(self, manifest: Manifest) -> None:
        """Validate the manifest against this sink and prepare; SinkMismatchError, PayloadError."""

    @abstractmethod
    def write(self, chunk: Chunk, pieces: Sequence[tuple[Piece, memoryview]]) -> None:
        """Place the chunk's pieces; the views are only valid during the call."""

    @abstractmethod
    def commit(self) -> Any:
        """Finish after the digest was verified; return the result."""

    @abstractmethod
    def abort(self, error: BaseException) -> None:
        """Give up: leave nothing that looks complete."""

    def resume(self, transfer_id: str, manifest: Manifest) -> Mapping[int, int]:
        """Called before open() for a transfer that can resume across connections and processes.

        A sink that persists its progress returns the chunks it already holds from an earlier
        attempt of this transfer (index -> checksum); open() then keeps them. Default: none.
        """
        return {}

    def record(self, index: int, checksum: int) -> None:  # noqa: B027 - an optional hook
        """Called once chunk `index` was written: a persisting sink notes it (default: nothing)."""


class _Progress:
    """Which planned chunks arrived, so commit() can refuse an incomplete stream."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.expected = len(plan_chunks(manifest))
        self.done: set[int] = set()
        self.lock = threading.Lock()

    def check(self, chunk: Chunk, pieces: Sequence[tuple[Piece, memoryview]]) -> None:
        if len(pieces) != len(chunk.pieces):
            raise PayloadError(
                f"chunk {chunk.index}: {len(pieces)} pieces written, the plan has "
                f"{len(chunk.pieces)}"
            )
        for (piece, view), planned in zip(pieces, chunk.pieces, strict=True):
            if piece != planned or view.nbytes != piece.nbytes:
                raise PayloadError(
                    f"chunk {chunk.index}: piece {piece} with {view.nbytes} bytes does not match "
                    f"the plan's {planned}"
                )

    def mark(self, chunk: Chunk) -> None:
        with self.lock:
            self.done.add(chunk.index)

    def require_complete(self, sink: str) -> None:
        if len(self.done) != self.expected:
            raise PayloadError(
                f"{sink}: commit after {len(self.done)} of {self.expected} chunks were written"
            )


def _require_open(progress: _Progress | None, sink: str) -> _Progress:
    if progress is None:
        raise PayloadError(f"{sink}: open(manifest) must be called first")
    return progress


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _as_bytes(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _Copier:
    """Copies a host view into a tensor's bytes: one memcpy on CPU, staged for other devices."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._staging: torch.Tensor | None = None

    def copy(self, flat: torch.Tensor, start: int, view: memoryview) -> None:
        count = view.nbytes
        if count == 0:
            return
        if flat.device.type == "cpu":
            flat.numpy().data[start : start + count] = _as_bytes(view)
            return
        # torch.frombuffer would warn on read-only views; a pinned staging buffer also makes
        # the host->device copy fast. One buffer, so device copies are serialized.
        with self._lock:
            if self._staging is None or self._staging.numel() < count:
                pinned = torch.cuda.is_available()
                self._staging = torch.empty(count, dtype=torch.uint8, pin_memory=pinned)
            self._staging.numpy().data[:count] = _as_bytes(view)
            flat[start : start + count].copy_(self._staging[:count])


# --- a state dict, new or filled in place ------------------------------------------------------


def _mismatches(
    manifest: Manifest, into: MutableMapping[str, torch.Tensor], strict: bool
) -> list[str]:
    problems: list[str] = []
    for position, spec in enumerate(manifest.tensors):
        target: object = into.get(spec.name)
        if target is None and position in manifest.target_of:
            continue  # e.g. `dict(model.named_parameters())`, which lists a tied weight once
        if target is None:
            problems.append(f"{spec.name!r} missing")
        elif not isinstance(target, torch.Tensor):
            problems.append(f"{spec.name!r} is a {type(target).__name__}, not a tensor")
        elif dtype_name(target.dtype) != spec.dtype:
            problems.append(f"{spec.name!r} dtype {target.dtype}, stream has {spec.dtype}")
        elif tuple(target.shape) != spec.shape:
            problems.append(
                f"{spec.name!r} shape {list(target.shape)}, stream has {list(spec.shape)}"
            )
        elif not target.is_contiguous() or target.device.type == "meta":
            problems.append(f"{spec.name!r} cannot be filled in place (non-contiguous or meta)")
    if strict:
        streamed = {spec.name for spec in manifest.tensors}
        problems += [f"{name!r} not in the stream" for name in into if name not in streamed]
    return problems


def _untied_aliases(
    manifest: Manifest, tensors: Sequence[torch.Tensor | None]
) -> dict[int, list[torch.Tensor]]:
    untied: dict[int, list[torch.Tensor]] = {}
    for alias, target in manifest.target_of.items():
        mine, theirs = tensors[alias], tensors[target]
        if mine is not None and theirs is not None and not same_view(mine, theirs):
            untied.setdefault(target, []).append(mine)
    return untied


class StateDictSink(Sink):
    """Fills a state dict: new tensors (`into=None`) or an existing dict's tensors in place.

    In place, every streamed tensor must exist in `into` with the same dtype and shape and be
    contiguous; with `strict=True` `into` may not hold tensors the stream lacks either. `device`
    places newly allocated tensors. An aborted in-place fill leaves the targets partly overwritten.

    Aliases: in a new dict an alias is the very same tensor object as its target (the tie
    survives). In place, an alias tensor of `into` that is already the same view as its target
    (a tied model's own state dict) is filled by filling the target; one that is not gets the same
    bytes copied in; one that `into` lacks is skipped, since `into` holds its values already.
    """

    def __init__(
        self,
        into: MutableMapping[str, torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
        strict: bool = False,
    ) -> None:
        self._into = into
        self._device = torch.device(device) if device is not None else None
        self._strict = strict
        self._progress: _Progress | None = None
        self._tensors: list[torch.Tensor | None] = []
        # Target position -> alias tensors of `into` that do not share its storage: filled too.
        self._untied: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._copier = _Copier()

    def open(self, manifest: Manifest) -> None:
        """Check the targets (in place) or prepare lazy allocation (new dict)."""
        self._tensors = [None] * len(manifest.tensors)
        self._untied = {}
        if self._into is not None:
            problems = _mismatches(manifest, self._into, self._strict)
            if problems:
                shown = "; ".join(problems[:20])
                raise SinkMismatchError(f"{len(problems)} tensors do not match the stream: {shown}")
            self._tensors = [self._into.get(spec.name) for spec in manifest.tensors]
            self._untied = _untied_aliases(manifest, self._tensors)
        self._progress = _Progress(manifest)

    def _target(self, position: int, spec: TensorSpec) -> torch.Tensor:
        tensor = self._tensors[position]
        if tensor is None:
            with self._lock:  # writes of different chunks may race to allocate a split tensor
                tensor = self._tensors[position]
                if tensor is None:
                    tensor = torch.empty(spec.shape, dtype=spec.torch_dtype, device=self._device)
                    self._tensors[position] = tensor
        return tensor

    def write(self, chunk: Chunk, pieces: Sequence[tuple[Piece, memoryview]]) -> None:
        """Copy each piece into its tensor's bytes (one memcpy, or one staged device copy)."""
        progress = _require_open(self._progress, "StateDictSink")
        progress.check(chunk, pieces)
        for piece, view in pieces:
            target = self._target(piece.tensor, progress.manifest.tensors[piece.tensor])
            self._copier.copy(_flat_bytes(target), piece.start, view)
            for alias in self._untied.get(piece.tensor, ()):
                self._copier.copy(_flat_bytes(alias), piece.start, view)
        progress.mark(chunk)

    def commit(self) -> MutableMapping[str, torch.Tensor]:
        """The filled dict: `into` itself, or a new dict in manifest order."""
        progress = _require_open(self._progress, "StateDictSink")
        progress.require_complete("StateDictSink")
        if self._into is not None:
            return self._into
        manifest = progress.manifest
        result: dict[str, torch.Tensor] = {}
        for position, spec in enumerate(manifest.tensors):
            source = manifest.target_of.get(position, position)
            result[spec.name] = self._target(source, manifest.tensors[source])
        return result

    def abort(self, error: BaseException) -> None:
        """Drop newly allocated tensors; targets filled in place keep what was written."""
        self._tensors = []
        self._progress = None


# --- a safetensors file on disk ----------------------------------------------------------------


def safetensors_file_header(manifest: Manifest) -> tuple[bytes, list[int]]:
    """The file header save_file would write, and each tensor's offset in the data section."""
    order = sorted(
        range(len(manifest.tensors)),
        key=lambda i: (-_DTYPE_RANK[manifest.tensors[i].dtype], manifest.tensors[i].name),
    )
    header: dict[str, Any] = {"__metadata__": dict(manifest.metadata)} if manifest.metadata else {}
    offsets = [0] * len(manifest.tensors)
    offset = 0
    for position in order:
        spec = manifest.tensors[position]
        end = offset + spec.nbytes
        entry = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, end]}
        header[spec.name] = entry
        offsets[position] = offset
        offset = end
    return pack_header(header), offsets


def _file_data_bytes(manifest: Manifest) -> int:
    """The data section of the file: every name's bytes, aliases included (written out twice)."""
    return sum(spec.nbytes for spec in manifest.tensors)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    # pwrite may write less than asked (Linux caps one call near 2 GiB): loop until done.
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class SafetensorsFileSink(Sink):
    """Writes a safetensors file in place as chunks arrive; only a committed file has its name.

    The header is computed from the manifest at open(), the file (`<path>.partial`) is sized with
    a sparse truncate, and each piece is pwritten at its final offset straight from the view.

    safetensors cannot store two names for one tensor, so an alias is written out in full under
    its own name, with its target's bytes: the file is what `save_file` writes for a dict holding
    two equal tensors, and every loader sees every name. The tie itself is not in the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.journal = ProgressJournal(self.partial.with_name(self.partial.name + ".progress"))
        self._fd: int | None = None
        # Per tensor: where its bytes go in the file, its aliases' places after its own.
        self._bases: list[tuple[int, ...]] = []
        self._progress: _Progress | None = None
        self._transfer_id: str | None = None
        self._held: dict[int, int] = {}

    def resume(self, transfer_id: str, manifest: Manifest) -> Mapping[int, int]:
        """Chunks an earlier attempt of this transfer left in `<path>.partial` (per the journal)."""
        self._transfer_id = transfer_id
        header, _ = safetensors_file_header(manifest)
        try:
            size_ok = self.partial.stat().st_size == len(header) + _file_data_bytes(manifest)
        except FileNotFoundError:
            size_ok = False
        self._held = self.journal.load(transfer_id, manifest) if size_ok else {}
        return dict(self._held)

    def open(self, manifest: Manifest) -> None:
        """Create `<path>.partial` with its final header and size (or keep the one resumed)."""
        header, offsets = safetensors_file_header(manifest)
        flags = os.O_RDWR | os.O_CREAT | (0 if self._held else os.O_TRUNC)
        try:
            self._fd = os.open(self.partial, flags, 0o644)
            _pwrite_all(self._fd, memoryview(header), 0)
            os.ftruncate(self._fd, len(header) + _file_data_bytes(manifest))
        except OSError as exc:
            self.abort(exc)
            raise PayloadError(f"cannot create {self.partial}: {exc}") from exc
        self._bases = [
            tuple(len(header) + offsets[i] for i in (position, *manifest.aliases_of(position)))
            for position in range(len(manifest.tensors))
        ]
        self._progress = _Progress(manifest)
        self._progress.done.update(self._held)
        if self._held:
            self.journal.reopen()
        elif self._transfer_id is not None:
            self.journal.start(self._transfer_id, manifest)

    def record(self, index: int, checksum: int) -> None:
        """Append chunk `index` to the journal (only for a transfer that can resume)."""
        if self._fd is not None:
            self.journal.record(index, checksum, self._fd)

    def write(self, chunk: Chunk, pieces: Sequence[tuple[Piece, memoryview]]) -> None:
        """pwrite each piece at its place in the file (no copy of the bytes)."""
        progress = _require_open(self._progress, "SafetensorsFileSink")
        progress.check(chunk, pieces)
        fd = self._fd
        if fd is None:
            raise PayloadError(f"{self.partial} is closed")
        try:
            for piece, view in pieces:
                for base in self._bases[piece.tensor]:
                    _pwrite_all(fd, _as_bytes(view), base + piece.start)
        except OSError as exc:
            raise PayloadError(
                f"cannot write chunk {chunk.index} to {self.partial}: {exc}"
            ) from exc
        progress.mark(chunk)

    def commit(self) -> Path:
        """fsync, rename `<path>.partial` to `<path>`, return `<path>`."""
        progress = _require_open(self._progress, "SafetensorsFileSink")
        progress.require_complete("SafetensorsFileSink")
        fd = self._fd
        if fd is None:
            raise PayloadError(f"{self.partial} is closed")
        try:
            os.fsync(fd)
            os.close(fd)
            self._fd = None
            os.replace(self.partial, self.path)
        except OSError as exc:
            raise PayloadError(f"cannot commit {self.path}: {exc}") from exc
        self.journal.remove()
        return self.path

    def abort(self, error: BaseException) -> None:
        """Close; remove the partial file unless the transfer can still resume from it.

        A lost connection (a TransportError) keeps `<path>.partial` and its journal so a later
        attempt continues; any other failure (bad data, a refused manifest) removes both.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.journal.close()
        self._progress = None
        if not (self._transfer_id is not None and isinstance(error, TransportError)):
            self.partial.unlink(missing_ok=True)
            self.journal.remove()


# --- one callback per complete tensor ----------------------------------------------------------


class CallbackSink(Sink):
    """Calls `on_tensor(name, tensor)` once per tensor, as soon as all its bytes arrived.

    A whole tensor is copied out of the chunk into a tensor of its own; a split tensor is assembled
    in one buffer of its size, delivered, then dropped. Calls come from the writing thread. An alias
    is delivered right after its target, with the same tensor object (so the callback sees every
    name of the state dict, and a tie survives if it keeps both).
    """

    def __init__(
        self,
        on_tensor: Callable[[str, torch.Tensor], None],
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self._on_tensor = on_tensor
        self._device = torch.device(device) if device is not None else None
        self._progress: _Progress | None = None
        self._pending: dict[int, list[Any]] = {}  # position -> [tensor, bytes still missing]
        self._lock = threading.Lock()
        self._copier = _Copier()
        self.delivered = 0

    def open(self, manifest: Manifest) -> None:
        """Prepare; nothing is allocated before the first piece of a tensor arrives."""
        self._progress = _Progress(manifest)
        self._pending = {}
        self.delivered = 0

    def _new(self, spec: TensorSpec) -> torch.Tensor:
        return torch.empty(spec.shape, dtype=spec.torch_dtype, device=self._device)

    def _assemble(self, position: int, spec: TensorSpec, piece: Piece, view: memoryview) -> bool:
        with self._lock:
            entry = self._pending.setdefault(position, [None, spec.nbytes])
            if entry[0] is None:
                entry[0] = self._new(spec)
        self._copier.copy(_flat_bytes(entry[0]), piece.start, view)
        with self._lock:
            entry[1] -= piece.nbytes
            return bool(entry[1] == 0)

    def write(self, chunk: Chunk, pieces: Sequence[tuple[Piece, memoryview]]) -> None:
        """Deliver every tensor this chunk completes."""
        progress = _require_open(self._progress, "CallbackSink")
        progress.check(chunk, pieces)
        for piece, view in pieces:
            spec = progress.manifest.tensors[piece.tensor]
            if is_whole(progress.manifest, piece):
                tensor = self._new(spec)
                self._copier.copy(_flat_bytes(tensor), 0, view)
            elif self._assemble(piece.tensor, spec, piece, view):
                tensor = self._pending.pop(piece.tensor)[0]
            else:
                continue
            self._deliver(progress.manifest, piece.tensor, tensor)
        progress.mark(chunk)

    def _deliver(self, manifest: Manifest, position: int, tensor: torch.Tensor) -> None:
        positions = (position, *manifest.aliases_of(position))
        for each in positions:
            self._on_tensor(manifest.tensors[each].name, tensor)
        with self._lock:
            self.delivered += len(positions)

    def commit(self) -> int:
        """The number of tensors delivered (all of them)."""
        progress = _require_open(self._progress, "CallbackSink")
        progress.require_complete("CallbackSink")
        return self.delivered

    def abort(self, error: BaseException) -> None:
        """Drop partly assembled tensors."""
        self._pending = {}
        self._progress = None


# --- counting only -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DigestStats:
    """What a DigestSink saw."""

    chunks: int
    tensors: int
    bytes: int


class DigestSink(Sink):
    """Counts chunks, completed tensors and bytes; keeps nothing. For benchmarks."""

    inline_writes = True

    def __init__(self) -> None:
        self._manifest: Manifest | None = None
        self._lock = threading.Lock()
        self.chunks = 0
        self.tensors = 0
        self.bytes = 0

    def open(self, manifest: Manifest) -> None:
        """Reset the counters."""
        self._manifest = manifest
        self.chunks = self.tensors = self.bytes = 0

    def write(self, chunk: Chunk, pieces: Sequence[tuple[Piece, memoryview]]) -> None:
        """Count; a tensor counts when its last byte range arrives (never an alias: it has none)."""
        manifest = self._manifest
        if manifest is None:
            raise PayloadError("DigestSink: open(manifest) must be called first")
        finished = sum(
            1 for piece, _ in pieces if piece.stop == manifest.tensors[piece.tensor].nbytes
        )
        with self._lock:
            self.chunks += 1
            self.tensors += finished
            self.bytes += sum(view.nbytes for _, view in pieces)

    def commit(self) -> DigestStats:
        """The counters."""
        return DigestStats(self.chunks, self.tensors, self.bytes)

    def abort(self, error: BaseException) -> None:
        """Nothing to undo."""
        self._manifest = None
