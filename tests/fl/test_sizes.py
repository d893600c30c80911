"""Sizes in flags and config files: one parser (pydantic's ByteSize) for both, clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl.config import ConfigFileError, ServerConfig, load_config
from fl.sizes import format_size, parse_size

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("1GiB", 2**30),
        ("256MiB", 256 * 2**20),
        ("8MiB", 8 * 2**20),
        ("14GiB", 14 * 2**30),
        ("1 GiB", 2**30),
        ("1gib", 2**30),
        ("1.5GB", 1_500_000_000),
        ("3145728", 3145728),
        (3145728, 3145728),
        ("0", 0),
    ],
)
def test_the_spellings_in_use_are_read(text: str | int, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "-1", "1GiBx", "GiB", "lots"])
def test_a_bad_size_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=f"cannot read {text!r} as a size"):
        parse_size(text)


def test_format_size_uses_binary_units() -> None:
    assert format_size(2**30) == "1 GiB"
    assert format_size(48 * 2**20) == "48 MiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(12) == "12 B"


def test_config_sizes_are_validated_with_the_file(tmp_path: Path) -> None:
    for written, nbytes in (('"1GiB"', 2**30), ('"3145728"', 3145728), ("4096", 4096)):
        toml = tmp_path / "server.toml"
        toml.write_text(f"[fedavg]\nmodel_size = {written}\n")
        assert load_config(ServerConfig, toml).fedavg.model_size == nbytes
    toml.write_text('[fedavg]\nmodel_size = "1 lot"\n')
    with pytest.raises(ConfigFileError, match=r"fedavg\.model_size: .*byte unit.*'1 lot'"):
        load_config(ServerConfig, toml)
    with pytest.raises(ConfigFileError, match=r"flags: fedavg\.model_size"):
        load_config(ServerConfig, None, {"fedavg.model_size": "big"})


def test_stream_demo_refuses_a_bad_size_before_streaming() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fl.cli", "stream-demo", "--size", "1GiBx"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cannot read '1GiBx' as a size" in done.stderr
    assert "streaming" not in done.stdout
