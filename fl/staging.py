"""Results folded from disk: a relay's bounded-memory way to aggregate its sites' results.

The server's default sink hands each result tensor to the aggregation once it is whole in memory
(CallbackSink), so a site's largest tensor is held per site uploading at once. A relay promises
memory bounded by the windows, so it stages each result in a file as it arrives (the transport's
SafetensorsFileSink: chunks pwritten in place) and folds each tensor into the round the moment its
last byte is on disk, reading it back a slice at a time (`StoredTensor`); the file is deleted when
the transfer ends. The page cache holds the staged bytes; the process holds slices.

A staged result does not resume across a restart of the relay (its gather is gone with it): an
old partial file is removed, never read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fl.model_file import _read_layouts
from transport import Manifest, SafetensorsFileSink

# Called with (tensor name, the tensor as stored) once every byte of it is on disk.
StoredFold = Callable[[str, "StoredTensor"], None]


class StoredTensor:
    """A tensor whose bytes are in a file, read a slice at a time with pread. It offers what
    RoundAggregation and the sums read of an incoming tensor: `shape`, `dtype`, `numel()`,
    `is_complex()`, `reshape(-1)` and flat slices `[start:stop]` (each a new tensor)."""

    def __init__(self, fd: int, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> None:
        self.fd, self.offset, self.dtype = fd, offset, dtype
        self.shape = torch.Size(shape)
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def numel(self) -> int:
        return self.shape.numel()

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def reshape(self, *shape: int) -> StoredTensor:
        if shape not in ((-1,), (self.numel(),)):
            raise ValueError(f"a stored tensor is read flat, not as {shape}")
        return StoredTensor(self.fd, self.offset, self.dtype, (self.numel(),))

    def __getitem__(self, elements: slice) -> torch.Tensor:
        start, stop, step = elements.indices(self.numel())
        if step != 1:
            raise ValueError("a stored tensor is read in contiguous slices")
        out = torch.empty(max(0, stop - start), dtype=self.dtype)
        view = out.view(torch.uint8).numpy().data if out.numel() else memoryview(b"")
        done, at = 0, self.offset + start * self.itemsize
        while done < view.nbytes:
            count = os.preadv(self.fd, [view[done:]], at + done)
            if count == 0:
                raise OSError(f"the staged result ended {view.nbytes - done} bytes short")
            done += count
        return out


class StagedSink(SafetensorsFileSink):
    """A result staged in `path` as it arrives, each tensor (and its aliases) handed to `fold`
    as a StoredTensor once complete; the file is removed when the transfer ends."""

    def __init__(self, path: str | Path, fold: StoredFold) -> None:
        super().__init__(path)
        self._fold = fold
        self._left: list[int] = []
        self._names: list[Sequence[str]] = []
        self._stored: list[StoredTensor] = []
        self._done: set[int] = set()

    def resume(self, transfer_id: str, manifest: Manifest) -> Mapping[int, int]:
        """Never: the folds of an earlier attempt died with it (see the module docstring)."""
        self.partial.unlink(missing_ok=True)
        self.journal.remove()
        return {}

    def open(self, manifest: Manifest) -> None:
        super().open(manifest)
        assert self._fd is not None
        layouts, places, data_start = _read_layouts(self.partial)
        self._left = [spec.nbytes for spec in manifest.tensors]
        self._names = [
            [spec.name, *(manifest.tensors[i].name for i in manifest.aliases_of(position))]
            for position, spec in enumerate(manifest.tensors)
        ]
        self._stored = [
            StoredTensor(
                self._fd,
                data_start + places[spec.name][0],
                layouts[spec.name].dtype,
                layouts[spec.name].shape,
            )
            for spec in manifest.tensors
        ]
        for position, left in enumerate(self._left):
            if left == 0:  # an empty tensor is complete before any chunk
                self._complete(position)

    def write(self, chunk: Any, pieces: Sequence[tuple[Any, memoryview]]) -> None:
        super().write(chunk, pieces)
        for piece, _ in pieces:
            self._left[piece.tensor] -= piece.stop - piece.start
            if self._left[piece.tensor] == 0:
                self._complete(piece.tensor)

    def commit(self) -> int:
        super().commit()
        self.path.unlink(missing_ok=True)
        return len(self._stored)

    def abort(self, error: BaseException) -> None:
        super().abort(error)
        self.partial.unlink(missing_ok=True)
        self.journal.remove()

    def _complete(self, position: int) -> None:
        if position in self._done:  # an empty tensor's empty piece
            return
        self._done.add(position)
        for name in self._names[position]:
            self._fold(name, self._stored[position])
