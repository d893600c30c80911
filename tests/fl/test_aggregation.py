"""RoundAggregation, the sums and the server updates: determinism, refusals, dropouts, FedAdam
against a float64 reference and across checkpoints, bounded memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fl.aggregation import (
    FileSums,
    MemorySums,
    RoundAggregation,
    RoundOutcome,
    Sums,
    TensorLayout,
)
from fl.model import ParamsType
from fl.server_optimizers import FedAdamUpdate, FedAvgUpdate, ServerUpdate

FULL, DIFF = ParamsType.FULL, ParamsType.DIFF
Model = dict[str, torch.Tensor]


def random_model(seed: int, dtype: torch.dtype = torch.float32) -> Model:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"w": (7, 5), "b": (5,), "s": (), "e": (0, 3)}
    return {n: torch.randn(s, generator=generator).to(dtype) for n, s in shapes.items()}


def layouts_of(model: Model) -> dict[str, TensorLayout]:
    return {name: TensorLayout.of(tensor) for name, tensor in model.items()}


def new_sums(kind: str, directory: Path, slice_elements: int = 4) -> Sums:
    if kind == "file":
        return FileSums(directory / "sums.bin", slice_elements=slice_elements)
    return MemorySums(slice_elements=slice_elements)


def run_round(
    base: Model,
    uploads: list[tuple[str, str, torch.Tensor, float, ParamsType]],
    sums: Sums,
    update: ServerUpdate | None = None,
) -> tuple[Model, RoundOutcome]:
    aggregation = RoundAggregation(base, layouts_of(base), sums, update or FedAvgUpdate())
    for upload in uploads:
        aggregation.add(*upload)
    out = {name: torch.empty_like(tensor) for name, tensor in base.items()}

    def write(name: str, start: int, piece: torch.Tensor) -> None:
        out[name].view(-1)[start : start + piece.numel()] = piece

    return out, aggregation.finish_round(write)


def whole_uploads(client: str, model: Model, weight: float, mode: ParamsType = FULL) -> list:
    return [(client, name, tensor, weight, mode) for name, tensor in model.items()]


def bits(model: Model) -> dict[str, bytes]:
    return {name: t.reshape(-1).view(torch.uint8).numpy().tobytes() for name, t in model.items()}


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [FULL, DIFF])
def test_two_clients_give_the_same_bits_in_either_order(
    kind: str, dtype: torch.dtype, mode: ParamsType, tmp_path: Path
) -> None:
    base = random_model(0, dtype)
    one, two = random_model(1, dtype), random_model(2, dtype)
    uploads = whole_uploads("a", one, 3, mode) + whole_uploads("b", two, 7.3, mode)
    forward, _ = run_round(base, uploads, new_sums(kind, tmp_path))
    backward, _ = run_round(base, uploads[::-1], new_sums(kind, tmp_path))
    interleaved, _ = run_round(base, uploads[1::2] + uploads[::2], new_sums(kind, tmp_path))
    assert bits(forward) == bits(backward) == bits(interleaved)


def test_memory_and_file_sums_give_the_same_bits(tmp_path: Path) -> None:
    base = random_model(0)
    uploads = whole_uploads("a", random_model(1), 2) + whole_uploads("b", random_model(2), 5)
    in_memory, _ = run_round(base, uploads, new_sums("memory", tmp_path, slice_elements=3))
    in_file, _ = run_round(base, uploads, new_sums("file", tmp_path, slice_elements=8))
    assert bits(in_memory) == bits(in_file)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_read_into_copies_raw_sums_without_consuming_them(kind: str, tmp_path: Path) -> None:
    """What fl.robust reads each client's stored update with: any range, any number of times."""
    sums = new_sums(kind, tmp_path, slice_elements=3)
    sums.add("w", torch.arange(10.0), 2.0)
    for start, stop in ((0, 10), (3, 7), (9, 10), (4, 4)):
        out = torch.empty(stop - start)
        sums.read_into("w", start, out)
        assert torch.equal(out, torch.arange(start, stop, dtype=torch.float32) * 2)
    with pytest.raises(ValueError, match=r"elements \[8, 11\) are not in 'w'"):
        sums.read_into("w", 8, torch.empty(3))
    with pytest.raises(ValueError, match="no sums of 'v'"):
        sums.read_into("v", 0, torch.empty(1))
    assert next(sums.mean_slices("w"))[1].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="no sums of 'w'"):  # the mean consumed them
        sums.read_into("w", 0, torch.empty(1))
    sums.close()


