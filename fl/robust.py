"""Robust aggregation on the streaming aggregator: per-update norm clipping, and the coordinate-wise
trimmed mean or median of the clients' updates.

    RobustOptions(clip_norm=None, trim_fraction=0.0, median=False)
        .active   .rule ("mean", "trimmed_mean", "median")   .check_min_clients(n)
    RobustAggregation(base, layouts, updates, update, options)     a RoundAggregation
    clip_scale(squared_norm, clip_norm) -> float    trim_count(clients, trim_fraction) -> int

Everything works on updates: a client's update is its DIFF, or its FULL model minus the round's
global model (base), computed per slice as RoundAggregation converts modes. The rule's result is
handed to the update rule (FedAvgUpdate, FedAdamUpdate) as a DIFF mean, so the new model is
base + the robust mean update (FedAdam takes it as its pseudo-gradient).

- Clipping (clip_norm = c): client i's update u_i is scaled by s_i = min(1, c / ||u_i||_2), the
  L2 norm taken over all its floating-point tensors together (in float64, over the values as
  stored). Integer and bool tensors (counters such as num_batches_tracked) are neither counted
  nor scaled. A client that dropped out mid-upload is clipped by the norm of what it delivered.
- Mean (no trimming, no median): sum_i w_i s_i u_i / sum_i w_i, weighted by sample count.
- Trimmed mean (trim_fraction = beta in (0, 0.5)), Yin et al. 2018 and Flower's FedTrimmedAvg: per
  coordinate, of the n clients that delivered the tensor, the k = floor(beta * n) largest and k
  smallest (clipped) values are dropped and the other n - 2k averaged, UNWEIGHTED (as Flower
  does: a sample count is the client's own claim, and weighting by it would give a liar back
  the influence trimming takes away). k must be at least 1: a tensor with too few clients to
  trim anything is refused (RobustOptions.check_min_clients refuses such a job up front).
- Median (median = True, Flower's FedMedian): per coordinate the median of the n (clipped)
  values, unweighted; for even n the mean of the two middle values (numpy's median).

Why every client's update is kept: the clip scale needs the norm of the whole update, known only
once the client's last tensor arrived, and the trimmed mean and median need every client's value
of a coordinate at once. So `add()` stores each client's update, tensor by tensor, in `updates`
(a Sums keyed by client and tensor, weight 1: MemorySums in RAM, or FileSums, one file touched
by pread/pwrite), plus each client's running squared norm; when a tensor is finished the clients'
slices are read side by side, scaled, combined and handed to the update rule. Contributors are
taken in sorted order, so the result does not depend on the order the tensors arrived in.

Memory: the stored updates are n_clients x the model's elements x 4 bytes (float32), i.e. n model
copies: in RAM with MemorySums (only for small models), on disk with FileSums (`accumulator_dir`),
where RAM holds a few slices and the kernel's page cache the rest. Finishing a tensor reads one
slice of `slice_elements / n` elements per client (together one 16 MiB slice in float32) and
combines it in a few temporaries of that size (sorting adds int64 indices, reductions run in
float64): well under 100 MiB whatever the model size and the number of clients. finish_tensor()
before the round's end needs, with clipping, every contributor to have delivered every tensor (its
norm is not known before); finish_round() clips each client by what it delivered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from fl.aggregation import RoundAggregation, Sums, TensorLayout, slice_bounds
from fl.model import ParamsType
from fl.server_optimizers import ServerUpdate

# (values: n_clients x slice, weights) -> the combined slice
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RobustOptions:
    """Which robust rule a round uses; the defaults are plain FedAvg."""

    clip_norm: float | None = None
    trim_fraction: float = 0.0
    median: bool = False

    def __post_init__(self) -> None:
        clip = self.clip_norm
        if clip is not None and not (isinstance(clip, int | float) and 0 < clip < math.inf):
            raise ValueError(f"clip_norm must be a positive finite number, got {clip!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if self.median and self.trim_fraction > 0:
            raise ValueError("choose the median or a trimmed mean (trim_fraction), not both")

    @property
    def active(self) -> bool:
        """Whether anything differs from FedAvg's weighted mean."""
        return self.clip_norm is not None or self.rule != "mean"

    @property
    def rule(self) -> str:
        if self.median:
            return "median"
        return "trimmed_mean" if self.trim_fraction > 0 else "mean"

    def check_min_clients(self, min_clients: int) -> None:
        """Refuse a trimmed mean that would trim nothing from a round of min_clients clients."""
        if self.rule == "trimmed_mean" and trim_count(min_clients, self.trim_fraction) < 1:
            needed = math.ceil(1 / self.trim_fraction - 1e-9)
            raise ValueError(
                f"trim_fraction {self.trim_fraction} trims nothing from {min_clients} clients "
                f"(floor({self.trim_fraction} * {min_clients}) = 0): set min_clients >= {needed}"
                " or raise trim_fraction"
            )


def trim_count(clients: int, trim_fraction: float) -> int:
    """Values dropped at each end of a coordinate: floor(trim_fraction * clients), in floating
    point as Flower computes it."""
    return int(trim_fraction * clients)


def clip_scale(squared_norm: float, clip_norm: float) -> float:
    """min(1, clip_norm / ||u||) for an update of that squared L2 norm."""
    if squared_norm <= clip_norm * clip_norm:
        return 1.0
    return clip_norm / math.sqrt(squared_norm)


