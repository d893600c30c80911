"""What a result must be to be taken, and the sink it streams into.

A site's result is checked before any of its bytes are taken (`sink_or_reject`): its weight (the
sample count), then its tensors against the model (names, shapes, dtypes; `ResultRules`). A
refused result is told to the client and is that client's failure only.

A relay's result (fl/relay.py) is a partial sum: for each tensor, the sum of its sites' weighted
tensors, with the weight each sum stands for (`PartialSum` in fl/protocol.py). It is folded into
the round as it is (not multiplied again) and its weights are added, so the server's FedAvg is
flat FedAvg over every site behind the relay. Only a streaming aggregation takes partial sums:
a plain gather (each result as a state dict) and robust aggregation (which needs every site's
own update) refuse them with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl.aggregation import RoundAggregation
from fl.model import FLModel
from fl.protocol import PartialSum, ResultInfo
from fl.staging import StagedSink
from transport import DTYPES, CallbackSink, IncomingTransfer, Sink, StateDictSink, dtype_name

# Called with (client, tensor name, tensor) as each tensor of a result has been aggregated.
TensorHook = Callable[[str, str, Any], None]
# A partial sum travels in an accumulation dtype.
PARTIAL_SUM_DTYPES = ("F32", "F64")

# The largest sample_count a result may claim by default: above any number of samples (or tokens)
# one site trains on in a round, and small enough that weight * value stays far inside float32
# (weights and values are multiplied in the sums' dtype). Jobs set their own bound.
DEFAULT_MAX_SAMPLE_COUNT = 10**12


@dataclass(frozen=True)
class ResultRules:
    """What a result must be to be taken (checked before any of its bytes are).

    `cast_dtypes`: a floating tensor sent in another float dtype (F16 for an F32 model) is cast
    (True) or refused (False); a result of another kind (int or bool for a float tensor, float for
    an int one) is always refused. `max_sample_count`: a larger sample_count is refused."""

    cast_dtypes: bool = True
    max_sample_count: float = DEFAULT_MAX_SAMPLE_COUNT


def sink_or_reject(
    transfer: IncomingTransfer,
    client: str,
    info: ResultInfo,
    aggregation: RoundAggregation | None,
    rules: ResultRules,
    on_tensor: TensorHook | None,
    stage_dir: Path | None = None,
) -> Sink:
    """The sink for a result, or the result refused (the client sees why) and the error raised.
    With `stage_dir` an aggregated result is staged there and folded from disk (fl/staging.py)."""
    try:
        if info.partial is not None:
            add = _partial_sum_add(transfer, client, info, aggregation, rules, on_tensor)
        else:
            weight = _sample_count(client, info, rules)
            if aggregation is None:
                return StateDictSink()
            _check_manifest(client, transfer, aggregation, rules)
            add = _aggregating_add(client, weight, info, aggregation, on_tensor)
        if stage_dir is None:
            return CallbackSink(add)
        return StagedSink(stage_dir / f"{_file_name(client)}.result.safetensors", add)
    except Exception as error:
        transfer.reject(f"result refused: {error}")
        raise


def _sample_count(client: str, info: ResultInfo, rules: ResultRules) -> float:
    """The result's weight: a positive number (not a bool), at most rules.max_sample_count."""
    try:
        weight = FLModel(meta=info.meta).sample_count
    except ValueError as error:
        raise ValueError(f"{client}'s result: {error}") from None
    if not weight <= rules.max_sample_count:
        raise ValueError(
            f"{client}'s result claims sample_count {weight:g}, above max_sample_count "
            f"{rules.max_sample_count:g}"
        )
    return weight


