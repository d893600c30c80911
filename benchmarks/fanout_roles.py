"""What runs inside the fan-out benchmark's processes, and the model they move.

- The model: float32 tensors of at most 64 MiB (`ModelSpec`), N(0, 1) from a seeded generator
  per tensor, written once by the parent to a safetensors file the server starts from
  (`fedavg`'s initial model, as a deployment would).
- A site (`site_main`, a spawned child in its region's namespace): FLClient's async API; it
  receives the model into a new dict, adds its delta in place (each tensor viewed as rows of 256
  floats plus a 256-float row that depends on the site and the tensor: exact in float32, cheap,
  no copy), and sends it back FULL with a sample count of its own. One model in memory.
- The server (`server_main`, a spawned child in the server's namespace): fl.fedavg.FedAvg on an
  fl.server.FLServer, one round, memory sums, the final model saved to a file.
- `check_fedavg`: the final model against flat FedAvg computed directly in float64 from the
  initial model, the known deltas and the sample counts.

Every child reports wall-clock marks (`baseline_at`: imports done; `ready_at`, `finished_at`:
the span its peak RSS is read over, from outside, by benchmarks/outside.py) and its figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.outside import child_main
from benchmarks.wan.netns import run_in_netns
from fl.client import ClientSettings, FLClient, JobStopped
from fl.config import ServerConfig
from fl.daemons import server_endpoint_config
from fl.fedavg import FedAvg, RoundReport
from fl.model import SAMPLE_COUNT, FLModel, ParamsType
from fl.rss import return_freed_memory
from fl.server import FLServer

__all__ = [
    "ModelSpec",
    "check_fedavg",
    "delta_row",
    "run_server",
    "run_site",
    "sample_count",
    "tensor_index",
    "write_initial_model",
]

MAX_TENSOR_BYTES = 64 * 2**20
ROW = 256  # floats per row of the delta pattern
_ITEMSIZE = 4  # float32
_FLOAT32_EPS = 2.0**-23


@dataclass(frozen=True)
class ModelSpec:
    """A float32 model of `size` bytes (rounded down to whole rows) in tensors of at most
    64 MiB (at most a quarter of the model, so even a small one has several)."""

    size: int
    seed: int = 0

    def layout(self) -> list[tuple[str, int]]:
        """(name, numel) of each tensor."""
        row_bytes = ROW * _ITEMSIZE
        rows = self.size // row_bytes
        if rows < 1:
            raise ValueError(f"a model needs at least {row_bytes} bytes, got {self.size}")
        per_tensor = max(1, min(MAX_TENSOR_BYTES // row_bytes, -(-rows // 4)))
        tensors = []
        index = 0
        while rows > 0:
            take = min(per_tensor, rows)
            tensors.append((f"layer{index:03d}.weight", take * ROW))
            rows -= take
            index += 1
        return tensors

    @property
    def nbytes(self) -> int:
        return sum(numel for _, numel in self.layout()) * _ITEMSIZE

    def initial(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The initial tensors, one at a time (seeded: the same every run)."""
        for index, (name, numel) in enumerate(self.layout()):
            generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
            yield name, torch.randn(numel, generator=generator, dtype=torch.float32)


def delta_row(site: int, tensor_index: int) -> torch.Tensor:
    """What site `site` adds to each row of 256 floats of tensor `tensor_index`: multiples of
    2**-12 up to 2**-5 * (site + 1) in size, exact in float32."""
    j = torch.arange(ROW, dtype=torch.int64)
    steps = (j * 37 + tensor_index * 11 + site * 7) % ROW - ROW // 2
    return (steps.to(torch.float64) * (site + 1) * 2.0**-12).to(torch.float32)


def tensor_index(name: str) -> int:
    """The index of tensor `name` ("layer007.weight" -> 7) in the model's layout."""
    return int(name.removeprefix("layer").split(".", 1)[0])