# --- refusals ------------------------------------------------------------------------------------

NAN_W = torch.full((7, 5), float("nan"))
INF_W = torch.zeros(7, 5).index_fill_(0, torch.tensor([3]), float("inf"))
REFUSALS: dict[str, tuple[str, torch.Tensor | None, float, str]] = {
    "unknown tensor": ("nope", torch.zeros(5), 1.0, "not in the model"),
    "wrong shape": ("w", torch.zeros(5, 7), 1.0, "shape"),
    "NaN values": ("w", NAN_W, 1.0, "NaN"),
    "infinite values": ("w", INF_W, 1.0, "infinite"),
    "weight 0": ("w", None, 0, "weight"),
    "weight -1": ("w", None, -1.0, "weight"),
    "weight inf": ("w", None, math.inf, "weight"),
    "weight nan": ("w", None, math.nan, "weight"),
    "weight True": ("w", None, True, "weight"),  # a bool is no sample count
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_bad_input_is_refused_naming_client_and_tensor(case: str) -> None:
    name, tensor, weight, why = REFUSALS[case]
    base = random_model(0)
    aggregation = RoundAggregation(base, layouts_of(base), MemorySums(), FedAvgUpdate())
    upload = base["w"] if tensor is None else tensor
    with pytest.raises(ValueError, match=why) as refused:
        aggregation.add("site-7", name, upload, weight, FULL)
    assert "site-7" in str(refused.value)
    assert repr(name) in str(refused.value)
    assert aggregation.weight(name) == 0.0  # nothing of it was folded


def test_a_duplicate_and_late_tensors_are_refused_naming_client_and_tensor() -> None:
    base = random_model(0)
    aggregation = RoundAggregation(base, layouts_of(base), MemorySums(), FedAvgUpdate())
    for name, tensor in base.items():
        aggregation.add("site-1", name, tensor, 2.0, FULL)
    with pytest.raises(ValueError, match=r"site-1's tensor 'b' was already added"):
        aggregation.add("site-1", "b", base["b"], 2.0, FULL)
    aggregation.finish_tensor("b", lambda start, piece: None)
    with pytest.raises(ValueError, match=r"site-2's tensor 'b' arrived after"):
        aggregation.add("site-2", "b", base["b"], 1.0, FULL)
    aggregation.add("site-2", "w", base["w"], 1.0, FULL)  # other tensors still open
    aggregation.finish_round(lambda name, start, piece: None)
    with pytest.raises(ValueError, match=r"site-3's tensor 'w' arrived after"):
        aggregation.add("site-3", "w", base["w"], 1.0, FULL)


def test_a_refused_tensor_can_be_sent_again() -> None:
    base = {"w": torch.zeros(3)}
    aggregation = RoundAggregation(base, layouts_of(base), MemorySums(), FedAvgUpdate())
    with pytest.raises(ValueError, match="NaN"):
        aggregation.add("site-1", "w", torch.tensor([1.0, float("nan"), 2.0]), 1.0, FULL)
    aggregation.add("site-1", "w", torch.tensor([1.0, 4.0, 2.0]), 1.0, FULL)
    written: list[torch.Tensor] = []
    aggregation.finish_round(lambda name, start, piece: written.append(piece.clone()))
    assert written[0].tolist() == [1.0, 4.0, 2.0]


def test_a_tensor_nobody_delivered_fails_the_round_by_name(tmp_path: Path) -> None:
    base = random_model(0)
    uploads = [u for u in whole_uploads("site-1", random_model(1), 1) if u[1] != "s"]
    with pytest.raises(ValueError, match=r"no client delivered 1 tensors, e\.g\. 's'"):
        run_round(base, uploads, new_sums("file", tmp_path))
    assert not (tmp_path / "sums.bin").exists()


def test_a_base_that_does_not_match_the_layouts_is_refused() -> None:
    base = random_model(0)
    layouts = layouts_of(base) | {"b": TensorLayout((5,), torch.float16)}
    with pytest.raises(ValueError, match="base tensor 'b'"):
        RoundAggregation(base, layouts, MemorySums(), FedAvgUpdate())


# --- what a round computes -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_each_tensor_is_averaged_over_the_clients_that_delivered_it(
    kind: str, tmp_path: Path
) -> None:
    base = {"a": torch.zeros(4), "b": torch.zeros(2, 2)}
    uploads = [
        ("site-1", "a", torch.full((4,), 1.0), 1, FULL),
        ("site-1", "b", torch.full((2, 2), 1.0), 1, FULL),
        ("site-2", "a", torch.full((4,), 4.0), 2, FULL),  # site-2 dropped before sending "b"
    ]
    out, outcome = run_round(base, uploads, new_sums(kind, tmp_path, slice_elements=3))
    assert out["a"].tolist() == [3.0] * 4
    assert out["b"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert outcome.weights == {"a": 3.0, "b": 1.0}
    assert outcome.contributors == {"a": ("site-1", "site-2"), "b": ("site-1",)}
    assert outcome.clients == ("site-1", "site-2")
    assert outcome.complete_clients == ("site-1",)
    assert outcome.mode is FULL


def test_diff_rounds_write_base_plus_the_mean_diff(tmp_path: Path) -> None:
    base = {"w": torch.tensor([10.0, 20.0, 30.0])}
    uploads = [
        ("site-1", "w", torch.tensor([1.0, 2.0, 3.0]), 1, DIFF),
        ("site-2", "w", torch.tensor([13.0, 20.0, 27.0]), 1, FULL),  # converted to a DIFF
    ]
    out, outcome = run_round(base, uploads, new_sums("file", tmp_path, slice_elements=2))
    assert outcome.mode is DIFF  # the first add decided
    assert out["w"].tolist() == [12.0, 21.0, 30.0]


def test_integer_and_bool_tensors_are_rounded_means() -> None:
    base = {"steps": torch.tensor([10, 20], dtype=torch.int64), "mask": torch.tensor([1, 0]) > 0}
    uploads = [
        ("site-1", "steps", torch.tensor([11, 20]), 1, FULL),
        ("site-2", "steps", torch.tensor([14, 23]), 2, FULL),
        ("site-1", "mask", torch.tensor([True, True]), 1, FULL),
        ("site-2", "mask", torch.tensor([False, True]), 2, FULL),
    ]
    out, _ = run_round(base, uploads, MemorySums())
    assert out["steps"].tolist() == [13, 22]  # 39/3 = 13, 66/3 = 22
    assert out["mask"].tolist() == [False, True]  # weighted majority
    diffs = [("site-1", "steps", torch.tensor([1, -3]), 1, DIFF)]
    out, _ = run_round({"steps": base["steps"]}, diffs, MemorySums())
    assert out["steps"].tolist() == [11, 17]


def test_adds_from_many_threads_fold_every_tensor_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    base = {f"t{i}": torch.zeros(50) for i in range(8)}
    clients = {f"site-{c}": random_model(c, torch.float32) for c in range(6)}
    uploads = [
        (client, name, torch.full((50,), float(c)), c + 1, FULL)
        for c, client in enumerate(clients)
        for name in base
    ]
    sums = new_sums("file", tmp_path, slice_elements=7)
    aggregation = RoundAggregation(base, layouts_of(base), sums, FedAvgUpdate())
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda upload: aggregation.add(*upload), uploads))
    out: Model = {name: torch.empty(50) for name in base}
    aggregation.finish_round(lambda n, s, p: out[n][s : s + p.numel()].copy_(p))
    expected = sum(c * (c + 1) for c in range(6)) / sum(c + 1 for c in range(6))
    for tensor in out.values():
        assert torch.allclose(tensor, torch.full((50,), expected))


