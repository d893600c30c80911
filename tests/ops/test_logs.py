"""Structured logs: one start and one end line per transfer, key=value or JSON, no chunk noise."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
import torch

from transport import Endpoint, EndpointConfig, StateDictSink
from transport.logs import KeyValueFormatter, configure_logging, log_event

SMALL = {"chunk_size": 1 << 20, "stream_window": 4 << 20, "connection_window": 8 << 20}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def move_one_state_dict() -> int:
    state_dict = {f"w{i}": torch.ones(1 << 20) for i in range(3)}  # 12 MiB, 12+ chunks
    config = EndpointConfig(**SMALL)  # type: ignore[arg-type]
    async with Endpoint(config, node_id="srv") as server, Endpoint(config, node_id="cli") as client:
        peer = await client.connect(await server.listen("tcp://127.0.0.1:0"))

        async def receive() -> None:
            transfer = await anext(server.incoming())
            await transfer.receive_into(StateDictSink())

        receiver = asyncio.ensure_future(receive())
        await peer.send_state_dict(state_dict, transfer_id="logged")
        await receiver
    return sum(t.nbytes for t in state_dict.values())


async def test_json_lines_one_start_and_end_per_side(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)
    nbytes = await move_one_state_dict()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    transfers = [r for r in records if r["logger"] == "tensorwire.transfer"]
    assert sorted((r["event"], r["direction"]) for r in transfers) == [
        ("transfer_end", "received"),
        ("transfer_end", "sent"),
        ("transfer_start", "received"),
        ("transfer_start", "sent"),
    ]
    ends = {r["direction"]: r for r in transfers if r["event"] == "transfer_end"}
    for end in ends.values():
        assert end["bytes"] == nbytes
        assert end["transfer"] == "logged"
        assert end["outcome"] == "ok"
        assert end["seconds"] > 0
        assert end["rate_mb_s"] > 0
    assert len(ends["received"]["digest"]) == 32  # the digest the receiver verified
    assert ends["sent"]["digest"] == ends["received"]["digest"]  # both sides log the same one
    assert (ends["sent"]["peer"], ends["received"]["peer"]) == ("srv", "cli")
    assert len(records) == len(transfers)  # nothing per chunk at INFO


async def test_key_value_lines(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("kv", logging.INFO, stream)
    await move_one_state_dict()
    lines = stream.getvalue().splitlines()
    ends = [line for line in lines if "event=transfer_end" in line]
    assert len(ends) == 2
    received = next(line for line in ends if "direction=received" in line)
    pairs = [part.split("=", 1) for part in received.split(" ")]
    fields = dict(pairs)
    assert {"ts", "level", "bytes", "seconds", "rate_mb_s", "digest", "peer"} <= set(fields)
    assert len(pairs) == len(fields)  # each field once: none repeated from the plain message
    assert fields["event"] == "transfer_end"


async def test_plain_logging_shows_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    """An application with only `logging.basicConfig()` sees the fields in the message."""
    caplog.set_level(logging.INFO, logger="tensorwire.transfer")
    nbytes = await move_one_state_dict()
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("transfer_end ")]
    received = next(message for message in ends if "direction=received" in message)
    fields = dict(part.split("=", 1) for part in received.split(" ")[1:])
    assert fields["transfer"] == "logged"
    assert fields["bytes"] == str(nbytes)
    assert fields["outcome"] == "ok"
    assert fields["peer"] == "cli"
    assert len(fields["digest"]) == 32
    assert float(fields["seconds"]) > 0
    assert "error" not in fields  # a None-valued field is left out, as in the kv lines


def test_plain_message_quotes_like_the_kv_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tensorwire.test-plain")
    logger = logging.getLogger("tensorwire.test-plain")
    log_event(logger, logging.INFO, "thing", reason='a "b" = c', missing=None, ratio=0.125)
    assert caplog.messages == ['thing reason="a \\"b\\" = c" ratio=0.125']


def test_values_are_quoted_when_needed() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain message", None, None)
    assert 'msg="plain message"' in KeyValueFormatter().format(record)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger("tensorwire.test-quoting")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    log_event(logger, logging.INFO, "thing", reason='a "b" = c', empty="", ratio=0.125)
    line = stream.getvalue().strip()
    assert 'reason="a \\"b\\" = c"' in line
    assert 'empty=""' in line
    assert "ratio=0.125" in line


def test_bad_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of kv, json, got 'xml'"):
        configure_logging("xml")  # type: ignore[arg-type]
