"""What `tensorwire demo` prints: one unit system (MiB, MiB/s, plain fixed point), a table that
fits 60 columns, log lines and the clients' stderr written above the bars (never through them),
a bar per site for the model out and the result back; and `tensorwire --version`, fast."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from fl.demo import format_table, relay_lines
from transport.progress import BarBoard, byte_bar, logs_above_bars, mib, transfer_progress

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
GIB = 2**30
MIB = 2**20


def summary(sites: int, rounds: int, model_bytes: int, seconds: float = 0.7) -> dict[str, Any]:
    """A demo summary as fl/demo.py builds it, with large numbers in every column."""
    names = [f"site-{i}" for i in range(sites)]
    moved = 2 * sites * model_bytes
    entry = {
        "bytes_moved": moved,
        "seconds": seconds,
        "throughput_mib_s": round(moved / seconds / 2**20, 1),
        "server_peak_rss_mib": 12345.6,
        "server_peak_anon_mib": 1234.5,
        "client_peak_rss_mib": {name: 33000.0 + i for i, name in enumerate(names)},
        "accuracy": 0.9,
    }
    return {
        "driver": "grpc",
        "clients": sites,
        "model_bytes": model_bytes,
        "initial_accuracy": 0.1,
        "rounds": [{**entry, "round": number + 1} for number in range(rounds)],
    }


@pytest.mark.parametrize(
    ("sites", "rounds", "model_bytes"),
    [(2, 3, GIB), (8, 20, 32 * GIB), (1, 1, 8 * 2**20), (16, 3, GIB - 1)],
)
def test_the_table_fits_60_columns(sites: int, rounds: int, model_bytes: int) -> None:
    table = format_table(summary(sites, rounds, model_bytes), width=60)
    for line in table.splitlines():
        assert len(line) <= 60, line
    assert "MiB/s" in table
    assert "MB/s" not in table
    assert "e+" not in table  # plain fixed point, never "1.02e+03 MiB"
    assert table.count("\nsite-") == sites  # each site's own peaks, one line each


def test_the_table_follows_COLUMNS_and_never_goes_past_60(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    wide = format_table(summary(2, 3, GIB))
    assert max(len(line) for line in wide.splitlines()) <= 60
    monkeypatch.setenv("COLUMNS", "60")
    assert format_table(summary(2, 3, GIB)) == wide


def test_sizes_in_mib_are_plain_fixed_point() -> None:
    assert mib(GIB - 1) == "1,024"  # format_size's "%.3g" printed 1.02e+03 MiB here
    assert mib(32 * GIB) == "32,768"
    assert mib(1.5 * 2**20) == "1.5"
    assert mib(0) == "0.0"


def test_a_bar_counts_mib_and_mib_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    bar = byte_bar(48 * 2**20, "moving", enabled=True)
    bar.update(48 * 2**20)
    bar.close()
    drawn = capsys.readouterr().err
    assert "48.0/48.0 MiB" in drawn
    assert "MiB/s" in drawn
    assert "MB/s" not in drawn


@contextmanager
def stderr_logger() -> Iterator[logging.Logger]:
    """A logger with a console handler on stderr (as it is now: made inside the test, where
    capsys captures it), as the daemons configure one."""
    logger = logging.getLogger("tests.demo_output")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)


def test_a_log_line_goes_above_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with stderr_logger() as log, transfer_progress(MIB, "moving", "sent", enabled=True):
        log.warning("site-1 joined")
    drawn = capsys.readouterr().err
    # The bar's line is cleared (carriage return) before the log line: it starts a line.
    assert "\rsite-1 joined\n" in drawn
    assert "moving" in drawn.split("site-1 joined\n")[1]  # and the bar is drawn again below


def test_without_the_redirection_a_log_line_would_split_the_bar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with stderr_logger() as log:
        bar = byte_bar(MIB, "moving", enabled=True)
        log.warning("site-1 joined")
        bar.close()
    assert "\rsite-1 joined\n" not in capsys.readouterr().err  # what the test above rules out


def test_the_last_resort_handler_and_custom_handlers_go_above_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Console(logging.Handler):  # like the daemon's: writes to whatever sys.stderr is
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(self.format(record) + "\n")

    custom = logging.getLogger("tests.demo_output.custom")
    custom.addHandler(Console())
    custom.propagate = False
    bare = logging.getLogger("tests.demo_output.bare")  # no handler: Python's last resort
    bare.propagate = False  # (not up to the root, where pytest's capture handler is)
    with transfer_progress(MIB, "moving", "sent", enabled=True):
        custom.warning("from a custom handler")
        bare.warning("from the last resort")
    drawn = capsys.readouterr().err
    assert "\rfrom a custom handler\n" in drawn
    assert "\rfrom the last resort\n" in drawn


def test_handlers_are_restored_after_the_last_bar() -> None:
    with stderr_logger() as log:
        handler = log.handlers[-1]  # ours (pytest may add its own capture handlers)
        with logs_above_bars(), logs_above_bars():
            assert "emit" in vars(handler)
        assert "emit" not in vars(handler)  # the class's own emit again
    assert "emit" not in vars(logging.lastResort)


def test_no_redirection_when_bars_are_off() -> None:
    with stderr_logger() as log, transfer_progress(MIB, "hidden", "sent", enabled=False):
        handler = log.handlers[-1]  # ours (pytest may add its own capture handlers)
        assert "emit" not in vars(handler)


def test_the_board_draws_a_line_per_site_and_starts_it_over_per_transfer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    board = BarBoard(enabled=True)
    board.show("site-0", "r1/3 site-0 model", 2**20, 4 * 2**20)
    board.show("site-1", "r1/3 site-1 model", 4 * 2**20, 4 * 2**20)
    assert [abs(bar.pos) for bar in board.bars.values()] == [0, 1]
    board.show("site-0", "r1/3 site-0 result", 0, 4 * 2**20)
    assert board.bars["site-0"].n == 0
    assert board.bars["site-0"].desc == "r1/3 site-0 result"
    board.close()
    drawn = capsys.readouterr().err
    for shown in ("r1/3 site-0 model", "r1/3 site-1 model", "r1/3 site-0 result", "100%"):
        assert shown in drawn, shown
    assert not board.bars


def test_a_clients_stderr_is_relayed_above_the_bars(capsys: pytest.CaptureFixture[str]) -> None:
    board = BarBoard(enabled=True)
    board.show("site-0", "r1/1 site-0 model", MIB, 2 * MIB)
    relay_lines(io.StringIO("client warning\nsecond line\n"))
    board.close()
    drawn = capsys.readouterr().err
    assert "\rclient warning\n" in drawn  # each line starts a line of its own
    assert "\rsecond line\n" in drawn


def test_version_prints_the_package_version_without_importing_torch() -> None:
    code = (
        "import sys\nfrom fl.cli import app\n"
        "try:\n    app(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transport'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True
    )
    printed, heavy = done.stdout.splitlines()
    assert printed == f"tensorwire {version('tensorwire')}"
    assert heavy == "[]"


def test_the_installed_command_answers_version() -> None:
    command = Path(sys.executable).with_name("tensorwire")
    done = subprocess.run(
        [command, "--version"], env=ENV, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"tensorwire {version('tensorwire')}"