# --- FedAdam --------------------------------------------------------------------------------------


class AdamReference:
    """The FedAdam formulas in float64, as in the paper (Algorithm 2, no bias correction)."""

    def __init__(self, eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3) -> None:
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, base: Model, mean: dict[str, torch.Tensor], mode: ParamsType) -> Model:
        new = {}
        for name, tensor in base.items():
            x = tensor.double()
            delta = mean[name] - x if mode is FULL else mean[name]
            m = self.m.get(name, torch.zeros_like(x))
            v = self.v.get(name, torch.full_like(x, self.tau**2))
            self.m[name] = m = self.beta1 * m + (1 - self.beta1) * delta
            self.v[name] = v = self.beta2 * v + (1 - self.beta2) * delta**2
            new[name] = x + self.eta * m / (v.sqrt() + self.tau)
        return new


def client_uploads(number: int, base: Model, mode: ParamsType) -> list:
    uploads = []
    for client in range(3):
        change = random_model(100 * number + client)
        weight = [3, 1.5, 8][client]
        for name, tensor in base.items():
            value = change[name] * 0.1 if mode is DIFF else tensor + change[name] * 0.1
            uploads.append((f"site-{client}", name, value, weight, mode))
    return uploads


def float64_mean(uploads: list, base: Model) -> dict[str, torch.Tensor]:
    totals = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in base.items()}
    weights = dict.fromkeys(base, 0.0)
    for _, name, tensor, weight, _ in uploads:
        totals[name] += weight * tensor.double()
        weights[name] += weight
    return {name: totals[name] / weights[name] for name in base}


