"""What the three applications share: one task interface and the three ways of training it.

A task says how to build its model, which of the model's tensors travel (`exchanged`: views of
the model's own storage, so a client receives the global model straight into them), how a site
trains for one round and how a model is scored on each site's held-out data and on their union.
Local-only, centralized and federated training then differ only in whose data a round trains on
and whether the model is averaged between rounds, which is the paper's comparison.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fl.apps.lm import LMSize

UNION = "union"


def site_name(site: int) -> str:
    return f"site-{site}"


@dataclass
class AppTask(ABC):
    """One application at one size. `site=None` in `train_round` means the pooled data."""

    sites: int = 3
    rounds: int = 5
    lm: LMSize = field(default_factory=LMSize)  # the base model every application starts from
    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]

    @abstractmethod
    def new_model(self) -> nn.Module:
        """The model every site starts from (the same for all: seeded)."""

    @abstractmethod
    def exchanged(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that travel, as views of `model`'s own storage."""

    @abstractmethod
    def train_round(self, model: nn.Module, site: int | None) -> None:
        """One round of local training on `site`'s data (None: every site's data pooled)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The metric on each site's held-out data and on their union."""

    @abstractmethod
    def sample_count(self, site: int) -> int:
        """FedAvg's weight for `site`."""

    def model_bytes(self, model: nn.Module) -> int:
        """Bytes of the whole model (for LoRA, more than what travels)."""
        return sum(t.nbytes for t in model.state_dict().values())

    def load(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        """Copy `params` (the tensors that travel) into `model`."""
        targets = self.exchanged(model)
        with torch.no_grad():
            for name, tensor in params.items():
                targets[name].copy_(tensor)


def round_seed(model: nn.Module, site: int | None) -> int:
    """A seed for this model's next round of local training: each round draws other minibatches
    (a client keeps its model object across rounds, so the count lives on the model)."""
    rounds = getattr(model, "_rounds_trained", 0)
    model._rounds_trained = rounds + 1  # type: ignore[assignment]
    return 1000 * rounds + (-1 if site is None else site)


def exchanged_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())


@dataclass
class Curve:
    """A model's metrics after each round (round 0: before training)."""

    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.rounds[-1]


def train_alone(
    task: AppTask, site: int | None, on_round: Callable[[int], None] | None = None
) -> Curve:
    """Local-only training of `site` (or centralized: `site=None`), scored after every round."""
    model = task.new_model()
    curve = Curve([task.evaluate(model)])
    for number in range(task.rounds):
        task.train_round(model, site)
        curve.rounds.append(task.evaluate(model))
        if on_round is not None:
            on_round(number + 1)
    return curve


def better(task: AppTask, first: float, second: float) -> bool:
    """Whether `first` is at least as good as `second` for this task's metric."""
    return first >= second if task.higher_is_better else first <= second