def sample_count(site: int) -> int:
    """Each site's sample count: all different, so a wrong weighting shows."""
    return 1000 + 250 * site + 37 * (site % 3)


def write_initial_model(spec: ModelSpec, path: Path) -> Path:
    """The initial model as a safetensors file (built whole in this process, then freed)."""
    from safetensors.torch import save_file

    tensors = dict(spec.initial())
    save_file(tensors, str(path))
    del tensors
    return path


def check_fedavg(
    spec: ModelSpec, initial_path: Path, final_path: Path, sites: list[int]
) -> dict[str, Any]:
    """The final model against flat FedAvg of the sites' results (FULL: initial + delta, weighted
    by sample count), computed tensor by tensor in float64. The tolerance allows float32 sums of
    N terms: 4 * N * eps32 * max(1, |expected|)."""
    from safetensors import safe_open

    weights = {site: float(sample_count(site)) for site in sites}
    total = sum(weights.values())
    worst = worst_relative = 0.0
    largest = 1.0
    names = [name for name, _ in spec.layout()]
    with (
        safe_open(str(initial_path), "pt") as initial,
        safe_open(str(final_path), "pt") as final,
    ):
        missing = sorted(set(names) ^ set(final.keys()))
        if missing:
            return {"matches": False, "problem": f"tensors differ: {missing[:5]}"}
        for index, name in enumerate(names):
            mean_delta = sum(
                weights[site] * delta_row(site, index).to(torch.float64) for site in sites
            )
            expected = initial.get_tensor(name).to(torch.float64).view(-1, ROW)
            expected += mean_delta / total
            got = final.get_tensor(name)
            if got.dtype != torch.float32 or got.numel() != expected.numel():
                return {"matches": False, "problem": f"{name}: {got.dtype} x {got.numel()}"}
            error = (got.to(torch.float64).view(-1, ROW) - expected).abs_()
            worst = max(worst, float(error.max()))
            scale = expected.abs_().max()
            largest = max(largest, float(scale))
            worst_relative = max(worst_relative, float(error.max()) / max(1.0, float(scale)))
            del expected, error, got
    tolerance = 4 * len(sites) * _FLOAT32_EPS * largest
    return {
        "matches": worst <= tolerance,
        "max_abs_error": worst,
        "tolerance": tolerance,
        "max_relative_error": worst_relative,
        "sites": len(sites),
        "total_weight": total,
    }


# --- the server ----------------------------------------------------------------------------------


def run_server(queue: Any, netns_name: str, settings: dict[str, Any]) -> None:
    """Child entry: enter the server's namespace, run one FedAvg round, report."""
    run_in_netns(queue, netns_name, _server_child, settings)


def _server_child(queue: Any, settings: dict[str, Any]) -> None:
    child_main("server", queue, lambda: _serve(settings), "asyncio")


async def _serve(settings: dict[str, Any]) -> dict[str, Any]:
    return_freed_memory()  # as the server daemon does (fl/daemons.py serve)
    baseline_at = time.time()
    marks: dict[str, Any] = {}
    expected = settings["expected_clients"]

    def round_started(number: int, clients: list[str]) -> None:
        marks["round_started_at"] = time.time()
        marks["round_clients"] = sorted(clients)

    def round_ended(report: RoundReport) -> None:
        marks["round_ended_at"] = time.time()
        marks["report"] = report

    config = ServerConfig(
        listen=[settings["listen"]],
        job="fanout",
        state_dir=settings["state_dir"],
        insecure=True,
        idle_timeout=settings["idle_timeout"],
        heartbeat_timeout=settings["idle_timeout"],
    )
    controller = FedAvg(
        Path(settings["initial_model"]),
        rounds=1,
        num_clients=expected,
        min_clients=expected,
        join_timeout=settings["join_timeout"],
        state_dir=settings["state_dir"],
        on_round_start=round_started,
        on_round=round_ended,
    )
    endpoint = server_endpoint_config(config).replace(compression=settings["compression"])
    server = FLServer(
        endpoint,
        job=config.job,
        heartbeat_timeout=config.heartbeat_timeout,
        reconnect_grace=config.reconnect_grace,
    )
    controller.attach(server)
    await server.start(config.listen)
    try:
        await controller.run()
        await asyncio.to_thread(controller.save_final, settings["final_model"])
    finally:
        await server.close(reason="job finished")
    report: RoundReport = marks["report"]
    return {
        "baseline_at": baseline_at,
        "ready_at": marks["round_started_at"],
        "finished_at": marks["round_ended_at"],
        "round_started_at": marks["round_started_at"],
        "round_ended_at": marks["round_ended_at"],
        "round_clients": marks["round_clients"],
        "report_seconds": report.seconds,
        "bytes_sent": report.bytes_sent,
        "bytes_received": report.bytes_received,
        "succeeded": sorted(report.succeeded),
        "failed": dict(report.failed),
    }


