"""Scoring a model on each site's held-out data and on the union of them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fl.apps.common import UNION, site_name

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def accuracy_by_site(
    logits_of: Callable[[torch.Tensor], torch.Tensor], tests: Batches, batch: int = 64
) -> dict[str, float]:
    """Accuracy on each site's test items and on all of them together (the pooled test set)."""
    correct, counts = [], []
    for features, labels in tests:
        hits = 0
        for start in range(0, len(labels), batch):
            predicted = logits_of(features[start : start + batch]).argmax(dim=-1)
            hits += int((predicted == labels[start : start + batch]).sum())
        correct.append(hits)
        counts.append(len(labels))
    scores = {
        site_name(i): hits / count
        for i, (hits, count) in enumerate(zip(correct, counts, strict=True))
    }
    scores[UNION] = sum(correct) / sum(counts)
    return scores


@torch.no_grad()
def perplexity_by_site(
    loss_of: Callable[[torch.Tensor], torch.Tensor], tests: list[torch.Tensor], batch: int = 32
) -> dict[str, float]:
    """exp(mean next-byte loss) on each site's held-out windows and on all of them together."""
    totals, counts = [], []
    for windows in tests:
        total = 0.0
        for start in range(0, len(windows), batch):
            part = windows[start : start + batch]
            total += float(loss_of(part)) * len(part)
        totals.append(total)
        counts.append(len(windows))
    scores = {
        site_name(i): math.exp(t / n) for i, (t, n) in enumerate(zip(totals, counts, strict=True))
    }
    scores[UNION] = math.exp(sum(totals) / sum(counts))
    return scores
