"""Tied tensors: an exact alias travels once (manifest `aliases`, no piece in the plan) and every
sink restores it; partial views travel separately; a received alias table is validated."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tests.payload.helpers import TiedLM, same_bits, stream
from transport.exceptions import ManifestError
from transport.payload import (
    CallbackSink,
    Manifest,
    ManifestLimits,
    SafetensorsFileSink,
    SharedStorageWarning,
    StateDictSink,
    StateDictSource,
    TensorSpec,
    find_aliases,
    plan_chunks,
)


def _planned_bytes(manifest: Manifest) -> dict[str, int]:
    sent: dict[str, int] = {}
    for chunk in plan_chunks(manifest):
        for piece in chunk.pieces:
            name = manifest.tensors[piece.tensor].name
            sent[name] = sent.get(name, 0) + piece.nbytes
    return sent


# --- the sender ----------------------------------------------------------------------------------


def test_a_tied_weight_is_planned_once() -> None:
    state = TiedLM().state_dict()
    source = StateDictSource(state, chunk_size=1000)  # the embedding is split over chunks
    manifest = source.manifest
    assert manifest.aliases == {"lm_head.weight": "embed.weight"}
    assert [spec.name for spec in manifest.tensors] == list(state)  # every name still listed
    sent = _planned_bytes(manifest)
    assert "lm_head.weight" not in sent
    assert sent["embed.weight"] == state["embed.weight"].nbytes
    unique = sum(t.nbytes for name, t in state.items() if name != "lm_head.weight")
    assert manifest.total_bytes == sum(sent.values()) == unique


def test_only_exact_aliases_are_aliases() -> None:
    base = torch.arange(24, dtype=torch.float32)
    complex_base = torch.randn(4, dtype=torch.complex64)
    state = {
        "base": base,
        "same": base,  # the same tensor object
        "view": base.view(24),  # another object, the same view
        "reshaped": base.view(4, 6),  # same bytes, other shape: not the same tensor
        "clone": base.clone(),
        "complex": complex_base,
        "conj": complex_base.conj(),  # same storage, other values
        "e1": torch.empty(0),
        "e2": torch.empty(0),
    }
    with pytest.warns(SharedStorageWarning, match="'reshaped' with 'base'") as caught:
        assert find_aliases(state) == {"same": "base", "view": "base"}
    assert "'conj' with 'complex'" in str(caught[0].message)


def test_partial_views_travel_separately_and_arrive_independent() -> None:
    fused = torch.randn(3, 8)
    state = {"fused": fused, "q": fused[0], "k": fused[1]}
    with pytest.warns(SharedStorageWarning, match="2 tensors share storage") as caught:
        source = StateDictSource(state)
    assert caught[0].filename == __file__  # pointed at the line that built the source
    assert source.manifest.aliases == {}
    assert _planned_bytes(source.manifest).keys() == state.keys()
    result = stream(source, StateDictSink())
    assert torch.equal(result["q"], fused[0])
    assert result["q"].untyped_storage().data_ptr() != result["fused"].untyped_storage().data_ptr()


def test_a_dict_without_ties_warns_nothing_and_its_header_is_unchanged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = StateDictSource({"a": torch.zeros(3), "b": torch.zeros(3)})
    assert "aliases" not in source.manifest.to_header()


# --- the sinks -----------------------------------------------------------------------------------


def test_new_dict_maps_the_alias_to_the_very_same_tensor() -> None:
    sent = TiedLM(seed=1).state_dict()
    result = stream(StateDictSource(sent, chunk_size=1000), StateDictSink(), check_safetensors=True)
    assert list(result) == list(sent)
    assert result["lm_head.weight"] is result["embed.weight"]
    for name, tensor in sent.items():
        assert same_bits(result[name], tensor)
    model = TiedLM(seed=2)
    model.load_state_dict(result)
    assert model.lm_head.weight is model.embed.weight


def test_in_place_fill_of_a_tied_model_keeps_its_storage_and_its_tie() -> None:
    sent, model = TiedLM(seed=1).state_dict(), TiedLM(seed=2)
    pointer = model.embed.weight.data_ptr()
    stream(StateDictSource(sent, chunk_size=1000), StateDictSink(model.state_dict()))
    assert model.lm_head.weight is model.embed.weight
    assert model.embed.weight.data_ptr() == pointer
    assert torch.equal(model.embed.weight.detach(), sent["embed.weight"])


def test_in_place_fill_copies_into_an_alias_that_is_not_tied_here() -> None:
    sent = TiedLM(seed=1).state_dict()
    untied = {name: torch.zeros_like(t) for name, t in sent.items()}
    head = untied["lm_head.weight"]
    stream(StateDictSource(sent, chunk_size=1000), StateDictSink(untied))
    assert untied["lm_head.weight"] is head
    assert torch.equal(head, sent["embed.weight"])
    assert torch.equal(untied["embed.weight"], sent["embed.weight"])


def test_in_place_fill_accepts_a_dict_that_lists_the_tied_weight_once() -> None:
    sent, model = TiedLM(seed=1).state_dict(), TiedLM(seed=2)
    params = dict(model.named_parameters())  # named_parameters() drops the duplicate name
    assert "lm_head.weight" not in params
    result = stream(StateDictSource(sent), StateDictSink(params, strict=True))  # type: ignore[arg-type]
    assert result is params
    assert torch.equal(model.lm_head.weight.detach(), sent["embed.weight"])


def test_file_sink_writes_the_bytes_under_both_names(tmp_path: Path) -> None:
    sent = TiedLM(seed=1).state_dict()
    path = stream(StateDictSource(sent, chunk_size=1000), SafetensorsFileSink(tmp_path / "m.st"))
    loaded = load_file(path)
    assert loaded.keys() == sent.keys()
    for name, tensor in sent.items():
        assert same_bits(loaded[name], tensor)
    # safetensors refuses shared tensors, so the reference is two equal, separate tensors.
    untied = {name: t.detach().clone() for name, t in sent.items()}
    save_file(untied, tmp_path / "reference.st")
    assert path.read_bytes() == (tmp_path / "reference.st").read_bytes()


def test_callback_gets_the_alias_with_the_same_tensor_right_after_its_target() -> None:
    sent = TiedLM(seed=1).state_dict()
    calls: list[tuple[str, torch.Tensor]] = []
    sink = CallbackSink(lambda name, tensor: calls.append((name, tensor)))
    delivered = stream(StateDictSource(sent, chunk_size=1000), sink)
    names = [name for name, _ in calls]
    assert sorted(names) == sorted(sent)
    assert delivered == len(sent)
    at = names.index("embed.weight")
    assert names[at + 1] == "lm_head.weight"
    assert calls[at + 1][1] is calls[at][1]
    assert torch.equal(calls[at][1], sent["embed.weight"])


# --- any mix of tensors and aliases ------------------------------------------------------------


@st.composite
def _tied_state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Names that each take a new tensor or re-use an earlier one (exactly or as a view)."""
    count = draw(st.integers(1, 8))
    state: dict[str, torch.Tensor] = {}
    for number in range(count):
        earlier = list(state.values())
        choice = draw(st.sampled_from(["new", "same", "view"] if earlier else ["new"]))
        if choice == "new":
            shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=2)))
            tensor = torch.randn(shape)
        else:
            tensor = draw(st.sampled_from(earlier))
            tensor = tensor if choice == "same" else tensor.view(tensor.shape)
        state[f"t{number}"] = tensor
    return state


