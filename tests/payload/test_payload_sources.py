"""Sources: state dicts (non-contiguous, CUDA), safetensors files and shards by mmap, synthetic."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.payload.helpers import random_tensor, same_bits, stream
from transport.exceptions import PayloadError
from transport.payload import (
    SafetensorsSource,
    StateDictSink,
    StateDictSource,
    SyntheticSource,
    plan_chunks,
)


def _state() -> dict[str, torch.Tensor]:
    return {
        "embed": random_tensor("BF16", (33, 7), seed=1),
        "bias": random_tensor("F32", (5,), seed=2),
        "step": random_tensor("I64", (), seed=3),
        "mask": random_tensor("BOOL", (4, 4), seed=4),
        "nothing": random_tensor("F16", (0,), seed=5),
    }


def test_contiguous_tensors_are_not_copied() -> None:
    tensor = random_tensor("F32", (64,))
    source = StateDictSource({"t": tensor}, chunk_size=1024)
    (view,) = source.chunk_views(plan_chunks(source.manifest)[0])
    tensor[0] = 12345.0
    assert bytes(view[:4]) == tensor[:1].numpy().tobytes()


def test_non_contiguous_tensor_made_contiguous_one_at_a_time() -> None:
    state = {
        "a": random_tensor("F32", (8, 6), seed=1).t(),
        "b": random_tensor("F32", (6, 8), seed=2).t(),
    }
    source = StateDictSource(state, chunk_size=40)
    chunks = plan_chunks(source.manifest)
    source.chunk_views(chunks[0])
    assert source._dense is not None
    assert source._dense[0] == 0
    sink = StateDictSink()
    out = stream(source, sink)
    assert source._dense is None  # dropped once its last piece was released
    assert all(same_bits(out[name], state[name]) for name in state)


def test_state_dict_source_refuses_bad_entries() -> None:
    with pytest.raises(PayloadError, match=r"'c' has dtype torch.complex128"):
        StateDictSource({"c": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(PayloadError, match="'n' is a list, not a tensor"):
        StateDictSource({"n": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(PayloadError, match=r"'s' has layout torch.sparse_coo"):
        StateDictSource({"s": torch.zeros(3, 3).to_sparse()})
    with pytest.raises(PayloadError, match=r"a receiver would refuse.*chunk_size 1073741824"):
        StateDictSource({"t": torch.zeros(1)}, chunk_size=2**30)
    with pytest.raises(PayloadError, match="reserved name"):
        StateDictSource({"__metadata__": torch.zeros(1)})


def test_requires_grad_and_conjugate_tensors() -> None:
    param = torch.nn.Parameter(torch.randn(4, 4))
    complex_tensor = torch.randn(3, dtype=torch.complex64).conj()
    out = stream(StateDictSource({"p": param, "c": complex_tensor}, chunk_size=8), StateDictSink())
    assert torch.equal(out["p"], param.detach())
    assert torch.equal(out["c"], complex_tensor.resolve_conj())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stream_through_staging() -> None:
    state = {name: tensor.cuda() for name, tensor in _state().items()}
    state["strided"] = random_tensor("F32", (9, 5)).cuda().t()
    source = StateDictSource(state, chunk_size=64)
    out = stream(source, StateDictSink(device="cuda"))
    assert all(out[name].is_cuda and same_bits(out[name], state[name]) for name in state)
    assert len(source._staging.busy) == 0
    assert len(source._staging.free) == 1  # one buffer reused when chunks are released in turn


def test_safetensors_file_source(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "model.safetensors"
    save_file(state, path, metadata={"format": "pt"})
    with SafetensorsSource(path, chunk_size=64) as source:
        assert source.manifest.metadata == {"format": "pt"}
        assert {spec.name for spec in source.manifest.tensors} == set(state)
        chunk = plan_chunks(source.manifest)[0]
        assert isinstance(source.chunk_views(chunk)[0].obj, type(source._maps[0]))  # an mmap slice
        out = stream(source, StateDictSink(), check_safetensors=True)
    assert all(same_bits(out[name], state[name]) for name in state)


def _write_shards(folder: Path) -> dict[str, torch.Tensor]:
    state = _state()
    names = list(state)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for file, members in shards.items():
        save_file({name: state[name] for name in members}, folder / file)
        weight_map.update(dict.fromkeys(members, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return state


def test_sharded_checkpoint_by_index_and_by_directory(tmp_path: Path) -> None:
    state = _write_shards(tmp_path)
    for path in (tmp_path / "model.safetensors.index.json", tmp_path):
        with SafetensorsSource(path, chunk_size=50) as source:
            out = stream(source, StateDictSink())
        assert set(out) == set(state)
        assert all(same_bits(out[name], state[name]) for name in state)


def test_index_naming_a_missing_tensor_refused(tmp_path: Path) -> None:
    _write_shards(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(PayloadError, match=r"names tensors not in it: \['ghost'\]"):
        SafetensorsSource(index_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01", "too short"),
        (b"\xff" * 8 + b"{}", "header length 18446744073709551615 impossible"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((2).to_bytes(8, "little") + b"{x", "not JSON"),
    ],
)
def test_broken_files_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(PayloadError, match=message):
        SafetensorsSource(path)


def test_file_with_lying_offsets_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "lie.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(PayloadError, match=r"needs 16 bytes but data_offsets are \[0, 8\]"):
        SafetensorsSource(path)
    header = json.dumps({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(2))
    with pytest.raises(PayloadError, match="unsupported dtype 'F4'"):
        SafetensorsSource(path)


def test_synthetic_is_deterministic_and_matches_materialize() -> None:
    kwargs = {
        "seed": 7,
        "dtype": "F16",
        "tensor_bytes": 3000,
        "chunk_size": 1024,
        "pool_bytes": 4096,
    }
    source = SyntheticSource(10_000, **kwargs)  # type: ignore[arg-type]
    assert [spec.nbytes for spec in source.manifest.tensors] == [3000, 3000, 3000, 1000]
    expected = SyntheticSource(10_000, **kwargs).materialize()  # type: ignore[arg-type]
    out = stream(source, StateDictSink(), check_safetensors=True)
    assert all(same_bits(out[name], expected[name]) for name in expected)
    other = SyntheticSource(10_000, **{**kwargs, "seed": 8}).materialize()  # type: ignore[arg-type]
    assert not same_bits(other["synthetic.000000"], expected["synthetic.000000"])
    # Chunking changes nothing about the bytes.
    rechunked = stream(SyntheticSource(10_000, **{**kwargs, "chunk_size": 333}), StateDictSink())  # type: ignore[arg-type]
    assert all(same_bits(rechunked[name], expected[name]) for name in expected)


def test_synthetic_streams_128_gib_for_free() -> None:
    source = SyntheticSource(128 * 2**30, tensor_bytes=2**30, pool_bytes=8 * 2**20)
    assert source.manifest.total_bytes == 128 * 2**30
    chunks = plan_chunks(source.manifest)
    started = time.perf_counter()
    total = sum(view.nbytes for chunk in chunks for view in source.chunk_views(chunk))
    assert total == 128 * 2**30
    assert time.perf_counter() - started < 2.0
    with pytest.raises(PayloadError, match="over max_bytes"):
        source.materialize()


def test_synthetic_refuses_bad_arguments() -> None:
    with pytest.raises(PayloadError, match="total_bytes 3 is not a non-negative multiple of 2"):
        SyntheticSource(3)
    with pytest.raises(PayloadError, match="unknown dtype 'F128'"):
        SyntheticSource(4, dtype="F128")
    with pytest.raises(PayloadError, match="tensor_bytes 0"):
        SyntheticSource(4, tensor_bytes=0)
