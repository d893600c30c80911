"""The paper's three applications (fl/apps) at their tiny size: the data, the base model, the
transport of a `save_pretrained` checkpoint and of a PEFT adapter, and the direction of each
result (federated at least as good as the mean local-only site), never exact values."""

from __future__ import annotations

import asyncio
import difflib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fl.apps import make_task
from fl.apps.common import UNION, better
from fl.apps.data import dirichlet_split, docstrings, labelled_split
from fl.apps.demo import AppDemoOptions, run_app_demo
from fl.apps.lm import TINY, lm_config, new_lm, pretrained_base
from fl.client import ClientSettings
from fl.fedavg import FedAvg
from fl.model import FLModel
from fl.server import FLServer
from transport import Endpoint, SafetensorsSource, StateDictSink


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny base model is pre-trained once per test session, never into the user's cache."""
    monkeypatch.setenv("TENSORWIRE_CACHE", str(tmp_path_factory.getbasetemp() / "apps-cache"))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_dirichlet_split_is_seeded_covers_every_item_once_and_skews_labels() -> None:
    labels = [i % 6 for i in range(600)]
    parts = dirichlet_split(labels, sites=3, alpha=0.5, seed=7)
    assert parts == dirichlet_split(labels, sites=3, alpha=0.5, seed=7)
    assert sorted(i for part in parts for i in part) == list(range(600))
    shares = [[sum(labels[i] == c for i in part) / 100 for c in range(6)] for part in parts]
    assert max(max(row) for row in shares) > 0.5  # some site holds most of some class


def test_the_labelled_texts_come_from_the_standard_library_and_are_reproducible() -> None:
    texts, labels = docstrings()
    assert len(texts) > 600
    assert len(set(labels)) == 6
    first, second = labelled_split(3, 32, 20), labelled_split(3, 32, 20)
    for (ids, y), (ids2, y2) in zip(first.train, second.train, strict=True):
        assert torch.equal(ids, ids2)
        assert torch.equal(y, y2)


async def send_and_receive(source: object, into: dict[str, torch.Tensor]) -> None:
    async with Endpoint() as receiver, Endpoint() as sender:
        url = await receiver.listen(f"memory://apps-{id(into)}")

        async def take() -> None:
            async for transfer in receiver.incoming():
                await transfer.receive_into(StateDictSink(into=into, strict=True))
                return

        taking = asyncio.create_task(take())
        peer = await sender.connect(url)
        await peer.send_state_dict(source)  # type: ignore[arg-type]
        await asyncio.wait_for(taking, 30)


async def test_a_sharded_save_pretrained_checkpoint_streams_into_a_model_in_place(
    tmp_path: Path,
) -> None:
    sent = new_lm(TINY)
    sent.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    received = new_lm(TINY.__class__(**{**TINY.__dict__, "seed": 1}))
    targets = received.state_dict()
    pointers = {name: t.data_ptr() for name, t in targets.items()}
    with SafetensorsSource(tmp_path / "model.safetensors.index.json") as source:
        await send_and_receive(source, targets)
    for name, tensor in sent.state_dict().items():
        assert torch.equal(received.state_dict()[name], tensor), name
        assert received.state_dict()[name].data_ptr() == pointers[name]  # in place
    assert lm_config(TINY).num_hidden_layers == received.config.num_hidden_layers


async def test_a_peft_adapter_is_received_into_the_model_in_place() -> None:
    task = make_task("lora", "tiny")
    trained, receiving = task.new_model(), task.new_model()
    await asyncio.to_thread(task.train_round, trained, 0)
    adapter = task.exchanged(receiving)
    assert adapter
    assert all(".lora_" in n or ".head." in n for n in adapter)
    pointers = {name: t.data_ptr() for name, t in adapter.items()}
    await send_and_receive(task.exchanged(trained), adapter)
    parameters = dict(receiving.named_parameters())
    for name, tensor in task.exchanged(trained).items():
        assert torch.equal(parameters[name], tensor), name
        assert parameters[name].data_ptr() == pointers[name]
    ids = task.data.test[0][0][:4]  # type: ignore[attr-defined]
    with torch.no_grad():
        assert torch.allclose(receiving(ids), trained(ids))


def test_the_pretrained_base_is_saved_once_as_sharded_safetensors() -> None:
    path = pretrained_base(TINY)
    assert (path / "config.json").exists()
    assert pretrained_base(TINY) == path
    assert list(path.glob("*.safetensors"))


@pytest.mark.parametrize("name", ["lora", "sft", "embeddings"])
def test_federated_is_at_least_as_good_as_the_mean_local_only_site(name: str) -> None:
    summary = run_app_demo(AppDemoOptions(name, "tiny", progress=False, in_process=True))
    task = make_task(name, "tiny")
    union = summary["metrics"][UNION]
    assert better(task, union["federated"], union["local"]), summary["metrics"]
    assert len(summary["curves"]["federated"]) == task.rounds + 1
    assert len(summary["bytes_per_round"]) == task.rounds
    # every site receives and sends the exchanged tensors each round
    assert min(summary["bytes_per_round"]) >= 2 * task.sites * summary["exchanged_bytes"]
    if name == "lora":
        assert summary["exchanged_bytes"] < 0.05 * summary["model_bytes"]
    else:
        assert summary["exchanged_bytes"] == summary["model_bytes"]


@pytest.mark.parametrize("name", ["lora", "sft", "embeddings"])
def test_each_federated_example_is_its_centralized_twin_plus_the_client_api(name: str) -> None:
    examples = Path(__file__).parents[2] / "examples"
    before = (examples / f"{name}_centralized.py").read_text().splitlines()
    after = (examples / f"{name}_federated.py").read_text().splitlines()
    diff = list(difflib.ndiff(before, after))
    added = [line[2:] for line in diff if line.startswith("+ ") and line[2:].strip()]
    removed = [line[2:] for line in diff if line.startswith("- ") and line[2:].strip()]
    assert len(added) <= 5, added
    assert removed == ["    for _ in range(task.rounds):"]
    assert "        flare.receive(into=tensors)" in added  # in place into the model's tensors


def start_example_site(url: str, site: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    script = Path(__file__).parents[2] / "examples" / "embeddings_federated.py"
    return subprocess.Popen(
        [sys.executable, str(script), "--site", str(site), "--size", "tiny"],
        env={**env, **ClientSettings(server_url=url, site=f"site-{site}").environment()},
        stdout=subprocess.PIPE,
    )


async def test_the_federated_embeddings_example_runs_under_a_server(tmp_path: Path) -> None:
    task = make_task("embeddings", "tiny", rounds=2)
    pretrained_base(task.lm)  # the sites load it; they never pre-train at once
    fedavg = FedAvg(
        FLModel(params=task.exchanged(task.new_model())), rounds=2, num_clients=3, min_clients=3
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    # Default limits: the example processes stream with the default chunk size.
    async with FLServer(job="example") as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        fedavg.attach(server)
        sites = [start_example_site(url, site, env) for site in range(3)]
        await asyncio.wait_for(fedavg.run(), 120)
        await server.stop_clients("done")
        outputs = [await asyncio.to_thread(site.communicate, timeout=30) for site in sites]
    assert [site.returncode for site in sites] == [0, 0, 0]
    assert all(out.count(b"accuracy") == 2 for out, _ in outputs)
