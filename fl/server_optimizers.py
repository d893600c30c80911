"""Server updates, the algorithms of a round: FedAvg, and FedAdam with its moments in RAM or files.

    ServerUpdate                                  what RoundAggregation calls, per tensor and slice
        .begin_tensor(name, layout)   .end_round()   .abort_round()
        .new_slice(name, start, base_slice, mean_slice, mode) -> new slice in base's dtype
        .save(directory) -> [files]   .load(directory, rounds_done=None)   (no-ops by default)
    FedAvgUpdate()                                FULL: the mean; DIFF: base + mean
    FedAdamUpdate(eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3, *, initial_v=None,
                  moments_dir=None, slice_elements=SLICE_ELEMENTS)
        .rounds_done   .save(directory) -> [json, moments]   .load(directory, rounds_done=None)
        .close()

FedAvg in float32 (float64 for float64 tensors): FULL -> mean cast to the tensor's dtype; DIFF ->
base + mean, cast. Integer and bool tensors: the mean rounded to nearest (torch.round), plus base
for DIFF, computed in float64.

FedAdam is server-side Adam on the clients' averaged update (Reddi et al. 2021, "Adaptive
Federated Optimization", Algorithm 2), per element of each float tensor, without bias correction:

    delta = mean - base (FULL) or mean (DIFF)
    m = beta1 * m + (1 - beta1) * delta
    v = beta2 * v + (1 - beta2) * delta**2
    x = base + eta * m / (sqrt(v) + tau)

m starts at 0 and v at `initial_v`, by default tau**2 (the paper's v_{-1} >= tau^2). Computed in
float32 (float64 for float64 tensors), m and v kept in float32; non-float tensors get FedAvg.

Moments state. A generation is the moments after t rounds: `fedadam-{t:08d}.moments` (per tensor a
64-byte aligned region, m then v, float32) described by `fedadam-{t:08d}.json` (format, t, file,
{name: [offset, numel]}). Without moments_dir the moments live in RAM (two generations during a
round: the one read and the one written). `save(directory)` commits the current generation there
(moments file written as .partial, fsynced and renamed, then the json the same way: the json is
the commit; a file generation is hard-linked instead of copied), keeps the previous generation
and deletes older ones; `load(directory, rounds_done)` continues from one of them.

With moments_dir the moments ARE files there and RAM holds a few slices. Round t+1 reads generation
t and writes `fedadam-{t+1}.moments.partial`; `end_round()` (RoundAggregation.finish_round calls it)
fsyncs and renames it, then writes the json: that rename is the commit. A SIGKILL mid-round leaves
generation t intact (a leftover .partial is overwritten). Generation t is kept until round t+2
commits, so a server whose model checkpoint is one round behind its moments can still resume.

Checkpoints: save after the round's model is durable, and resume with `load(directory,
rounds_done=<rounds the checkpointed model has seen>)`, not the latest: a crash between `save` and
the job's own commit leaves the moments one generation ahead of the model, and the previous
generation is there for exactly that.
"""

from __future__ import annotations

import json
import os
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from fl.aggregation import (
    SLICE_ELEMENTS,
    TensorLayout,
    pread_into,
    pwrite_from,
    slice_bounds,
    work_dtype,
)
from fl.model import ParamsType

MOMENTS_FORMAT = "tensorwire-fedadam-moments/1"
_GENERATION_FILE = re.compile(r"fedadam-(\d{8})\.(json|moments|moments\.partial)$")
_FLOAT32 = torch.float32