@settings(max_examples=60, deadline=None)
@given(state=_tied_state_dicts(), chunk_size=st.integers(1, 300))
def test_any_mix_arrives_tied_exactly_where_it_was(
    state: dict[str, torch.Tensor], chunk_size: int
) -> None:
    source = StateDictSource(state, chunk_size=chunk_size)
    result = stream(source, StateDictSink())
    assert list(result) == list(state)
    for name, tensor in state.items():
        assert same_bits(result[name], tensor)
    pairs = [(a, b) for a in state for b in state if a < b]
    for a, b in pairs:
        tied = state[a].numel() > 0 and state[a].data_ptr() == state[b].data_ptr()
        assert (result[a] is result[b]) == tied, (a, b)
    unique = {t.data_ptr(): t.nbytes for t in state.values() if t.numel() > 0}
    assert source.manifest.total_bytes == sum(unique.values())
    assert sum(c.nbytes for c in plan_chunks(source.manifest)) == source.manifest.total_bytes


# --- a received alias table --------------------------------------------------------------------


def _tied_manifest() -> Manifest:
    return Manifest(
        (
            TensorSpec("embed", "F32", (5, 4)),
            TensorSpec("norm", "F32", (4,)),
            TensorSpec("head", "F32", (5, 4)),
            TensorSpec("half", "F16", (5, 4)),
        ),
        chunk_size=64,
        aliases={"head": "embed"},
    )


