"""A relay's partial sum folded into the round gives flat FedAvg: the relay writes its sites' raw
weighted sums (`write_sums`), the server folds them as they are (`add(partial=True)`), FULL and
DIFF and mixed, against a direct float64 computation; robust aggregation refuses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.aggregation import FileSums, MemorySums, RoundAggregation, TensorLayout
from fl.model import ParamsType
from fl.robust import RobustAggregation, RobustOptions
from fl.server_optimizers import FedAvgUpdate

FULL, DIFF = ParamsType.FULL, ParamsType.DIFF
Model = dict[str, torch.Tensor]
SHAPES = {"w": (9, 5), "b": (5,), "s": (), "n": (3,)}


def model_of(seed: int, *, integers: bool = False) -> Model:
    generator = torch.Generator().manual_seed(seed)
    made = {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}
    if integers:  # small integers: every float32 sum below is exact, whatever the order
        made = {n: (t * 8).round() for n, t in made.items()}
    return made


def layouts(model: Model) -> dict[str, TensorLayout]:
    return {name: TensorLayout.of(tensor) for name, tensor in model.items()}


def new_round(base: Model, tmp_path: Path | None = None) -> RoundAggregation:
    sums = FileSums(tmp_path / "sums.bin", slice_elements=7) if tmp_path else MemorySums()
    return RoundAggregation(base, layouts(base), sums, FedAvgUpdate())


def finish(aggregation: RoundAggregation, base: Model) -> Model:
    out = {name: torch.empty_like(tensor).reshape(-1) for name, tensor in base.items()}

    def write(name: str, start: int, piece: torch.Tensor) -> None:
        out[name][start : start + piece.numel()] = piece

    aggregation.finish_round(write)
    return {name: out[name].reshape(base[name].shape) for name in base}


def relay_sums(
    base: Model, sites: list[tuple[str, Model, float, ParamsType]]
) -> tuple[Model, dict[str, float], ParamsType]:
    """What a relay sends up: its sites' raw weighted sums, their weights and the mode."""
    aggregation = new_round(base)
    for site, update, weight, mode in sites:
        for name, tensor in update.items():
            aggregation.add(site, name, tensor, weight, mode)
    sums = {name: torch.empty(t.numel(), dtype=torch.float32) for name, t in base.items()}

    def write(name: str, start: int, piece: torch.Tensor) -> None:
        sums[name][start : start + piece.numel()] = piece

    outcome = aggregation.write_sums(write)
    return {n: sums[n].reshape(base[n].shape) for n in base}, outcome.weights, outcome.mode


def flat_fedavg(base: Model, sites: list[tuple[str, Model, float, ParamsType]]) -> Model:
    """FedAvg over every site directly, in float64: the reference."""
    total = sum(weight for _, _, weight, _ in sites)
    out = {}
    for name, tensor in base.items():
        acc = torch.zeros(tensor.shape, dtype=torch.float64)
        for _, update, weight, mode in sites:
            full = update[name].double() + (tensor.double() if mode is DIFF else 0)
            acc += weight * full
        out[name] = (acc / total).float()
    return out


def relayed_fedavg(
    base: Model, groups: list[list[tuple[str, Model, float, ParamsType]]], tmp_path: Path
) -> Model:
    """The server's round: one partial sum per group (a relay), folded as it is."""
    server = new_round(base, tmp_path)
    for number, group in enumerate(groups):
        sums, weights, mode = relay_sums(base, group)
        for name, tensor in sums.items():
            server.add(f"relay-{number}", name, tensor, weights[name], mode, partial=True)
    return finish(server, base)


def site(name: str, seed: int, weight: float, mode: ParamsType, *, integers: bool = False):
    return (name, model_of(seed, integers=integers), weight, mode)


