"""FedAvg and FedAdam as jobs: real clients over tcp loopback, the result checked against a direct
float64 computation; and the Controller API as an algorithm author uses it (models, not sinks)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fl.controller import Controller
from fl.fedadam import FedAdam
from fl.fedavg import FedAvg
from fl.model import SAMPLE_COUNT, FLModel
from tests.fl.helpers import Trainer, new_server, run_client

BASE = {
    "w": torch.linspace(-1, 1, 70_000).reshape(700, 100),
    "h": torch.linspace(0, 2, 513).to(torch.bfloat16),
}


def offset_trainer(offset: float, count: int, params_type: str) -> Trainer:
    """Returns received + offset (FULL) or just offset (DIFF), weighted by `count`."""

    async def trainer(client: object, received: FLModel) -> FLModel:
        assert isinstance(received.params, dict)
        if params_type == "FULL":
            params = {
                name: (t.double() + offset).to(t.dtype) for name, t in received.params.items()
            }
        else:
            params = {name: torch.full_like(t, offset) for name, t in received.params.items()}
        return FLModel(params=params, params_type=params_type, meta={SAMPLE_COUNT: count})  # type: ignore[arg-type]

    return trainer


async def run_job(algorithm: FedAvg, trainers: dict[str, Trainer]) -> None:
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        algorithm.attach(server)
        clients = [asyncio.ensure_future(run_client(url, s, t)) for s, t in trainers.items()]
        await algorithm.run()
    await asyncio.gather(*clients)


@pytest.mark.parametrize("sums", ["memory", "file"])
async def test_diff_updates_give_base_plus_the_weighted_mean_diff(
    tmp_path: Path, sums: str
) -> None:
    """The bug this guards against: with file sums the new model was the mean diff alone."""
    fedavg = FedAvg(
        FLModel(params=dict(BASE)),
        rounds=2,
        num_clients=2,
        min_clients=2,
        state_dir=tmp_path / "state",
        accumulator_dir=tmp_path / "sums" if sums == "file" else None,
    )
    await run_job(
        fedavg, {"a": offset_trainer(0.5, 1, "DIFF"), "b": offset_trainer(2.0, 3, "DIFF")}
    )
    mean_diff = (0.5 * 1 + 2.0 * 3) / 4
    params = fedavg.model.params
    assert isinstance(params, dict)
    for name, base in BASE.items():
        expected = base.double()
        for _ in range(2):  # each round: base + mean diff, rounded to the tensor's dtype
            expected = (expected + mean_diff).to(base.dtype).double()
        assert params[name].dtype == base.dtype
        assert torch.equal(params[name], expected.to(base.dtype)), name


def adam_reference(rounds: int, deltas: list[float], eta: float, b1: float, b2: float, tau: float):  # type: ignore[no-untyped-def]
    """FedAdam (Reddi et al. 2021, Algorithm 2) in float64, for one tensor."""
    x = BASE["w"].double()
    m = torch.zeros_like(x)
    v = torch.full_like(x, tau**2)
    for delta in deltas[:rounds]:
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        x = (x + eta * m / (v.sqrt() + tau)).float().double()
    return x


@pytest.mark.parametrize("sums", ["memory", "file"])
async def test_fedadam_job_matches_the_paper_update(tmp_path: Path, sums: str) -> None:
    fedadam = FedAdam(
        FLModel(params={"w": BASE["w"].clone()}),
        eta=0.1,
        rounds=2,
        num_clients=2,
        min_clients=2,
        state_dir=tmp_path / "state",
        accumulator_dir=tmp_path / "sums" if sums == "file" else None,
    )
    trainers = {"a": offset_trainer(0.25, 1, "FULL"), "b": offset_trainer(1.0, 1, "FULL")}
    await run_job(fedadam, trainers)
    params = fedadam.model.params
    assert isinstance(params, dict)
    # each round the clients move every weight by 0.25 and 1.0 (FULL): mean delta 0.625
    expected = adam_reference(2, [0.625, 0.625], 0.1, 0.9, 0.99, 1e-3)
    assert torch.allclose(params["w"].double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(params["w"], BASE["w"] + 2 * 0.625)  # not FedAvg's step
    assert any((tmp_path / "state").glob("fedadam-*.json"))  # the moments are job state


class MedianOfModels(Controller):
    """An algorithm written against models only: one round, the element-wise median."""

    def __init__(self, initial: dict[str, torch.Tensor]) -> None:
        self.model = FLModel(params=initial)
        self.failed: dict[str, str] = {}

    async def run(self) -> None:
        clients = await self.sample_clients(3, min_clients=3, join_timeout=30)
        gathered = await self.gather(self.send_model(self.model, clients), min_clients=3)
        self.failed = gathered.failed
        stacked: dict[str, list[torch.Tensor]] = {}
        for model in gathered.models.values():
            assert isinstance(model.params, dict)
            assert model.sample_count == 2
            for name, tensor in model.params.items():
                stacked.setdefault(name, []).append(tensor)
        self.model = FLModel(
            params={name: torch.stack(ts).median(dim=0).values for name, ts in stacked.items()}
        )


async def test_a_controller_gets_each_clients_model() -> None:
    median = MedianOfModels({"w": torch.zeros(1000)})
    trainers = {site: offset_trainer(v, 2, "FULL") for site, v in (("a", 1), ("b", 5), ("c", 9))}
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        median.attach(server)
        clients = [asyncio.ensure_future(run_client(url, s, t)) for s, t in trainers.items()]
        await median.run()
    await asyncio.gather(*clients)
    assert median.failed == {}
    params = median.model.params
    assert isinstance(params, dict)
    assert torch.equal(params["w"], torch.full((1000,), 5.0))
