"""The aggregation functions and accumulators against a direct computation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fl import aggregation
from fl.aggregation import (
    FileAccumulator,
    MemoryAccumulator,
    apply_diff,
    as_params_type,
    weighted_average,
)
from fl.model import FLModel, ParamsType


def direct(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack([v.double() for v in values])
    scale = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * values[0].dim())
    return (stacked * scale).sum(0) / sum(weights)


def client_models(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "a": torch.randn(33, 17, generator=generator),
            "b": torch.randn(5, generator=generator).to(torch.bfloat16),
            "c": torch.randn(4, 4, 4, generator=generator, dtype=torch.float64),
        }
        for _ in range(count)
    ]


@given(
    weights=st.lists(st.floats(0.01, 1e4), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_weighted_average_matches_direct(weights: list[float], seed: int) -> None:
    values = [m["a"] for m in client_models(len(weights), seed)]
    expected = direct(values, weights).float()
    assert torch.allclose(weighted_average(values, weights), expected, rtol=1e-6, atol=1e-6)


def test_known_tensors_give_the_exact_weighted_average() -> None:
    values = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([5.0, 10.0])]
    assert weighted_average(values, [1, 1, 2]).tolist() == [3.5, 7.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_accumulator_equals_direct(dtype: torch.dtype) -> None:
    models, weights = client_models(4), [10.0, 1.0, 3.0, 250.0]
    accumulator = MemoryAccumulator(dtype)
    for model, weight in zip(models, weights, strict=True):
        for name, tensor in model.items():
            accumulator.add(name, tensor, weight)
    averaged = accumulator.average()
    for name in models[0]:
        expected = direct([m[name] for m in models], weights).to(models[0][name].dtype)
        assert averaged[name].dtype == models[0][name].dtype
        assert averaged[name].shape == models[0][name].shape
        tolerance = 1e-2 if expected.dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(averaged[name].double(), expected.double(), atol=tolerance)


def test_file_accumulator_equals_direct_across_slices(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(aggregation, "FILE_SLICE_ELEMENTS", 100)  # many slices per tensor
    models, weights = client_models(3), [2.0, 5.0, 1.0]
    accumulator = FileAccumulator(tmp_path / "sums.bin")
    threads = [
        threading.Thread(
            target=lambda m=model, w=weight: [accumulator.add(n, t, w) for n, t in m.items()]
        )
        for model, weight in zip(models, weights, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    path = accumulator.write_average(tmp_path / "average.safetensors")
    accumulator.close_file()
    averaged = load_file(path)
    for name in models[0]:
        expected = direct([m[name] for m in models], weights)
        assert averaged[name].dtype == models[0][name].dtype
        tolerance = 1e-2 if averaged[name].dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(averaged[name].double(), expected, atol=tolerance)
    assert not (tmp_path / "sums.bin").exists()


def test_diff_average_is_applied_to_the_base(tmp_path: Path) -> None:
    base = {"w": torch.full((10,), 100.0)}
    memory, on_disk = MemoryAccumulator(), FileAccumulator(tmp_path / "s.bin")
    for accumulator in (memory, on_disk):
        accumulator.add("w", torch.full((10,), 1.0), 1.0)
        accumulator.add("w", torch.full((10,), 4.0), 2.0)
    assert memory.average(base.__getitem__)["w"].tolist() == [103.0] * 10
    out = load_file(on_disk.write_average(tmp_path / "o.safetensors", base.__getitem__))
    assert out["w"].tolist() == [103.0] * 10


def test_params_type_conversions_and_apply_diff() -> None:
    base, full = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0])
    diff = as_params_type(full, ParamsType.FULL, ParamsType.DIFF, base)
    assert diff.tolist() == [3.0, 2.0]
    assert as_params_type(diff, ParamsType.DIFF, ParamsType.FULL, base).tolist() == [4.0, 4.0]
    assert apply_diff(base.to(torch.bfloat16), diff).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="without the base"):
        as_params_type(full, ParamsType.FULL, ParamsType.DIFF, None)


def test_bad_input_is_refused_with_a_clear_error() -> None:
    accumulator = MemoryAccumulator()
    accumulator.add("w", torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match=r"shape \(4,\), expected \(3,\)"):
        accumulator.add("w", torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        accumulator.add("w", torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="as many weights"):
        weighted_average([torch.zeros(1)], [1.0, 2.0])
    accumulator.close()
    with pytest.raises(RuntimeError, match="arrived too late"):
        accumulator.add("w", torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="sample_count"):
        _ = FLModel(meta={"sample_count": -1}).sample_count
    with pytest.raises(ValueError, match="FULL or DIFF"):
        FLModel(params_type="HALF")  # type: ignore[arg-type]
