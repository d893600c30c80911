"""Shared pieces of the FL tests: an in-process server and clients on real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import torch

from fl.client import ClientSettings, FLClient
from fl.model import SAMPLE_COUNT, FLModel
from fl.server import FLServer
from fl.task import MLP, evaluate, held_out_data, local_data, train
from transport import EndpointConfig

SMALL = {"chunk_size": 1 << 20, "stream_window": 4 << 20, "connection_window": 8 << 20}


def server_config(**changes: object) -> EndpointConfig:
    return EndpointConfig(idle_timeout=5.0, **SMALL).replace(**changes)


def client_settings(url: str, site: str, **changes: object) -> ClientSettings:
    settings = ClientSettings(
        server_url=url,
        site=site,
        heartbeat_interval=0.2,
        idle_timeout=5.0,
        endpoint_overrides=dict(SMALL),
    )
    for name, value in changes.items():
        setattr(settings, name, value)
    return settings


Trainer = Callable[[FLClient, FLModel], Awaitable[FLModel]]


async def run_client(url: str, site: str, trainer: Trainer) -> int:
    """An in-process client on this loop: answer tasks with `trainer` until the job ends."""
    client = FLClient(client_settings(url, site))
    await client.start_async()
    rounds = 0
    try:
        while await client.is_running_async():
            model = await client.receive_async()
            await client.send_async(await trainer(client, model))
            rounds += 1
    finally:
        await client.close_async()
    return rounds


def mlp_trainer(site: int, sites: int) -> Trainer:
    """A trainer that trains the task's MLP on this site's skewed shard."""
    features, labels = local_data(site, sites)
    test_features, test_labels = held_out_data()

    async def trainer(client: FLClient, received: FLModel) -> FLModel:
        model = MLP()
        assert isinstance(received.params, dict)
        model.load_state_dict(received.params)
        await asyncio.to_thread(train, model, features, labels)
        accuracy = evaluate(model, test_features, test_labels)
        return FLModel(
            params=model.state_dict(),
            metrics={"accuracy": accuracy},
            meta={SAMPLE_COUNT: len(labels)},
        )

    return trainer


def global_accuracy(model: FLModel) -> dict[str, float]:
    network = MLP()
    assert isinstance(model.params, dict)
    network.load_state_dict(model.params)
    return {"global_accuracy": evaluate(network, *held_out_data())}


def new_server(**changes: object) -> FLServer:
    return FLServer(server_config(), heartbeat_timeout=5.0, reconnect_grace=1.0, **changes)  # type: ignore[arg-type]


def constant_trainer(value: float, count: int, params_type: str = "FULL") -> Trainer:
    """Returns every tensor filled with `value`, weighted by `count`."""

    async def trainer(client: FLClient, received: FLModel) -> FLModel:
        assert isinstance(received.params, dict)
        params = {name: torch.full_like(t, value) for name, t in received.params.items()}
        return FLModel(params=params, params_type=params_type, meta={SAMPLE_COUNT: count})  # type: ignore[arg-type]

    return trainer
