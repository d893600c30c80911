"""Sinks: new dict, in-place fill, safetensors file, per-tensor callback, counting."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.payload.helpers import random_tensor, same_bits, stream
from transport.exceptions import PayloadError, SinkMismatchError
from transport.payload import (
    DTYPES,
    CallbackSink,
    DigestSink,
    DigestStats,
    SafetensorsFileSink,
    StateDictSink,
    StateDictSource,
    decode_chunk,
    encode_chunk,
    plan_chunks,
)


def _every_dtype() -> dict[str, torch.Tensor]:
    state = {f"t.{name}": random_tensor(name, (3, 5), seed=i) for i, name in enumerate(DTYPES)}
    state["scalar"] = random_tensor("F32", (), seed=99)
    state["empty"] = random_tensor("BF16", (2, 0), seed=98)
    state["zé"] = random_tensor("I8", (17,), seed=97)
    return state


def test_in_place_fill_keeps_storage() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    sent = {name: torch.randn_like(p) for name, p in model.state_dict().items()}
    params = dict(model.named_parameters())
    pointers = {name: p.data_ptr() for name, p in params.items()}
    result = stream(StateDictSource(sent, chunk_size=100), StateDictSink(params))  # type: ignore[arg-type]
    assert result is params
    for name, param in params.items():
        assert param.data_ptr() == pointers[name]
        assert torch.equal(param.detach(), sent[name])


def test_in_place_mismatches_listed() -> None:
    source = StateDictSource(
        {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1), "d": torch.zeros(2, 2)}
    )
    into = {
        "a": torch.zeros(3, 2),
        "b": torch.zeros(4, dtype=torch.float64),
        "d": torch.zeros(2, 2).t(),
        "x": torch.zeros(1),
    }
    with pytest.raises(SinkMismatchError) as caught:
        StateDictSink(into).open(source.manifest)
    message = str(caught.value)
    assert message.startswith("4 tensors do not match")
    assert "'a' shape [3, 2], stream has [2, 3]" in message
    assert "'b' dtype torch.float64, stream has F32" in message
    assert "'c' missing" in message
    assert "'d' cannot be filled in place" in message
    into = {
        "a": torch.zeros(2, 3),
        "b": torch.zeros(4),
        "c": torch.zeros(1),
        "d": torch.zeros(2, 2),
        "x": torch.zeros(1),
    }
    StateDictSink(into).open(source.manifest)
    with pytest.raises(SinkMismatchError, match="'x' not in the stream"):
        StateDictSink(into, strict=True).open(source.manifest)


def test_new_dict_on_explicit_device() -> None:
    state = _every_dtype()
    out = stream(StateDictSource(state, chunk_size=16), StateDictSink(device="cpu"))
    assert list(out) == list(state)
    assert all(same_bits(out[name], state[name]) for name in state)


def test_commit_before_all_chunks_refused() -> None:
    source = StateDictSource({"a": torch.zeros(10)}, chunk_size=8)
    sink = StateDictSink()
    sink.open(source.manifest)
    with pytest.raises(PayloadError, match="commit after 0 of 5 chunks"):
        sink.commit()
    with pytest.raises(PayloadError, match="open"):
        StateDictSink().write(plan_chunks(source.manifest)[0], [])


def test_write_checks_pieces_against_the_plan() -> None:
    source = StateDictSource({"a": torch.zeros(10)}, chunk_size=8)
    chunks = plan_chunks(source.manifest)
    sink = StateDictSink()
    sink.open(source.manifest)
    pieces = [(chunks[1].pieces[0], memoryview(bytes(8)))]
    with pytest.raises(PayloadError, match="does not match the plan"):
        sink.write(chunks[0], pieces)


def test_file_sink_byte_identical_to_save_file(tmp_path: Path) -> None:
    state = _every_dtype()
    reference = tmp_path / "reference.safetensors"
    save_file(state, reference, metadata={"round": "7"})
    target = tmp_path / "out.safetensors"
    source = StateDictSource(state, chunk_size=24, metadata={"round": "7"})
    assert stream(source, SafetensorsFileSink(target)) == target
    assert target.read_bytes() == reference.read_bytes()
    assert not (tmp_path / "out.safetensors.partial").exists()
    with safe_open(target, framework="pt") as loaded:
        assert set(loaded.keys()) == set(state)
        assert all(same_bits(loaded.get_tensor(name), state[name]) for name in state)


def test_file_sink_abort_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    source = StateDictSource({"a": torch.ones(100)}, chunk_size=64)
    sink = SafetensorsFileSink(target)
    sink.open(source.manifest)
    chunk = plan_chunks(source.manifest)[0]
    blob = b"".join(encode_chunk(source.manifest, chunk, source.chunk_views(chunk)))
    sink.write(chunk, decode_chunk(source.manifest, chunk, blob))
    assert sink.partial.exists()
    assert not target.exists()
    sink.abort(RuntimeError("connection lost"))
    assert list(tmp_path.iterdir()) == []


def test_file_sink_unwritable_directory(tmp_path: Path) -> None:
    sink = SafetensorsFileSink(tmp_path / "missing" / "out.safetensors")
    with pytest.raises(PayloadError, match="cannot create"):
        sink.open(StateDictSource({"a": torch.ones(1)}).manifest)


def test_callback_sink_delivers_each_tensor_once_when_complete() -> None:
    state = _every_dtype()
    state["big"] = random_tensor("F64", (40,), seed=5)  # 320 bytes: split over many chunks
    delivered: dict[str, torch.Tensor] = {}

    def on_tensor(name: str, tensor: torch.Tensor) -> None:
        assert name not in delivered
        delivered[name] = tensor

    sink = CallbackSink(on_tensor)
    assert stream(StateDictSource(state, chunk_size=32), sink) == len(state)
    assert set(delivered) == set(state)
    assert all(same_bits(delivered[name], state[name]) for name in state)
    assert sink._pending == {}


def test_callback_sink_from_threads_out_of_order() -> None:
    state = {
        "big": random_tensor("I32", (500,), seed=3),
        "small": random_tensor("U8", (3,), seed=4),
    }
    source = StateDictSource(state, chunk_size=64)
    manifest = source.manifest
    delivered: dict[str, torch.Tensor] = {}
    sink = CallbackSink(delivered.__setitem__)
    sink.open(manifest)
    chunks = plan_chunks(manifest)
    blobs = [b"".join(encode_chunk(manifest, c, source.chunk_views(c))) for c in chunks]
    threads = [
        threading.Thread(target=lambda c=c, b=b: sink.write(c, decode_chunk(manifest, c, b)))
        for c, b in reversed(list(zip(chunks, blobs, strict=True)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sink.commit() == 2
    assert all(same_bits(delivered[name], state[name]) for name in state)


def test_digest_sink_counts() -> None:
    state = {"a": torch.zeros(10), "b": torch.zeros(3), "c": torch.zeros(0)}
    sink = DigestSink()
    stats = stream(StateDictSource(state, chunk_size=16), sink)
    assert stats == DigestStats(chunks=4, tensors=3, bytes=52)
