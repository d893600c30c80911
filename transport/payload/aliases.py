"""Tied tensors: entries of one state dict that are the very same tensor travel once.

A model with tied weights (`lm_head.weight is embed.weight`) lists one tensor under two names.
Sending both would move its bytes twice and deliver two independent tensors, untying the model on
the receiver. An *exact alias* is an entry whose view equals an earlier entry's: same storage,
storage offset, shape, strides, dtype (and conj/neg bits, which change the values read). The source
records it in the manifest (`aliases: {alias: target}`), the plan gives it no piece, and each sink
restores it from its target (see sinks.py for what each one does).

Anything short of exact (a view of part of another tensor, two halves of one fused buffer) is not
an alias: both travel separately and arrive as independent tensors. `find_aliases` warns about
those (SharedStorageWarning), because whatever sharing the sender relied on is not reproduced.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Final

import torch

__all__ = ["SharedStorageWarning", "find_aliases", "same_view", "view_key"]

# Enough to identify the culprits in a warning without printing a whole model.
_SHOWN_PAIRS: Final = 5

_ViewKey = tuple[object, ...]


class SharedStorageWarning(UserWarning):
    """Tensors of a state dict share storage without being the same tensor; sent separately."""


def view_key(tensor: torch.Tensor) -> _ViewKey | None:
    """What makes two tensors one and the same view; None for a tensor without bytes.

    Tensors with no elements are left out: they all sit at address 0 or at arbitrary places, so
    two empty entries are two names for nothing, not one tied weight.
    """
    if tensor.numel() == 0:
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.is_conj(),
        tensor.is_neg(),
    )


def same_view(left: torch.Tensor, right: torch.Tensor) -> bool:
    """True when writing one of the two tensors writes the other, element for element."""
    key = view_key(left)
    return key is not None and key == view_key(right)


def _storage_key(tensor: torch.Tensor) -> tuple[object, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


def find_aliases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{alias: target} for each entry that is an exact alias of an earlier one.

    The target is the first name in dict order, so it is never itself an alias. Entries that share
    storage with an earlier one without being the same view trigger one SharedStorageWarning.
    """
    first_by_view: dict[_ViewKey, str] = {}
    first_by_storage: dict[tuple[object, int], str] = {}
    aliases: dict[str, str] = {}
    partial: list[tuple[str, str]] = []
    for name, tensor in state_dict.items():
        key = view_key(tensor)
        if key is None:
            continue
        target = first_by_view.setdefault(key, name)
        if target != name:
            aliases[name] = target
            continue
        owner = first_by_storage.setdefault(_storage_key(tensor), name)
        if owner != name:
            partial.append((name, owner))
    if partial:
        _warn_partial(partial)
    return aliases


def _warn_partial(pairs: list[tuple[str, str]]) -> None:
    shown = ", ".join(f"{name!r} with {owner!r}" for name, owner in pairs[:_SHOWN_PAIRS])
    more = f" and {len(pairs) - _SHOWN_PAIRS} more" if len(pairs) > _SHOWN_PAIRS else ""
    warnings.warn(
        f"{len(pairs)} tensors share storage with another entry without being the same tensor "
        f"({shown}{more}); only exact aliases travel once and arrive shared, these travel "
        "separately and arrive as independent tensors",
        SharedStorageWarning,
        stacklevel=4,  # past find_aliases and StateDictSource: the line that built the source
    )
