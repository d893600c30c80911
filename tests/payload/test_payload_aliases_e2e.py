"""A tied model over a real loopback connection, through the public API only: the tied weight
crosses the wire once and arrives shared (new dict) or fills a tied model in place."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from tests.payload.helpers import TiedLM
from transport import Endpoint, IncomingTransfer, Sink, StateDictSink


async def _send_tied(sink: Sink) -> tuple[Any, IncomingTransfer, int]:
    """Send TiedLM(seed=1)'s state dict over tcp into `sink`: (result, transfer, bytes sent)."""
    sent = TiedLM(seed=1).state_dict()
    async with Endpoint() as server, Endpoint() as client:
        peer = await client.connect(await server.listen("tcp://127.0.0.1:0"))

        async def receive() -> tuple[Any, IncomingTransfer]:
            transfer = await anext(server.incoming())
            return await transfer.receive_into(sink), transfer

        receiving = asyncio.ensure_future(receive())
        outcome = await peer.send_state_dict(sent)
        result, transfer = await receiving
    return result, transfer, outcome.bytes


async def test_tied_weights_cross_the_wire_once_and_arrive_shared() -> None:
    sent = TiedLM(seed=1).state_dict()
    result, transfer, moved = await _send_tied(StateDictSink())
    assert result["lm_head.weight"] is result["embed.weight"]
    assert list(result) == list(sent)
    for name, tensor in sent.items():
        assert torch.equal(result[name], tensor)
    once = sum(t.nbytes for name, t in sent.items() if name != "lm_head.weight")
    assert moved == once
    assert transfer.manifest is not None
    assert transfer.manifest.total_bytes == once
    assert transfer.manifest.aliases == {"lm_head.weight": "embed.weight"}


async def test_a_tied_model_is_filled_in_place_and_stays_tied() -> None:
    model = TiedLM(seed=2)
    pointer = model.embed.weight.data_ptr()
    await _send_tied(StateDictSink(into=model.state_dict()))
    assert model.lm_head.weight is model.embed.weight
    assert model.embed.weight.data_ptr() == pointer
    assert torch.equal(model.embed.weight.detach(), TiedLM(seed=1).embed.weight.detach())
