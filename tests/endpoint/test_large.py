"""Big transfers: a tensor over 4 GiB, and 8 GiB between processes with bounded memory.

Marked slow; they still run in CI (make test runs every test). They assert bounds, never timings.
"""

import multiprocessing
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks.probes import run_children
from transport import Endpoint, StateDictSink, SyntheticSource

from . import children

GIB = 1 << 30


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_tensor_larger_than_4_gib_round_trips() -> None:
    nbytes = 4 * GIB + 6 * (1 << 20)
    big = torch.empty(nbytes, dtype=torch.uint8)
    torch.manual_seed(5)
    big.view(torch.int32).random_()
    sent = {
        "embed.weight": big.view(torch.bfloat16).view(nbytes // 2 // 4096, 4096),
        "tail": torch.arange(7),
    }
    target = {
        "embed.weight": torch.empty_like(sent["embed.weight"]),
        "tail": torch.zeros(7, dtype=torch.int64),
    }
    async with Endpoint() as server, Endpoint() as client:
        url = await server.listen("tcp://127.0.0.1:0")
        peer = await client.connect(url)
        import asyncio

        async def receive():
            return await (await anext(server.incoming())).receive_into(StateDictSink(into=target))

        receiving = asyncio.ensure_future(receive())
        await peer.send_state_dict(sent)
        received = await receiving
    assert torch.equal(
        received["embed.weight"].view(torch.uint8), big.view(-1, 4096 * 2).view(torch.uint8)
    )
    assert torch.equal(received["tail"], sent["tail"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_8_gib_over_tcp_into_a_file_with_bounded_memory(tmp_path: Path) -> None:
    nbytes = 8 * GIB
    path = tmp_path / "model.safetensors"
    url_queue = multiprocessing.get_context("spawn").Queue()
    receiver, sender = run_children(
        [
            (children.file_receiver, (str(path), url_queue)),
            (children.synthetic_sender, (nbytes, url_queue)),
        ],
        timeout=800,
    )
    assert sender["bytes"] == nbytes
    assert sender["peak_rss_mib"] < 512, sender
    assert receiver["peak_rss_mib"] < 512, receiver
    # The file is complete and holds exactly the source's tensors (checked on the first and last).
    source = SyntheticSource(nbytes, seed=11)
    specs = source.manifest.tensors
    with safe_open(receiver["path"], framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(spec.name for spec in specs)
        for spec in (specs[0], specs[-1]):
            expected = source.tensor(spec.name)
            assert torch.equal(
                handle.get_tensor(spec.name).view(torch.uint8), expected.view(torch.uint8)
            )
    path.unlink()