class ServerUpdate(ABC):
    """How a tensor's new global value follows from base and the clients' weighted mean."""

    def begin_tensor(self, name: str, layout: TensorLayout) -> None:  # noqa: B027 (optional hook)
        """Called before the first slice of `name` in a round."""

    @abstractmethod
    def new_slice(
        self,
        name: str,
        start: int,
        base_slice: torch.Tensor,
        mean_slice: torch.Tensor,
        mode: ParamsType,
    ) -> torch.Tensor:
        """The new global values of elements [start, start + len) of `name`, in base's dtype.
        `mean_slice` is the clients' weighted mean (of FULL models or of DIFFs, per `mode`)."""

    def end_round(self) -> None:  # noqa: B027 (optional hook)
        """Called once every tensor of the round has been written."""

    def abort_round(self) -> None:  # noqa: B027 (optional hook)
        """Called when finishing the round failed: forget what it began."""

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the update's state for a checkpoint into `directory`; the files written."""
        return []

    def load(self, directory: str | os.PathLike[str], rounds_done: int | None = None) -> None:
        """Continue from the state `save()` wrote after `rounds_done` rounds (the latest: None)."""
        return None


class FedAvgUpdate(ServerUpdate):
    """FedAvg: the new model is the clients' weighted mean (FULL) or base + that mean (DIFF)."""

    def new_slice(
        self,
        name: str,
        start: int,
        base_slice: torch.Tensor,
        mean_slice: torch.Tensor,
        mode: ParamsType,
    ) -> torch.Tensor:
        return fedavg_slice(base_slice, mean_slice, mode)


def fedavg_slice(base: torch.Tensor, mean: torch.Tensor, mode: ParamsType) -> torch.Tensor:
    """FedAvg of one slice in base's dtype; integer and bool means are rounded to nearest."""
    dtype = base.dtype
    if not dtype.is_floating_point:
        step = torch.round(mean.to(torch.float64))
        if mode is ParamsType.DIFF:
            step.add_(base.to(torch.float64))
        return step.to(dtype)
    if mode is ParamsType.FULL:
        return mean.to(dtype)
    work = work_dtype(dtype)
    return (base.to(work) + mean.to(work)).to(dtype)


