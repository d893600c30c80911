"""The Controller API: a server algorithm is a class whose `run()` uses a few calls.

class MyAlgorithm(Controller):
    async def run(self) -> None:
        model = self.load_model("initial.safetensors")
        for round in range(self.rounds):
            clients = await self.sample_clients(3, min_clients=2)
            task = self.send_model(model, clients)
            gathered = await self.gather(task, min_clients=2)   # failures are data too
            models = gathered.models                            # client -> FLModel
            ...
        self.save_model(model, "final.safetensors")

Algorithms see models (FLModel) and tensors only. To aggregate as results stream in (a model of
any size, one model of sums), pass a `RoundAggregation` (fl/aggregation.py) to gather(): each
client's tensors are folded into it as they arrive and its `models` then carry metrics and meta
but no params.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from fl.aggregation import RoundAggregation
from fl.model import FLModel
from fl.model_file import ModelFile, write_model_file
from fl.server import ClientResult, FLServer, ResultRules, Task, TensorHook


class NotEnoughClients(RuntimeError):
    """Fewer clients joined, or returned a result, than a min_clients rule asks for."""


@dataclass
class Gathered:
    """What gather() brought back: each client's model (its params are None when they were
    streamed into an aggregation), each failed client's reason, and the traffic."""

    models: dict[str, FLModel] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    @classmethod
    def of(cls, results: Sequence[ClientResult]) -> Gathered:
        gathered = cls(bytes_sent=sum(result.bytes_sent for result in results))
        for result in results:
            if result.ok and result.info is not None:
                gathered.models[result.client] = _model_of(result)
                gathered.bytes_received += result.bytes_received
            else:
                gathered.failed[result.client] = result.error or "no result"
        return gathered


def _model_of(result: ClientResult) -> FLModel:
    assert result.info is not None
    params = result.value if isinstance(result.value, dict) else None
    return FLModel(
        params=params,
        params_type=result.info.params_type,
        metrics=dict(result.info.metrics),
        meta=dict(result.info.meta),
    )


class Controller(ABC):
    """Base class of server algorithms; the server calls `attach()` then `run()`."""

    server: FLServer

    def attach(self, server: FLServer) -> None:
        self.server = server

    @abstractmethod
    async def run(self) -> None:
        """The algorithm."""

    async def sample_clients(
        self,
        count: int | None = None,
        *,
        min_clients: int = 1,
        join_timeout: float = 60.0,
        seed: int | None = None,
    ) -> list[str]:
        """Up to `count` live clients at random (all when None), waiting up to `join_timeout`
        for `count` to be live; NotEnoughClients if fewer than min_clients are."""
        wanted = count if count is not None else max(min_clients, len(self.server.clients))
        live = await self.server.wait_for_clients(wanted, join_timeout)
        if len(live) < min_clients:
            raise NotEnoughClients(
                f"{len(live)} clients are live ({', '.join(live) or 'none'}), "
                f"min_clients is {min_clients}"
            )
        if count is None or count >= len(live):
            return live
        return sorted(random.Random(seed).sample(live, count))

    def send_model(
        self,
        model: FLModel,
        clients: Sequence[str],
        task_name: str = "train",
        task_id: str | None = None,
    ) -> Task:
        """Stream `model` to `clients` in the background; pass the Task to gather(). A stable
        `task_id` lets a restarted server resume the same task (see FLServer.send_model)."""
        return self.server.send_model(model, clients, task_name, task_id)

    async def gather(
        self,
        task: Task,
        aggregation: RoundAggregation | None = None,
        *,
        min_clients: int = 1,
        wait_after_min: float | None = None,
        round_timeout: float | None = None,
        rules: ResultRules | None = None,
        on_tensor: TensorHook | None = None,
    ) -> Gathered:
        """Every client's result (failures as data); NotEnoughClients if fewer than
        `min_clients` succeeded. See FLServer.gather for the waiting rules, the round's deadline
        (`round_timeout`) and what a result must be to be taken (`rules`)."""
        results = await self.server.gather(
            task,
            aggregation,
            min_clients=min_clients,
            wait_after_min=wait_after_min,
            round_timeout=round_timeout,
            rules=rules,
            on_tensor=on_tensor,
        )
        gathered = Gathered.of(results)
        if len(gathered.models) < min_clients:
            failures = "; ".join(f"{name}: {why}" for name, why in gathered.failed.items())
            raise NotEnoughClients(
                f"{len(gathered.models)} of {len(results)} clients returned a result, "
                f"min_clients is {min_clients} ({failures})"
            )
        return gathered

    @staticmethod
    def load_model(path: str | Path) -> FLModel:
        """A model from a safetensors file (into memory)."""
        return FLModel(params=load_file(str(path)))

    @staticmethod
    def save_model(model: FLModel | ModelFile, path: str | Path) -> Path:
        """Write the model to a safetensors file (atomically: via a temporary). A model that
        lives in a file (ModelFile) is copied slice by slice, never loaded whole."""
        if isinstance(model, ModelFile):
            return model.copy_to(path)
        if model.params is None or not isinstance(model.params, dict):
            raise ValueError("save_model needs an in-memory state dict or a ModelFile")
        return write_model_file(path, model.params)


def state_dict_of(model: FLModel) -> dict[str, torch.Tensor]:
    """The model's params as an in-memory dict (TypeError for a Source-backed model)."""
    if not isinstance(model.params, dict):
        raise TypeError("this needs the model's params as an in-memory state dict")
    return model.params
