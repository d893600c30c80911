"""Client failures are data: a killed client does not kill the round, and it can rejoin."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from fl.fedavg import FedAvg
from fl.model import FLModel
from tests.fl.helpers import client_settings, new_server

SCRIPT = Path(__file__).parent / "scripts" / "site.py"
ROOT = Path(__file__).parents[2]


def start_site(url: str, site: str, **env: str) -> subprocess.Popen[bytes]:
    settings = client_settings(url, site)
    environment = {**os.environ, **settings.environment(), **env, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(SCRIPT)], env=environment)


async def wait_for_file(path: Path, timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.05)):
        if path.exists():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{path} did not appear")


async def test_a_killed_client_fails_its_round_and_rejoins_the_next(tmp_path: Path) -> None:
    marker = tmp_path / "victim-is-training"
    fedavg = FedAvg(
        FLModel(params={"w": torch.zeros(1000)}),
        rounds=2,
        num_clients=3,
        min_clients=2,
        join_timeout=60,
    )
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        fedavg.attach(server)
        sites = {name: start_site(url, name) for name in ("a", "b")}
        sites["victim"] = start_site(url, "victim", SITE_SLOW_MARKER=str(marker))
        try:
            job = asyncio.ensure_future(fedavg.run())
            await wait_for_file(marker)
            sites["victim"].send_signal(signal.SIGKILL)
            await asyncio.to_thread(sites["victim"].wait)
            sites["victim"] = start_site(url, "victim")  # restarted: same site name
            await asyncio.wait_for(job, 120)
        finally:
            await server.stop_clients("test over")
            for process in sites.values():
                try:
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
    first, second = fedavg.history
    assert first.succeeded == ["a", "b"]
    assert "disconnected" in first.failed["victim"] or "restarted" in first.failed["victim"]
    assert second.succeeded == ["a", "b", "victim"]
    params = fedavg.model.params
    assert isinstance(params, dict)
    assert torch.equal(params["w"], torch.full((1000,), 2.0))  # +1 per round
    assert all(process.returncode == 0 for process in sites.values())


async def test_a_client_restarted_within_the_grace_period_fails_its_task(tmp_path: Path) -> None:
    marker = tmp_path / "victim-is-training"
    fedavg = FedAvg(FLModel(params={"w": torch.zeros(10)}), rounds=1, num_clients=2, min_clients=1)
    async with new_server() as server:
        server.reconnect_grace = 3600  # only the restart's hello can tell the task is lost
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        fedavg.attach(server)
        sites = {"a": start_site(url, "a")}
        sites["victim"] = start_site(url, "victim", SITE_SLOW_MARKER=str(marker))
        try:
            job = asyncio.ensure_future(fedavg.run())
            await wait_for_file(marker)
            sites["victim"].send_signal(signal.SIGKILL)
            await asyncio.to_thread(sites["victim"].wait)
            sites["victim"] = start_site(url, "victim")
            await asyncio.wait_for(job, 60)
        finally:
            await server.stop_clients("test over")
            for process in sites.values():
                await asyncio.to_thread(process.wait, 30)
    failed = fedavg.history[0].failed
    assert list(failed) == ["victim"]
    assert "the client restarted before returning its result" in failed["victim"]
    assert fedavg.history[0].succeeded == ["a"]
