"""Sizes in flags and config files: one parser (pydantic's ByteSize) for both, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl.cli import app
from fl.config import ConfigFileError, ServerConfig, load_config
from fl.sizes import format_size, parse_size


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
    # In-process, on the installed command's typer app: a process would import torch (2-3 s).
    done = CliRunner().invoke(app, ["stream-demo", "--size", "1GiBx"], env={"COLUMNS": "200"})
    assert done.exit_code == 2
    assert "cannot read '1GiBx' as a size" in done.stderr
    assert "streaming" not in done.stdout
