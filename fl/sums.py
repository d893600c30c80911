"""Running weighted sums for streaming aggregation (fl/aggregation.py): one per tensor name,
folded a slice at a time, in RAM (`MemorySums`) or in one file touched by pread/pwrite
(`FileSums`), so temporaries are at most `SLICE_ELEMENTS` elements whatever the model's size.

Determinism: a contribution is folded as product-then-add per slice (`sums[s] += t[s].to(acc) *
w`, never a fused `add_(alpha=)`), so with two clients the sums are bit-identical whatever order
they arrive in (IEEE addition commutes).
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# Elements per slice: 4 Mi float32 = 16 MiB per temporary, whatever the tensor's size.
SLICE_ELEMENTS = 4 * 2**20

# (start_element, slice of the incoming tensor) -> that slice in the round's mode
SliceConvert = Callable[[int, torch.Tensor], torch.Tensor]


# --- sums ----------------------------------------------------------------------------------------


class Sums(ABC):
    """Running weighted sums, one per tensor name, folded a slice at a time; `add()` is safe from
    many threads at once (adds of one name are serialized, different names run in parallel)."""

    def __init__(self, accumulate_dtype: torch.dtype, slice_elements: int) -> None:
        if not accumulate_dtype.is_floating_point:
            raise ValueError(f"accumulate_dtype must be a float dtype, got {accumulate_dtype}")
        if slice_elements < 1:
            raise ValueError(f"slice_elements must be positive, got {slice_elements}")
        self.accumulate_dtype = accumulate_dtype
        self.slice_elements = slice_elements
        self._weights: dict[str, float] = {}
        self._numels: dict[str, int] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._taken: set[str] = set()  # names whose mean was read: a late add must not change it
        self._broken: set[str] = set()  # names whose fold failed half way
        self._registry = threading.Lock()
        self._sealed = False

    def add(
        self,
        name: str,
        tensor: torch.Tensor,
        weight: float,
        convert: SliceConvert | None = None,
        *,
        weighted_already: bool = False,
    ) -> None:
        """Fold `weight * convert(tensor)` (flattened) into the sums of `name`; with
        `weighted_already` (a relay's partial sum) `convert(tensor)` itself, standing for
        `weight`."""
        check_weight(weight)
        flat = tensor.reshape(-1)
        lock = self._claim(name, flat.numel())
        with lock:
            first = name not in self._weights
            try:
                self._fold(name, flat, 1.0 if weighted_already else weight, convert, first)
            except BaseException:
                self._broken.add(name)
                raise
            self._weights[name] = self._weights.get(name, 0.0) + weight

    def weight(self, name: str) -> float:
        """The sum of the weights folded into `name` (0.0 when none was)."""
        return self._weights.get(name, 0.0)

    def names(self) -> list[str]:
        """The names that have sums, in the order their first tensor arrived."""
        return list(self._weights)

    def mean_slices(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(start_element, weighted mean slice in accumulate_dtype) for `name`, once: the sums are
        consumed. A yielded slice is only valid until the next one is asked for."""
        with self._registry:
            if name in self._broken:
                raise RuntimeError(f"the sums of {name!r} are broken: an add failed half way")
            if name in self._taken:
                raise ValueError(f"the mean of {name!r} was already taken")
            if name not in self._weights:
                raise ValueError(f"no tensor {name!r} was added")
            self._taken.add(name)
            lock = self._locks[name]
        with lock:  # an add already folding finishes first
            return self._means(name, self._weights[name])

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Copy the raw sums of `name` from element `start` into the contiguous 1-D `out`
        (accumulate_dtype), without consuming them: fl.robust keeps one client's update per
        name and reads the clients' slices side by side."""
        with self._registry:
            if name in self._broken:
                raise RuntimeError(f"the sums of {name!r} are broken: an add failed half way")
            if name not in self._weights or name in self._taken:
                raise ValueError(f"no sums of {name!r} to read")
            if not 0 <= start <= start + out.numel() <= self._numels[name]:
                raise ValueError(f"elements [{start}, {start + out.numel()}) are not in {name!r}")
            lock = self._locks[name]
        with lock:
            self._read(name, start, out)

    def seal(self) -> None:
        """Refuse further adds; the sums stay readable."""
        with self._registry:
            self._sealed = True

    def close(self) -> None:
        """Refuse further adds and release the sums."""
        self.seal()

    def _claim(self, name: str, numel: int) -> threading.Lock:
        with self._registry:
            if self._sealed or name in self._taken:
                raise ValueError(f"tensor {name!r} arrived after its sums were finished")
            if name in self._broken:
                raise RuntimeError(f"the sums of {name!r} are broken: an add failed half way")
            known = self._numels.setdefault(name, numel)
            if known != numel:
                raise ValueError(f"tensor {name!r} has {numel} elements, expected {known}")
            self._allocate(name, numel)
            return self._locks.setdefault(name, threading.Lock())

    @abstractmethod
    def _allocate(self, name: str, numel: int) -> None:
        """Called under the registry lock on every add; reserve space for a new name."""

    @abstractmethod
    def _fold(
        self,
        name: str,
        flat: torch.Tensor,
        weight: float,
        convert: SliceConvert | None,
        first: bool,
    ) -> None: ...

    @abstractmethod
    def _means(self, name: str, weight: float) -> Iterator[tuple[int, torch.Tensor]]: ...

    @abstractmethod
    def _read(self, name: str, start: int, out: torch.Tensor) -> None: ...


class MemorySums(Sums):
    """Sums in RAM: one flat accumulate_dtype tensor per model tensor, freed as its mean is read."""

    def __init__(
        self, accumulate_dtype: torch.dtype = torch.float32, slice_elements: int = SLICE_ELEMENTS
    ) -> None:
        super().__init__(accumulate_dtype, slice_elements)
        self._sums: dict[str, torch.Tensor] = {}

    def _allocate(self, name: str, numel: int) -> None:
        """Nothing to reserve: the first fold allocates."""

    def _fold(
        self,
        name: str,
        flat: torch.Tensor,
        weight: float,
        convert: SliceConvert | None,
        first: bool,
    ) -> None:
        if first:
            self._sums[name] = torch.empty(flat.numel(), dtype=self.accumulate_dtype)
        total = self._sums[name]
        for start, stop in slice_bounds(flat.numel(), self.slice_elements):
            piece = flat[start:stop]
            if first:  # the product straight into the sums: no temporary
                weighted(piece, start, weight, convert, self.accumulate_dtype, total[start:stop])
            else:
                total[start:stop].add_(weighted(piece, start, weight, convert, total.dtype))

    def _means(self, name: str, weight: float) -> Iterator[tuple[int, torch.Tensor]]:
        total = self._sums.pop(name)
        for start, stop in slice_bounds(total.numel(), self.slice_elements):
            yield start, total[start:stop].div_(weight)

    def _read(self, name: str, start: int, out: torch.Tensor) -> None:
        out.copy_(self._sums[name][start : start + out.numel()])

    def close(self) -> None:
        super().close()
        self._sums.clear()


class FileSums(Sums):
    """Sums in one file (a 64-byte aligned region per tensor), read and written a slice at a time
    with pread/pwrite, so RAM holds a few slices per busy thread whatever the model size. Dirty
    pages sit in the kernel's page cache, which writes them back and reclaims them as it needs."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        accumulate_dtype: torch.dtype = torch.float32,
        slice_elements: int = SLICE_ELEMENTS,
    ) -> None:
        super().__init__(accumulate_dtype, slice_elements)
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._offsets: dict[str, int] = {}
        self._end = 0
        self._itemsize = torch.empty((), dtype=accumulate_dtype).element_size()

    def _allocate(self, name: str, numel: int) -> None:
        if name not in self._offsets:
            self._offsets[name] = self._end
            self._end += -(-numel * self._itemsize // 64) * 64

    def _fold(
        self,
        name: str,
        flat: torch.Tensor,
        weight: float,
        convert: SliceConvert | None,
        first: bool,
    ) -> None:
        region = self._offsets[name]
        sums: torch.Tensor | None = None
        for start, stop in slice_bounds(flat.numel(), self.slice_elements):
            product = weighted(flat[start:stop], start, weight, convert, self.accumulate_dtype)
            offset = region + start * self._itemsize
            if not first:
                if sums is None:
                    sums = torch.empty(product.numel(), dtype=self.accumulate_dtype)
                pread_into(self._fd, sums[: product.numel()], offset)
                product = sums[: product.numel()].add_(product)
            pwrite_from(self._fd, product, offset)

    def _means(self, name: str, weight: float) -> Iterator[tuple[int, torch.Tensor]]:
        numel, region = self._numels[name], self._offsets[name]
        buffer = torch.empty(min(numel, self.slice_elements), dtype=self.accumulate_dtype)
        for start, stop in slice_bounds(numel, self.slice_elements):
            mean = buffer[: stop - start]
            pread_into(self._fd, mean, region + start * self._itemsize)
            yield start, mean.div_(weight)

    def _read(self, name: str, start: int, out: torch.Tensor) -> None:
        pread_into(self._fd, out, self._offsets[name] + start * self._itemsize)

    def close(self) -> None:
        """Refuse further adds, close and delete the sums file."""
        super().close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)


# --- helpers ------------------------------------------------------------------------------------


def slice_bounds(numel: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of each slice of at most `size` elements; one empty slice for numel 0."""
    if numel == 0:
        yield 0, 0
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


def weighted(
    piece: torch.Tensor,
    start: int,
    weight: float,
    convert: SliceConvert | None,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`convert(piece).to(dtype) * weight`, the product rounded on its own (never fused into the
    following add), so a client's contribution is the same bits on every arrival path."""
    if convert is not None:
        piece = convert(start, piece)
    if out is not None:
        return torch.mul(piece.to(dtype), weight, out=out)
    return piece.to(dtype, copy=True).mul_(weight)


def check_weight(weight: float) -> float:
    """A weight must be a positive finite number (a sample count)."""
    if not is_weight(weight):
        raise ValueError(f"an aggregation weight must be positive and finite, got {weight!r}")
    return weight


def is_weight(weight: object) -> bool:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return False
    return math.isfinite(weight) and weight > 0


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def pread_into(fd: int, into: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor `into` from `fd` at byte `offset`."""
    view = _bytes_of(into)
    done = 0
    while done < view.nbytes:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(f"file ended at byte {offset + done}, {view.nbytes - done} bytes short")
        done += count


def pwrite_from(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write the tensor's bytes to `fd` at byte `offset`."""
    view = _bytes_of(tensor.contiguous())
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)
