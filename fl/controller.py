"""The Controller API: a server algorithm is a class whose `run()` uses a few calls.

class MyAlgorithm(Controller):
    async def run(self) -> None:
        model = self.load_model("initial.safetensors")
        for round in range(self.rounds):
            clients = await self.sample_clients(3, min_clients=2)
            task = self.send_model(model, clients)
            results = await self.gather(task, min_clients=2)   # failures are results too
            ...
        self.save_model(model, "final.safetensors")
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fl.model import FLModel
from fl.server import ClientResult, FLServer, SinkFactory, Task


class NotEnoughClients(RuntimeError):
    """Fewer clients joined, or returned a result, than a min_clients rule asks for."""


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

    def send_model(self, model: FLModel, clients: Sequence[str], task_name: str = "train") -> Task:
        """Stream `model` to `clients` in the background; pass the Task to gather()."""
        return self.server.send_model(model, clients, task_name)

    async def gather(
        self,
        task: Task,
        sink_for: SinkFactory | None = None,
        *,
        min_clients: int = 1,
        wait_after_min: float | None = None,
        on_result: Callable[[ClientResult], None] | None = None,
    ) -> list[ClientResult]:
        """Every client's result (failures as results with `error`); NotEnoughClients if fewer
        than `min_clients` succeeded. See FLServer.gather for the waiting rules."""
        results = await self.server.gather(
            task,
            sink_for,
            min_clients=min_clients,
            wait_after_min=wait_after_min,
            on_result=on_result,
        )
        succeeded = sum(result.ok for result in results)
        if succeeded < min_clients:
            failures = "; ".join(f"{r.client}: {r.error}" for r in results if not r.ok)
            raise NotEnoughClients(
                f"{succeeded} of {len(results)} clients returned a result, min_clients is "
                f"{min_clients} ({failures})"
            )
        return results

    @staticmethod
    def load_model(path: str | Path) -> FLModel:
        """A model from a safetensors file (into memory)."""
        return FLModel(params=load_file(str(path)))

    @staticmethod
    def save_model(model: FLModel, path: str | Path) -> Path:
        """Write the model's state dict to a safetensors file (atomically: via a temporary)."""
        if model.params is None or not isinstance(model.params, dict):
            raise ValueError("save_model needs a model whose params are an in-memory dict")
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        tensors = {name: tensor.contiguous() for name, tensor in model.params.items()}
        save_file(tensors, str(partial), metadata={"format": "pt"})
        partial.replace(target)
        return target


def state_dict_of(model: FLModel) -> dict[str, torch.Tensor]:
    """The model's params as an in-memory dict (TypeError for a Source-backed model)."""
    if not isinstance(model.params, dict):
        raise TypeError("this needs the model's params as an in-memory state dict")
    return model.params
