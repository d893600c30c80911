"""Robust aggregation (fl/robust.py) against a direct float64 computation, its refusals, its
sensitivity to deliberate bugs, and jobs over real tcp where one site poisons the round.

The reference works on exact updates: u_i = sent - base (FULL) or sent (DIFF), in float64, the
norm over each client's delivered float tensors, s_i = min(1, c / ||u_i||), then the weighted mean,
trimmed mean (numpy sort) or median (numpy median) of s_i * u_i per coordinate, plus base.

Tolerance per coordinate (u = 2**-24; M = the largest |u_i| there over the contributors): a
stored update is u_i rounded to float32 (FULL: one subtraction), <= u * M; the clip scale comes
from the stored values' norm and is rounded to float32, and the product rounded: <= 4u * M more.
Sorting moves an order statistic by at most the largest perturbation, and averaging does not grow
it; the float64 reduction is exact enough; base + result in float32 rounds twice more. So
E = 8u * (M + |base| + |ref|), plus the final cast to the model's dtype: 2 ulps at |ref| + E.
A wrong norm, a wrong trim count or a lower median is off by orders of magnitude more.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fl.robust
from fl.aggregation import FileSums, MemorySums, TensorLayout
from fl.config import ConfigFileError, ServerConfig, load_config
from fl.daemons import build_fedavg
from fl.fedavg import FedAvg
from fl.model import SAMPLE_COUNT, FLModel, ParamsType
from fl.robust import RobustAggregation, RobustOptions
from fl.server_optimizers import FedAdamUpdate, FedAvgUpdate
from tests.fl.helpers import Trainer, new_server, run_client
from tests.fl.rounds import add_in_lanes, finish_into

U32 = 2.0**-24
RULES = ("mean", "trimmed_mean", "median")


@dataclass
class Client:
    name: str
    weight: float
    mode: ParamsType
    delivers: list[bool]
    poison: float = 1.0  # its update is this many times larger than an honest one


@dataclass
class Case:
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    clients: list[Client]
    options: RobustOptions
    file_store: bool
    slice_elements: int
    threads: int
    order_seed: int
    seed: int
    scales: list[float] = field(default_factory=list)


def options_for(rule: str, clip: float | None, trim: float) -> RobustOptions:
    if rule == "median":
        return RobustOptions(clip_norm=clip, median=True)
    return RobustOptions(clip_norm=clip, trim_fraction=trim if rule == "trimmed_mean" else 0.0)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    tensors = draw(st.integers(1, 3))
    count = draw(st.integers(1, 5))
    clients = [
        Client(
            f"site-{i}",
            draw(st.one_of(st.integers(1, 1000), st.floats(1e-2, 1e3))),
            draw(st.sampled_from(ParamsType)),
            draw(st.lists(st.booleans(), min_size=tensors, max_size=tensors)),
            draw(st.sampled_from([1.0, 1.0, 1.0, 1e4])),
        )
        for i in range(count)
    ]
    for client in clients[: draw(st.integers(0, count))]:  # most clients deliver everything
        client.delivers = [True] * tensors
    rule = draw(st.sampled_from(RULES))
    clip = draw(st.sampled_from([None, 0.05, 1.0, 30.0]))
    if rule == "mean" and clip is None:
        clip = 1.0  # plain FedAvg is test_aggregation_properties.py's
    return Case(
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        shapes=draw(
            st.lists(
                st.lists(st.integers(0, 4), max_size=2).map(tuple) | st.tuples(st.integers(9, 30)),
                min_size=tensors,
                max_size=tensors,
            )
        ),
        clients=clients,
        options=options_for(rule, clip, draw(st.sampled_from([0.2, 0.34, 0.49]))),
        file_store=draw(st.booleans()),
        slice_elements=draw(st.integers(1, 12)),
        threads=draw(st.integers(1, 2)),
        order_seed=draw(st.integers(0, 2**32 - 1)),
        seed=draw(st.integers(0, 2**32 - 1)),
        scales=draw(
            st.lists(st.sampled_from([1e-2, 1.0, 20.0]), min_size=tensors, max_size=tensors)
        ),
    )


# --- the round: ours and the reference ---------------------------------------------------------

Upload = tuple[Client, str, torch.Tensor]


def make_round(case: Case) -> tuple[dict[str, torch.Tensor], list[Upload]]:
    """The base model and every upload that reached the server (in the model's dtype)."""
    generator = torch.Generator().manual_seed(case.seed)
    base, uploads = {}, []
    for index, (shape, scale) in enumerate(zip(case.shapes, case.scales, strict=True)):
        name = f"t{index}"
        base[name] = (torch.randn(shape, generator=generator) * scale).to(case.dtype)
        for client in case.clients:
            change = torch.randn(shape, generator=generator) * scale * 0.5 * client.poison
            full = (base[name].float() + change).to(case.dtype)
            sent = full if client.mode is ParamsType.FULL else (full.float() - base[name].float())
            if client.delivers[index]:
                uploads.append((client, name, sent.to(case.dtype)))
    return base, uploads


def aggregate(
    case: Case, base: dict[str, torch.Tensor], uploads: list[Upload], directory: Path
) -> dict[str, torch.Tensor]:
    layouts = {name: TensorLayout.of(tensor) for name, tensor in base.items()}
    store = (
        FileSums(directory / "updates.bin", slice_elements=case.slice_elements)
        if case.file_store
        else MemorySums(slice_elements=case.slice_elements)
    )
    aggregation = RobustAggregation(base, layouts, store, FedAvgUpdate(), case.options)
    ordered = list(uploads)
    random.Random(case.order_seed).shuffle(ordered)
    lanes = [ordered[i :: case.threads] for i in range(case.threads)]
    add_in_lanes(aggregation, lanes)
    out = finish_into(aggregation, base)
    assert not (directory / "updates.bin").exists()  # finish_round deleted the stored updates
    return out


def exact_update(client: Client, sent: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    value = sent.double().numpy().reshape(-1)
    return value - base.double().numpy().reshape(-1) if client.mode is ParamsType.FULL else value


def reference(
    options: RobustOptions, base: dict[str, torch.Tensor], uploads: list[Upload]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the new model in float64, the largest |clipped update| per coordinate), per tensor."""
    updates = {(c.name, n): exact_update(c, t, base[n]) for c, n, t in uploads}
    scale = {c.name: 1.0 for c, _, _ in uploads}
    if options.clip_norm is not None:
        for name in scale:
            norm = np.sqrt(sum(float(np.sum(u * u)) for (c, _), u in updates.items() if c == name))
            scale[name] = min(1.0, options.clip_norm / norm) if norm > 0 else 1.0
    new, largest = {}, {}
    for name, tensor in base.items():
        rows = [(c, scale[c.name] * updates[(c.name, n)]) for c, n, _ in uploads if n == name]
        values = np.stack([row for _, row in rows]).reshape(len(rows), -1)
        weights = np.array([c.weight for c, _ in rows], dtype=np.float64)
        new[name] = tensor.double().numpy().reshape(-1) + combine(options, values, weights)
        largest[name] = np.abs(values).max(axis=0)
    return new, largest


def combine(options: RobustOptions, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    if options.median:
        return np.median(values, axis=0)
    if options.trim_fraction > 0:
        trim = int(options.trim_fraction * len(values))
        return np.sort(values, axis=0)[trim : len(values) - trim].mean(axis=0)
    return (weights[:, None] * values).sum(axis=0) / weights.sum()


def ulp(magnitude: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    info = torch.finfo(dtype)
    return 2.0 ** np.floor(np.log2(np.maximum(magnitude, info.tiny))) * info.eps


def mismatches(
    case: Case, base: dict[str, torch.Tensor], uploads: list[Upload], ours: dict[str, torch.Tensor]
) -> list[str]:
    """The tensors where ours is outside the tolerance (module docstring) of the reference."""
    ref, largest = reference(case.options, base, uploads)
    wrong = []
    for name, tensor in base.items():
        got = ours[name].double().numpy().reshape(-1)
        base64 = np.abs(tensor.double().numpy().reshape(-1))
        bound = 8 * U32 * (largest[name] + base64 + np.abs(ref[name]))
        bound = bound + 2 * ulp(np.abs(ref[name]) + bound, case.dtype)
        if not np.all(np.abs(got - ref[name]) <= bound):
            wrong.append(f"{name}: off by {np.max(np.abs(got - ref[name]) - bound):.3g}")
    return wrong


def too_few_to_trim(case: Case, uploads: list[Upload]) -> bool:
    counts = dict.fromkeys({n for _, n, _ in uploads}, 0)
    for _, name, _ in uploads:
        counts[name] += 1
    trim = case.options.trim_fraction
    return trim > 0 and any(int(trim * n) < 1 for n in counts.values())


# --- property tests ----------------------------------------------------------------------------


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_robust_round_matches_the_float64_direct_computation(case: Case) -> None:
    base, uploads = make_round(case)
    event(f"{case.options.rule}, clip {case.options.clip_norm}, {len(case.clients)} clients")
    with tempfile.TemporaryDirectory() as directory:
        if {n for _, n, _ in uploads} != set(base):
            with pytest.raises(ValueError, match="no client delivered"):
                aggregate(case, base, uploads, Path(directory))
            return
        if too_few_to_trim(case, uploads):
            event("too few clients to trim")
            with pytest.raises(ValueError, match="trims none"):
                aggregate(case, base, uploads, Path(directory))
            return
        ours = aggregate(case, base, uploads, Path(directory))
    assert not mismatches(case, base, uploads, ours)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), other_order=st.integers(0, 2**32 - 1))
def test_the_result_does_not_depend_on_arrival_order(case: Case, other_order: int) -> None:
    """Contributors are combined in sorted order: any two arrival orders give the same bits."""
    base, uploads = make_round(case)
    if {n for _, n, _ in uploads} != set(base) or too_few_to_trim(case, uploads):
        return
    with tempfile.TemporaryDirectory() as directory:
        first = aggregate(case, base, uploads, Path(directory))
        case.order_seed, case.threads = other_order, 1
        second = aggregate(case, base, uploads, Path(directory))
    assert all(torch.equal(first[name], second[name]) for name in base)


# --- deliberate bugs are caught ----------------------------------------------------------------


def poisoned_case(options: RobustOptions, count: int = 5) -> Case:
    clients = [
        Client(f"site-{i}", 1.0 + i, list(ParamsType)[i % 2], [True, True], 1.0)
        for i in range(count)
    ]
    clients[-1].poison = 1e4
    return Case(
        dtype=torch.float32,
        shapes=[(7, 3), (40,)],
        clients=clients,
        options=options,
        file_store=True,
        slice_elements=6,
        threads=1,
        order_seed=1,
        seed=7,
        scales=[1.0, 1.0],
    )


def run_case(case: Case, tmp_path: Path) -> list[str]:
    base, uploads = make_round(case)
    return mismatches(case, base, uploads, aggregate(case, base, uploads, tmp_path))


@pytest.mark.parametrize(
    ("options", "mutant", "bug"),
    [
        (RobustOptions(clip_norm=1.0), "clip_scale", lambda sq, c: min(1.0, c / max(sq, 1e-30))),
        (RobustOptions(clip_norm=1.0), "clip_scale", lambda sq, c: 1.0),
        (RobustOptions(trim_fraction=0.4), "trim_count", lambda n, f: int(f * n) - 1),
        (RobustOptions(median=True), "median", lambda v, w: torch.sort(v, 0).values[1].double()),
    ],
    ids=["norm-without-sqrt", "no-clipping", "trims-one-too-few", "lower-median"],
)
def test_a_deliberate_bug_fails_the_direct_comparison(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: RobustOptions,
    mutant: str,
    bug: Callable[..., object],
) -> None:
    count = 4 if options.median else 5
    assert not run_case(poisoned_case(options, count), tmp_path)  # the real code passes
    monkeypatch.setattr(fl.robust, mutant, bug)
    assert run_case(poisoned_case(options, count), tmp_path)


def test_the_norm_is_over_the_whole_update_not_per_tensor(tmp_path: Path) -> None:
    """Two tensors of norm 3 and 4: the update's norm is 5, so clip 5 leaves it as it is (a
    per-tensor clip to 5 would too, but clip 2.5 scales both by 1/2, not by 2.5/3 and 2.5/4)."""
    base = {"a": torch.zeros(1), "b": torch.zeros(1)}
    layouts = {name: TensorLayout.of(t) for name, t in base.items()}
    for clip, expected in ((5.0, (3.0, 4.0)), (2.5, (1.5, 2.0))):
        options = RobustOptions(clip_norm=clip)
        aggregation = RobustAggregation(base, layouts, MemorySums(), FedAvgUpdate(), options)
        aggregation.add("s", "a", torch.tensor([3.0]), 1, "DIFF")
        aggregation.add("s", "b", torch.tensor([-4.0]), 1, "DIFF")
        assert aggregation.norm("s") == 5.0
        out: dict[str, float] = {}

        def write(name: str, start: int, piece: torch.Tensor, out: dict[str, float] = out) -> None:
            out[name] = piece.item()

        aggregation.finish_round(write)
        assert (out["a"], -out["b"]) == expected


def test_integer_tensors_are_neither_counted_nor_scaled() -> None:
    base = {"w": torch.zeros(2), "steps": torch.tensor([10, 20])}
    layouts = {name: TensorLayout.of(t) for name, t in base.items()}
    options = RobustOptions(clip_norm=1.0, median=True)
    aggregation = RobustAggregation(base, layouts, MemorySums(), FedAvgUpdate(), options)
    for site, (w, steps) in {"a": (3.0, 4), "b": (0.3, 8), "c": (-30.0, 100)}.items():
        aggregation.add(site, "w", torch.tensor([w, 0.0]), 1, "DIFF")
        aggregation.add(site, "steps", base["steps"] + steps, 1, "FULL")
    assert aggregation.norm("a") == 3.0  # the counter's change (4) is not in the norm
    out: dict[str, torch.Tensor] = {}
    aggregation.finish_round(lambda name, start, piece: out.update({name: piece.clone()}))
    assert torch.equal(out["steps"], torch.tensor([18, 28]))  # the median step, unscaled
    assert out["w"].tolist() == [pytest.approx(0.3), 0.0]  # medians of 1, 0.3, -1 and of 0s


def test_fedadam_steps_on_the_robust_update() -> None:
    """The update rule gets the median update as a DIFF mean: Adam's pseudo-gradient."""
    base = {"w": torch.full((4,), 0.5)}
    update = FedAdamUpdate(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    options = RobustOptions(median=True)
    layouts = {"w": TensorLayout.of(base["w"])}
    aggregation = RobustAggregation(base, layouts, MemorySums(), update, options)
    for site, value in {"a": 1.5, "b": 2.5, "mallory": 1e6}.items():
        aggregation.add(site, "w", torch.full((4,), value), 1, "FULL")
    out: dict[str, torch.Tensor] = {}
    aggregation.finish_round(lambda name, start, piece: out.update({name: piece.clone()}))
    delta = 2.0  # the median of the updates 1, 2 and 1e6 - 0.5
    m, v = 0.1 * delta, 0.99 * 1e-3**2 + 0.01 * delta**2
    assert torch.allclose(out["w"], torch.full((4,), 0.5 + 0.1 * m / (v**0.5 + 1e-3)))


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trim_fraction": 0.5}, "trim_fraction must be in"),
        ({"trim_fraction": -0.1}, "trim_fraction must be in"),
        ({"clip_norm": 0.0}, "clip_norm must be"),
        ({"clip_norm": float("nan")}, "clip_norm must be"),
        ({"clip_norm": float("inf")}, "clip_norm must be"),
        ({"median": True, "trim_fraction": 0.2}, "not both"),
    ],
)
def test_bad_options_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RobustOptions(**options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        FedAvg(FLModel(params={"w": torch.zeros(1)}), min_clients=10, **options)  # type: ignore[arg-type]


def test_a_trimmed_mean_that_trims_nothing_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match=r"trims nothing from 4 clients.*min_clients >= 5"):
        FedAvg(FLModel(params={"w": torch.zeros(1)}), min_clients=4, trim_fraction=0.2)
    FedAvg(FLModel(params={"w": torch.zeros(1)}), min_clients=5, trim_fraction=0.2)


