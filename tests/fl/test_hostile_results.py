"""Results from a buggy or hostile site, over a real FLServer and FLClients on tcp loopback: each is
refused (or, a float dtype, cast) before it touches the global model, and the job goes on with the
honest sites. A site that never uploads fails its round at round_timeout instead of hanging it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from fl.client import FLClient
from fl.controller import NotEnoughClients
from fl.fedavg import FedAvg
from fl.model import SAMPLE_COUNT, FLModel
from fl.protocol import result_meta, result_transfer_id
from fl.results import ResultRules
from fl.results import check_dtype as _check_dtype
from tests.fl.helpers import Trainer, client_settings, constant_trainer, new_server, run_client

SHAPE = (64, 33)
BASE = {"w": torch.linspace(-1, 1, SHAPE[0] * SHAPE[1]).reshape(SHAPE)}

# A site's own loop: given its connected client, answer tasks until the job ends.
Site = Callable[[str, str], Awaitable[object]]


def fedavg(tmp_path: Path, **options: object) -> FedAvg:
    settings: dict[str, object] = {"rounds": 2, "min_clients": 2, "join_timeout": 10.0}
    settings.update(options)
    return FedAvg(FLModel(params=dict(BASE)), state_dir=tmp_path / "state", **settings)  # type: ignore[arg-type]


async def run_job(algorithm: FedAvg, sites: dict[str, Trainer | Site]) -> None:
    """Run the job with one in-process client per site (a Trainer through the usual loop, or a
    Site coroutine of its own); every site must have joined before the first round samples."""
    async with new_server() as server:
        (url,) = await server.start(["tcp://127.0.0.1:0"])
        algorithm.attach(server)
        algorithm.num_clients = len(sites)
        clients = [
            asyncio.ensure_future(
                site(url, name) if getattr(site, "is_site", False) else run_client(url, name, site)  # type: ignore[arg-type]
            )
            for name, site in sites.items()
        ]
        try:
            await algorithm.run()
        finally:
            for client in clients:  # a site that never uploads never ends on its own
                if not client.done():
                    client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)


def returning(
    make: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], count: object
) -> Trainer:
    """A trainer returning make(received params) with sample_count `count`."""

    async def trainer(client: FLClient, received: FLModel) -> FLModel:
        assert isinstance(received.params, dict)
        return FLModel(params=make(received.params), meta={SAMPLE_COUNT: count})

    return trainer


def filled(
    value: float, dtype: torch.dtype = torch.float32
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda params: {
        name: torch.full(t.shape, value, dtype=dtype) for name, t in params.items()
    }


def assert_model(algorithm: FedAvg, expected: torch.Tensor) -> None:
    params = algorithm.model.params
    assert isinstance(params, dict)
    assert params["w"].dtype == torch.float32
    assert torch.equal(params["w"], expected)


def failures(algorithm: FedAvg, site: str) -> list[str]:
    """The reason `site` failed each round (every round must have failed it)."""
    return [report.failed[site] for report in algorithm.history]


# --- dtypes --------------------------------------------------------------------------------------


async def test_an_fp16_result_for_an_fp32_model_is_cast(tmp_path: Path) -> None:
    algorithm = fedavg(tmp_path)
    await run_job(
        algorithm,
        {"a": returning(filled(1.0), 1), "h": returning(filled(3.0, torch.float16), 3)},
    )
    assert all(report.succeeded == ["a", "h"] for report in algorithm.history)
    assert_model(algorithm, torch.full(SHAPE, (1.0 * 1 + 3.0 * 3) / 4))


async def test_an_fp16_result_is_refused_when_cast_dtypes_is_off(tmp_path: Path) -> None:
    algorithm = fedavg(tmp_path, cast_dtypes=False)
    await run_job(
        algorithm,
        {
            "a": returning(filled(1.0), 1),
            "b": returning(filled(2.0), 1),
            "h": returning(filled(3.0, torch.float16), 3),
        },
    )
    assert all(
        "is F16, the model's is F32 (cast_dtypes is off)" in why for why in failures(algorithm, "h")
    )
    assert_model(algorithm, torch.full(SHAPE, 1.5))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
async def test_an_int_or_bool_result_for_a_float_model_is_refused(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    algorithm = fedavg(tmp_path)
    await run_job(
        algorithm,
        {
            "a": returning(filled(1.0), 1),
            "b": returning(filled(2.0), 1),
            "evil": returning(filled(1, dtype), 1),
        },
    )
    got = "I32" if dtype == torch.int32 else "BOOL"
    for why in failures(algorithm, "evil"):
        assert f"evil's tensor 'w' is {got}, the model's is F32 (not castable)" in why
    assert all(report.succeeded == ["a", "b"] for report in algorithm.history)
    assert_model(algorithm, torch.full(SHAPE, 1.5))


def test_the_dtype_rules() -> None:
    cast, strict = ResultRules(), ResultRules(cast_dtypes=False)
    _check_dtype("c", "w", "F32", torch.float32, strict)
    for got, expected in [("F16", torch.float32), ("BF16", torch.float32), ("F32", torch.bfloat16)]:
        _check_dtype("c", "w", got, expected, cast)
        with pytest.raises(ValueError, match="cast_dtypes is off"):
            _check_dtype("c", "w", got, expected, strict)
    _check_dtype("c", "n", "I32", torch.int64, cast)  # an int for an int: cast
    for got, expected in [
        ("F32", torch.int64),
        ("BOOL", torch.float32),
        ("I64", torch.float16),
        ("F16", torch.bool),
        ("I8", torch.bool),
        ("C64", torch.float32),
        ("NOPE", torch.float32),
    ]:
        with pytest.raises(
            ValueError, match=f"c's tensor 'w' is {got}, the model's is .* \\(not castable\\)"
        ):
            _check_dtype("c", "w", got, expected, cast)


# --- values and weights --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "count", "why"),
    [
        (float("nan"), 1, "holds NaN or infinite values"),
        (float("inf"), 1, "holds NaN or infinite values"),
        (100.0, 1e30, "claims sample_count 1e+30, above max_sample_count 1e+12"),
        (100.0, True, "must be a positive number, got True"),
        (100.0, -2, "must be a positive number, got -2"),
    ],
)
async def test_a_hostile_value_or_weight_is_refused(
    tmp_path: Path, value: float, count: object, why: str
) -> None:
    algorithm = fedavg(tmp_path, rounds=1)
    await run_job(
        algorithm,
        {
            "a": returning(filled(1.0), 1),
            "b": returning(filled(2.0), 3),
            "evil": returning(filled(value), count),
        },
    )
    (reason,) = failures(algorithm, "evil")
    assert why in reason, reason
    assert_model(algorithm, torch.full(SHAPE, (1.0 * 1 + 2.0 * 3) / 4))


async def test_max_sample_count_is_the_jobs_to_set(tmp_path: Path) -> None:
    algorithm = fedavg(tmp_path, rounds=1, max_sample_count=10)
    await run_job(
        algorithm,
        {
            "a": returning(filled(1.0), 10),
            "b": returning(filled(2.0), 10),
            "c": returning(filled(9.0), 11),
        },
    )
    assert "above max_sample_count 10" in failures(algorithm, "c")[0]
    assert_model(algorithm, torch.full(SHAPE, 1.5))


# --- replays -------------------------------------------------------------------------------------


def site_result(site: str, round_number: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * round_number + sum(map(ord, site)))
    return {"w": torch.randn(SHAPE, generator=generator)}


COUNTS = {"a": 3, "r": 5}


def honest(site: str) -> Trainer:
    async def trainer(client: FLClient, received: FLModel) -> FLModel:
        assert received.current_round is not None
        return FLModel(
            params=site_result(site, received.current_round), meta={SAMPLE_COUNT: COUNTS[site]}
        )

    return trainer


def replaying(refusals: list[str]) -> Site:
    """Site "r": sends its honest result, then replays it (changed) under another transfer id,
    then, from the next round on, the previous round's result under that round's transfer id."""

    async def site(url: str, name: str) -> None:
        client = FLClient(client_settings(url, name))
        await client.start_async()
        previous: tuple[str, dict[str, object]] | None = None
        try:
            while await client.is_running_async():
                received = await client.receive_async()
                assert client.current is not None
                assert client.peer is not None
                task_id = client.current.task_id
                model = await honest(name)(client, received)
                await client.send_async(model)
                forged_params = {"w": torch.full(SHAPE, 1e3)}
                forged = FLModel(params=forged_params, meta={SAMPLE_COUNT: 1})
                attempts = [(f"{task_id}/{name}/result-again", result_meta(task_id, forged))]
                if previous is not None:
                    attempts.append((result_transfer_id(previous[0], name), previous[1]))
                for transfer_id, meta in attempts:
                    try:
                        await client.peer.send_state_dict(
                            forged_params, meta=meta, transfer_id=transfer_id
                        )
                    except Exception as refused:
                        refusals.append(f"{transfer_id}: {refused}")
                previous = (task_id, result_meta(task_id, forged))
        finally:
            await client.close_async()

    site.is_site = True  # type: ignore[attr-defined]
    return site


def direct_fedavg(round_number: int) -> torch.Tensor:
    """The honest sites' FedAvg as the server computes it: products in float32, summed, divided."""
    total = site_result("a", round_number)["w"] * COUNTS["a"]
    total = total + site_result("r", round_number)["w"] * COUNTS["r"]
    return total / (COUNTS["a"] + COUNTS["r"])


