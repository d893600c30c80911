"""The small causal language model every application starts from, built from a `transformers`
config (never downloaded) and pre-trained briefly in code on shared text.

The pre-trained base is saved with `save_pretrained` in shards (the format a real checkpoint
comes in) under a cache directory keyed by its settings, so the demo, the examples and every client
process load the same base instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import huggingface_hub
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.utils import logging as transformers_logging

from fl.apps.data import PAD_ID, VOCAB_SIZE, pretraining_text, text_windows


@dataclass(frozen=True)
class LMSize:
    """The model's shape and how long it is pre-trained."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    context: int = 64
    pretrain_steps: int = 300
    batch: int = 16
    seed: int = 0


TINY = LMSize(hidden=64, layers=2, heads=2, intermediate=128, context=48, pretrain_steps=60)


def lm_config(size: LMSize) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.context * 4,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,  # every tensor its own: nothing aliased travels
    )


def quiet_transformers() -> None:
    """No loading bars or "newly initialized" notes (a classification head is new on purpose)."""
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()  # "Writing model shards"


def new_lm(size: LMSize) -> LlamaForCausalLM:
    torch.manual_seed(size.seed)
    return LlamaForCausalLM(lm_config(size))


def lm_loss(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy of `ids` (pad positions are not predicted)."""
    labels = ids.masked_fill(ids == PAD_ID, -100)
    loss: torch.Tensor = model(input_ids=ids, labels=labels).loss
    return loss


def train_lm(
    model: PreTrainedModel, ids: torch.Tensor, steps: int, batch: int, lr: float, seed: int = 0
) -> None:
    """AdamW over seeded minibatches of `ids` (the optimizer starts afresh: a round's local
    training on the Client API receives the model and nothing else)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picked = torch.randint(len(ids), (batch,), generator=generator)
        optimizer.zero_grad()
        lm_loss(model, ids[picked]).backward()
        optimizer.step()


def cache_dir() -> Path:
    root = os.environ.get("TENSORWIRE_CACHE") or Path.home() / ".cache" / "tensorwire"
    return Path(root) / "apps"


def base_path(size: LMSize) -> Path:
    key = hashlib.sha256(json.dumps(asdict(size), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"base-{key}"


def pretrained_base(size: LMSize) -> Path:
    """The directory of the pre-trained base (trained and saved on first use)."""
    path = base_path(size)
    if not (path / "config.json").exists():
        quiet_transformers()
        model = new_lm(size)
        ids = text_windows(pretraining_text(), size.context, 4096, seed=size.seed)
        train_lm(model, ids, size.pretrain_steps, size.batch, lr=3e-3)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        # Several shards and an index, as a real checkpoint comes (SafetensorsSource reads both).
        model.save_pretrained(partial, max_shard_size="500KB")
        try:
            partial.replace(path)
        except OSError:  # another process saved the same base first: keep theirs
            shutil.rmtree(partial, ignore_errors=True)
    return path


def load_base(size: LMSize) -> LlamaForCausalLM:
    quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(pretrained_base(size), local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    return model