@pytest.mark.parametrize("mode", [FULL, DIFF])
def test_exact_when_the_sums_are(mode: ParamsType, tmp_path: Path) -> None:
    base = model_of(0, integers=True)
    sites = [site(f"s{i}", i + 1, float(i + 1), mode, integers=True) for i in range(6)]
    groups = [sites[:2], sites[2:5], sites[5:]]
    relayed = relayed_fedavg(base, groups, tmp_path)
    direct = new_round(base)
    for name_, update, weight, kind in sites:
        for name, tensor in update.items():
            direct.add(name_, name, tensor, weight, kind)
    flat = finish(direct, base)
    for name in base:
        assert torch.equal(relayed[name], flat[name]), name
        assert torch.allclose(relayed[name], flat_fedavg(base, sites)[name], atol=1e-6), name


@pytest.mark.parametrize(
    ("relay_modes", "first"),
    [((FULL, DIFF), FULL), ((DIFF, FULL), DIFF), ((DIFF, DIFF), FULL)],
    ids=["full-then-diff", "diff-then-full", "diff-relay-into-full-round"],
)
def test_modes_mix_across_relays(relay_modes, first, tmp_path: Path) -> None:
    base = model_of(0)
    direct = site("direct", 99, 3.0, first)
    groups = [
        [site(f"r{r}s{i}", 10 * r + i, 1.0 + i, mode) for i in range(3)]
        for r, mode in enumerate(relay_modes)
    ]
    server = new_round(base, tmp_path)
    for name, tensor in direct[1].items():
        server.add("direct", name, tensor, direct[2], first)
    for number, group in enumerate(groups):
        sums, weights, mode = relay_sums(base, group)
        for name, tensor in sums.items():
            server.add(f"relay-{number}", name, tensor, weights[name], mode, partial=True)
    relayed = finish(server, base)
    expected = flat_fedavg(base, [direct, *groups[0], *groups[1]])
    for name in base:
        torch.testing.assert_close(relayed[name], expected[name], rtol=1e-5, atol=1e-5)


def test_a_site_that_failed_half_way_counts_for_its_tensors_only(tmp_path: Path) -> None:
    base = model_of(0)
    whole = site("whole", 1, 2.0, FULL)
    half = ("half", {"w": model_of(2)["w"]}, 5.0, FULL)  # only "w" arrived
    sums, weights, mode = relay_sums(base, [whole, half])
    assert weights == {"w": 7.0, "b": 2.0, "s": 2.0, "n": 2.0}
    server = new_round(base, tmp_path)
    for name, tensor in sums.items():
        server.add("relay", name, tensor, weights[name], mode, partial=True)
    relayed = finish(server, base)
    torch.testing.assert_close(relayed["w"], (2 * whole[1]["w"] + 5 * half[1]["w"]) / 7)
    torch.testing.assert_close(relayed["b"], whole[1]["b"])


def test_a_relay_with_no_result_writes_nothing(tmp_path: Path) -> None:
    aggregation = new_round(model_of(0))
    with pytest.raises(ValueError, match="no client delivered any tensor"):
        aggregation.write_sums(lambda *_: None)


def test_robust_aggregation_refuses_a_partial_sum() -> None:
    base = model_of(0)
    robust = RobustAggregation(
        base, layouts(base), MemorySums(), FedAvgUpdate(), RobustOptions(median=True)
    )
    with pytest.raises(ValueError, match="needs each site's own update"):
        robust.add("relay", "w", base["w"], 3.0, FULL, partial=True)


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 50), min_size=2, max_size=7),
    cut=st.integers(1, 6),
    mode=st.sampled_from([FULL, DIFF]),
)
def test_any_grouping_is_flat_fedavg(weights: list[int], cut: int, mode: ParamsType) -> None:
    base = model_of(0)
    sites = [site(f"s{i}", i + 1, float(w), mode) for i, w in enumerate(weights)]
    cut = min(cut, len(sites) - 1)
    server = new_round(base)
    for number, group in enumerate([sites[:cut], sites[cut:]]):
        sums, sum_weights, kind = relay_sums(base, group)
        for name, tensor in sums.items():
            server.add(f"relay-{number}", name, tensor, sum_weights[name], kind, partial=True)
    relayed = finish(server, base)
    expected = flat_fedavg(base, sites)
    for name in base:
        torch.testing.assert_close(relayed[name], expected[name], rtol=1e-5, atol=1e-5)
