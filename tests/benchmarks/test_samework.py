"""`python -m benchmarks stream --source dict`: the user's work (a real dict into a new dict or
into existing tensors) over each driver and loop, with the bare baselines of the same work, and
benchmarks that fail at once with the real error instead of waiting out their timeout."""

from __future__ import annotations

import json
import multiprocessing
import time
from typing import Any

import pytest

from benchmarks.__main__ import main
from benchmarks.outside import ChildFailed, run_measured

SMALL = ["--size", "24MiB", "--tensor-size", "8MiB", "--json", "--quiet", "--timeout", "120"]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["stream", "--source", "dict", *args, *SMALL]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


@pytest.mark.parametrize(
    ("driver", "loop", "sink", "library"),
    [
        ("tcp", "asyncio", "dict", None),
        ("grpc", "uvloop", "dict", "grpc"),
        ("http", "asyncio", "into", "aiohttp"),
    ],
)
def test_the_same_work_runs_beside_its_bare_baselines(
    capsys: pytest.CaptureFixture[str], driver: str, loop: str, sink: str, library: str | None
) -> None:
    result = _run(capsys, "--driver", driver, "--loop", loop, "--sink", sink, "--baseline")
    assert (result["driver"], result["loop"], result["sink"]) == (driver, loop, sink)
    assert result["bytes"] == 24 << 20
    assert result["tensors"] == 3
    assert result["digest_ok"] is True
    assert result["throughput_mb_s"] > 0
    assert result["socket_mb_s"] > 0
    assert result["ratio"] == pytest.approx(result["throughput_mb_s"] / result["socket_mb_s"], 0.01)
    if library:
        assert result[f"{library}_mb_s"] > 0
    # measured from outside: the absolute peak holds the 24 MiB dict itself
    assert result["receiver_peak_rss_mib"] > 24
    assert result["sender_peak_rss_mib"] > 24


def test_tls_and_the_bare_tls_socket_finish(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(capsys, "--driver", "tcp", "--tls", "--baseline")
    assert result["tls"] is True
    assert result["socket_mb_s"] > 0


def test_the_synthetic_bare_tls_baseline_finishes(capsys: pytest.CaptureFixture[str]) -> None:
    # its raw receiver used to wait forever for bytes the sender's close could lose
    args = ["stream", "--driver", "tcp", "--tls", "--baseline", "--size", "16MiB", "--json", "-q"]
    assert main([*args, "--timeout", "120"]) == 0
    assert json.loads(capsys.readouterr().out)["raw_throughput_mb_s"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1001"], "not a positive whole number of BF16"),
        (["--size", "8MiB", "--sink", "dict"], "--sink dict/into needs --source dict"),
        (["--size", "8MiB", "--loop", "asyncio"], "--loop asyncio needs --source dict"),
        (["--size", "1002", "--source", "dict"], "not a positive whole number of float32"),
        (["--size", "8MiB", "--source", "dict", "--driver", "memory"], "tcp, grpc or http"),
    ],
)
def test_sizes_and_combinations_it_cannot_run_are_refused_before_any_process(
    args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["stream", "--quiet", *args])


def _failing_child(queue: Any) -> None:
    queue.put({"role": "sender", "error": "Traceback ...\nValueError: the real reason"})


def _waiting_child(queue: Any, never: Any) -> None:
    never.get()  # waits for a peer that will never come


def test_a_failing_child_ends_the_run_at_once_with_its_error() -> None:
    never = multiprocessing.get_context("spawn").Queue()
    started = time.monotonic()
    with pytest.raises(ChildFailed, match=r"sender failed:(.|\n)*the real reason"):
        run_measured([(_waiting_child, (never,)), (_failing_child, ())], timeout=600)
    assert time.monotonic() - started < 300  # not the timeout: the error, as soon as it came


def _dying_child(queue: Any) -> None:
    import os

    os._exit(3)


def test_a_child_that_dies_without_a_word_is_named() -> None:
    never = multiprocessing.get_context("spawn").Queue()
    with pytest.raises(ChildFailed, match="exit code 3"):
        run_measured([(_waiting_child, (never,)), (_dying_child, ())], timeout=600)
