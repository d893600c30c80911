"""FedAvg on the Controller API, aggregating tensor by tensor as results stream in.

Each client's result is received into a CallbackSink whose callback folds the tensor into a
running weighted sum (weights: each client's sample count) and lets it go. The server therefore
holds the current global model plus one model's worth of sums plus the transport window, whatever
the number of clients; with `accumulator_dir` the sums live in a file and the new global model is
written there too, so a server can aggregate a model larger than its RAM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl.aggregation import (
    Accumulator,
    BaseLookup,
    FileAccumulator,
    MemoryAccumulator,
    as_params_type,
)
from fl.controller import Controller
from fl.model import FLModel, ParamsType, params_nbytes
from fl.protocol import ResultInfo
from fl.server import ClientResult
from transport import CallbackSink, IncomingTransfer, SafetensorsSource, Sink, Source

log = logging.getLogger(__name__)


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
    """Federated averaging weighted by sample count, FULL or DIFF updates, streaming."""

    def __init__(
        self,
        initial_model: FLModel,
        *,
        rounds: int = 3,
        num_clients: int | None = None,
        min_clients: int = 1,
        wait_after_min: float | None = None,
        join_timeout: float = 60.0,
        accumulator_dir: str | Path | None = None,
        accumulate_dtype: torch.dtype = torch.float32,
        evaluate: Callable[[FLModel], Mapping[str, float]] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        on_tensor: Callable[[str, str, torch.Tensor], None] | None = None,
        on_round_start: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        if initial_model.params is None:
            raise ValueError("FedAvg needs an initial model with params")
        if rounds < 1 or min_clients < 1:
            raise ValueError(f"rounds and min_clients must be >= 1, got {rounds}, {min_clients}")
        self.model = initial_model
        self.rounds = rounds
        self.num_clients = num_clients
        self.min_clients = min_clients
        self.wait_after_min = wait_after_min
        self.join_timeout = join_timeout
        self.accumulator_dir = Path(accumulator_dir) if accumulator_dir else None
        self.accumulate_dtype = accumulate_dtype
        self.evaluate = evaluate
        self.on_round = on_round
        self.on_tensor = on_tensor  # (client, tensor name, tensor): progress display
        self.on_round_start = on_round_start  # (round, sampled clients): progress display
        self.history: list[RoundReport] = []

    async def run(self) -> None:
        for number in range(self.rounds):
            report = await self.run_round(number)
            self.history.append(report)
            if self.on_round is not None:
                self.on_round(report)

    async def run_round(self, number: int) -> RoundReport:
        """Sample, send, gather into the sums, replace the global model."""
        started = time.perf_counter()
        clients = await self.sample_clients(
            self.num_clients, min_clients=self.min_clients, join_timeout=self.join_timeout
        )
        if self.on_round_start is not None:
            self.on_round_start(number, clients)
        outgoing = FLModel(params=self.model.params, current_round=number, total_rounds=self.rounds)
        task = self.send_model(outgoing, clients)
        accumulator = self._new_accumulator(number)
        aggregation = _RoundAggregation(self, accumulator)
        try:
            results = await self.gather(
                task,
                aggregation.sink_for,
                min_clients=self.min_clients,
                wait_after_min=self.wait_after_min,
            )
            self.model = self._averaged(accumulator, aggregation.mode, number)
        finally:
            accumulator.close()
            if isinstance(accumulator, FileAccumulator):
                accumulator.close_file()
        return self._report(number, clients, results, time.perf_counter() - started)

    def _new_accumulator(self, number: int) -> Accumulator:
        if self.accumulator_dir is None:
            return MemoryAccumulator(self.accumulate_dtype)
        self.accumulator_dir.mkdir(parents=True, exist_ok=True)
        return FileAccumulator(self.accumulator_dir / f"sums-{number}.bin", self.accumulate_dtype)

    def model_bytes(self) -> int:
        """Tensor bytes of the global model (what each sampled site receives)."""
        assert self.model.params is not None
        return params_nbytes(self.model.params)

    def base_lookup(self) -> BaseLookup | None:
        """The global model's tensors by name, where it is held in memory."""
        params = self.model.params
        if isinstance(params, Mapping):
            return params.__getitem__
        return None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        params = self.model.params
        if isinstance(params, Source):
            return {spec.name: tuple(spec.shape) for spec in params.manifest.tensors}
        assert params is not None
        return {name: tuple(tensor.shape) for name, tensor in params.items()}

    def _averaged(self, accumulator: Accumulator, mode: ParamsType, number: int) -> FLModel:
        missing = set(self.expected_shapes()) - set(accumulator.weights)
        if missing:
            raise RuntimeError(f"no client delivered {len(missing)} tensors, e.g. {min(missing)}")
        base = self.base_lookup() if mode is ParamsType.DIFF else None
        if mode is ParamsType.DIFF and base is None:
            raise RuntimeError("DIFF updates need the global model in memory to be applied")
        if isinstance(accumulator, FileAccumulator):
            assert self.accumulator_dir is not None
            path = accumulator.write_average(self.accumulator_dir / f"global-{number}.safetensors")
            if isinstance(self.model.params, Source):
                self.model.params.close()
            return FLModel(params=SafetensorsSource(path, chunk_size=self._chunk_size()))
        assert isinstance(accumulator, MemoryAccumulator)
        return FLModel(params=accumulator.average(base))

    def _chunk_size(self) -> int:
        return self.server.endpoint.config.chunk_size

    def _report(
        self, number: int, clients: list[str], results: list[ClientResult], seconds: float
    ) -> RoundReport:
        ok = [result for result in results if result.ok and result.info]
        report = RoundReport(
            round=number,
            clients=clients,
            succeeded=[result.client for result in ok],
            failed={result.client: result.error or "" for result in results if not result.ok},
            bytes_sent=sum(result.bytes_sent for result in results),
            bytes_received=sum(result.bytes_received for result in ok),
            seconds=seconds,
            client_metrics={r.client: r.info.metrics for r in ok if r.info},
        )
        report.metrics = _weighted_metrics(ok)
        if self.evaluate is not None:
            report.metrics.update(self.evaluate(self.model))
        return report


