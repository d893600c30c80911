"""`tensorwire demo --task ...`: the applications as real processes, and the options' errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl.cli import app

ROOT = Path(__file__).parents[2]


def test_an_unknown_task_is_a_usage_error() -> None:
    done = CliRunner().invoke(app, ["demo", "--task", "nope"], env={"COLUMNS": "200"})
    assert done.exit_code == 2
    assert "unknown task 'nope'" in done.output


def test_an_unknown_size_is_a_usage_error() -> None:
    pytest.importorskip("peft")
    done = CliRunner().invoke(app, ["demo", "--task", "sft", "--size", "huge"])
    assert done.exit_code == 2
    assert "unknown size 'huge'" in done.output


def test_the_embeddings_demo_runs_sites_as_processes_and_prints_one_json(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    command = [sys.executable, "-m", "fl.cli", "demo", "--task", "embeddings", "--size", "tiny"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TENSORWIRE_CACHE": str(tmp_path)}
    done = subprocess.run(
        [*command, "--rounds", "2", "--json"], env=env, capture_output=True, timeout=240
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary["task"] == "embeddings"
    assert summary["rounds"] == 2
    assert len(summary["bytes_per_round"]) == 2
    assert summary["model_bytes"] > 0
    for site in ("site-0", "site-1", "site-2", "union"):
        assert set(summary["metrics"][site]) >= {"local", "federated", "centralized"}
