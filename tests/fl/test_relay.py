"""`tensorwire relay` as real processes between a real server and real sites: the final model is
flat FedAvg over every site (FULL and DIFF, through one relay and through a chain of two), and a
relay killed mid-round leaves its sites to reach the server themselves and the round completes
with every site counted.

Sites run tests/fl/scripts/relay_site.py: site i returns received + (i + 1) / 4 (or that delta,
DIFF) with sample_count i + 1; every sum is exact in float32, so the comparison is bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import urlopen

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLI = [str(Path(sys.executable).with_name("tensorwire"))]
SITE_SCRIPT = Path(__file__).parent / "scripts" / "relay_site.py"
FAST = "heartbeat_interval = 0.5\nidle_timeout = 20\nconnect_timeout = 60\n"

pytestmark = pytest.mark.timeout(180)
OPS_URLS: dict[int, str] = {}  # a daemon's ops server, by pid, as it printed it


def initial_model() -> dict[str, torch.Tensor]:
    """Small integers (exact sums) over several chunks' worth of bytes."""
    generator = torch.Generator().manual_seed(5)
    return {
        "layer.weight": torch.randint(-8, 8, (600, 1000), generator=generator).float(),
        "layer.bias": torch.randint(-8, 8, (1000,), generator=generator).float(),
        "head": torch.randint(-8, 8, (3, 7), generator=generator).float(),
    }


def flat_fedavg(model: dict[str, torch.Tensor], sites: list[int]) -> dict[str, torch.Tensor]:
    """What FedAvg over every site gives, computed directly (FULL and DIFF agree)."""
    weight = sum(site + 1 for site in sites)
    step = sum((site + 1) * (site + 1) / 4 for site in sites) / weight
    return {name: (tensor.double() + step).float() for name, tensor in model.items()}


@dataclass
class Fleet:
    """The processes of one test; everything still running is killed at the end."""

    root: Path
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        log = self.root / f"{len(self.processes)}-{args[0]}.log"  # what a failure shows
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [*CLI, *args], env=env or ENV, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.processes.append(process)
        return process

    def server(
        self, direct_peers: int, model: Path, grace: float = 1
    ) -> tuple[subprocess.Popen[str], str]:
        config = self.root / "server.toml"
        config.write_text(
            f'listen = ["tcp://127.0.0.1:0"]\nheartbeat_timeout = 20\nreconnect_grace = {grace}\n'
            f'state_dir = "{self.root / "server-state"}"\n'
            f"[fedavg]\nrounds = 1\nnum_clients = {direct_peers}\n"
            f"min_clients = {direct_peers}\njoin_timeout = 60\n"
            f'initial_model = "{model}"\nsave_path = "{self.root / "final.safetensors"}"\n'
        )
        process = self.start("server", "--config", str(config))
        return process, listening_url(process)

    def relay(
        self, name: str, upstream: str, sites: int, *options: str
    ) -> tuple[subprocess.Popen[str], str]:
        config = self.root / f"{name}.toml"
        config.write_text(
            f'name = "{name}"\nupstream = "{upstream}"\nlisten = ["tcp://127.0.0.1:0"]\n'
            f'state_dir = "{self.root / name}"\nmin_sites = {sites}\nsite_wait = 60\n'
            f"reconnect_grace = 1\nheartbeat_timeout = 20\n{FAST}"
        )
        process = self.start("relay", "--config", str(config), *options)
        return process, listening_url(process)

    def site(
        self, index: int, upstream: str, mode: str, fallbacks: tuple[str, ...] = (), gate=None
    ) -> subprocess.Popen[str]:
        config = self.root / f"site-{index}.toml"
        config.write_text(
            f'server = "{upstream}"\nsite = "site-{index}"\nscript = "{SITE_SCRIPT}"\n'
            f'args = ["{index}", "{mode}"]\nmode = "in-process"\n'
            f"fallbacks = {json.dumps(list(fallbacks))}\n{FAST}"
        )
        env = {**ENV, "RELAY_SITE_GATE": str(gate)} if gate else ENV
        return self.start("client", "--config", str(config), env=env)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(tmp_path)
    try:
        yield running
    finally:
        running.stop()
        for log in sorted(tmp_path.glob("*.log")):  # pytest shows it when the test failed
            print(f"--- {log.name}", log.read_text()[-6000:], sep="\n")


def listening_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if "metrics and health on" in line:
            OPS_URLS[process.pid] = line.split("health on ")[1].split()[0].removesuffix("/metrics")
        if "listening on" in line:
            return line.split("listening on ")[1].split()[0].rstrip(",")
    raise AssertionError(f"{process.args} printed no URL (exit {process.wait()})")


