"""A receiver process killed mid-transfer into a file sink restarts and resumes, not restarts."""

import asyncio
import multiprocessing
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from transport import Endpoint, SyntheticSource

from . import children

MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_for(queue, what: str, timeout: float = 60) -> dict:
    message = await asyncio.to_thread(queue.get, True, timeout)
    assert "error" not in message, message["error"]
    return message


@pytest.mark.timeout(300)
async def test_killed_receiver_restarts_and_the_transfer_resumes(tmp_path: Path) -> None:
    total, chunk, window = 128 * MIB, MIB, 4 * MIB
    path, port = tmp_path / "model.safetensors", _free_port()
    journal = tmp_path / "model.safetensors.partial.progress"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    first = context.Process(
        target=children.restartable_file_receiver, args=(queue, str(path), port, 40), daemon=True
    )
    first.start()
    await _wait_for(queue, "the first receiver to listen")
    source = SyntheticSource(total, seed=9, tensor_bytes=16 * MIB, chunk_size=chunk)
    async with Endpoint(chunk_size=chunk, stream_window=window, idle_timeout=60) as endpoint:
        peer = await endpoint.connect(f"tcp://127.0.0.1:{port}")
        sending = asyncio.ensure_future(peer.send_state_dict(source, transfer_id="round-3/site-b"))
        holding = await _wait_for(queue, "the first receiver to hold after 40 chunks")
        assert holding["holding"] == 40
        first.kill()
        first.join()
        held_at_kill = len(journal.read_text().splitlines()) - 1
        # A queue of its own: a process killed just after its last put can leave the queue's
        # shared write lock held (its feeder thread releases it after the bytes are out), and
        # the second receiver's puts would then wait forever (seen once in a fresh-clone run).
        queue = context.Queue()
        second = context.Process(
            target=children.restartable_file_receiver,
            args=(queue, str(path), port, None),
            daemon=True,
        )
        second.start()
        await _wait_for(queue, "the second receiver to listen")
        result = await asyncio.wait_for(sending, 120)
        done = await _wait_for(queue, "the second receiver to finish")
        second.join(30)
    assert held_at_kill == 40  # every chunk written before the hold, journaled
    assert result.resumes >= 1
    # Only what the killed process had not written yet (at most a window in flight) went twice.
    assert result.bytes_sent - total <= window + 2 * chunk
    assert not journal.exists()
    with safe_open(done["path"], framework="pt") as handle:
        for spec in source.manifest.tensors:
            expected = source.tensor(spec.name).view(torch.uint8)
            assert torch.equal(handle.get_tensor(spec.name).view(torch.uint8), expected), spec.name