async def test_a_replayed_result_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refusals: list[str] = []
    algorithm = fedavg(tmp_path, rounds=3)
    with caplog.at_level("WARNING", logger="fl.server"):
        await run_job(algorithm, {"a": honest("a"), "r": replaying(refusals)})
    assert all(report.succeeded == ["a", "r"] and not report.failed for report in algorithm.history)
    assert_model(algorithm, direct_fedavg(2))
    for number in range(3):  # the server refused each round's replay (the site may be gone)
        assert (
            f"refusing a transfer from r: r's result for task 'job/round-{number}' came as "
            f"transfer 'job/round-{number}/r/result-again', not 'job/round-{number}/r/result' "
            "(a replay or another site's)"
        ) in caplog.text
    assert refusals, "the site was told"
    assert all("a replay or another site's" in r for r in refusals if "result-again" in r)


async def test_a_result_under_another_sites_transfer_id_is_refused(tmp_path: Path) -> None:
    """A site that sends its result as "a"'s transfer (a stolen transfer id) is refused; "a"'s
    own result, sent later under that id, is taken."""
    stolen: list[str] = []
    a_may_send = asyncio.Event()

    async def thief(client: FLClient, received: FLModel) -> FLModel:
        assert client.current is not None
        assert client.peer is not None
        task_id = client.current.task_id
        forged = FLModel(params={"w": torch.full(SHAPE, 1e3)}, meta={SAMPLE_COUNT: 1})
        try:
            await client.peer.send_state_dict(
                forged.params,  # type: ignore[arg-type]
                meta=result_meta(task_id, forged),
                transfer_id=result_transfer_id(task_id, "a"),
            )
        except Exception as refused:
            stolen.append(str(refused))
        a_may_send.set()
        return FLModel(
            params=site_result("r", received.current_round or 0), meta={SAMPLE_COUNT: COUNTS["r"]}
        )

    async def a_after_the_thief(client: FLClient, received: FLModel) -> FLModel:
        await a_may_send.wait()
        a_may_send.clear()
        return await honest("a")(client, received)

    algorithm = fedavg(tmp_path, rounds=1)
    await run_job(algorithm, {"a": a_after_the_thief, "r": thief})
    assert algorithm.history[0].succeeded == ["a", "r"]
    assert_model(algorithm, direct_fedavg(0))
    assert len(stolen) == 1, stolen
    assert "a replay or another site's" in stolen[0], stolen