@pytest.mark.parametrize("moments", ["memory", "file"])
@pytest.mark.parametrize("mode", [FULL, DIFF])
def test_fedadam_follows_the_float64_formulas(moments: str, mode: ParamsType, tmp_path) -> None:
    update = FedAdamUpdate(moments_dir=tmp_path / "moments" if moments == "file" else None)
    reference = AdamReference()
    base = random_model(0)
    for number in range(3):
        uploads = client_uploads(number, base, mode)
        expected = reference.step(base, float64_mean(uploads, base), mode)
        ours, _ = run_round(base, uploads, new_sums("file", tmp_path, slice_elements=6), update)
        for name in base:
            # float32 arithmetic against float64: the mean is off by ~(n + 5) u |x|; FULL's delta
            # = mean - base inherits that, and the step scales a delta error by at most
            # eta / tau = 10; the final base + step rounds once more: 200 u (|base| + 1) covers it.
            # A wrong formula moves the step (~1e-2) by far more.
            tolerance = 200 * 2.0**-24 * (base[name].double().abs() + 1)
            error = (ours[name].double() - expected[name]).abs()
            assert bool((error <= tolerance).all()), (number, name, error.max())
            moved = (ours[name].double() - base[name].double()).abs()
            assert moved.numel() == 0 or moved.max() > 1e-3  # the step is really taken
        base = ours
    assert update.rounds_done == 3


def three_rounds(update_for: Callable[[int], FedAdamUpdate], tmp_path: Path) -> list[Model]:
    """Three FedAdam rounds; `update_for(number)` hands the update that runs round `number`."""
    base, models = random_model(0, torch.bfloat16), []
    for number in range(3):
        uploads = client_uploads(number, base, FULL)
        sums = new_sums("file", tmp_path, slice_elements=5)
        base, _ = run_round(base, uploads, sums, update_for(number))
        models.append(base)
    return models


def resumed_after_round_one(make: Callable[[], FedAdamUpdate], checkpoint: Path):
    updates: dict[int, FedAdamUpdate] = {}

    def update_for(number: int) -> FedAdamUpdate:
        if number == 0:
            updates[0] = make()
        if number == 1:  # a new process: save, forget, load
            updates[0].save(checkpoint)
            updates[0].close()
            updates[1] = make()
            updates[1].load(checkpoint)
            assert updates[1].rounds_done == 1
        return updates[min(number, 1)]

    return update_for


RESUMES = {  # moments of the first process, of the second, and where the checkpoint goes
    "memory -> memory": (None, None, "checkpoint"),
    "files, checkpoint in moments_dir": ("moments", "moments", "moments"),
    "files -> other files, checkpoint apart": ("moments", "moments-2", "checkpoint"),
    "memory -> files": (None, "moments", "checkpoint"),
    "files -> memory": ("moments", None, "checkpoint"),
}


@pytest.mark.parametrize("resume", RESUMES, ids=list(RESUMES))
def test_fedadam_resumed_from_a_checkpoint_gives_the_same_bits(resume: str, tmp_path: Path):
    uninterrupted = FedAdamUpdate()
    expected = three_rounds(lambda number: uninterrupted, tmp_path)
    first, second, checkpoint = RESUMES[resume]
    places = iter([first, second])

    def make() -> FedAdamUpdate:
        place = next(places)
        return FedAdamUpdate(moments_dir=tmp_path / place if place else None)

    resumed = three_rounds(resumed_after_round_one(make, tmp_path / checkpoint), tmp_path)
    assert [bits(m) for m in resumed] == [bits(m) for m in expected]


