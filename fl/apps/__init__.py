"""The paper's three applications at CPU scale, on real text that ships with Python.

    fl.apps.lora        LoRA adapters (peft) on a small causal LM: text classification
    fl.apps.sft         full fine-tuning of the same LM, one kind of text per site: perplexity
    fl.apps.embeddings  a frozen LM's embeddings + an MLP trained with FedAvg: accuracy
    fl.apps.data        the texts, labels and the Dirichlet split;  fl.apps.lm: the base model
    fl.apps.client      the federated client every task runs;  fl.apps.demo: `tensorwire demo`

They need the `llm` extra (transformers, peft, scikit-learn): `pip install tensorwire[llm]`.
Every module imports those libraries only when a task is made, so `fl` works without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fl.apps.common import AppTask

TASKS = ("lora", "sft", "embeddings")
SIZES = ("default", "tiny")


def make_task(name: str, size: str = "default", rounds: int | None = None) -> AppTask:
    """The task `name` at `size` ("default": the demo's; "tiny": seconds, for the tests)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: one of {', '.join(TASKS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")
    module = importlib.import_module(f"fl.apps.{name}")
    task: AppTask = module.tiny() if size == "tiny" else module.default()
    if rounds is not None:
        task.rounds = rounds
    return task