class _RoundAggregation:
    """Hands each client's result a sink into this round's sums, after checking its manifest."""

    def __init__(self, fedavg: FedAvg, accumulator: Accumulator) -> None:
        self.fedavg = fedavg
        self.accumulator = accumulator
        self.shapes = fedavg.expected_shapes()
        self.mode: ParamsType = ParamsType.FULL
        self._mode_set = False

    def sink_for(self, client: str, info: ResultInfo, transfer: IncomingTransfer) -> Sink:
        self._check_manifest(client, transfer)
        if not self._mode_set:  # the first result decides; later ones are converted to it
            self.mode, self._mode_set = info.params_type, True
        base = self.fedavg.base_lookup()
        if info.params_type is not self.mode and base is None:
            raise ValueError(f"{client} sent {info.params_type.value}, others {self.mode.value}")
        weight = _sample_count(info)
        have, want, on_tensor = info.params_type, self.mode, self.fedavg.on_tensor

        def add(name: str, tensor: torch.Tensor) -> None:
            reference = base(name) if base is not None and have is not want else None
            self.accumulator.add(name, as_params_type(tensor, have, want, reference), weight)
            if on_tensor is not None:
                on_tensor(client, name, tensor)

        return CallbackSink(add)

    def _check_manifest(self, client: str, transfer: IncomingTransfer) -> None:
        manifest = transfer.manifest
        received = {s.name: tuple(s.shape) for s in manifest.tensors} if manifest else {}
        if received != self.shapes:
            extra = sorted(set(received) - set(self.shapes))[:3]
            absent = sorted(set(self.shapes) - set(received))[:3]
            changed = sorted(
                n for n in set(received) & set(self.shapes) if received[n] != self.shapes[n]
            )[:3]
            raise ValueError(
                f"{client}'s result does not match the model: unexpected {extra}, missing "
                f"{absent}, other shape {changed}"
            )


def _sample_count(info: ResultInfo) -> float:
    return FLModel(meta=info.meta).sample_count


def _weighted_metrics(results: list[ClientResult]) -> dict[str, float]:
    """Each metric averaged over clients, weighted by sample count."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for result in results:
        assert result.info is not None
        weight = _sample_count(result.info)
        for name, value in result.info.metrics.items():
            sums[name] = sums.get(name, 0.0) + weight * value
            weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sums}