class RobustAggregation(RoundAggregation):
    """A round whose clients' updates are kept in `updates` and combined by `options` when each
    tensor is finished (see the module docstring)."""

    takes_partial_sums = False  # a relay's sum hides the sites' updates it would compare

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        layouts: Mapping[str, TensorLayout],
        updates: Sums,
        update: ServerUpdate,
        options: RobustOptions,
    ) -> None:
        super().__init__(base, layouts, updates, update)
        self.options = options
        self._ids: dict[str, int] = {}  # client -> the number its stored tensors are keyed by
        self._squares: dict[str, float] = {}  # client -> squared norm of its float tensors
        self._weight_of: dict[tuple[str, str], float] = {}  # (client, name) -> sample count

    def weight(self, name: str) -> float:
        """The sample counts of the clients whose copy of `name` was stored, summed."""
        with self._lock:
            clients = self._contributors.get(name, ())
            return sum(self._weight_of[(client, name)] for client in clients)

    def norm(self, client: str) -> float:
        """The L2 norm of the float tensors `client` delivered (its update, before clipping)."""
        with self._lock:
            return math.sqrt(self._squares.get(client, 0.0))

    def norms(self) -> dict[str, float]:
        """Every client's update norm (before clipping), by client name."""
        with self._lock:
            return {client: math.sqrt(squares) for client, squares in sorted(self._squares.items())}

    def _key(self, client: str, name: str) -> str:
        with self._lock:
            number = self._ids.setdefault(client, len(self._ids))
        return f"{number}/{name}"

    def _fold(
        self, client: str, name: str, tensor: torch.Tensor, weight: float, have: ParamsType
    ) -> None:
        squares = [0.0]
        convert = self._converter(name, have, ParamsType.DIFF)
        counted = tensor.dtype.is_floating_point

        def to_update(start: int, piece: torch.Tensor) -> torch.Tensor:
            value = piece if convert is None else convert(start, piece)
            if counted:
                squares[0] += float(torch.sum(torch.square(value.to(torch.float64))))
            return value

        self.sums.add(self._key(client, name), tensor, 1.0, to_update)
        with self._lock:  # only a tensor stored whole counts towards the norm
            self._squares[client] = self._squares.get(client, 0.0) + squares[0]
            self._weight_of[(client, name)] = weight

    def _update_mode(self) -> ParamsType:
        return ParamsType.DIFF

    def _mean_slices(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        clients = self.contributors(name)  # sorted: the result is independent of arrival order
        layout = self.layouts[name]
        scales = self._scales(clients, layout)
        weights = torch.tensor([self._weight_of[(c, name)] for c in clients], dtype=torch.float64)
        combine = self._combiner(name, len(clients))
        keys = [self._key(client, name) for client in clients]
        step = max(1, self.sums.slice_elements // len(clients))
        width = min(step, layout.numel)
        rows = torch.empty((len(clients), width), dtype=self.sums.accumulate_dtype)
        for start, stop in slice_bounds(layout.numel, step):
            values = rows[:, : stop - start]
            for row, key in enumerate(keys):
                self.sums.read_into(key, start, values[row])
            if scales is not None:
                values.mul_(scales)
            yield start, combine(values, weights)

    def _scales(self, clients: tuple[str, ...], layout: TensorLayout) -> torch.Tensor | None:
        """Each client's clip scale as a column, or None when nothing is scaled."""
        clip = self.options.clip_norm
        if clip is None or not layout.dtype.is_floating_point:
            return None
        with self._lock:
            if not self._closed:  # finish_tensor mid-round: a norm is final only when complete
                pending = [c for c in clients if not self._delivered_all(c)]
                if pending:
                    raise ValueError(
                        f"cannot clip before {pending[0]} delivered every tensor: its norm is "
                        "not known yet (finish the round instead)"
                    )
            factors = [clip_scale(self._squares[client], clip) for client in clients]
        return torch.tensor(factors, dtype=self.sums.accumulate_dtype).unsqueeze(1)

    def _delivered_all(self, client: str) -> bool:
        return all(client in self._contributors.get(name, ()) for name in self.layouts)

    def _combiner(self, name: str, clients: int) -> Combine:
        rule = self.options.rule
        if rule == "median":
            return median
        if rule == "mean":
            return weighted_mean
        trim = trim_count(clients, self.options.trim_fraction)
        if trim < 1:
            raise ValueError(
                f"tensor {name!r} came from {clients} clients: trim_fraction "
                f"{self.options.trim_fraction} trims none of them"
            )
        return lambda values, weights: trimmed_mean(values, trim)


# --- the rules, per slice (values: one row per client) -----------------------------------------


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i, in float64."""
    total = torch.zeros(values.shape[1], dtype=torch.float64)
    for row, weight in zip(values, weights.tolist(), strict=True):
        total.add_(row.to(torch.float64) * weight)
    return total.div_(float(weights.sum()))


def trimmed_mean(values: torch.Tensor, trim: int) -> torch.Tensor:
    """Per column: drop the `trim` smallest and largest values, average the rest (float64)."""
    ordered = torch.sort(values, dim=0).values
    kept = ordered[trim : values.shape[0] - trim]
    return kept.to(torch.float64).sum(dim=0).div_(kept.shape[0])


def median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per column: the middle value, or the mean of the two middle ones (float64)."""
    ordered = torch.sort(values, dim=0).values.to(torch.float64)
    count = values.shape[0]
    if count % 2:
        return ordered[count // 2]
    return (ordered[count // 2 - 1] + ordered[count // 2]) / 2
