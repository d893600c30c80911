"""RelayFile on its own: a chunk is served once the sink wrote it, a relay restarted mid-transfer
serves at once the chunks its journal holds (and resumes the rest), and a failed transfer fails
every source that waits on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transport import ConnectionClosedError, PayloadError, RelayFile, StateDictSource
from transport.payload import plan_chunks

CHUNK = 4096


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(6000, generator=generator),  # several chunks
        "b": torch.arange(10, dtype=torch.int16),
        "c": torch.randn(5, 7, generator=generator).to(torch.bfloat16),
    }


def _write(relay: RelayFile, source: StateDictSource, indices: range) -> None:
    chunks = plan_chunks(source.manifest)
    for index in indices:
        chunk = chunks[index]
        pieces = list(zip(chunk.pieces, source.chunk_views(chunk), strict=True))
        relay.sink.write(chunk, pieces)
        relay.sink.record(index, index)


def _bytes(relayed, chunk) -> bytes:
    return b"".join(bytes(view) for view in relayed.chunk_views(chunk))


def test_chunks_are_served_once_written_and_the_file_is_the_model(tmp_path: Path) -> None:
    source = StateDictSource(_state(), chunk_size=CHUNK)
    chunks = plan_chunks(source.manifest)
    relay = RelayFile(tmp_path / "m.safetensors")
    relay.sink.resume("t", source.manifest)
    relay.sink.open(source.manifest)
    onward = relay.source(source.manifest)
    calls: list[int] = []
    stop = onward.when_ready(lambda: calls.append(relay.ready_chunks))
    assert not onward.is_ready(chunks[0])
    with pytest.raises(PayloadError, match="not there yet"):
        onward.chunk_views(chunks[0])
    _write(relay, source, range(2))
    assert onward.is_ready(chunks[1])
    assert not onward.is_ready(chunks[2])
    assert calls == [1, 2]
    assert _bytes(onward, chunks[1]) == _bytes(source, chunks[1])
    onward.release(chunks[1])  # its pages let go: still readable from the file
    assert _bytes(onward, chunks[1]) == _bytes(source, chunks[1])
    stop()
    _write(relay, source, range(2, len(chunks)))
    assert relay.sink.commit() == tmp_path / "m.safetensors"
    assert calls == [1, 2]
    loaded = load_file(str(tmp_path / "m.safetensors"))
    for name, tensor in _state().items():
        assert torch.equal(loaded[name], tensor), name
    onward.close()


def test_a_restarted_relay_serves_what_its_journal_holds(tmp_path: Path) -> None:
    source = StateDictSource(_state(), chunk_size=CHUNK)
    chunks = plan_chunks(source.manifest)
    first = RelayFile(tmp_path / "m.safetensors")
    first.sink.resume("t", source.manifest)
    first.sink.open(source.manifest)
    _write(first, source, range(3))
    first.sink.abort(ConnectionClosedError("the upstream connection dropped"))
    assert (tmp_path / "m.safetensors.partial").exists()  # kept for the resume

    again = RelayFile(tmp_path / "m.safetensors")
    assert sorted(again.sink.resume("t", source.manifest)) == [0, 1, 2]
    again.sink.open(source.manifest)
    onward = again.source(source.manifest)
    assert [onward.is_ready(chunk) for chunk in chunks[:4]] == [True, True, True, False]
    assert _bytes(onward, chunks[2]) == _bytes(source, chunks[2])
    _write(again, source, range(3, len(chunks)))
    again.sink.commit()
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(loaded["a"], _state()["a"])
    onward.close()


def test_a_failed_transfer_fails_the_waiting_sources(tmp_path: Path) -> None:
    source = StateDictSource(_state(), chunk_size=CHUNK)
    chunks = plan_chunks(source.manifest)
    relay = RelayFile(tmp_path / "m.safetensors")
    relay.sink.open(source.manifest)
    onward = relay.source(source.manifest)
    woken: list[bool] = []
    onward.when_ready(lambda: woken.append(True))
    _write(relay, source, range(1))
    relay.sink.abort(ValueError("the digest did not match"))
    assert woken == [True, True]
    assert relay.failed == "ValueError: the digest did not match"
    assert onward.is_ready(chunks[0])  # what is on disk is still served
    with pytest.raises(PayloadError, match="relayed transfer failed: ValueError"):
        onward.is_ready(chunks[1])
    assert not (tmp_path / "m.safetensors.partial").exists()
