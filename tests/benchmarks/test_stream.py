"""`python -m benchmarks stream` with the in-process memory driver: it runs (it used to listen
on a host and port a memory URL cannot have, and the sender waited for its URL forever)."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main


def test_the_stream_benchmark_runs_over_the_memory_driver(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["stream", "--driver", "memory", "--size", "8MiB", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["driver"] == "memory"
    assert result["bytes"] == 8 << 20
    assert result["digest_ok"] is True


def test_the_memory_driver_refuses_cuts_at_once() -> None:
    with pytest.raises(SystemExit, match="--cut-every"):
        main(["stream", "--driver", "memory", "--size", "8MiB", "--cut-every", "1MiB", "--quiet"])