class FedAdamUpdate(ServerUpdate):
    """FedAdam (see the module docstring); moments in RAM, or in files under `moments_dir`."""

    def __init__(
        self,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        *,
        initial_v: float | None = None,
        moments_dir: str | os.PathLike[str] | None = None,
        slice_elements: int = SLICE_ELEMENTS,
    ) -> None:
        if not (eta > 0 and tau > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(
                f"FedAdam needs eta, tau > 0 and betas in [0, 1), got eta={eta}, tau={tau}, "
                f"beta1={beta1}, beta2={beta2}"
            )
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.initial_v = tau**2 if initial_v is None else initial_v
        directory = Path(moments_dir) if moments_dir is not None else None
        self.moments = _Moments(directory, slice_elements)

    @property
    def rounds_done(self) -> int:
        """Rounds whose moments are committed (the t of the current generation)."""
        return self.moments.rounds_done

    def begin_tensor(self, name: str, layout: TensorLayout) -> None:
        if layout.dtype.is_floating_point:
            self.moments.begin_tensor(name, layout.numel)

    def new_slice(
        self,
        name: str,
        start: int,
        base_slice: torch.Tensor,
        mean_slice: torch.Tensor,
        mode: ParamsType,
    ) -> torch.Tensor:
        if not base_slice.dtype.is_floating_point:
            return fedavg_slice(base_slice, mean_slice, mode)
        m, v = self.moments.read(name, start, base_slice.numel(), self.initial_v)
        new, m, v = self.step(base_slice, mean_slice, m, v, mode)
        self.moments.write(name, start, m, v)
        return new

    def step(
        self,
        base: torch.Tensor,
        mean: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        mode: ParamsType,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new slice in base's dtype, new m, new v) for one slice. In place on fresh copies so
        a slice costs a few temporaries; every product is rounded before its add (no fused
        multiply-add), so a resumed run computes the same bits."""
        work = work_dtype(base.dtype)
        base_work = base.to(work)
        delta = mean.to(work, copy=True)
        if mode is ParamsType.FULL:
            delta.sub_(base_work)
        m = m.to(work, copy=True).mul_(self.beta1).add_(delta * (1 - self.beta1))
        v = v.to(work, copy=True).mul_(self.beta2).add_(delta.square_().mul_(1 - self.beta2))
        denominator = v.sqrt().add_(self.tau)
        new = torch.mul(m, self.eta).div_(denominator).add_(base_work)
        return new.to(base.dtype), m.to(_FLOAT32), v.to(_FLOAT32)

    def end_round(self) -> None:
        """Commit this round's moments (see the module docstring)."""
        self.moments.end_round()

    def abort_round(self) -> None:
        self.moments.abort_round()

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the committed moments to `directory` (between rounds), keeping the previous
        generation there and deleting older ones; returns the json and the moments file. File
        moments are hard-linked (they are immutable once committed), copied across file systems;
        with moments_dir == directory they are already there."""
        return self.moments.save(Path(directory))

    def load(self, directory: str | os.PathLike[str], rounds_done: int | None = None) -> None:
        """Continue from the generation saved in `directory` after `rounds_done` rounds (the
        latest there when None); a round in progress is dropped."""
        self.moments.load(Path(directory), rounds_done)

    def close(self) -> None:
        """Close the moment files (they stay on disk)."""
        self.moments.close()


# --- moment generations ------------------------------------------------------------------------


class _Generation(ABC):
    """The moments after some round: m and v, float32, per tensor name."""

    numels: dict[str, int]

    @abstractmethod
    def allocate(self, name: str, numel: int) -> None: ...

    @abstractmethod
    def read(self, name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def write(self, name: str, start: int, m: torch.Tensor, v: torch.Tensor) -> None: ...

    def close(self) -> None:
        """Release what the generation holds open."""
        return None


class _MemoryGeneration(_Generation):
    def __init__(self) -> None:
        self.numels = {}
        self._tensors: dict[str, torch.Tensor] = {}  # [m | v] per name

    def allocate(self, name: str, numel: int) -> None:
        if name not in self.numels:
            self.numels[name] = numel
            self._tensors[name] = torch.empty(2 * numel, dtype=_FLOAT32)

    def read(self, name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        moments, numel = self._tensors[name], self.numels[name]
        return moments[start : start + count], moments[numel + start : numel + start + count]

    def write(self, name: str, start: int, m: torch.Tensor, v: torch.Tensor) -> None:
        moments, numel = self._tensors[name], self.numels[name]
        moments[start : start + m.numel()].copy_(m)
        moments[numel + start : numel + start + v.numel()].copy_(v)


class _FileGeneration(_Generation):
    """A moments file read and written by slices with pread/pwrite."""

    def __init__(
        self, path: Path, regions: dict[str, list[int]] | None = None, writable: bool = False
    ) -> None:
        self.path = path
        self.offsets = {name: offset for name, (offset, _) in (regions or {}).items()}
        self.numels = {name: numel for name, (_, numel) in (regions or {}).items()}
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC if writable else os.O_RDONLY
        self._fd = os.open(path, flags, 0o600)
        self._end = max((o + 8 * self.numels[n] for n, o in self.offsets.items()), default=0)
        if not writable and os.fstat(self._fd).st_size < self._end:  # empty tensors: no bytes
            ends = [o + 8 * self.numels[n] for n, o in self.offsets.items() if self.numels[n]]
            if os.fstat(self._fd).st_size < max(ends, default=0):
                os.close(self._fd)
                raise ValueError(f"{path} is shorter than its json says ({max(ends)} bytes)")

    def allocate(self, name: str, numel: int) -> None:
        if name not in self.numels:
            self.offsets[name], self.numels[name] = self._end, numel
            self._end += -(-8 * numel // 64) * 64

    def read(self, name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, v = torch.empty(count, dtype=_FLOAT32), torch.empty(count, dtype=_FLOAT32)
        pread_into(self._fd, m, self._byte(name, start))
        pread_into(self._fd, v, self._byte(name, self.numels[name] + start))
        return m, v

    def write(self, name: str, start: int, m: torch.Tensor, v: torch.Tensor) -> None:
        pwrite_from(self._fd, m, self._byte(name, start))
        pwrite_from(self._fd, v, self._byte(name, self.numels[name] + start))

    def regions(self) -> dict[str, list[int]]:
        return {name: [self.offsets[name], self.numels[name]] for name in self.numels}

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _byte(self, name: str, element: int) -> int:
        return self.offsets[name] + 4 * element


class _Moments:
    """The committed generation (read) and the round's pending one (written)."""

    def __init__(self, directory: Path | None, slice_elements: int) -> None:
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.slice_elements = slice_elements
        self.current: _Generation | None = None
        self.pending: _Generation | None = None
        self.rounds_done = 0
        self._lock = threading.Lock()  # finish_tensor may run for several tensors at once

    def begin_tensor(self, name: str, numel: int) -> None:
        with self._lock:
            if self.pending is None:
                self.pending = self._new_generation(self.rounds_done + 1)
            self.pending.allocate(name, numel)

    def read(
        self, name: str, start: int, count: int, initial_v: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.pending is not None, "begin_tensor first"
        current = self.current
        if current is None or current.numels.get(name) != self.pending.numels[name]:
            return torch.zeros(count, dtype=_FLOAT32), torch.full(
                (count,), initial_v, dtype=_FLOAT32
            )
        return current.read(name, start, count)

    def write(self, name: str, start: int, m: torch.Tensor, v: torch.Tensor) -> None:
        assert self.pending is not None
        self.pending.write(name, start, m, v)

    def end_round(self) -> None:
        with self._lock:
            rounds = self.rounds_done + 1
            pending = self.pending or self._new_generation(rounds)
            self.pending = None
            if isinstance(pending, _FileGeneration):
                assert self.directory is not None
                _publish(pending, self.directory, rounds)
                _prune(self.directory, keep={rounds - 1, rounds})
            self._replace_current(pending, rounds)

    def save(self, directory: Path) -> list[Path]:
        with self._lock:
            if self.pending is not None:
                raise RuntimeError("save the FedAdam moments between rounds, not during one")
            rounds, current = self.rounds_done, self.current
            directory.mkdir(parents=True, exist_ok=True)
            if isinstance(current, _FileGeneration) and _same_dir(current.path.parent, directory):
                return [directory / _json_name(rounds), current.path]
            written = _transfer(
                current or _MemoryGeneration(), directory, rounds, self.slice_elements
            )
            _prune(directory, keep={rounds - 1, rounds})
            return written

    def load(self, directory: Path, rounds_done: int | None) -> None:
        rounds = _latest(directory) if rounds_done is None else rounds_done
        fresh = rounds == 0 and not (directory / _json_name(0)).exists()  # before any round
        source = None if fresh else _open_generation(directory, rounds)
        with self._lock:
            self._drop_pending()
            if self.directory is not None:  # later generations are a future that did not happen
                _prune(self.directory, keep={rounds}, above=rounds)
            self._replace_current(self._adopt(source, rounds), rounds)

    def _adopt(self, source: _FileGeneration | None, rounds: int) -> _Generation | None:
        """`source` as this store's generation `rounds`: itself when it is in moments_dir, else
        copied to RAM or linked (copied) into moments_dir."""
        if source is None:
            return None
        if self.directory is not None and _same_dir(source.path.parent, self.directory):
            return source
        try:
            if self.directory is None:
                in_memory = _MemoryGeneration()
                _copy(source, in_memory, self.slice_elements)
                return in_memory
            _transfer(source, self.directory, rounds, self.slice_elements)
            return _FileGeneration(self.directory / _moments_name(rounds), source.regions())
        finally:
            source.close()

    def abort_round(self) -> None:
        with self._lock:
            self._drop_pending()

    def close(self) -> None:
        with self._lock:
            self._drop_pending()
            if self.current is not None:
                self.current.close()

    def _new_generation(self, rounds: int) -> _Generation:
        if self.directory is None:
            return _MemoryGeneration()
        return _FileGeneration(self.directory / _partial_name(rounds), writable=True)

    def _replace_current(self, generation: _Generation | None, rounds: int) -> None:
        if self.current is not None:
            self.current.close()
        self.current, self.rounds_done = generation, rounds

    def _drop_pending(self) -> None:
        if self.pending is not None:
            self.pending.close()
            if isinstance(self.pending, _FileGeneration):
                self.pending.path.unlink(missing_ok=True)
            self.pending = None


# --- files ---------------------------------------------------------------------------------------


def _json_name(rounds: int) -> str:
    return f"fedadam-{rounds:08d}.json"


def _moments_name(rounds: int) -> str:
    return f"fedadam-{rounds:08d}.moments"


def _partial_name(rounds: int) -> str:
    return _moments_name(rounds) + ".partial"


def _copy(source: _Generation, target: _Generation, slice_elements: int) -> None:
    for name, numel in source.numels.items():
        target.allocate(name, numel)
        for start, stop in slice_bounds(numel, slice_elements):
            target.write(name, start, *source.read(name, start, stop - start))


def _transfer(source: _Generation, directory: Path, rounds: int, slice_elements: int) -> list[Path]:
    """Commit generation `rounds` in `directory` with `source`'s moments: a hard link to a
    committed file (they never change), else a slice by slice copy."""
    final = directory / _moments_name(rounds)
    if isinstance(source, _FileGeneration):
        try:
            final.unlink(missing_ok=True)
            os.link(source.path, final)
        except OSError:  # another file system, or no hard links there
            pass
        else:
            _fsync_dir(directory)
            return [_describe(directory, rounds, final, source.regions()), final]
    target = _FileGeneration(directory / _partial_name(rounds), writable=True)
    try:
        _copy(source, target, slice_elements)
        return _publish(target, directory, rounds)
    finally:
        target.close()


def _publish(generation: _FileGeneration, directory: Path, rounds: int) -> list[Path]:
    """Make a written .partial generation durable, then commit it by writing its json."""
    generation.sync()
    final = directory / _moments_name(rounds)
    os.replace(generation.path, final)
    generation.path = final
    return [_describe(directory, rounds, final, generation.regions()), final]


def _describe(directory: Path, rounds: int, moments: Path, regions: dict[str, list[int]]) -> Path:
    """Write the json that commits generation `rounds` (atomically: it is the commit)."""
    described = {
        "format": MOMENTS_FORMAT,
        "rounds_done": rounds,
        "moments": moments.name,
        "tensors": regions,
    }
    path = directory / _json_name(rounds)
    _write_atomically(path, json.dumps(described).encode())
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(directory: Path, keep: set[int], above: int | None = None) -> None:
    """Delete generation files not in `keep` (only those above `above` when it is given)."""
    for path in directory.iterdir():
        match = _GENERATION_FILE.fullmatch(path.name)
        if match is None:
            continue
        rounds = int(match.group(1))
        if rounds not in keep and (above is None or rounds > above):
            path.unlink(missing_ok=True)


def _open_generation(directory: Path, rounds: int) -> _FileGeneration:
    path = directory / _json_name(rounds)
    described = json.loads(path.read_text())
    if described.get("format") != MOMENTS_FORMAT or described.get("rounds_done") != rounds:
        raise ValueError(f"{path} does not describe FedAdam moments after round {rounds}")
    return _FileGeneration(directory / described["moments"], described["tensors"])


def _latest(directory: Path) -> int:
    committed = [
        int(match.group(1))
        for path in directory.glob("fedadam-*.json")
        if (match := _GENERATION_FILE.fullmatch(path.name))
    ]
    if not committed:
        raise FileNotFoundError(f"no FedAdam moments in {directory}")
    return max(committed)


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()
