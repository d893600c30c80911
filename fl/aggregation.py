"""Streaming aggregation: clients' tensors folded into running sums, the new model written by slice.

The server receives each client's result tensor by tensor, from worker threads, several clients at
once. `RoundAggregation.add()` folds each tensor into a running weighted sum and drops it, so the
server holds at most one model of sums (`MemorySums`) or a few slices (`FileSums`: the sums live in
one file, touched by pread/pwrite), whatever the model size. `finish_round()` then computes the new
global model tensor by tensor and slice by slice through a `ServerUpdate` (the algorithm:
`FedAvgUpdate` or `FedAdamUpdate`, in fl.server_optimizers) and hands each slice to a writer, so the
new model never exists whole in RAM either.

    TensorLayout(shape, dtype)                         one tensor of the global model
    Sums                                               running weighted sums, one per tensor name
        MemorySums(accumulate_dtype=float32, slice_elements=SLICE_ELEMENTS)
        FileSums(path, accumulate_dtype=float32, slice_elements=SLICE_ELEMENTS)
        .add(name, tensor, weight, convert=None)       thread-safe; whole tensor or nothing
        .weight(name) -> float   .names()   .seal()   .close()  (FileSums: deletes its file)
        .mean_slices(name) -> Iterator[(start_element, 1-D weighted mean slice)]
        .read_into(name, start_element, out)           the raw sums, not consumed (fl.robust)
    ServerUpdate, FedAvgUpdate, FedAdamUpdate          the algorithm: base + clients' mean -> new
        (defined in fl.server_optimizers, importable from here as well)
    RoundAggregation(base, layouts, sums, update)      one round
        .add(client, name, tensor, weight, params_type)   thread-safe
        .finish_tensor(name, write(start, slice))
        .finish_round(write_tensor(name, start, slice)) -> RoundOutcome   (closes the sums)
        .contributors(name) -> tuple[str, ...]   .weight(name) -> float   .close()
    fl.robust.RobustAggregation keeps each client's update instead (clipping, trimmed mean, median)

Dropouts: each tensor's average is over the clients whose copy of THAT tensor arrived whole (the
weight sums are per tensor). `add()` checks everything it can (name, shape, weight, finite values,
duplicates) before it folds anything, so a client's tensor is either fully added or not at all; a
client that fails half way through its upload counts for the tensors it completed and no others.

Mode: the round's first `add()` fixes FULL or DIFF; a tensor sent in the other mode is converted
against base slice by slice (FULL->DIFF: t - base; DIFF->FULL: base + t; in float32, or float64 for
float64 or integer tensors). Integer and bool tensors are averaged too, then rounded to nearest.

Determinism: a contribution is folded as product-then-add per slice (`sums[s] += t[s].to(acc) *
w`, never a fused `add_(alpha=)`), so with two clients the sums are bit-identical whatever order
they arrive in (IEEE addition commutes). Temporaries are at most `slice_elements` (4 Mi) elements.

Base: a read-only mapping name -> tensor (views of an mmap'd safetensors file in production). Only
slices are read, as `base[name].reshape(-1)[start:stop]`, a view for a contiguous tensor; a
non-contiguous base tensor would be copied whole by that reshape. Incoming tensors likewise.

Writers receive (start_element, 1-D slice in the model's dtype) in increasing order, at least one
call per tensor (an empty tensor gets one empty slice); a slice is only valid during the call.
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fl.model import ParamsType

if TYPE_CHECKING:  # fl.server_optimizers imports this module
    from fl.server_optimizers import ServerUpdate

# Elements per slice: 4 Mi float32 = 16 MiB per temporary, whatever the tensor's size.
SLICE_ELEMENTS = 4 * 2**20

SliceWriter = Callable[[int, torch.Tensor], None]
TensorWriter = Callable[[str, int, torch.Tensor], None]
# (start_element, slice of the incoming tensor) -> that slice in the round's mode
SliceConvert = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TensorLayout:
    """One tensor of the global model."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorLayout:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RoundOutcome:
    """Who counted for what: each tensor's weight sum and its contributing clients (sorted)."""

    mode: ParamsType
    weights: dict[str, float]
    contributors: dict[str, tuple[str, ...]]

    @property
    def clients(self) -> tuple[str, ...]:
        """Every client that contributed at least one tensor."""
        return tuple(sorted({c for names in self.contributors.values() for c in names}))

    @property
    def complete_clients(self) -> tuple[str, ...]:
        """The clients that contributed every tensor."""
        return tuple(c for c in self.clients if all(c in n for n in self.contributors.values()))


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


# --- one round -----------------------------------------------------------------------------------