def test_fedadam_checkpoints_keep_two_generations_and_link_file_moments(tmp_path: Path) -> None:
    update = FedAdamUpdate(moments_dir=tmp_path / "moments")
    checkpoint = tmp_path / "checkpoint"

    def saving(number: int) -> FedAdamUpdate:
        if number > 0:
            update.save(checkpoint)
        return update

    three_rounds(saving, tmp_path)
    json_file, moments_file = update.save(checkpoint)
    assert (json_file.name, moments_file.name) == (
        "fedadam-00000003.json",
        "fedadam-00000003.moments",
    )
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "fedadam-00000002.json",
        "fedadam-00000002.moments",
        "fedadam-00000003.json",
        "fedadam-00000003.moments",
    ]
    in_moments_dir = tmp_path / "moments" / "fedadam-00000003.moments"
    assert moments_file.stat().st_ino == in_moments_dir.stat().st_ino  # a link, not a copy


def test_fedadam_forgets_a_round_whose_finish_failed(tmp_path: Path) -> None:
    uninterrupted = FedAdamUpdate()
    expected = three_rounds(lambda number: uninterrupted, tmp_path)
    update = FedAdamUpdate(moments_dir=tmp_path / "moments")
    base = random_model(0, torch.bfloat16)
    base, _ = run_round(base, client_uploads(0, base, FULL), MemorySums(), update)
    failing = RoundAggregation(base, layouts_of(base), MemorySums(), update)
    for upload in client_uploads(1, base, FULL):
        failing.add(*upload)

    def write(name: str, start: int, piece: torch.Tensor) -> None:
        if name == "b":
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        failing.finish_round(write)
    assert update.rounds_done == 1
    assert not (tmp_path / "moments" / "fedadam-00000002.moments.partial").exists()
    models = [base]
    for number in (1, 2):
        base, _ = run_round(base, client_uploads(number, base, FULL), MemorySums(), update)
        models.append(base)
    assert [bits(m) for m in models] == [bits(m) for m in expected]


def test_fedadam_files_survive_a_kill_mid_round(tmp_path: Path) -> None:
    uninterrupted = FedAdamUpdate(moments_dir=tmp_path / "a")
    expected = three_rounds(lambda number: uninterrupted, tmp_path)
    moments = tmp_path / "b"
    first = FedAdamUpdate(moments_dir=moments)
    base = random_model(0, torch.bfloat16)
    base, _ = run_round(base, client_uploads(0, base, FULL), MemorySums(), first)
    # round 2 starts, writes some moments, and the process dies (nothing closed, nothing ended)
    killed = RoundAggregation(base, layouts_of(base), MemorySums(), first)
    for upload in client_uploads(1, base, FULL):
        killed.add(*upload)
    killed.finish_tensor("w", lambda start, piece: None)
    assert (moments / "fedadam-00000002.moments.partial").exists()
    restarted = FedAdamUpdate(moments_dir=moments)
    restarted.load(moments)
    assert restarted.rounds_done == 1
    models = [base]
    for number in (1, 2):
        base, _ = run_round(base, client_uploads(number, base, FULL), MemorySums(), restarted)
        models.append(base)
    assert [bits(m) for m in models] == [bits(m) for m in expected]
    described = json.loads((moments / "fedadam-00000003.json").read_text())
    assert described["rounds_done"] == 3
    assert sorted(p.name for p in moments.iterdir()) == [  # the previous generation is kept
        "fedadam-00000002.json",
        "fedadam-00000002.moments",
        "fedadam-00000003.json",
        "fedadam-00000003.moments",
    ]


