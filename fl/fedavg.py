"""FedAvg (and FedAdam) on the Controller API: aggregation as results stream in, 1x server memory,
job state that survives a restart.

Each round the global model is a safetensors file in the job's state directory, sent to the
sampled clients by mmap. Every client's result is folded tensor by tensor into a
`RoundAggregation` (fl/aggregation.py: weighted sums in memory or in a file, and the algorithm's
update rule), and the next global model is written slice by slice into a new file. The server
therefore holds no model in anonymous memory: at most one model of sums (memory sums) or a few
16 MiB slices (file sums, `accumulator_dir`), plus the transport's windows.

After every round (and when a round starts: which clients it sampled) the job state is written
atomically (fl/job_state.py). A server started again with the same state directory continues the
round it was in: it sends the same task again (same transfer ids, so the clients' downloads resume
and their uploads in flight are taken), and asks a client that had already delivered its result
to the lost server process to send it again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl.aggregation import FileSums, MemorySums, RoundAggregation, Sums
from fl.controller import Controller, Gathered
from fl.job_state import JobState, load_state, model_name, remove_stale_models, save_state
from fl.model import FLModel
from fl.model_file import ModelFile, ModelFileWriter, copy_file, write_model_file
from fl.results import DEFAULT_MAX_SAMPLE_COUNT, ResultRules
from fl.robust import RobustAggregation, RobustOptions
from fl.server_optimizers import FedAvgUpdate, ServerUpdate
from transport import SafetensorsSource

log = logging.getLogger(__name__)

# A model in memory, a safetensors file, or a function that builds the model's state dict (called
# only when the job starts fresh: a restarted server does not build a model it would throw away).
InitialModel = FLModel | str | Path | Callable[[], Mapping[str, torch.Tensor]]


@dataclass
class RoundReport:
    """What one round did."""

    round: int
    clients: list[str]
    succeeded: list[str]
    failed: dict[str, str]
    bytes_sent: int
    bytes_received: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput_mb_s(self) -> float:
        return (self.bytes_sent + self.bytes_received) / max(self.seconds, 1e-9) / 1e6


class FedAvg(Controller):
    """Federated averaging weighted by sample count, FULL or DIFF updates, streaming.

    `state_dir` keeps the job state and the global model files (None: a temporary directory,
    removed when the job ends; nothing survives a restart then). `accumulator_dir` puts the
    sums in files there instead of RAM.

    `round_timeout` (None: no deadline, progress-aware waiting) ends each round's gather: sites
    without a result by then fail the round, and min_clients decides whether it counts.
    `cast_dtypes` and `max_sample_count` are the result rules (fl.results.ResultRules).

    Robust aggregation (fl/robust.py): `clip_norm` scales each client's update to at most that L2
    norm; `trim_fraction` (0 <= beta < 0.5) replaces the weighted mean by the coordinate-wise
    trimmed mean of the updates, `median=True` by their coordinate-wise median (both unweighted).
    Every client's update is then kept until the round ends: in RAM, or in a file under
    `accumulator_dir` (a model's size per client on disk)."""

    def __init__(
        self,
        initial_model: InitialModel,
        *,
        rounds: int = 3,
        num_clients: int | None = None,
        min_clients: int = 1,
        wait_after_min: float | None = None,
        round_timeout: float | None = None,
        cast_dtypes: bool = True,
        max_sample_count: float = DEFAULT_MAX_SAMPLE_COUNT,
        join_timeout: float = 60.0,
        state_dir: str | Path | None = None,
        accumulator_dir: str | Path | None = None,
        accumulate_dtype: torch.dtype = torch.float32,
        clip_norm: float | None = None,
        trim_fraction: float = 0.0,
        median: bool = False,
        evaluate: Callable[[FLModel], Mapping[str, float]] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        on_tensor: Callable[[str, str, torch.Tensor], None] | None = None,
        on_round_start: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        if isinstance(initial_model, FLModel) and initial_model.params is None:
            raise ValueError("FedAvg needs an initial model with params")
        if rounds < 1 or min_clients < 1:
            raise ValueError(f"rounds and min_clients must be >= 1, got {rounds}, {min_clients}")
        self.initial_model = initial_model
        self.rounds = rounds
        self.num_clients = num_clients
        self.min_clients = min_clients
        if round_timeout is not None and round_timeout <= 0:
            raise ValueError(f"round_timeout must be positive, got {round_timeout}")
        if not max_sample_count > 0:
            raise ValueError(f"max_sample_count must be positive, got {max_sample_count}")
        self.wait_after_min = wait_after_min
        self.round_timeout = round_timeout
        self.rules = ResultRules(cast_dtypes=cast_dtypes, max_sample_count=max_sample_count)
        self.join_timeout = join_timeout
        if state_dir is None:  # nothing to resume from: removed once this object is gone
            state_dir = tempfile.mkdtemp(prefix="fl-job-")
            weakref.finalize(self, shutil.rmtree, state_dir, True)
        self.state_dir = Path(state_dir)
        self.accumulator_dir = Path(accumulator_dir) if accumulator_dir else None
        self.accumulate_dtype = accumulate_dtype
        self.robust = RobustOptions(clip_norm, trim_fraction, median)
        self.robust.check_min_clients(min_clients)
        self.evaluate = evaluate
        self.on_round = on_round
        self.on_tensor = on_tensor  # (client, tensor name, tensor): progress display
        self.on_round_start = on_round_start  # (round, sampled clients): progress display
        self.update: ServerUpdate = self.new_update()
        self.history: list[RoundReport] = []
        self.state: JobState | None = None
        self._global: ModelFile | None = None
        self.resumed_from: int | None = None  # the round a restarted job continued from

    def new_update(self) -> ServerUpdate:
        """The rule that turns the clients' weighted mean into the next global model."""
        return FedAvgUpdate()

    # --- the job ---------------------------------------------------------------------------------

    async def run(self) -> None:
        # Opening a new job writes the initial model (gigabytes): not on the event loop, whose
        # heartbeat answers tell the clients the server is alive.
        state = self.state or await asyncio.to_thread(self.open_state)
        while state.round < self.rounds:
            report = await self.run_round(state.round)
            if self.on_round is not None:
                self.on_round(report)
        self._finish(state)

    def open_state(self) -> JobState:
        """The saved state of this job (a restart) or a new one with the initial model."""
        if self.state is not None:
            return self.state
        self.state_dir.mkdir(parents=True, exist_ok=True)
        job = self.server.job
        state = load_state(self.state_dir, job)
        if state is None:
            state = JobState(job=job, rounds=self.rounds)
            self._store_initial_model(self.state_dir / model_name(0))
            save_state(self.state_dir, state)
        else:
            self.resumed_from = state.round
            self.history = [RoundReport(**entry) for entry in state.history]
            self.update.load(self.state_dir, rounds_done=state.round)
            log.info("job %s: continuing from round %d of %d", job, state.round + 1, self.rounds)
        # From here on the model is its file: let go of the one in memory (the server's
        # anonymous memory must not hold a model for the whole job).
        self.initial_model = state.model_path(self.state_dir)
        state.rounds = self.rounds
        self.state = state
        remove_stale_models(self.state_dir, {state.model})
        return state

    def _store_initial_model(self, path: Path) -> None:
        initial = self.initial_model
        if callable(initial):
            write_model_file(path, initial())
        elif isinstance(initial, FLModel):
            if not isinstance(initial.params, Mapping):
                raise TypeError("the initial model must be a state dict or a safetensors file")
            write_model_file(path, initial.params)
        else:
            ModelFile(initial)  # refuse a file that is not a readable safetensors model
            copy_file(Path(initial), path)

    @property
    def finished(self) -> bool:
        return self.state is not None and self.state.finished

    def _finish(self, state: JobState) -> None:
        if not state.finished:
            state.finished = True
            save_state(self.state_dir, state)

    # --- one round -------------------------------------------------------------------------------

    async def run_round(self, number: int) -> RoundReport:
        """Sample (or, resuming, take the saved sample), send, gather into the sums, write the
        next global model, save the state."""
        state = self.open_state()
        started = time.perf_counter()
        clients = await self._round_clients(state)
        if self.on_round_start is not None:
            self.on_round_start(number, clients)
        model = self.global_model()
        source = SafetensorsSource(model.path, chunk_size=self.server.endpoint.config.chunk_size)
        outgoing = FLModel(params=source, current_round=number, total_rounds=self.rounds)
        task = self.send_model(outgoing, clients, task_id=f"{state.job}/round-{number}")
        aggregation = self._new_aggregation(number, model)
        try:
            gathered = await self.gather(
                task,
                aggregation,
                min_clients=self.min_clients,
                wait_after_min=self.wait_after_min,
                round_timeout=self.round_timeout,
                rules=self.rules,
                on_tensor=self.on_tensor,
            )
            next_model = self.state_dir / model_name(number + 1)
            await asyncio.to_thread(self._write_next_model, aggregation, model, next_model)
        finally:
            aggregation.close()
            source.close()
        report = self._report(number, clients, gathered, time.perf_counter() - started)
        if isinstance(aggregation, RobustAggregation):  # what an operator picks clip_norm from
            report.extra["update_norms"] = aggregation.norms()
        self._advance(state, report)
        return report

    async def _round_clients(self, state: JobState) -> list[str]:
        if state.round_clients is not None:  # resuming: the clients this round was sent to
            await self.server.wait_for_clients_named(state.round_clients, self.join_timeout)
            return list(state.round_clients)
        clients = await self.sample_clients(
            self.num_clients, min_clients=self.min_clients, join_timeout=self.join_timeout
        )
        state.round_clients = clients
        state.sites = sorted(set(state.sites) | set(clients))
        save_state(self.state_dir, state)
        return clients

    def _new_aggregation(self, number: int, model: ModelFile) -> RoundAggregation:
        """The round's aggregation: weighted sums, or every client's update kept for a robust
        rule. A round restarted after a kill reuses (truncates) the same file."""
        robust = self.robust.active
        sums = self._new_sums(f"{'updates' if robust else 'sums'}-{number}.bin")
        try:
            if robust:
                return RobustAggregation(
                    model.tensors(), model.layouts, sums, self.update, self.robust
                )
            return RoundAggregation(model.tensors(), model.layouts, sums, self.update)
        except BaseException:
            sums.close()
            raise

    def _new_sums(self, file_name: str) -> Sums:
        if self.accumulator_dir is None:
            return MemorySums(self.accumulate_dtype)
        self.accumulator_dir.mkdir(parents=True, exist_ok=True)
        return FileSums(self.accumulator_dir / file_name, self.accumulate_dtype)

    def _write_next_model(
        self, aggregation: RoundAggregation, model: ModelFile, path: Path
    ) -> None:
        """Finish every tensor into a new model file (slice by slice), then commit the update
        rule's own state (FedAdam's moments) beside it."""
        writer = ModelFileWriter(path, model.layouts)
        try:
            aggregation.finish_round(writer.write)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        self.update.save(self.state_dir)

    def _advance(self, state: JobState, report: RoundReport) -> None:
        """The round is over: its model becomes the global one, atomically with the state."""
        self.history.append(report)
        state.history.append(_jsonable(asdict(report)))
        state.round = report.round + 1
        state.model = model_name(state.round)
        state.round_clients = None
        save_state(self.state_dir, state)
        self._global = None
        remove_stale_models(self.state_dir, {state.model})
        if self.evaluate is not None:
            report.metrics.update(self.evaluate(self.model))
            state.history[-1]["metrics"] = dict(report.metrics)
            save_state(self.state_dir, state)

    # --- the global model ------------------------------------------------------------------------

    def global_model(self) -> ModelFile:
        """The current global model's file (mmap'd)."""
        state = self.open_state() if self.state is None else self.state
        if self._global is None or self._global.path.name != state.model:
            self._global = ModelFile(state.model_path(self.state_dir))
        return self._global

    @property
    def model(self) -> FLModel:
        """The current global model; its params are views of the model file's mmap."""
        if self.state is None:
            return FLModel(params=self._initial_tensors())
        return FLModel(params=self.global_model().tensors())

    def model_bytes(self) -> int:
        """Tensor bytes of the global model (what each sampled site receives)."""
        if self.state is None:
            return sum(int(tensor.nbytes) for tensor in self._initial_tensors().values())
        return self.global_model().nbytes

    def _initial_tensors(self) -> Mapping[str, torch.Tensor]:
        """The initial model before the job started (built, if it is a builder)."""
        initial = self.initial_model
        if isinstance(initial, FLModel):
            assert isinstance(initial.params, Mapping)
            return initial.params
        if callable(initial):
            return initial()
        return ModelFile(initial).tensors()

    def save_final(self, path: str | Path) -> Path:
        """Copy the final global model to `path` (atomically)."""
        return self.global_model().copy_to(path)

    def _report(
        self, number: int, clients: list[str], gathered: Gathered, seconds: float
    ) -> RoundReport:
        return RoundReport(
            round=number,
            clients=clients,
            succeeded=sorted(gathered.models),
            failed=dict(gathered.failed),
            bytes_sent=gathered.bytes_sent,
            bytes_received=gathered.bytes_received,
            seconds=seconds,
            metrics=_weighted_metrics(gathered.models),
            client_metrics={name: dict(m.metrics) for name, m in gathered.models.items()},
        )


def _weighted_metrics(models: Mapping[str, FLModel]) -> dict[str, float]:
    """Each metric averaged over clients, weighted by sample count."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for model in models.values():
        weight = model.sample_count
        for name, value in model.metrics.items():
            sums[name] = sums.get(name, 0.0) + weight * value
            weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sums}


def _jsonable(report: dict[str, Any]) -> dict[str, Any]:
    """A round report as plain JSON (metrics may hold NaN, which JSON writes as NaN)."""
    report["extra"] = {key: value for key, value in report["extra"].items() if _plain(value)}
    return report


def _plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)
