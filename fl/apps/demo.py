"""`tensorwire demo --task lora|sft|embeddings`: the paper's comparison for one application.

Federated: a FedAvg server in this process and one client process per site (fl/apps/client.py)
on loopback, the global model scored after every round. Then, in this process, the two baselines
with the same rounds of the same local training: each site alone (local-only) and all sites' data
pooled (centralized). The summary holds every curve, the final site x method table, the bytes that
moved per round and the whole model's bytes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fl.apps import make_task
from fl.apps.client import run_site_async
from fl.apps.common import UNION, AppTask, Curve, exchanged_bytes, site_name, train_alone
from fl.apps.lm import pretrained_base
from fl.client import ClientSettings
from fl.fedavg import FedAvg, RoundReport
from fl.model import FLModel
from fl.server import FLServer


@dataclass
class AppDemoOptions:
    task: str = "lora"
    size: str = "default"
    rounds: int | None = None  # None: the task's own
    driver: str = "tcp"
    progress: bool = True
    in_process: bool = False  # sites as tasks on this event loop, not processes (the tests)


def run_app_demo(options: AppDemoOptions) -> dict[str, Any]:
    """Run federated, local-only and centralized training of one task; the JSON-able summary."""
    torch.set_num_threads(1)  # the site processes need the other core
    task = make_task(options.task, options.size, options.rounds)
    say = _reporter(options.progress)
    started = time.perf_counter()
    pretrained_base(task.lm)  # once, before the sites load it
    seconds = {"pretraining": time.perf_counter() - started}
    federated, history, model = asyncio.run(_federated(task, options, say))
    seconds["federated"] = time.perf_counter() - started - seconds["pretraining"]
    local = {}
    for site in range(task.sites):
        local[site_name(site)] = train_alone(task, site)
        say(f"local-only {site_name(site)}: {_brief(task, local[site_name(site)].final)}")
    seconds["local"] = time.perf_counter() - started - sum(seconds.values())
    centralized = train_alone(task, None)
    say(f"centralized: {_brief(task, centralized.final)}")
    seconds["total"] = time.perf_counter() - started
    curves = {"federated": federated, "centralized": centralized, "local": local}
    return summarize(task, options, curves, history, model, seconds)


def _reporter(enabled: bool) -> Callable[[str], None]:
    def say(line: str) -> None:
        if enabled:
            print(line, file=sys.stderr, flush=True)

    return say


def _brief(task: AppTask, scores: dict[str, float]) -> str:
    return f"{task.metric} on the union {scores[UNION]:.3f}"


async def _federated(
    task: AppTask, options: AppDemoOptions, say: Callable[[str], None]
) -> tuple[Curve, list[RoundReport], torch.nn.Module]:
    model = task.new_model()  # the server's copy: scores each round's global tensors
    initial = {name: t.clone() for name, t in task.exchanged(model).items()}
    curve = Curve([task.evaluate(model)])

    def evaluate(global_model: FLModel) -> dict[str, float]:
        assert isinstance(global_model.params, dict)
        task.load(model, global_model.params)
        curve.rounds.append(task.evaluate(model))
        return curve.final

    def on_round(report: RoundReport) -> None:
        say(f"round {report.round + 1}/{task.rounds}: {_brief(task, report.metrics)}")

    fedavg = FedAvg(
        FLModel(params=initial),
        rounds=task.rounds,
        num_clients=task.sites,
        min_clients=task.sites,
        join_timeout=300.0,  # sites load the base model and their data before they join
        evaluate=evaluate,
        on_round=on_round,
    )
    async with FLServer(job=f"demo-{task.name}") as server:
        (url,) = await server.start([_listen_url(options.driver)])
        fedavg.attach(server)
        if options.in_process:
            await _run_in_process(fedavg, server, url, task)
        else:
            await _run_with_processes(fedavg, server, url, task, options.size)
    return curve, fedavg.history, model


async def _run_with_processes(
    fedavg: FedAvg, server: FLServer, url: str, task: AppTask, size: str
) -> None:
    children = _start_sites(url, task, size)
    try:
        await fedavg.run()
    finally:
        await server.stop_clients("demo finished")
        await asyncio.to_thread(_reap, children)


async def _run_in_process(fedavg: FedAvg, server: FLServer, url: str, task: AppTask) -> None:
    sites = [
        asyncio.create_task(run_site_async(task, site, _site_settings(url, site)))
        for site in range(task.sites)
    ]
    try:
        await fedavg.run()
    finally:
        await server.stop_clients("demo finished")
        await asyncio.gather(*sites)


def _site_settings(url: str, site: int) -> ClientSettings:
    return ClientSettings(server_url=url, site=site_name(site), heartbeat_interval=2.0)


def _listen_url(driver: str) -> str:
    if driver not in ("tcp", "grpc", "http"):
        raise ValueError(
            f"the demo runs over tcp, grpc or http (sites are processes), not {driver}"
        )
    return f"{driver}://127.0.0.1:0"


def _start_sites(url: str, task: AppTask, size: str) -> list[subprocess.Popen[bytes]]:
    children = []
    for site in range(task.sites):
        settings = _site_settings(url, site)
        command = [sys.executable, "-m", "fl.apps.client", "--task", task.name, "--size", size]
        command += ["--site", str(site), "--sites", str(task.sites)]
        children.append(subprocess.Popen(command, env={**os.environ, **settings.environment()}))
    return children


def _reap(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def summarize(
    task: AppTask,
    options: AppDemoOptions,
    curves: dict[str, Any],
    history: list[RoundReport],
    model: torch.nn.Module,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The JSON summary: per-site `local`, `federated`, `centralized`, bytes, every curve."""
    local: dict[str, Curve] = curves["local"]
    return {
        "task": task.name,
        "size": options.size,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "sites": task.sites,
        "rounds": task.rounds,
        "driver": options.driver,
        "model_bytes": task.model_bytes(model),
        "exchanged_bytes": exchanged_bytes(task.exchanged(model)),
        "bytes_per_round": [r.bytes_sent + r.bytes_received for r in history],
        "round_seconds": [round(r.seconds, 2) for r in history],
        "metrics": final_table(task, curves),
        "curves": {
            "federated": curves["federated"].rounds,
            "centralized": curves["centralized"].rounds,
            "local": {site: curve.rounds for site, curve in local.items()},
        },
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
    }


def final_table(task: AppTask, curves: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Site x method. A site's `local` is its own model on its own held-out data (and
    `local_on_union` the same model on everyone's); the union's `local` is the mean over sites of
    each local model on the union: the number federated has to beat."""
    federated, centralized = curves["federated"].final, curves["centralized"].final
    local: dict[str, Curve] = curves["local"]
    table = {}
    for site in range(task.sites):
        name = site_name(site)
        table[name] = {
            "local": local[name].final[name],
            "local_on_union": local[name].final[UNION],
            "federated": federated[name],
            "centralized": centralized[name],
        }
    mean_local = sum(curve.final[UNION] for curve in local.values()) / len(local)
    table[UNION] = {
        "local": mean_local,
        "federated": federated[UNION],
        "centralized": centralized[UNION],
    }
    return table