def test_fedadam_resumes_from_the_generation_its_model_checkpoint_names(tmp_path: Path) -> None:
    """The moments of round 2 committed, the model of round 2 did not: resume from round 1."""
    uninterrupted = FedAdamUpdate()
    expected = three_rounds(lambda number: uninterrupted, tmp_path)
    moments = tmp_path / "moments"
    ahead = FedAdamUpdate(moments_dir=moments)
    three_rounds(lambda number: ahead, tmp_path)
    assert ahead.rounds_done == 3
    behind = FedAdamUpdate(moments_dir=moments)
    behind.load(moments, rounds_done=2)
    base = expected[1]
    base, _ = run_round(base, client_uploads(2, base, FULL), MemorySums(), behind)
    assert bits(base) == bits(expected[2])


def test_fedadam_resumed_before_its_first_round_starts_fresh(tmp_path: Path) -> None:
    uninterrupted = FedAdamUpdate()
    expected = three_rounds(lambda number: uninterrupted, tmp_path)
    resumed = FedAdamUpdate(moments_dir=tmp_path / "moments")
    resumed.load(tmp_path / "moments", rounds_done=0)
    assert [bits(m) for m in three_rounds(lambda n: resumed, tmp_path)] == [
        bits(m) for m in expected
    ]
    with pytest.raises(FileNotFoundError):
        FedAdamUpdate().load(tmp_path / "nothing-here")


def test_fedadam_leaves_integer_tensors_to_fedavg() -> None:
    base = {"steps": torch.tensor([10, 20]), "w": torch.zeros(2)}
    uploads = [
        ("site-1", "steps", torch.tensor([12, 20]), 1, FULL),
        ("site-1", "w", torch.ones(2), 1, FULL),
    ]
    out, _ = run_round(base, uploads, MemorySums(), FedAdamUpdate())
    assert out["steps"].tolist() == [12, 20]
    assert out["w"].tolist() != [1.0, 1.0]  # Adam's small step, not the mean


# --- memory ---------------------------------------------------------------------------------------

PEAK_PROBE = textwrap.dedent(
    """
    import os, sys, torch
    from fl.aggregation import FileSums, MemorySums, RoundAggregation, TensorLayout
    from fl.server_optimizers import FedAvgUpdate

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    kind, directory = sys.argv[1], sys.argv[2]
    names, numel = [f"t{i}" for i in range(8)], 2 * 2**20  # 8 x 8 MiB = a 64 MiB model
    path = os.path.join(directory, "base.bin")
    with open(path, "wb") as file:
        file.truncate(4 * numel * len(names))
    whole = torch.from_file(path, shared=True, size=numel * len(names))  # an mmap'd base
    base = {name: whole[i * numel : (i + 1) * numel] for i, name in enumerate(names)}
    layouts = {name: TensorLayout((numel,), torch.float32) for name in names}
    slice_elements = 2**20
    sums = (
        FileSums(os.path.join(directory, "sums.bin"), slice_elements=slice_elements)
        if kind == "file"
        else MemorySums(slice_elements=slice_elements)
    )
    aggregation = RoundAggregation(base, layouts, sums, FedAvgUpdate())
    torch.randn(numel)  # warm the allocator and torch's kernels before the baseline
    baseline = rss("VmRSS:")
    for client in range(2):
        for name in names:
            aggregation.add(f"site-{client}", name, torch.randn(numel), 1.0 + client, "FULL")
    out = os.open(os.path.join(directory, "new.bin"), os.O_WRONLY | os.O_CREAT, 0o600)
    aggregation.finish_round(lambda name, start, piece: os.pwrite(out, piece.numpy().data, 0))
    print(rss("VmHWM:") - baseline)
    """
)


def peak_above_baseline(kind: str, directory: Path) -> int:
    # glibc's dynamic mmap threshold would keep freed 4-8 MiB temporaries in the heap, where they
    # pile up by fragmentation (RSS then grows to ~the model even though little is live); a fixed
    # threshold maps and unmaps them, so the peak measures what the code holds at once.
    environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, kind, str(directory)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(done.stdout.split()[-1])


def test_file_sums_hold_a_few_slices_not_the_model(tmp_path: Path) -> None:
    model = 64 * 2**20
    in_memory = peak_above_baseline("memory", tmp_path)
    in_file = peak_above_baseline("file", tmp_path)
    assert in_memory > model  # the probe sees the sums when they are in RAM
    # one 8 MiB client tensor in flight + a few 4 MiB slices (product, sums, mean), not 64 MiB
    assert in_file < 32 * 2**20, in_file
