"""Full supervised fine-tuning: every weight of the pre-trained base trains, each site on a
different kind of text (the language reference, API docstrings, Python source code), as the
paper's three sites each held a different instruction dataset. Scored by perplexity (lower is
better) on each site's held-out text and on their union.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn
from transformers import LlamaForCausalLM

from fl.apps.common import AppTask, round_seed
from fl.apps.data import split_text, text_sources, text_windows
from fl.apps.lm import TINY, lm_loss, load_base, train_lm
from fl.apps.metrics import perplexity_by_site


@dataclass(frozen=True)
class SiteText:
    train: torch.Tensor  # windows of the first 90% of the source
    held_out: torch.Tensor  # windows of the last 10%: never trained on


@dataclass
class SFTTask(AppTask):
    train_windows: int = 2048
    held_out_windows: int = 96
    steps: int = 12  # per site per round; the pooled run takes sites x steps
    batch: int = 16
    lr: float = 1e-3
    name: ClassVar[str] = "sft"
    metric: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False

    @cached_property
    def texts(self) -> list[SiteText]:
        sources = list(text_sources().values())[: self.sites]
        if len(sources) < self.sites:
            raise ValueError(f"sft has {len(sources)} text sources, not {self.sites} sites")
        return [self._site_text(text, seed) for seed, text in enumerate(sources)]

    def _site_text(self, text: str, seed: int) -> SiteText:
        train, held_out = split_text(text)
        length = self.lm.context
        return SiteText(
            text_windows(train, length, self.train_windows, seed=seed),
            text_windows(held_out, length, self.held_out_windows, seed=100 + seed),
        )

    def new_model(self) -> nn.Module:
        return load_base(self.lm)

    def exchanged(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def train_round(self, model: nn.Module, site: int | None) -> None:
        assert isinstance(model, LlamaForCausalLM)
        if site is None:
            ids = torch.cat([text.train for text in self.texts])
            steps = self.steps * self.sites  # the compute of all sites together
        else:
            ids, steps = self.texts[site].train, self.steps
        train_lm(model, ids, steps, self.batch, self.lr, seed=round_seed(model, site))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, LlamaForCausalLM)
        model.eval()
        return perplexity_by_site(
            lambda ids: lm_loss(model, ids), [text.held_out for text in self.texts]
        )

    def sample_count(self, site: int) -> int:
        return len(self.texts[site].train)


def default() -> SFTTask:
    """The demo's size: minutes on two cores."""
    return SFTTask(rounds=8)


def tiny() -> SFTTask:
    """Seconds, for the tests."""
    return SFTTask(
        rounds=2, lm=TINY, train_windows=256, held_out_windows=32, steps=8, batch=8, lr=3e-3
    )