# --- round_timeout -------------------------------------------------------------------------------


async def never_uploads(client: FLClient, received: FLModel) -> FLModel:
    """Joined, heart-beating (the client does that in the background), never uploading."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_site_that_never_uploads_fails_the_round_at_round_timeout(tmp_path: Path) -> None:
    algorithm = fedavg(tmp_path, round_timeout=2.0)
    await run_job(
        algorithm,
        {"a": constant_trainer(1.0, 1), "b": constant_trainer(2.0, 3), "silent": never_uploads},
    )
    assert failures(algorithm, "silent") == ["no result within round_timeout (2 s)"] * 2
    assert all(report.succeeded == ["a", "b"] for report in algorithm.history)
    assert_model(algorithm, torch.full(SHAPE, (1.0 * 1 + 2.0 * 3) / 4))


async def test_round_timeout_with_too_few_results_is_not_enough_clients(tmp_path: Path) -> None:
    algorithm = fedavg(tmp_path, round_timeout=1.5)
    with pytest.raises(NotEnoughClients, match="no result within round_timeout"):
        await run_job(algorithm, {"a": constant_trainer(1.0, 1), "silent": never_uploads})


async def test_a_result_after_its_round_closed_is_refused_and_the_site_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A site late for round 0 (past round_timeout) has that result refused at once, and is
    taken in round 1."""
    round_over = asyncio.Event()
    algorithm = fedavg(tmp_path, round_timeout=2.0, on_round=lambda report: round_over.set())

    async def late_in_round_0(client: FLClient, received: FLModel) -> FLModel:
        if received.current_round == 0:
            await round_over.wait()
            return FLModel(params={"w": torch.full(SHAPE, 1e3)}, meta={SAMPLE_COUNT: 1})
        return FLModel(params={"w": torch.full(SHAPE, 4.0)}, meta={SAMPLE_COUNT: 1})

    with caplog.at_level("WARNING", logger="fl"):
        await run_job(
            algorithm,
            {"a": constant_trainer(1.0, 1), "b": constant_trainer(2.0, 1), "late": late_in_round_0},
        )
    assert algorithm.history[0].failed == {"late": "no result within round_timeout (2 s)"}
    assert algorithm.history[1].succeeded == ["a", "b", "late"]
    assert "task 'job/round-0' is closed; no result is expected" in caplog.text
    assert_model(algorithm, torch.full(SHAPE, (1.0 + 2.0 + 4.0) / 3))
