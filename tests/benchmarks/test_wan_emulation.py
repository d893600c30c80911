"""The emulated WAN for real: namespaces, TUN devices, the forwarder (needs root and a TUN)."""

from __future__ import annotations

import argparse

import pytest

import benchmarks.wan as wan_benchmark
from benchmarks.wan import netns
from benchmarks.wan.emulator import EmulatedWan
from benchmarks.wan.profiles import PROFILES
from benchmarks.wan.validate import validate_link

needs_namespaces = pytest.mark.skipif(
    wan_benchmark.preflight_problem() is not None,
    reason=str(wan_benchmark.preflight_problem()),
)


@needs_namespaces
def test_regional_link_has_the_profile_rtt_and_is_cleaned_up() -> None:
    profile = PROFILES["regional"]
    with EmulatedWan(profile) as wan:
        names = (wan.netns_a, wan.netns_b)
        assert all((netns.NETNS_DIR / name).exists() for name in names)
        checked = validate_link(wan, "bbr", bulk_seconds=1.0)
    assert abs(checked["rtt_ms"] - 50.0) <= 5.0, checked
    assert checked["validation_congestion_control"] == "bbr"
    assert checked["raw_tcp_mb_s"] > 0
    assert not any((netns.NETNS_DIR / name).exists() for name in names)
    report = wan.forwarder_report
    assert report is not None
    assert report["a_to_b"]["delivered_bytes"] > 0
    assert report["a_to_b"]["malformed"] == 0


@needs_namespaces
def test_namespaces_are_deleted_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), EmulatedWan(PROFILES["lan"]) as wan:
        raise RuntimeError("boom")
    assert not (netns.NETNS_DIR / wan.netns_a).exists()
    assert not (netns.NETNS_DIR / wan.netns_b).exists()


def test_without_root_the_benchmark_skips_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(wan_benchmark.os, "geteuid", lambda: 1000)
    parser = argparse.ArgumentParser()
    wan_benchmark.add_arguments(parser)
    result = wan_benchmark.run(parser.parse_args(["--profile", "regional"]))
    assert result["skipped"].startswith("the WAN emulation needs root")
    assert result["emulation_validated"] is False
    assert "throughput_mb_s" not in result
    assert "skipped" in capsys.readouterr().err