class RoundAggregation:
    """One round: clients' tensors into `sums`, then `update` writes the new global model."""

    # Whether a relay's partial sum can be folded in (fl.robust needs each site's own update).
    takes_partial_sums = True

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        layouts: Mapping[str, TensorLayout],
        sums: Sums,
        update: ServerUpdate,
    ) -> None:
        self.base, self.layouts = base, dict(layouts)
        self.sums, self.update = sums, update
        self.mode: ParamsType | None = None
        _check_base(base, self.layouts)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # signalled when an add ends
        self._claimed: set[tuple[str, str]] = set()
        self._in_flight: dict[str, int] = {}
        self._contributors: dict[str, list[str]] = {}
        self._finished: set[str] = set()
        self._closed = False

    def add(
        self,
        client: str,
        name: str,
        tensor: torch.Tensor,
        weight: float,
        params_type: ParamsType | str,
        *,
        partial: bool = False,
    ) -> None:
        """Fold `client`'s copy of tensor `name` into the sums, or refuse it whole with a
        ValueError naming client and tensor. A `partial` one is a relay's sum of its sites'
        weighted copies, standing for `weight`: folded as it is (FULL <-> DIFF: -/+ weight x
        base), so the round is the same as with those sites' own copies."""
        have = ParamsType.parse(params_type)
        if partial and not self.takes_partial_sums:
            raise ValueError(
                f"{client}'s partial sum of {name!r}: this aggregation needs each site's own update"
            )
        self._admit(client, name, tensor, weight, have)
        folded = False
        try:
            _check_finite(client, name, tensor, self.sums.slice_elements)
            if partial:
                convert = self._converter(name, have, scale=weight)
                self.sums.add(name, tensor, weight, convert, weighted_already=True)
            else:
                self._fold(client, name, tensor, weight, have)
            folded = True
        finally:
            with self._lock:
                self._in_flight[name] -= 1
                if folded:
                    self._contributors.setdefault(name, []).append(client)
                else:  # refused before folding (or broken sums, which finish reports)
                    self._claimed.discard((client, name))
                self._idle.notify_all()

    def finish_tensor(self, name: str, write: SliceWriter) -> None:
        """Write the new global tensor `name` slice by slice: write(start_element, new slice in
        the model's dtype); its sums are consumed. Refuses a tensor no client delivered."""
        layout = self._close_tensor(name)
        base_flat = self.base[name].reshape(-1)
        mode = self._update_mode()
        self.update.begin_tensor(name, layout)
        for start, mean in self._mean_slices(name):
            base_slice = base_flat[start : start + mean.numel()]
            write(start, self.update.new_slice(name, start, base_slice, mean, mode))

    def finish_round(self, write_tensor: TensorWriter) -> RoundOutcome:
        """Refuse further adds, write every tensor not yet finished (in `layouts` order) through
        write_tensor(name, start_element, slice), end the update's round and close the sums."""
        try:
            with self._lock:
                self._closed = True
                self._idle.wait_for(lambda: not any(self._in_flight.values()))
            pending = [name for name in self.layouts if name not in self._finished]
            missing = [name for name in pending if self.weight(name) <= 0]
            if missing:
                raise ValueError(f"no client delivered {len(missing)} tensors, e.g. {missing[0]!r}")
            try:
                for name in pending:
                    self.finish_tensor(name, partial(write_tensor, name))
            except BaseException:
                self.update.abort_round()
                raise
            self.update.end_round()
            assert self.mode is not None
            return RoundOutcome(self.mode, self.weights(), self.all_contributors())
        finally:
            self.close()

    def write_sums(self, write_tensor: TensorWriter) -> RoundOutcome:
        """What a relay sends upstream instead of finishing the round: refuse further adds and
        write each tensor's raw weighted sum (accumulate dtype; zeros for a tensor no client
        delivered, whose weight is 0) through write_tensor(name, start_element, slice), in
        `layouts` order; closes the sums. ValueError when no client delivered anything."""
        try:
            with self._lock:
                self._closed = True
                self._idle.wait_for(lambda: not any(self._in_flight.values()))
            if self.mode is None:
                raise ValueError("no client delivered any tensor")
            size = self.sums.slice_elements
            buffer = torch.empty(size, dtype=self.sums.accumulate_dtype)
            for name, layout in self.layouts.items():
                delivered = self.weight(name) > 0
                for start, stop in slice_bounds(layout.numel, size):
                    piece = buffer[: stop - start]
                    if delivered:
                        self.sums.read_into(name, start, piece)
                    else:
                        piece.zero_()
                    write_tensor(name, start, piece)
            return RoundOutcome(self.mode, self.weights(), self.all_contributors())
        finally:
            self.close()

    def contributors(self, name: str) -> tuple[str, ...]:
        """The clients whose copy of `name` was added, sorted."""
        with self._lock:
            return tuple(sorted(self._contributors.get(name, ())))

    def all_contributors(self) -> dict[str, tuple[str, ...]]:
        return {name: self.contributors(name) for name in self.layouts}

    def weight(self, name: str) -> float:
        """The weight sum of the copies of `name` added so far."""
        return self.sums.weight(name)

    def weights(self) -> dict[str, float]:
        return {name: self.weight(name) for name in self.layouts}

    def close(self) -> None:
        """Refuse further adds and release the sums (an aborted round calls this)."""
        with self._lock:
            self._closed = True
        self.sums.close()

    def _admit(
        self, client: str, name: str, tensor: torch.Tensor, weight: float, have: ParamsType
    ) -> None:
        def refuse(why: str) -> ValueError:
            return ValueError(f"{client}'s tensor {name!r} {why}")

        if not _is_weight(weight):
            raise refuse(f"has weight {weight!r}; a weight must be positive and finite")
        layout = self.layouts.get(name)
        if layout is None:
            raise refuse("is not in the model")
        if tuple(tensor.shape) != layout.shape:
            raise refuse(f"has shape {tuple(tensor.shape)}, the model's is {layout.shape}")
        if tensor.is_complex():
            raise refuse(f"has dtype {tensor.dtype}; complex tensors are not averaged")
        with self._lock:
            if self._closed or name in self._finished:
                raise refuse("arrived after its aggregation was finished")
            if (client, name) in self._claimed:
                raise refuse("was already added")
            self._claimed.add((client, name))
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
            if self.mode is None:  # the first add decides; later ones are converted to it
                self.mode = have

    def _converter(
        self, name: str, have: ParamsType, want: ParamsType | None = None, scale: float = 1.0
    ) -> SliceConvert | None:
        """Slices sent in mode `have` to mode `want` (the round's by default); None: as sent.
        `scale`: the slices are sums standing for that weight, so base counts that many times."""
        if have is (want or self.mode):
            return None
        base_flat = self.base[name].reshape(-1)
        work = work_dtype(base_flat.dtype)

        def convert(start: int, piece: torch.Tensor) -> torch.Tensor:
            base = base_flat[start : start + piece.numel()].to(work)
            if scale != 1.0:
                base = base * scale  # a new tensor: `base` may be a view of the model
            if have is ParamsType.FULL:  # to DIFF
                return piece.to(work) - base
            return base + piece.to(work)

        return convert

    def _close_tensor(self, name: str) -> TensorLayout:
        layout = self.layouts.get(name)
        if layout is None:
            raise ValueError(f"tensor {name!r} is not in the model")
        with self._lock:
            if name in self._finished:
                raise ValueError(f"tensor {name!r} was already finished")
            self._finished.add(name)  # from here on, adds of it are refused
            self._idle.wait_for(lambda: not self._in_flight.get(name))
        if self.weight(name) <= 0:
            raise ValueError(f"no client delivered tensor {name!r}")
        return layout

    # Hooks fl.robust overrides: how a tensor is kept, and what the update rule is given.

    def _fold(
        self, client: str, name: str, tensor: torch.Tensor, weight: float, have: ParamsType
    ) -> None:
        self.sums.add(name, tensor, weight, self._converter(name, have))

    def _mean_slices(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        return self.sums.mean_slices(name)

    def _update_mode(self) -> ParamsType:
        assert self.mode is not None  # a delivered tensor fixed it
        return self.mode


def __getattr__(name: str) -> object:
    """The server updates, importable from here too: fl.server_optimizers imports this module,
    so they are looked up on first use instead of at import."""
    if name in {"ServerUpdate", "FedAvgUpdate", "FedAdamUpdate", "fedavg_slice"}:
        from fl import server_optimizers

        return getattr(server_optimizers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- helpers -------------------------------------------------------------------------------------


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


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What base +/- a mean is computed in: float64 for float64 and integer tensors (exact for
    integers below 2**53), float32 otherwise."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


def check_weight(weight: float) -> float:
    """A weight must be a positive finite number (a sample count)."""
    if not _is_weight(weight):
        raise ValueError(f"an aggregation weight must be positive and finite, got {weight!r}")
    return weight


def _is_weight(weight: object) -> bool:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return False
    return math.isfinite(weight) and weight > 0


def _check_finite(client: str, name: str, tensor: torch.Tensor, slice_elements: int) -> None:
    if not tensor.dtype.is_floating_point:
        return
    flat = tensor.reshape(-1)
    for start, stop in slice_bounds(flat.numel(), slice_elements):
        if not bool(torch.isfinite(flat[start:stop]).all()):
            raise ValueError(f"{client}'s tensor {name!r} holds NaN or infinite values")


def _check_base(base: Mapping[str, torch.Tensor], layouts: Mapping[str, TensorLayout]) -> None:
    for name, layout in layouts.items():
        if name not in base:
            raise ValueError(f"the base model has no tensor {name!r}")
        if TensorLayout.of(base[name]) != layout:
            found = TensorLayout.of(base[name])
            raise ValueError(f"base tensor {name!r} is {found}, the layout says {layout}")


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
