"""RoundAggregation + FedAvgUpdate against a direct float64 computation, over random rounds.

A round draws: the model dtype (fp32, bf16, fp16), 1-4 tensors of small random shapes (0-d and
empty ones included), 1-4 clients each with a weight (a sample count, int or float), a mode
(FULL or DIFF, mixed across clients) and the subset of tensors that reached the server (a dropout
mid-upload), memory or file sums with a slice of 1-8 elements (so tensors span many slices), and
the order the adds arrive in, spread over 1-3 threads.

Tolerance (u = 2**-24, float32's unit roundoff; A = sum_i w_i (|x_i| + |base|) / sum_i w_i, where
x_i is client i's full model and the sum runs over the clients that delivered the tensor):
  - a term entering the sums: converting FULL<->DIFF against base (<= u*(|x_i| + |base|)), the
    weight rounded to float32 and the product rounded (<= 2u more): <= 3u * w_i * (|x_i| + |base|);
  - summing n terms in float32 adds at most (n - 1) * u * sum_i w_i * (|x_i| + |base|);
  - dividing by sum w rounds once (<= u * A); DIFF's base + mean rounds once more (<= u * A);
so the float32 value differs from the float64 reference by at most E = (n + 5) * u * A. Casting it
to the model's dtype rounds once more, by half an ulp of the output dtype at the value, which is
below one ulp at |ref| + E (twice that if the value crossed a power of two), so:
    |ours - ref| <= E + 2 * ulp_out(|ref| + E).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fl.aggregation import FileSums, MemorySums, RoundAggregation, TensorLayout
from fl.model import ParamsType
from fl.server_optimizers import FedAvgUpdate
from tests.fl.rounds import add_in_lanes, finish_into

U32 = 2.0**-24
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Client:
    name: str
    weight: float
    mode: ParamsType
    delivers: list[bool]  # per tensor: did its copy arrive whole


@dataclass
class Case:
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    scales: list[float]
    clients: list[Client]
    file_sums: bool
    slice_elements: int
    threads: int
    order_seed: int
    seed: int


weights = st.one_of(st.integers(1, 10**6), st.floats(1e-3, 1e6, allow_nan=False))
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple) | st.tuples(st.integers(9, 40))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    tensors = draw(st.integers(1, 4))
    count = draw(st.integers(1, 4))
    clients = [
        Client(
            f"site-{i}",
            draw(weights),
            draw(st.sampled_from(ParamsType)),
            draw(st.lists(st.booleans(), min_size=tensors, max_size=tensors)),
        )
        for i in range(count)
    ]
    return Case(
        dtype=draw(st.sampled_from(MODEL_DTYPES)),
        shapes=draw(st.lists(shapes, min_size=tensors, max_size=tensors)),
        scales=draw(
            st.lists(st.sampled_from([1e-3, 1.0, 50.0]), min_size=tensors, max_size=tensors)
        ),
        clients=clients,
        file_sums=draw(st.booleans()),
        slice_elements=draw(st.integers(1, 8)),
        threads=draw(st.integers(1, 3)),
        order_seed=draw(st.integers(0, 2**32 - 1)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_models(case: Case) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The base model and each client's full model, all in the model's dtype."""
    generator = torch.Generator().manual_seed(case.seed)
    base, fulls = {}, {c.name: {} for c in case.clients}
    for index, (shape, scale) in enumerate(zip(case.shapes, case.scales, strict=True)):
        name = f"t{index}"
        base[name] = (torch.randn(shape, generator=generator) * scale).to(case.dtype)
        for client in case.clients:
            change = torch.randn(shape, generator=generator) * scale * 0.5
            fulls[client.name][name] = (base[name].float() + change).to(case.dtype)
    return base, fulls


def sent(client: Client, full: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """What the client uploads: its model, or its change from base (in the model's dtype)."""
    return full if client.mode is ParamsType.FULL else (full.float() - base.float()).to(full.dtype)


def as_full64(client: Client, sent_tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The full model the upload describes, exactly, in float64."""
    value = sent_tensor.double()
    return value if client.mode is ParamsType.FULL else base.double() + value


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(magnitude.clamp(min=info.tiny)))
    return torch.pow(2.0, exponent) * info.eps


def aggregate(case: Case, base, uploads, directory: Path) -> dict[str, torch.Tensor]:
    layouts = {name: TensorLayout.of(tensor) for name, tensor in base.items()}
    sums = (
        FileSums(directory / "sums.bin", slice_elements=case.slice_elements)
        if case.file_sums
        else MemorySums(slice_elements=case.slice_elements)
    )
    aggregation = RoundAggregation(base, layouts, sums, FedAvgUpdate())
    random.Random(case.order_seed).shuffle(uploads)
    lanes = [uploads[i :: case.threads] for i in range(case.threads)]
    add_in_lanes(aggregation, lanes)
    out = finish_into(aggregation, base)
    assert not (directory / "sums.bin").exists()  # finish_round closed the sums
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_round_matches_the_float64_weighted_mean(case: Case) -> None:
    base, fulls = make_models(case)
    uploads = [
        (client, name, sent(client, fulls[client.name][name], base[name]))
        for client in case.clients
        for index, name in enumerate(base)
        if client.delivers[index]
    ]
    delivered = {name for _, name, _ in uploads}
    with tempfile.TemporaryDirectory() as directory:
        event(f"{len(case.clients)} clients, {case.threads} threads")
        if delivered != set(base):
            event("a tensor nobody delivered")
            with pytest.raises(ValueError, match="no client delivered"):
                aggregate(case, base, uploads, Path(directory))
            return
        ours = aggregate(case, base, list(uploads), Path(directory))
    for name in base:
        contributions = [(c, t) for c, n, t in uploads if n == name]
        total = sum(c.weight for c, _ in contributions)
        fulls64 = [as_full64(c, t, base[name]) for c, t in contributions]
        ref = sum(c.weight * x for (c, _), x in zip(contributions, fulls64, strict=True)) / total
        spread = (
            sum(
                c.weight * (x.abs() + base[name].double().abs())
                for (c, _), x in zip(contributions, fulls64, strict=True)
            )
            / total
        )
        bound = (len(contributions) + 5) * U32 * spread
        bound = bound + 2 * ulp(ref.abs() + bound, case.dtype)
        error = (ours[name].double() - ref).abs()
        assert bool((error <= bound).all()), (name, error.max(), (error - bound).max())
