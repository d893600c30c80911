"""Driving a round aggregation the way the server does, for the aggregation property tests:
uploads added from several threads at once, then the round finished into fresh tensors."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch


class _Aggregation(Protocol):
    def add(
        self, client: str, name: str, tensor: torch.Tensor, weight: float, mode: Any
    ) -> Any: ...

    def finish_round(self, write: Any) -> Any: ...


def add_in_lanes(aggregation: _Aggregation, lanes: Sequence[Sequence[Any]]) -> None:
    """Each lane of (client, name, tensor) uploads added by a thread of its own; any error
    raised there fails the test here."""
    errors: list[BaseException] = []

    def run(lane: Sequence[Any]) -> None:
        try:
            for client, name, tensor in lane:
                aggregation.add(client.name, name, tensor, client.weight, client.mode)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    workers = [threading.Thread(target=run, args=(lane,)) for lane in lanes]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors


def finish_into(
    aggregation: _Aggregation, base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The round's new model, every element written exactly once (NaN marks one that was not)."""
    out = {name: torch.full_like(tensor, float("nan")) for name, tensor in base.items()}

    def write(name: str, start: int, piece: torch.Tensor) -> None:
        assert piece.dtype == base[name].dtype
        out[name].view(-1)[start : start + piece.numel()] = piece

    aggregation.finish_round(write)
    return out