# --- a site --------------------------------------------------------------------------------------


def run_site(queue: Any, netns_name: str, settings: dict[str, Any]) -> None:
    """Child entry: enter the region's namespace, be site `settings["site"]` until the job ends."""
    run_in_netns(queue, netns_name, _site_child, settings)


def _site_child(queue: Any, settings: dict[str, Any]) -> None:
    child_main(f"site-{settings['site']}", queue, lambda: _site(settings), "asyncio")


async def _site(settings: dict[str, Any]) -> dict[str, Any]:
    baseline_at = time.time()
    site = settings["site"]
    warnings = _Warnings()
    logging.getLogger("fl.client").addHandler(warnings)
    client = FLClient(
        ClientSettings(
            server_url=settings["url"],
            site=f"site-{site}",
            fallback_urls=tuple(settings.get("fallback_urls", ())),
            heartbeat_interval=settings["heartbeat_interval"],
            connect_timeout=settings["connect_timeout"],
            idle_timeout=settings["idle_timeout"],
            endpoint_overrides={"compression": settings["compression"]},
        )
    )
    await client.start_async()
    ready_at = time.time()
    params: dict[str, torch.Tensor] | None = None
    rounds: list[dict[str, float]] = []
    try:
        while await client.is_running_async():
            asked_at = time.time()
            try:
                received = await client.receive_async(into=params)
            except JobStopped:
                if rounds:  # a task sent again (e.g. after a failover) the end of the job cut
                    break
                raise
            received_at = time.time()
            assert isinstance(received.params, dict)
            params = received.params
            with torch.no_grad():
                for name, tensor in params.items():
                    tensor.view(-1, ROW).add_(delta_row(site, tensor_index(name)))
            result = FLModel(
                params=params, params_type=ParamsType.FULL, meta={SAMPLE_COUNT: sample_count(site)}
            )
            await client.send_async(result)
            rounds.append(
                {"asked_at": asked_at, "received_at": received_at, "sent_at": time.time()}
            )
    finally:
        await client.close_async()
    if not rounds:
        raise RuntimeError(f"site-{site}: the job ended before any task arrived")
    nbytes = sum(int(tensor.nbytes) for tensor in (params or {}).values())
    return {
        "site": site,
        "baseline_at": baseline_at,
        "ready_at": ready_at,
        "finished_at": time.time(),
        "received_at": rounds[0]["received_at"],
        "sent_at": rounds[0]["sent_at"],
        "tasks": len(rounds),
        "model_bytes": nbytes,
        "sample_count": sample_count(site),
        "failovers": warnings.failovers,
        "warnings": warnings.records[:20],
    }


class _Warnings(logging.Handler):
    """fl.client's warnings (failovers among them), with their wall-clock times."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[float, str]] = []
        self.failovers: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.records.append((record.created, message[:300]))
        if "failed over to" in message:
            self.failovers.append(record.created)
