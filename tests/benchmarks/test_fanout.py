"""`python -m benchmarks fanout` at a tiny size, for real: namespaces, a bridge, tbf, a server
process and site processes (and relay daemons) run one FedAvg round; the JSON carries the figures
and the final model is flat FedAvg. Needs root and iproute2; skipped otherwise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import benchmarks.fanout as fanout
from benchmarks.__main__ import main
from benchmarks.fanout_net import LinkSpec, parse_rate, rate_check
from benchmarks.fanout_roles import ModelSpec, delta_row, sample_count, tensor_index
from benchmarks.wan import netns

MIB = 2**20
needs_namespaces = pytest.mark.skipif(
    fanout.preflight_problem() is not None, reason=str(fanout.preflight_problem())
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    # the benchmark's own deadline comes first: its failure names the process that hung
    assert main(["fanout", *argv, "--timeout", "240", "--json", "--quiet"]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def _check_common(result: dict[str, Any], clients: int) -> None:
    model = result["model_bytes"]
    assert 8 * MIB - 1024 <= model <= 8 * MIB
    assert result["tensors"] >= 2
    assert result["clients"] == clients
    assert 0 < result["send_seconds"] <= result["round_seconds"]
    assert result["gather_seconds"] > 0
    assert result["round_seconds"] == pytest.approx(
        result["send_seconds"] + result["gather_seconds"], abs=0.01
    )
    assert result["fedavg"]["matches"] is True, result["fedavg"]
    assert result["fedavg"]["max_abs_error"] <= result["fedavg"]["tolerance"]
    assert result["uplink_check"]["limit_holds"] in (True, None)  # None: a run under 1 s
    assert result["server_ingress_bytes"] > 0
    assert result["rss"]["server"]["peak_rss_mib"] >= result["rss"]["server"]["baseline_rss_mib"]
    assert result["rss"]["sites"]["max_peak_above_baseline_mib"] >= 0
    assert [site["site"] for site in result["per_site"]] == list(range(clients))
    assert result["round_failed"] == {}
    assert isinstance(result["goals"]["egress_within"], bool)
    assert result["load_before"]
    assert result["load_after"]
    assert "fanout" in fanout.format_human(result)


@needs_namespaces
@pytest.mark.timeout(300)
def test_direct_fan_out_of_a_small_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _run(capsys, "--clients", "2", "--model-size", "8MiB", "--results-dir", str(tmp_path))
    _check_common(result, 2)
    assert (result["mode"], result["relays"], result["regions"]) == ("direct", 0, 2)
    model = result["model_bytes"]
    assert result["server_model_bytes_sent"] == 2 * model
    assert result["server_egress_bytes"] >= 2 * model  # the interface sees the model and more
    assert result["server_peers"] == ["site-0", "site-1"]
    assert result["goals"]["egress_within"] is True
    written = json.loads(Path(result["files"]["json"]).read_text())
    assert written["egress_timeline"]
    assert not [name for name in netns.NETNS_DIR.glob("twwan*") if _mine(name.name)]


@needs_namespaces
@pytest.mark.timeout(300)
def test_relayed_fan_out_of_a_small_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not _relay_command_exists():
        pytest.skip("`python -m fl.cli relay` does not exist yet (fl/relay.py)")
    result = _run(capsys, "--clients", "2", "--relays", "1", "--model-size", "8MiB", "--no-files")
    _check_common(result, 2)
    assert (result["mode"], result["relays"], result["regions"]) == ("relayed", 1, 1)
    assert result["server_peers"] == ["relay-0"]
    assert result["sites_behind_relays"] is True
    assert result["server_model_bytes_sent"] == result["model_bytes"]  # once, to the relay
    assert result["goals"]["egress_within"] is True
    assert set(result["rss"]["relays"]) == {"relay-0"}


def test_without_root_the_benchmark_skips_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(fanout.os, "geteuid", lambda: 1000)
    parser = argparse.ArgumentParser()
    fanout.add_arguments(parser)
    result = fanout.run(parser.parse_args(["--clients", "2", "--model-size", "8MiB"]))
    assert result["skipped"].startswith("the fanout benchmark needs root")
    assert "round_seconds" not in result
    assert "skipped" in capsys.readouterr().err


def test_the_model_and_the_deltas_are_deterministic_and_exact() -> None:
    spec = ModelSpec(8 * MIB + 5000)
    layout = spec.layout()
    assert len(layout) == 4
    assert spec.nbytes % 1024 == 0
    assert spec.nbytes <= 8 * MIB + 5000
    assert [tensor_index(name) for name, _ in layout] == [0, 1, 2, 3]
    first = dict(spec.initial())
    assert all(torch.equal(first[name], tensor) for name, tensor in spec.initial())
    assert len(ModelSpec(2 * 2**30).layout()) == 32  # 64 MiB tensors
    row = delta_row(3, 1)
    assert row.dtype == torch.float32
    assert row.shape == (256,)
    assert torch.equal(row.double(), delta_row(3, 1).double())
    assert not torch.equal(row, delta_row(2, 1))
    assert not torch.equal(row, delta_row(3, 2))
    assert len({sample_count(site) for site in range(16)}) == 16


def test_rates_and_the_rate_check() -> None:
    assert parse_rate("1Gbit") == parse_rate("1gbit/s") == 10**9
    assert parse_rate("100Mbit") == 10**8
    link = LinkSpec(8 * 10**6)  # 1 MB/s
    # 1 MB/s of counted bytes (the check scales them up to wire bytes: 4.6% more) holds within
    # the burst over 1 s windows only if the wire stays under the rate: 0.9 MB/s does.
    steady = [(t * 0.1, t * 0.1 + 1e-4, int(t * 90_000), 0) for t in range(50)]
    assert rate_check(steady, link)["limit_holds"] is True
    fast = [(t * 0.1, t * 0.1 + 1e-4, int(t * 150_000), 0) for t in range(50)]
    assert rate_check(fast, link)["limit_holds"] is False
    assert rate_check(steady[:3], link)["limit_holds"] is None  # no 1 s window yet


def _mine(name: str) -> bool:
    import os

    return name.startswith(f"twwan{os.getpid()}x")


def _relay_command_exists() -> bool:
    import subprocess
    import sys

    probe = subprocess.run(
        [sys.executable, "-m", "fl.cli", "relay", "--help"], capture_output=True, check=False
    )
    return probe.returncode == 0
