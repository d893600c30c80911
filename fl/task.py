"""A small real training task generated in code (no downloads), for the demo, examples and tests.

Classification of Gaussian blobs pushed through a fixed random nonlinearity. Every site draws from
the same task, but a site's shard is skewed: most of its samples come from a few classes, so a
model trained on one shard alone does poorly on the balanced test set and federation helps.
`MLP(padding_bytes=...)` carries an extra untrained parameter so the streamed model has any size.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES, CLASSES, HIDDEN = 32, 10, 64
_TASK_SEED = 1234
_PADDING_ROWS = 16 * 1024  # 64 MiB of float32 per padding tensor


def _task_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(_TASK_SEED)
    centers = torch.randn(CLASSES, FEATURES, generator=generator) * 1.5
    mixing = torch.randn(FEATURES, FEATURES, generator=generator) / FEATURES**0.5
    return centers, mixing


def _draw(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centers, mixing = _task_tensors()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), FEATURES, generator=generator) * 1.5
    features = torch.tanh((centers[labels] + noise) @ mixing) * 3
    return features, labels


def local_data(
    site: int, sites: int, samples: int = 2000, skew: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Site `site` of `sites`: a share `skew` of its samples from its own few classes."""
    if not 0 <= site < sites:
        raise ValueError(f"site index {site} is outside 0..{sites - 1}")
    generator = torch.Generator().manual_seed(1000 + site)
    own = torch.tensor([c for c in range(CLASSES) if c % sites == site])
    from_own = torch.rand(samples, generator=generator) < skew
    labels = torch.where(
        from_own,
        own[torch.randint(len(own), (samples,), generator=generator)],
        torch.randint(CLASSES, (samples,), generator=generator),
    )
    return _draw(labels, seed=2000 + site)


def held_out_data(samples: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced held-out set."""
    labels = torch.arange(samples) % CLASSES
    return _draw(labels, seed=99)


class MLP(nn.Module):
    """Two hidden layers, plus `padding_bytes` (in `dtype`) that only make the model big."""

    def __init__(
        self, padding_bytes: int = 0, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES),
        )
        # Stands in for a large embedding table, split in tensors of at most 64 MiB as a real
        # model's many layers are (per-tensor aggregation holds one tensor per client at a time).
        # Built in `dtype` directly: a bf16 model never exists in float32 first.
        rows = padding_bytes // (dtype.itemsize * 1024)
        self.padding = nn.ParameterList(
            nn.Parameter(
                torch.zeros(min(_PADDING_ROWS, rows - start), 1024, dtype=dtype),
                requires_grad=False,
            )
            for start in range(0, rows, _PADDING_ROWS)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(features)
        return logits


def train(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, epochs: int = 2) -> float:
    """Plain minibatch SGD; returns the last epoch's mean loss."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    total = 0.0
    for _ in range(epochs):
        total = 0.0
        for start in range(0, len(labels), 64):
            optimizer.zero_grad()
            loss = loss_function(model(features[start : start + 64]), labels[start : start + 64])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels[start : start + 64])
    return total / len(labels)


@torch.no_grad()
def evaluate(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy on (features, labels)."""
    model.eval()
    return float((model(features).argmax(dim=1) == labels).float().mean())