@pytest.mark.parametrize(
    ("robust", "message"),
    [
        ("trim_fraction = 0.5", "fedavg.robust.trim_fraction: Input should be less than 0.5"),
        ("trim_fraction = 0.2", "trims nothing from min_clients = 2 clients"),
        ("median = true\ntrim_fraction = 0.3", "choose median or trim_fraction, not both"),
        ("clip_norm = -1.0", "fedavg.robust.clip_norm: Input should be greater than 0"),
        ("clip = 1.0", "fedavg.robust.clip: Extra inputs are not permitted"),
    ],
)
def test_bad_robust_config_is_refused_with_the_field(
    tmp_path: Path, robust: str, message: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f"[fedavg]\nmin_clients = 2\n[fedavg.robust]\n{robust}\n")
    with pytest.raises(ConfigFileError, match=message):
        load_config(ServerConfig, path)


def test_the_config_reaches_the_controller(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        '[fedavg]\nmin_clients = 4\nalgorithm = "fedadam"\n'
        "[fedavg.robust]\nclip_norm = 2.5\ntrim_fraction = 0.25\n"
    )
    controller = build_fedavg(load_config(ServerConfig, path).fedavg, tmp_path / "state")
    assert controller.robust == RobustOptions(clip_norm=2.5, trim_fraction=0.25)


