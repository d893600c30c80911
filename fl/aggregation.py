"""Streaming aggregation: clients' tensors folded into running sums, the new model written by slice.

The server receives each client's result tensor by tensor, from worker threads, several clients at
once. `RoundAggregation.add()` folds each tensor into a running weighted sum and drops it, so the
server holds at most one model of sums (`MemorySums`) or a few slices (`FileSums`: the sums live in
one file, touched by pread/pwrite), whatever the model size. `finish_round()` then computes the new
global model tensor by tensor and slice by slice through a `ServerUpdate` (the algorithm:
`FedAvgUpdate` or `FedAdamUpdate`, in fl.server_optimizers) and hands each slice to a writer, so the
new model never exists whole in RAM either.

    TensorLayout(shape, dtype)                         one tensor of the global model
    Sums (fl/sums.py, importable from here)            running weighted sums, one per tensor name
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
        .write_sums(write_tensor(name, start, slice)) -> RoundOutcome     a relay's partial sum
        .add(..., partial=True)                        a relay's partial sum, folded as it is
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
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from fl.model import ParamsType
from fl.sums import (
    SLICE_ELEMENTS,
    FileSums,
    MemorySums,
    SliceConvert,
    Sums,
    is_weight,
    pread_into,
    pwrite_from,
    slice_bounds,
    weighted,
)

if TYPE_CHECKING:  # fl.server_optimizers imports this module
    from fl.server_optimizers import ServerUpdate

# The sums live in fl/sums.py; these names are this module's API too.
__all__ = [
    "SLICE_ELEMENTS",
    "FileSums",
    "MemorySums",
    "RoundAggregation",
    "RoundOutcome",
    "SliceConvert",
    "SliceWriter",
    "Sums",
    "TensorLayout",
    "TensorWriter",
    "pread_into",
    "pwrite_from",
    "slice_bounds",
    "weighted",
    "work_dtype",
]

SliceWriter = Callable[[int, torch.Tensor], None]
TensorWriter = Callable[[str, int, torch.Tensor], None]


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

        if not is_weight(weight):
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


# --- helpers ------------------------------------------------------------------------------------


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What base +/- a mean is computed in: float64 for float64 and integer tensors (exact for
    integers below 2**53), float32 otherwise."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


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
