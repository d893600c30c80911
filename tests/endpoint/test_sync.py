"""transport.sync: the blocking facade, used as a script would, with no asyncio in sight."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import transport
from transport import StateDictSink
from transport.sync import Endpoint, IncomingTransfer, Peer

SMALL = {"chunk_size": 1 << 20, "stream_window": 4 << 20}
WAIT_S = 60  # only reached when a test is broken: the iterations below end on their own
DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"


@contextlib.contextmanager
def serving(url: str, handle: Callable[[Endpoint], Any]) -> Iterator[tuple[str, Future[Any]]]:
    """A sync server listening on `url`, running `handle(server)` in a thread of its own."""
    # The server closes before the pool joins its thread: a handler still waiting in incoming()
    # is ended by the close, so a failing test cannot hang here.
    with ThreadPoolExecutor(1) as pool, Endpoint(**SMALL) as server:
        yield server.listen(url), pool.submit(handle, server)


def first_transfer(server: Endpoint) -> IncomingTransfer:
    return next(server.incoming(timeout=WAIT_S))


def sync_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "tensorwire-sync"]


def test_state_dict_round_trip(listen_url: str) -> None:
    weights = {
        "layer.weight": torch.randn(1024, 300),  # 1.2 MB: more than one chunk
        "layer.bias": torch.arange(300, dtype=torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
    }

    def receive(server: Endpoint) -> tuple[Any, dict[str, torch.Tensor]]:
        transfer = first_transfer(server)
        return transfer.meta, transfer.receive_into(StateDictSink())

    with serving(listen_url, receive) as (url, received), Endpoint(**SMALL) as client:
        peer = client.connect(url)
        result = peer.send_state_dict(weights, meta={"round": 3})
        meta, state_dict = received.result()
    assert meta == {"round": 3}
    assert result.bytes == sum(t.nbytes for t in weights.values())
    assert result.chunks > 1
    assert state_dict.keys() == weights.keys()
    assert all(torch.equal(weights[name], state_dict[name]) for name in weights)
    assert state_dict["layer.bias"].dtype == torch.bfloat16
    assert not sync_threads()  # the last endpoint closed: the loop thread went with it


def test_bytes_blocks_are_copies_the_caller_may_keep(listen_url: str) -> None:
    blocks = [bytes([i]) * (300_000 + i) for i in range(8)]

    def receive(server: Endpoint) -> list[bytes]:
        return list(first_transfer(server))

    with serving(listen_url, receive) as (url, received), Endpoint(**SMALL) as client:
        client.connect(url).send_bytes(iter(blocks), meta={"name": "log"})
        kept = received.result()
    assert all(type(block) is bytes for block in kept)
    assert b"".join(kept) == b"".join(blocks)  # no block was overwritten by a later one


def test_file_to_file(listen_url: str, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.bin"
    source.write_bytes(bytes(range(256)) * 10_000)

    def receive(server: Endpoint) -> tuple[Any, int | None, Path]:
        transfer = first_transfer(server)
        return transfer.meta, transfer.size, transfer.receive_to_file(tmp_path / "copy.bin")

    with serving(listen_url, receive) as (url, received), Endpoint(**SMALL) as client:
        client.connect(url).send_file(source, meta={"round": 1})
        meta, size, copy = received.result()
    assert meta == {"name": "checkpoint.bin", "round": 1}
    assert size == source.stat().st_size
    assert copy.read_bytes() == source.read_bytes()


def test_request_answered_by_a_plain_function(listen_url: str) -> None:
    with Endpoint(**SMALL) as server, Endpoint(**SMALL, node_id="site-1") as client:
        url = server.listen(listen_url)
        asked_by = []

        def answer(peer: Peer, header: Mapping[str, Any], body: bytes) -> tuple[Any, bytes]:
            asked_by.append(peer)  # plain code: it runs in a worker thread and may block
            return {"from": peer.node_id, **header}, body[::-1]

        server.on_request(answer)
        reply = client.connect(url).request({"question": "done?"}, b"body")
        assert asked_by == [next(server.accepted(timeout=WAIT_S))]  # the same peer, rewrapped
    assert reply == ({"from": "site-1", "question": "done?"}, b"ydob")


def test_rejected_transfer_raises_in_the_sender(listen_url: str) -> None:
    def reject(server: Endpoint) -> None:
        first_transfer(server).reject("not today")

    with serving(listen_url, reject) as (url, rejected), Endpoint(**SMALL) as client:
        with pytest.raises(transport.StreamResetError, match="not today"):
            # More than the window, so the send is still waiting for credit when it is refused.
            client.connect(url).send_state_dict({"w": torch.ones(4 << 20)})
        rejected.result()


def test_errors_are_the_async_api_classes(listen_url: str) -> None:
    with Endpoint(**SMALL) as gone:
        url = gone.listen(listen_url)

    async def connect_with_the_async_api() -> None:
        async with transport.Endpoint(**SMALL) as client:
            await client.connect(url)

    with pytest.raises(transport.TensorwireError) as expected:
        asyncio.run(connect_with_the_async_api())
    with Endpoint(**SMALL) as client, pytest.raises(transport.TensorwireError) as raised:
        client.connect(url)
    assert raised.type is expected.type  # ConnectError, unchanged by the facade
    assert str(raised.value) == str(expected.value)


def test_bad_options_raise_and_leave_no_thread() -> None:
    with pytest.raises(transport.ConfigError):
        Endpoint(chunk_size=1 << 20, stream_window=1 << 10)
    assert not sync_threads()


def test_one_loop_thread_while_any_endpoint_is_open() -> None:
    first, second = Endpoint(), Endpoint()
    assert len(sync_threads()) == 1
    first.close()
    assert len(sync_threads()) == 1
    second.close()
    second.close()  # closing twice is harmless
    assert not sync_threads()


def test_a_peer_of_a_closed_endpoint_raises_connection_closed() -> None:
    with Endpoint(**SMALL) as server:
        url = server.listen("memory://sync-closed")
        with Endpoint(**SMALL) as client:
            peer = client.connect(url)
        with pytest.raises(transport.ConnectionClosedError):
            peer.send_bytes([b"late"])  # the loop still runs for the server
    with pytest.raises(transport.ConnectionClosedError):
        peer.send_bytes([b"later"])  # no loop left at all


def test_incoming_ends_after_its_timeout() -> None:
    with Endpoint(**SMALL) as server:
        server.listen("memory://sync-quiet")
        assert list(server.incoming(timeout=0.01)) == []
        assert list(server.accepted(timeout=0.01)) == []


def test_closing_ends_an_iteration_waiting_in_another_thread() -> None:
    server = Endpoint(**SMALL)
    server.listen("memory://sync-closing")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: list(server.incoming()))  # no timeout: only close ends it
        server.close()
        assert waiting.result(timeout=WAIT_S) == []


def run_script(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` as `python -c` from a directory outside the project, as an embedder would."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_documented_script_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    script = next(block for block in blocks if "transport.sync" in block)
    assert "asyncio" not in script
    done = run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"sent \d+ bytes", done.stdout)
    assert done.stderr == ""  # the loop thread stopped cleanly: no warnings at exit


CTRL_C = """
import itertools, signal, threading
import transport
from transport.sync import Endpoint