def test_a_tensor_with_too_few_clients_to_trim_is_refused() -> None:
    base = {"w": torch.zeros(3)}
    options = RobustOptions(trim_fraction=0.25)
    aggregation = RobustAggregation(
        base, {"w": TensorLayout.of(base["w"])}, MemorySums(), FedAvgUpdate(), options
    )
    for site in "abc":
        aggregation.add(site, "w", torch.ones(3), 1, "DIFF")
    with pytest.raises(ValueError, match=r"came from 3 clients: trim_fraction 0\.25 trims none"):
        aggregation.finish_round(lambda name, start, piece: None)


def test_clipping_a_tensor_before_its_clients_finished_is_refused() -> None:
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    layouts = {name: TensorLayout.of(t) for name, t in base.items()}
    options = RobustOptions(clip_norm=1.0)
    aggregation = RobustAggregation(base, layouts, MemorySums(), FedAvgUpdate(), options)
    aggregation.add("s", "a", torch.ones(2), 1, "DIFF")
    with pytest.raises(ValueError, match="cannot clip before s delivered every tensor"):
        aggregation.finish_tensor("a", lambda start, piece: None)


# --- jobs over real tcp ------------------------------------------------------------------------

BASE = {
    "w": torch.linspace(-1, 1, 20_000).reshape(200, 100),
    "h": torch.linspace(0, 2, 513).to(torch.bfloat16),
}
OFFSETS = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "mallory": 1e6}  # mallory poisons
HONEST = ("a", "b", "c", "d")
FULL_SITES = ("a", "c")  # the others send DIFFs
COUNTS = {**dict.fromkeys(HONEST, 10.0), "mallory": 1e6}  # mallory claims many samples


