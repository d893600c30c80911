"""Progress bars: drawn on a terminal for the commands that move a model, silent off one and
with --quiet, following real transfers (the bar counts bytes as chunks move, not at the end)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ops.terminal import popen_on_terminal, run_on_terminal
from tests.ops.test_daemons_metrics import wait_for
from transport import Endpoint, EndpointConfig, StateDictSink, StreamResetError
from transport.progress import progress_wanted, transfer_progress

ROOT = Path(__file__).parents[2]
HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
SMALL = {"chunk_size": 1 << 20, "stream_window": 4 << 20, "connection_window": 8 << 20}
STATE = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(4)}  # 16 MiB, 16 chunks
NBYTES = sum(t.nbytes for t in STATE.values())


async def _transfer(fail_receiver: bool = False) -> None:
    config = EndpointConfig(**SMALL)  # type: ignore[arg-type]
    async with Endpoint(config, node_id="a") as server, Endpoint(config, node_id="b") as client:
        peer = await client.connect(await server.listen("tcp://127.0.0.1:0"))

        async def receive() -> None:
            transfer = await anext(server.incoming())
            sink = StateDictSink()
            if fail_receiver:
                sink.write = lambda *args: (_ for _ in ()).throw(OSError("disk gone"))  # type: ignore[method-assign]
            await transfer.receive_into(sink)

        receiver = asyncio.ensure_future(receive())
        try:
            await peer.send_state_dict(STATE)
        finally:
            await asyncio.gather(receiver, return_exceptions=True)


async def test_the_bar_follows_the_bytes_as_they_move(capsys: pytest.CaptureFixture[str]) -> None:
    both_ways = 2 * NBYTES  # sender and receiver share this process: both directions add up
    with transfer_progress(both_ways, "moving", ("sent", "received"), enabled=True) as bar:
        await _transfer()
        async with asyncio.timeout(10):  # the follower refreshes on its own: wait until it did
            while bar.n < both_ways:
                await asyncio.sleep(0.02)
        followed = bar.n  # before the block's end fills it
    assert followed == both_ways
    drawn = capsys.readouterr().err
    assert "moving" in drawn
    assert "100%" in drawn


async def test_a_failed_transfer_leaves_the_bar_short(capsys: pytest.CaptureFixture[str]) -> None:
    with (
        pytest.raises(StreamResetError),
        transfer_progress(NBYTES, "failing", "sent", enabled=True) as bar,
    ):
        await _transfer(fail_receiver=True)
    assert bar.n < NBYTES
    assert "100%" not in capsys.readouterr().err


async def test_no_bar_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not progress_wanted()  # pytest captures stderr: not a terminal
    with transfer_progress(NBYTES, "hidden", "received"):
        await _transfer()
    assert capsys.readouterr().err == ""


def _tensorwire(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "fl.cli", *arguments]


def test_stream_demo_draws_a_bar_on_a_terminal() -> None:
    result, terminal = run_on_terminal(_tensorwire("stream-demo", "--size", "48MiB"), env=ENV)
    assert result.returncode == 0, terminal
    assert "digest verified" in result.stdout
    assert "streaming" in terminal
    assert "100%" in terminal
    assert "48.0/48.0 MiB" in terminal  # one unit system: MiB and MiB/s
    assert "MiB/s" in terminal


def test_stream_demo_quiet_and_off_a_terminal_draw_nothing() -> None:
    command = _tensorwire("stream-demo", "--size", "16MiB", "--quiet")
    result, terminal = run_on_terminal(command, env=ENV)
    assert result.returncode == 0, terminal
    assert "streaming" not in terminal
    piped = subprocess.run(
        _tensorwire("stream-demo", "--size", "16MiB", "--json"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert json.loads(piped.stdout)["digest_ok"] is True
    assert "streaming" not in piped.stderr


def test_stream_benchmark_draws_a_bar_and_keeps_json_clean() -> None:
    command = [sys.executable, "-m", "benchmarks", "stream", "--size", "32MiB", "--json"]
    result, terminal = run_on_terminal(command, env=ENV)
    assert result.returncode == 0, terminal
    assert json.loads(result.stdout)["digest_ok"] is True  # the bar went to stderr only
    assert "streaming" in terminal
    assert "100%" in terminal


def test_daemons_draw_a_bar_per_round_and_per_transfer(tmp_path: Path) -> None:
    server_config = tmp_path / "server.toml"
    server_config.write_text(
        'listen = ["tcp://127.0.0.1:0"]\njob = "bars"\n'
        '[fedavg]\nrounds = 2\nmin_clients = 1\nnum_clients = 1\nmodel_size = "8MiB"\n'
    )
    daemon = str(HERE / "scripts" / "daemon.py")
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "env": ENV}
    server, server_terminal = popen_on_terminal(
        [sys.executable, daemon, "server", server_config], **pipes
    )
    client = None
    try:
        url = wait_for(server, "listening on").split("listening on ")[1].split()[0]
        client_config = tmp_path / "site.toml"
        client_config.write_text(
            f'server = "{url}"\nsite = "site-1"\nmode = "in-process"\n'
            f'script = "{HERE / "scripts" / "echo_site.py"}"\n'
        )
        client, client_terminal = popen_on_terminal(
            [sys.executable, daemon, "client", client_config], **pipes
        )
        wait_for(server, "daemon done: True")
        wait_for(client, "daemon done: 0")
    finally:
        for process in (server, client):
            if process is not None and process.poll() is None:
                process.communicate(timeout=30)
    server_drawn = server_terminal.finish()
    assert "round 1/2, 1 sites" in server_drawn
    assert "round 2/2, 1 sites" in server_drawn
    client_drawn = client_terminal.finish()
    for shown in ("round 1 model", "round 1 result", "round 2 model", "round 2 result", "100%"):
        assert shown in client_drawn, shown


def test_fl_demo_draws_a_bar_per_site_and_transfer_at_60_columns_unless_quiet() -> None:
    command = _tensorwire("demo", "--rounds", "1", "--clients", "2", "--model-size", "8MiB")
    narrow = {**ENV, "COLUMNS": "60"}
    # The quiet demo runs at the same time as the one drawing (each listens on its own port).
    quiet, quiet_terminal = popen_on_terminal(
        [*command, "--quiet"], stdout=subprocess.PIPE, env=narrow
    )
    try:
        result, terminal = run_on_terminal(command, env=narrow)
        quiet.communicate(timeout=240)
    finally:
        if quiet.poll() is None:
            quiet.kill()
            quiet.wait()
        quiet_drawn = quiet_terminal.finish()
    assert result.returncode == 0, terminal
    for site in ("site-0", "site-1"):  # the model out to each site
        assert f"r1/1 {site} model" in terminal
    # Results back are not asserted: an 8 MiB result can start and end between two redraws on a
    # loaded machine (fresh-clone runs drew none); tests/ops/test_demo_output.py checks that the
    # board starts a result line per site.
    assert "100%" in terminal
    bars = [p for p in re.split(r"\r|\n|\x1b\[A", terminal) if "MiB/s" in p]
    assert bars, terminal
    assert max(len(bar) for bar in bars) <= 60
    assert "MB/s" not in terminal
    table = result.stdout.splitlines()
    assert max(len(line) for line in table) <= 60, result.stdout
    assert "MiB/s" in result.stdout
    assert "e+" not in result.stdout
    assert quiet.returncode == 0, quiet_drawn
    assert "site-0 model" not in quiet_drawn