def test_header_round_trip_with_aliases() -> None:
    manifest = _tied_manifest()
    header = manifest.to_header()
    assert header["aliases"] == {"head": "embed"}
    assert header["total_bytes"] == 80 + 16 + 40  # "head" not again
    assert Manifest.from_header(header) == manifest
    assert manifest.target_of == {2: 0}
    assert manifest.aliases_of(0) == (2,)
    assert manifest.aliases_of(1) == ()


BAD_ALIASES: list[tuple[Any, str]] = [
    (["head", "embed"], "aliases must be a JSON object, got list"),
    ({"head": 0}, "alias 'head' -> 0 is not a name -> name pair"),
    ({"ghost": "embed"}, "alias 'ghost' is not the name of a tensor"),
    ({"head": "ghost"}, "alias 'head' points at 'ghost', which is not a tensor"),
    ({"head": "head"}, "alias 'head' points at itself"),
    ({"head": "embed", "norm": "head"}, "'norm' points at 'head', itself an alias of 'embed'"),
    ({"head": "norm"}, r"alias 'head' is F32\[5, 4\] but its target 'norm' is F32\[4\]"),
    ({"half": "embed"}, r"alias 'half' is F16\[5, 4\] but its target 'embed' is F32\[5, 4\]"),
]


@pytest.mark.parametrize(("aliases", "message"), BAD_ALIASES)
def test_bad_aliases_refused(aliases: Any, message: str) -> None:
    header = copy.deepcopy(_tied_manifest().to_header())
    header["aliases"] = aliases
    with pytest.raises(ManifestError, match=message):
        Manifest.from_header(header)


def test_bad_aliases_refused_at_construction_too() -> None:
    specs = (TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (3,)))
    with pytest.raises(ManifestError, match="alias 'b' is F32"):
        Manifest(specs, aliases={"b": "a"})


def test_too_many_aliases_refused_before_reading_them() -> None:
    header = _tied_manifest().to_header()
    with pytest.raises(ManifestError, match="lists 1 aliases, over the limit of 0"):
        Manifest.from_header(header, ManifestLimits(max_aliases=0))


def test_total_bytes_must_count_an_alias_once() -> None:
    header = _tied_manifest().to_header()
    header["total_bytes"] += 80  # what a sender that counts the alias again would announce
    with pytest.raises(ManifestError, match=r"sum to 136 \(each alias counted once\)"):
        Manifest.from_header(header)


def test_aliases_count_toward_the_total_limit() -> None:
    # A file sink writes every alias out, so a table of aliases must not dodge the limit.
    header = _tied_manifest().to_header()
    with pytest.raises(ManifestError, match="manifest totals 216 bytes, over the limit of 200"):
        Manifest.from_header(header, ManifestLimits(max_total_bytes=200))
