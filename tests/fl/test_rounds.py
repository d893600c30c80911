"""FedAvg rounds with an in-process server and clients over real tcp sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio

import torch

from fl.fedavg import FedAvg
from fl.model import FLModel, ParamsType
from fl.task import MLP, evaluate, held_out_data, local_data, train
from tests.fl.helpers import constant_trainer, global_accuracy, mlp_trainer, new_server, run_client


async def run_job(fedavg: FedAvg, trainers: dict[str, object]) -> list[int]:
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        fedavg.attach(server)
        clients = [
            asyncio.ensure_future(run_client(url, site, trainer))  # type: ignore[arg-type]
            for site, trainer in trainers.items()
        ]
        await fedavg.run()
    return list(await asyncio.gather(*clients))


async def test_fedavg_of_constant_models_is_the_weighted_mean() -> None:
    initial = {"w": torch.zeros(300, 1000), "b": torch.zeros(7, dtype=torch.bfloat16)}
    fedavg = FedAvg(FLModel(params=initial), rounds=1, num_clients=3, min_clients=3)
    trainers = {
        "a": constant_trainer(1.0, 1),
        "b": constant_trainer(2.0, 3),
        "c": constant_trainer(4.0, 4),
    }
    assert await run_job(fedavg, trainers) == [1, 1, 1]
    expected = (1.0 * 1 + 2.0 * 3 + 4.0 * 4) / 8
    params = fedavg.model.params
    assert isinstance(params, dict)
    assert torch.allclose(params["w"], torch.full((300, 1000), expected))
    assert params["b"].dtype == torch.bfloat16
    assert fedavg.history[0].succeeded == ["a", "b", "c"]


async def test_diff_updates_are_applied_to_the_global_model() -> None:
    initial = {"w": torch.full((1000,), 10.0)}
    fedavg = FedAvg(FLModel(params=initial), rounds=2, num_clients=2, min_clients=2)
    trainers = {"a": constant_trainer(1.0, 1, "DIFF"), "b": constant_trainer(3.0, 1, "DIFF")}
    await run_job(fedavg, trainers)
    params = fedavg.model.params
    assert isinstance(params, dict)
    assert torch.allclose(params["w"], torch.full((1000,), 14.0))  # 10 + 2 + 2


async def test_mlp_improves_over_rounds_and_beats_a_lone_client() -> None:
    fedavg = FedAvg(
        FLModel(params=MLP().state_dict()),
        rounds=4,
        num_clients=2,
        min_clients=2,
        evaluate=global_accuracy,
    )
    await run_job(fedavg, {"site-0": mlp_trainer(0, 2), "site-1": mlp_trainer(1, 2)})
    accuracies = [report.metrics["global_accuracy"] for report in fedavg.history]
    assert accuracies[-1] > accuracies[0]
    alone = MLP()
    for _ in range(4):
        train(alone, *local_data(0, 2))
    assert accuracies[-1] > evaluate(alone, *held_out_data()) + 0.05
    assert all(report.bytes_received > 0 and report.bytes_sent > 0 for report in fedavg.history)
    assert ParamsType.FULL is fedavg.model.params_type