def shift_trainer(offset: float, count: float, params_type: str) -> Trainer:
    """received + offset (FULL) or offset everywhere (DIFF), weighted by `count`."""

    async def trainer(client: object, received: FLModel) -> FLModel:
        assert isinstance(received.params, dict)
        params = {name: shifted(t, offset, params_type) for name, t in received.params.items()}
        return FLModel(params=params, params_type=params_type, meta={SAMPLE_COUNT: count})  # type: ignore[arg-type]

    return trainer


def shifted(tensor: torch.Tensor, offset: float, params_type: str) -> torch.Tensor:
    if params_type == "FULL":
        return (tensor.double() + offset).to(tensor.dtype)
    return torch.full_like(tensor, offset)


def poisoned_trainers() -> dict[str, Trainer]:
    return {
        site: shift_trainer(offset, COUNTS[site], "FULL" if site in FULL_SITES else "DIFF")
        for site, offset in OFFSETS.items()
    }


def exact_updates(model: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's upload as an update from `model`, exactly (float64): what the direct
    computations start from."""
    updates: dict[str, dict[str, torch.Tensor]] = {}
    for site, offset in OFFSETS.items():
        full = site in FULL_SITES
        updates[site] = {
            name: shifted(t, offset, "FULL" if full else "DIFF").double()
            - (t.double() if full else 0)
            for name, t in model.items()
        }
    return updates


async def run_job(algorithm: FedAvg, trainers: dict[str, Trainer]) -> None:
    clients: list[asyncio.Future[int]] = []
    try:
        async with new_server() as server:
            (url,) = await server.start(["tcp://127.0.0.1:0"])
            algorithm.attach(server)
            clients = [asyncio.ensure_future(run_client(url, s, t)) for s, t in trainers.items()]
            await algorithm.run()
    finally:  # a job that raised has stopped its server: the clients end too
        await asyncio.gather(*clients, return_exceptions=True)


def assert_close_to(params: object, expected: dict[str, torch.Tensor]) -> None:
    """Equal to the direct computation up to its rounding: a few float32 ulps for float32, one
    bfloat16 ulp (the rounding of a value computed in float32 vs float64 may differ)."""
    assert isinstance(params, dict)
    for name, value in expected.items():
        tolerance = 2**-6 if value.dtype == torch.bfloat16 else 1e-6
        error = (params[name].double() - value.double()).abs().max()
        assert params[name].dtype == value.dtype, name
        assert error <= tolerance, (name, error)


@pytest.mark.parametrize("sums", ["memory", "file"])
async def test_a_trimmed_mean_job_ignores_a_poisoning_site(tmp_path: Path, sums: str) -> None:
    fedavg = FedAvg(
        FLModel(params=dict(BASE)),
        rounds=2,
        num_clients=5,
        min_clients=5,
        trim_fraction=0.2,
        state_dir=tmp_path / "state",
        accumulator_dir=tmp_path / "scratch" if sums == "file" else None,
    )
    await run_job(fedavg, poisoned_trainers())
    expected = dict(BASE)
    for _ in range(2):  # each round: base + the trimmed mean (drop 1 at each end of 5)
        updates = exact_updates(expected)
        for name, value in expected.items():
            stacked = torch.stack([updates[site][name] for site in OFFSETS])
            step = torch.sort(stacked, dim=0).values[1:-1].mean(dim=0)
            expected[name] = (value.double() + step).to(value.dtype)
    assert_close_to(fedavg.model.params, expected)
    honest = 2 * sum(OFFSETS[site] for site in HONEST) / len(HONEST)  # 0.5 after two rounds
    for name, base in BASE.items():
        drift = (fedavg.model.params[name].double() - base.double() - honest).abs().max()  # type: ignore[index]
        assert drift < 0.15, (name, drift)  # 0.6: FedAvg would have moved by ~1e6
    assert not list((tmp_path / "scratch").glob("*"))  # no per-client scratch left behind


async def test_a_clipped_job_bounds_a_poisoning_sites_step(tmp_path: Path) -> None:
    clip = 5.0
    fedavg = FedAvg(
        FLModel(params=dict(BASE)),
        rounds=1,
        num_clients=5,
        min_clients=5,
        clip_norm=clip,
        state_dir=tmp_path / "state",
        accumulator_dir=tmp_path / "scratch",
    )
    await run_job(fedavg, poisoned_trainers())
    updates = exact_updates(BASE)
    norms = {
        s: sum(float(u.square().sum()) for u in ups.values()) ** 0.5 for s, ups in updates.items()
    }
    scales = {site: min(1.0, clip / norm) for site, norm in norms.items()}
    total = sum(COUNTS.values())
    expected = {
        name: (
            base.double() + sum(COUNTS[s] * scales[s] * updates[s][name] for s in OFFSETS) / total
        ).to(base.dtype)
        for name, base in BASE.items()
    }
    params = fedavg.model.params
    assert_close_to(params, expected)
    assert isinstance(params, dict)
    step = sum(float((params[n].double() - b.double()).square().sum()) for n, b in BASE.items())
    assert step**0.5 <= clip * 1.05  # a mean of updates of norm <= clip (bf16 rounding aside)
    reported = fedavg.history[0].extra["update_norms"]  # for an operator choosing clip_norm
    assert reported == {site: pytest.approx(norm, rel=1e-6) for site, norm in norms.items()}


async def test_a_robust_round_restarted_after_a_crash_ends_as_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    """A server that died mid-round (its scratch file left behind, half written) runs the round
    again with the same sites: the stale file is truncated and reused, then deleted."""

    def job(directory: Path, **changes: object) -> FedAvg:
        return FedAvg(
            FLModel(params=dict(BASE)),
            rounds=2,
            num_clients=5,
            min_clients=5,
            median=True,
            clip_norm=50.0,
            state_dir=directory / "state",
            accumulator_dir=directory / "scratch",
            **changes,  # type: ignore[arg-type]
        )

    plain = job(tmp_path / "plain")
    await run_job(plain, poisoned_trainers())

    class Crash(Exception):
        pass

    def crash(number: int, clients: list[str]) -> None:
        if number == 1:
            (tmp_path / "killed" / "scratch" / "updates-1.bin").write_bytes(b"\x7f" * 100_000)
            raise Crash

    with pytest.raises(Crash):
        await run_job(job(tmp_path / "killed", on_round_start=crash), poisoned_trainers())
    resumed = job(tmp_path / "killed")
    await run_job(resumed, poisoned_trainers())
    assert resumed.resumed_from == 1
    for name, tensor in plain.model.params.items():  # type: ignore[union-attr]
        assert torch.equal(resumed.model.params[name], tensor), name  # type: ignore[index]
    assert not list((tmp_path / "killed" / "scratch").glob("*"))
