"""Parameter-efficient fine-tuning: `peft` LoRA adapters on the pre-trained base for text
classification (which standard-library family a docstring comes from), labels skewed across sites
by a Dirichlet(0.5) split. Only the adapter tensors (and the new classification head) travel; a
client receives them straight into its PEFT model's own adapter tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fl.apps.common import AppTask, round_seed
from fl.apps.data import PAD_ID, LabelledSplit, labelled_split
from fl.apps.lm import TINY, load_base
from fl.apps.metrics import accuracy_by_site


class LMClassifier(nn.Module):
    """The base LM's body, its last hidden states averaged over the text's bytes, and a linear
    head. (transformers' sequence classifier reads the last token only, which a byte-level model
    this small cannot summarize a text into; the mean of all positions it can.)"""

    def __init__(self, body: nn.Module, classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != PAD_ID).long()
        hidden = self.body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        logits: torch.Tensor = self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))
        return logits


@dataclass
class LoRATask(AppTask):
    rank: int = 8
    per_class: int = 200
    epochs: int = 2
    batch: int = 16
    lr: float = 2e-3
    name: ClassVar[str] = "lora"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    @cached_property
    def data(self) -> LabelledSplit:
        return labelled_split(self.sites, self.lm.context, self.per_class)

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.lm.seed + 1)
        classifier = LMClassifier(load_base(self.lm).model, self.data.classes)
        config = LoraConfig(
            r=self.rank,
            lora_alpha=2 * self.rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            modules_to_save=["head"],  # the new head trains in full and travels too
        )
        return get_peft_model(classifier, config)  # type: ignore[no-any-return]

    def exchanged(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter: the trainable tensors (LoRA's A and B, the head), views of the model."""
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return {name: t for name, t in model.state_dict().items() if name in trainable}

    def train_round(self, model: nn.Module, site: int | None) -> None:
        ids, labels = self.data.pooled_train() if site is None else self.data.train[site]
        seed = round_seed(model, site)
        train_classifier(model, ids, labels, self.epochs, self.batch, self.lr, seed)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        return accuracy_by_site(model, self.data.test)

    def sample_count(self, site: int) -> int:
        return len(self.data.train[site][1])


def train_classifier(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch):
            picked = order[start : start + batch]
            optimizer.zero_grad()
            loss_function(model(ids[picked]), labels[picked]).backward()
            optimizer.step()


def default() -> LoRATask:
    """The demo's size: minutes on two cores."""
    return LoRATask(rounds=8)


def tiny() -> LoRATask:
    """Seconds, for the tests."""
    return LoRATask(rounds=4, lm=TINY, rank=4, per_class=80, epochs=2, lr=1e-2)