def _file_name(client: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", client)


def _aggregating_add(
    client: str,
    weight: float,
    info: ResultInfo,
    aggregation: RoundAggregation,
    on_tensor: TensorHook | None,
) -> Callable[[str, Any], None]:
    """What folds each tensor into `aggregation` as it arrives (then it is let go)."""
    params_type = info.params_type

    def add(name: str, tensor: Any) -> None:
        aggregation.add(client, name, tensor, weight, params_type)
        if on_tensor is not None:
            on_tensor(client, name, tensor)

    return add


def _partial_sum_add(
    transfer: IncomingTransfer,
    client: str,
    info: ResultInfo,
    aggregation: RoundAggregation | None,
    rules: ResultRules,
    on_tensor: TensorHook | None,
) -> Callable[[str, Any], None]:
    """A relay's partial sum: each tensor folded as it is, standing for its sites' weight."""
    partial = info.partial
    assert partial is not None
    if aggregation is None:
        raise ValueError(
            f"{client} is a relay: its result is a partial sum, which only a streaming "
            "aggregation (gather with a RoundAggregation, as FedAvg does) can take"
        )
    if not aggregation.takes_partial_sums:
        raise ValueError(
            f"{client} is a relay, and this round's aggregation needs every site's own update "
            "(robust aggregation): connect those sites to the server directly"
        )
    _check_partial_weights(client, partial, rules)
    _check_manifest(client, transfer, aggregation, rules, partial_sum=True)
    params_type = info.params_type

    def add(name: str, tensor: Any) -> None:
        weight = partial.weight_of(name)
        if weight > 0:  # no site behind the relay delivered this tensor
            aggregation.add(client, name, tensor, weight, params_type, partial=True)
            if on_tensor is not None:
                on_tensor(client, name, tensor)

    return add


def _check_partial_weights(client: str, partial: PartialSum, rules: ResultRules) -> None:
    """Every weight a sum stands for is at most what its sites could claim together."""
    bound = rules.max_sample_count * max(1, len(partial.sites))
    for name, weight in [("", partial.weight), *partial.weights.items()]:
        if not 0 <= weight <= bound:
            what = f"tensor {name!r}" if name else "its total"
            raise ValueError(
                f"{client}'s partial sum claims weight {weight:g} for {what}, outside [0, "
                f"{bound:g}] (max_sample_count x {len(partial.sites)} sites)"
            )


def _check_manifest(
    client: str,
    transfer: IncomingTransfer,
    aggregation: RoundAggregation,
    rules: ResultRules,
    *,
    partial_sum: bool = False,
) -> None:
    """Refuse, before any byte is taken, a result whose tensors are not the model's: names,
    shapes, then dtypes (see ResultRules)."""
    manifest = transfer.manifest
    received = {s.name: tuple(s.shape) for s in manifest.tensors} if manifest else {}
    expected = {name: tuple(layout.shape) for name, layout in aggregation.layouts.items()}
    if received != expected:
        extra = sorted(set(received) - set(expected))[:3]
        absent = sorted(set(expected) - set(received))[:3]
        changed = sorted(n for n in set(received) & set(expected) if received[n] != expected[n])
        raise ValueError(
            f"{client}'s result does not match the model: unexpected {extra}, missing "
            f"{absent}, other shape {changed[:3]}"
        )
    assert manifest is not None  # the names matched
    for spec in manifest.tensors:
        if partial_sum:
            if spec.dtype not in PARTIAL_SUM_DTYPES:
                raise ValueError(
                    f"{client}'s partial sum of {spec.name!r} is {spec.dtype}, not one of "
                    f"{', '.join(PARTIAL_SUM_DTYPES)}"
                )
            continue
        check_dtype(client, spec.name, spec.dtype, aggregation.layouts[spec.name].dtype, rules)


def check_dtype(
    client: str, name: str, got: str, expected: torch.dtype, rules: ResultRules
) -> None:
    """A tensor of the model's dtype, or a castable one (see ResultRules); else refused."""
    dtype = DTYPES.get(got)
    if dtype == expected:
        return
    castable = dtype is not None and _dtype_kind(dtype) == _dtype_kind(expected)
    if castable and rules.cast_dtypes and _dtype_kind(expected) != "bool":
        return
    why = "cast_dtypes is off" if castable else "not castable"
    raise ValueError(
        f"{client}'s tensor {name!r} is {got}, the model's is {dtype_name(expected) or expected} "
        f"({why})"
    )


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"
