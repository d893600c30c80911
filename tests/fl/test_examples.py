"""The example: a centralized script and its federated twin, at most 5 lines apart, both run."""

from __future__ import annotations

import asyncio
import difflib
import os
import subprocess
import sys
from pathlib import Path

from fl.fedavg import FedAvg
from fl.model import FLModel
from fl.task import MLP
from tests.fl.helpers import client_settings, global_accuracy, new_server

ROOT = Path(__file__).parents[2]
CENTRALIZED, FEDERATED = ROOT / "examples" / "centralized.py", ROOT / "examples" / "federated.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def changed_lines() -> tuple[list[str], list[str]]:
    before = CENTRALIZED.read_text().splitlines()
    after = FEDERATED.read_text().splitlines()
    diff = list(difflib.ndiff(before, after))
    added = [line[2:] for line in diff if line.startswith("+ ") and line[2:].strip()]
    removed = [line[2:] for line in diff if line.startswith("- ") and line[2:].strip()]
    return added, removed


def start_federated(url: str, index: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(FEDERATED), "--site", str(index)],
        env={**ENV, **client_settings(url, f"site-{index}").environment()},
        stdout=subprocess.PIPE,
    )


def test_the_federated_script_is_at_most_five_changed_lines() -> None:
    added, removed = changed_lines()
    assert len(added) <= 5, added
    assert len(removed) <= len(added)


def test_docs_show_the_same_diff() -> None:
    docs = (ROOT / "docs" / "fl.md").read_text()
    added, removed = changed_lines()
    for line in added:
        assert f"+{line}" in docs
    for line in removed:
        assert f"-{line}" in docs


def test_the_centralized_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(CENTRALIZED), "--rounds", "1"],
        env=ENV,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"accuracy" in done.stdout


async def test_the_federated_script_runs_under_a_server() -> None:
    fedavg = FedAvg(
        FLModel(params=MLP().state_dict()),
        rounds=2,
        num_clients=2,
        min_clients=2,
        evaluate=global_accuracy,
    )
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        fedavg.attach(server)
        sites = [start_federated(url, index) for index in range(2)]
        await asyncio.wait_for(fedavg.run(), 120)
        await server.stop_clients("done")
        outputs = [await asyncio.to_thread(site.communicate, timeout=30) for site in sites]
    assert [site.returncode for site in sites] == [0, 0]
    assert all(output[0].count(b"accuracy") == 2 for output in outputs)
    assert [report.succeeded for report in fedavg.history] == [["site-0", "site-1"]] * 2
