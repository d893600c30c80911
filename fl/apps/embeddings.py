"""Embeddings + MLP: a frozen language model turns each labelled docstring into one vector (its
last hidden states averaged over the text's bytes) and a small MLP classifies the vectors, as the
paper's protein embeddings from a frozen model fed an MLP. Only the MLP trains and travels; labels
are skewed across sites by a Dirichlet(0.5) split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn

from fl.apps.common import AppTask, round_seed
from fl.apps.data import PAD_ID, LabelledSplit, labelled_split
from fl.apps.lm import TINY, LMSize, load_base
from fl.apps.lora import train_classifier
from fl.apps.metrics import accuracy_by_site


@torch.no_grad()
def embed(ids: torch.Tensor, lm: LMSize, batch: int = 64) -> torch.Tensor:
    """One vector per row of `ids`: the frozen base's last hidden states, mean over non-pad."""
    encoder = load_base(lm).model.eval()
    vectors = []
    for start in range(0, len(ids), batch):
        part = ids[start : start + batch]
        mask = (part != PAD_ID).unsqueeze(-1).float()
        hidden = encoder(input_ids=part, attention_mask=mask.squeeze(-1).long()).last_hidden_state
        vectors.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(vectors)


class Classifier(nn.Module):
    def __init__(self, width: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(vectors)
        return logits


@dataclass
class EmbeddingsTask(AppTask):
    per_class: int = 400
    hidden: int = 128
    epochs: int = 3
    batch: int = 32
    lr: float = 1e-3
    _embedded: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )
    name: ClassVar[str] = "embeddings"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    @cached_property
    def data(self) -> LabelledSplit:
        """The labelled texts (token ids); each part is embedded when first used, so a site
        embeds its own texts only and the server the held-out ones."""
        return labelled_split(self.sites, self.lm.context, self.per_class)

    def vectors(self, part: str, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, labels) of `part` ("train" or "test") of `site`."""
        if (part, site) not in self._embedded:
            ids, labels = getattr(self.data, part)[site]
            self._embedded[part, site] = (embed(ids, self.lm), labels)
        return self._embedded[part, site]

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.lm.seed + 2)
        return Classifier(self.lm.hidden, self.hidden, self.data.classes)

    def exchanged(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def train_round(self, model: nn.Module, site: int | None) -> None:
        sites = range(self.sites) if site is None else [site]
        parts = [self.vectors("train", s) for s in sites]
        vectors, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        seed = round_seed(model, site)
        train_classifier(model, vectors, labels, self.epochs, self.batch, self.lr, seed)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        return accuracy_by_site(model, [self.vectors("test", s) for s in range(self.sites)])

    def sample_count(self, site: int) -> int:
        return len(self.data.train[site][1])


def default() -> EmbeddingsTask:
    """The demo's size: minutes on two cores."""
    return EmbeddingsTask(rounds=15)  # rounds are cheap here: fewer local epochs, less drift


def tiny() -> EmbeddingsTask:
    """Seconds, for the tests."""
    return EmbeddingsTask(rounds=3, lm=TINY, per_class=60, hidden=64, epochs=15, lr=3e-3)
