"""FLModel: what travels between a server's controller and a client's training script."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from transport import Source

# The meta key a client fills with the number of samples it trained on; FedAvg weights by it.
SAMPLE_COUNT = "sample_count"

Params = Mapping[str, torch.Tensor] | Source


def params_nbytes(params: Params) -> int:
    """Tensor bytes of a state dict or a transport Source (what one transfer of it moves)."""
    if isinstance(params, Source):
        return params.manifest.total_bytes
    return sum(int(tensor.nbytes) for tensor in params.values())


class ParamsType(enum.StrEnum):
    """FULL: the parameters themselves. DIFF: the change from the model the client received."""

    FULL = "FULL"
    DIFF = "DIFF"

    @classmethod
    def parse(cls, value: object) -> ParamsType:
        """The enum member named by `value`; a clear ValueError for anything else."""
        if isinstance(value, ParamsType):
            return value
        try:
            return cls(str(value).upper())
        except ValueError:
            raise ValueError(f"params_type must be FULL or DIFF, got {value!r}") from None


@dataclass
class FLModel:
    """A model update and what goes with it.

    `params` is a state dict, or a transport Source (a safetensors file read by mmap, a synthetic
    model) when the model should not be held in memory. `meta` and `metrics` must be JSON-able:
    they travel in the transfer's header, never pickled.
    """

    params: Params | None = None
    params_type: ParamsType = ParamsType.FULL
    metrics: dict[str, float] = field(default_factory=dict)
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params_type = ParamsType.parse(self.params_type)  # "DIFF" is accepted too

    @property
    def sample_count(self) -> float:
        """The weight FedAvg gives this update (meta["sample_count"], 1 when absent)."""
        value = self.meta.get(SAMPLE_COUNT, 1)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"meta[{SAMPLE_COUNT!r}] must be a positive number, got {value!r}")
        return float(value)
