"""`python -m benchmarks fl-memory` at a tiny size: a real `tensorwire server` process and two
client processes run one round, and the server's memory is reported from outside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.fl_memory import format_human

MIB = 2**20


@pytest.mark.timeout(120)
def test_the_fl_memory_benchmark_measures_a_small_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fl-memory", "--model-size", "64MiB", "--rounds", "1", "--clients", "2"]
    argv += ["--dtype", "bfloat16", "--sums", "file", "--results-dir", str(tmp_path)]
    assert main([*argv, "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "fl-memory"
    assert (result["rounds"], result["clients"]) == (1, 2)
    (config,) = result["configs"]
    assert (config["dtype"], config["sums"]) == ("bfloat16", "file")
    assert 64 * MIB - 64 * 1024 <= config["model_bytes"] <= 64 * MIB
    assert config["model_numel"] == config["model_bytes"] // 2
    assert config["bound_bytes"] == 256 * MIB
    assert len(config["round_seconds"]) == 1
    assert [client["rounds"] for client in config["clients"]] == [1, 1]
    # Sanity only: this is no measurement (a shared machine, a tiny model).
    assert 0 <= config["peak_anon_above_baseline_mib"] < 64 + 512
    assert config["peak_anon_mib"] >= config["baseline_anon_mib"]
    assert config["peak_rss_mib"] >= config["baseline_rss_mib"]
    assert isinstance(config["bound_holds"], bool)
    assert result["all_bounds_hold"] == config["bound_holds"]
    written = json.loads(Path(result["files"]["json"]).read_text())
    assert written["configs"][0]["timeline"]  # the file keeps the timeline; stdout does not
    assert "timeline" not in config
    assert "bfloat16" in format_human(result)