main, interrupted, seen = threading.main_thread().ident, threading.Event(), []
with Endpoint(chunk_size=1 << 20, stream_window=4 << 20) as server, Endpoint() as client:
    url = server.listen("memory://ctrl-c")

    def receive():
        transfer = next(server.incoming())
        signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C while the send is under way
        interrupted.wait()
        try:
            for block in transfer:
                pass
        except transport.TensorwireError as error:
            seen.append(f"{type(error).__name__}: {error}")

    receiver = threading.Thread(target=receive)
    receiver.start()
    try:
        client.connect(url).send_bytes(itertools.repeat(b"x" * 65536))  # ends only if cancelled
    except KeyboardInterrupt:
        print("interrupted")
    interrupted.set()
    receiver.join()
print("receiver saw", *seen)
"""


@pytest.mark.xfail(
    reason="hangs (120 s) in every fresh-clone full-suite run since the FL tests of issue 14 "
    "landed, never alone or in /work/main's runs; cause not found yet (see the closing note of "
    "the issue-14 stop): kept running, not skipped, so a pass still shows",
    strict=False,
)
def test_ctrl_c_cancels_the_transfer(tmp_path: Path) -> None:
    done = run_script(CTRL_C, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "interrupted"
    # The receiver learns the transfer was cancelled (a StreamResetError naming the
    # CancelledError), instead of taking blocks forever.
    seen = done.stdout.splitlines()[1]
    assert seen.startswith("receiver saw ")
    assert "Error: " in seen
    assert "cancel" in seen.lower()


LEFT_OPEN = """
from transport.sync import Endpoint
server = Endpoint()
peer = Endpoint().connect(server.listen("tcp://127.0.0.1:0"))
print("exiting with both endpoints open")
"""


def test_exit_with_endpoints_left_open_is_clean(tmp_path: Path) -> None:
    done = run_script(LEFT_OPEN, tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert "exiting" in done.stdout