def wait_for_line(log: Path, text: str) -> None:
    """Until a daemon's log says `text` (what it logs is the event waited for, not a time)."""
    deadline = time.monotonic() + 60
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{log.name} never said {text!r}"
        time.sleep(0.05)


def model_file(root: Path) -> tuple[dict[str, torch.Tensor], Path]:
    model = initial_model()
    path = root / "initial.safetensors"
    save_file(model, str(path))
    return model, path


def finished(fleet: Fleet, server: subprocess.Popen[str]) -> dict[str, torch.Tensor]:
    assert server.wait(timeout=150) == 0
    return load_file(str(fleet.root / "final.safetensors"))


def assert_flat_fedavg(final: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


@pytest.mark.parametrize("mode", ["FULL", "DIFF"])
def test_a_relay_gives_flat_fedavg(fleet: Fleet, mode: str) -> None:
    model, path = model_file(fleet.root)
    server, server_url = fleet.server(direct_peers=2, model=path)
    relay, relay_url = fleet.relay("relay-a", server_url, 3, "--metrics-port", "0")
    ops = OPS_URLS[relay.pid]
    assert urlopen(f"{ops}/healthz", timeout=10).status == 200
    sites = [fleet.site(i, relay_url, mode) for i in range(3)]
    direct = fleet.site(3, server_url, mode)
    status = json.load(urlopen(f"{ops}/status.json", timeout=10))
    assert status["job"]["name"] == "relay-relay-a"
    assert "tensorwire_" in urlopen(f"{ops}/metrics", timeout=10).read().decode()
    assert_flat_fedavg(finished(fleet, server), flat_fedavg(model, [0, 1, 2, 3]))
    assert [site.wait(timeout=30) for site in [*sites, direct]] == [0, 0, 0, 0]
    assert relay.wait(timeout=30) == 0  # the job's end reached it, and through it its sites


def test_chained_relays_give_flat_fedavg(fleet: Fleet) -> None:
    model, path = model_file(fleet.root)
    server, server_url = fleet.server(direct_peers=1, model=path)
    parent, parent_url = fleet.relay("relay-parent", server_url, sites=2)
    child, child_url = fleet.relay("relay-child", parent_url, sites=2)
    sites = [fleet.site(0, parent_url, "FULL"), *(fleet.site(i, child_url, "DIFF") for i in (1, 2))]
    assert_flat_fedavg(finished(fleet, server), flat_fedavg(model, [0, 1, 2]))
    assert [process.wait(timeout=30) for process in [*sites, child, parent]] == [0] * 5


def test_a_site_that_fails_behind_a_relay_fails_alone(fleet: Fleet) -> None:
    model, path = model_file(fleet.root)
    server, server_url = fleet.server(direct_peers=1, model=path)
    relay, relay_url = fleet.relay("relay-a", server_url, sites=3)
    [fleet.site(i, relay_url, "FULL") for i in (0, 2)]
    fleet.site(1, relay_url, "FAIL")
    assert_flat_fedavg(finished(fleet, server), flat_fedavg(model, [0, 2]))
    assert relay.wait(timeout=30) == 0


@pytest.mark.parametrize(
    "sites_first",
    [True, False],
    ids=["results-before-the-relay-is-given-up", "results-after-it-is-given-up"],
)
def test_a_relay_killed_mid_round_leaves_its_sites_to_the_server(
    fleet: Fleet, sites_first: bool
) -> None:
    model, path = model_file(fleet.root)
    gate = fleet.root / "gate"
    gate.mkdir()
    # The server gives a lost client reconnect_grace: long, the sites' results come first.
    server, server_url = fleet.server(direct_peers=2, model=path, grace=5 if sites_first else 1)
    relay, relay_url = fleet.relay("relay-doomed", server_url, sites=2)
    sites = [fleet.site(i, relay_url, "FULL", (server_url,), gate) for i in range(2)]
    direct = fleet.site(2, server_url, "FULL", (), gate)
    received = [gate / f"received-{i}" for i in range(3)]
    deadline = time.monotonic() + 120
    while not all(marker.exists() for marker in received):  # every site holds the task
        assert time.monotonic() < deadline, "the sites never received the task"
        assert server.poll() is None
        time.sleep(0.05)
    relay.send_signal(signal.SIGKILL)
    relay.wait()
    if not sites_first:
        wait_for_line(fleet.root / "0-server.log", "gathering its sites directly")
    (gate / "go").touch()
    assert_flat_fedavg(finished(fleet, server), flat_fedavg(model, [0, 1, 2]))
    assert [site.wait(timeout=30) for site in [*sites, direct]] == [0, 0, 0]
