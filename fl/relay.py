"""The relay: a site to its upstream (the server, or a parent relay), a server to its sites.

    upstream ──task──> relay ──task──> its sites      forwarded chunk by chunk as it arrives
    upstream <──Σ w·x── relay <──result── its sites    folded tensor by tensor as they arrive

A task from upstream is received into a file (transport's RelayFile) and sent on at once to every
site connected now: each chunk goes to every site as soon as it is verified here, and memory holds
only the transfers' windows. The sites' results are folded into weighted sums kept in a file
(FileSums: a few 16 MiB slices in RAM), in the round's mode (FULL or DIFF, a result in the other
mode converted against the task's model). Upstream the relay then sends one result: each tensor's
sum of its sites' weighted tensors (float32) and the weight it stands for (fl/protocol.py,
PartialSum), which the server folds as it is: its FedAvg is flat FedAvg over the sites. A parent
relay does the same with its children's partial sums, so relays make a tree.

Disk: the task's model, its sums and the partial sum (up to two float32 models) in `state_dir`;
the last task's files stay until the next task, for an upstream that asks for the result again.

Failure: upstream, the relay is a client like any site (it resumes, fails over to its fallbacks,
and ends when the upstream ends the job, telling its sites). A site that fails is that site's
failure only: the partial sum is over the others. A relay that dies: its sites turn to their
fallbacks (the server or another relay), and the server gathers them directly (fl/server.py).
A task the upstream withdraws, or a newer task arriving while the relay still gathers, ends the
relay's round for that task: its sites' transfers are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fl.aggregation import FileSums, RoundAggregation, TensorLayout
from fl.client_core import FLClient
from fl.client_settings import ClientSettings, JobStopped
from fl.config import RelayConfig
from fl.model import FLModel
from fl.model_file import ModelFile, ModelFileWriter
from fl.protocol import PartialSum, TaskInfo
from fl.server import ClientResult, FLServer, Task
from fl.server_optimizers import FedAvgUpdate
from transport import (
    EndpointConfig,
    Manifest,
    RelayFile,
    SafetensorsSource,
    TransferCancelledError,
    TransportError,
    server_tls,
)

log = logging.getLogger(__name__)


# Per site: its stream's window (twice that per connection), and the elements the fold of its
# result reads at a time (4 MiB of float32); with the staged results this is what a relay holds
# per site uploading, whatever the model.
SITE_WINDOW = 16 * 2**20
FOLD_SLICE_ELEMENTS = 2**20


def relay_endpoint_config(config: RelayConfig) -> EndpointConfig:
    """The endpoint the relay's sites connect to: its own certificate, their tokens and names."""
    tokens, allowed = config.auth_tokens, config.allowed_clients
    return EndpointConfig(
        node_id=config.name,
        idle_timeout=config.idle_timeout,
        tls=server_tls(Path(config.pki_dir), config.name) if config.pki_dir else None,
        auth_tokens=frozenset(tokens) if tokens else None,
        allowed_identities=frozenset(allowed) if allowed else None,
        compression=config.compression,
        # Sites are on the relay's LAN: small windows fill it, and each site's window is what
        # its upload may hold here while the staged result is folded.
        stream_window=SITE_WINDOW,
        connection_window=2 * SITE_WINDOW,
    )


def upstream_settings(config: RelayConfig) -> ClientSettings:
    """How the relay reaches its upstream: as a site named after itself, with its certificate."""
    return ClientSettings(
        server_url=config.upstream,
        site=config.name,
        fallback_urls=tuple(config.fallbacks),
        token=config.token,
        pki_dir=config.pki_dir,
        heartbeat_interval=config.heartbeat_interval,
        connect_timeout=config.connect_timeout,
        idle_timeout=config.idle_timeout,
        endpoint_overrides={"compression": config.compression},
    )


class Relay:
    """One relay: `start()`, then `run()` until the upstream ends the job, then `close()`."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        server: FLServer | None = None,
        client: FLClient | None = None,
    ) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.server = server or FLServer(
            relay_endpoint_config(config),
            job=f"relay-{config.name}",
            heartbeat_timeout=config.heartbeat_timeout,
            reconnect_grace=config.reconnect_grace,
        )
        self.client = client or FLClient(upstream_settings(config))
        # The upstream learns which sites are behind this relay (to reach them if it dies).
        self.client.heartbeat_extra = lambda: {"sites": self.server.live_clients()}

    async def start(self) -> list[str]:
        """Listen for sites, then join the upstream; returns the URLs the sites dial."""
        urls = await self.listen()
        await self.join()
        return urls

    async def listen(self) -> list[str]:
        """Listen for sites (they may connect before the upstream is reachable)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return await self.server.start(self.config.listen)

    async def join(self) -> None:
        """Join the upstream (retried until connect_timeout: ServerLost; NotAdmitted)."""
        await self.client.start_async()

    async def run(self) -> None:
        """Relay every task until the upstream ends the job (ServerLost if it is gone)."""
        while await self.client.is_running_async():
            try:
                await self.relay_task()
            except TransferCancelledError as withdrawn:
                log.warning("the upstream withdrew the task: %s", withdrawn)
            except JobStopped:
                return  # the upstream ended the job while a task was under way
            except TransportError as lost:
                # The upstream went away mid-task (the client fails over, or gives it up: then
                # the next is_running_async says so). The next upstream sends the task again;
                # its file resumes from what arrived.
                log.warning("the upstream was lost during a task: %s", lost)

    async def close(self, *, stop_sites: bool | None = None) -> None:
        """Close both sides. The sites are told to stop when the upstream ended the job (the
        default); otherwise (a relay going away) they turn to their fallbacks."""
        ended = self.client.stop_reason
        tell = stop_sites if stop_sites is not None else ended is not None
        await self.server.close(stop_clients=tell, reason=ended or "the relay stopped")
        await self.client.close_async()

    # --- one task ----------------------------------------------------------------------------

    async def relay_task(self) -> None:
        """Forward the next task to the sites while it arrives, gather their results into one
        partial sum and send it upstream (or report why there is none)."""
        info = await self.client.next_task_async()
        if info is None:
            return
        files = _TaskFiles(self.state_dir, info.task_id)
        files.remove_older()
        relayed = RelayFile(files.model)
        receiving = asyncio.ensure_future(self.client.receive_async(sink=relayed.sink))
        manifest = await _opened(relayed, receiving)
        config = self.config
        sites = await self.server.wait_for_clients(config.min_sites, config.site_wait)
        forwarded = _forwarded(info, relayed.source(manifest))
        task = self.server.send_model(forwarded, sites, info.task, info.task_id)
        await self.client.beat_now_async()  # the upstream knows these sites before we may die
        try:
            await receiving
        except BaseException:
            self.server.withdraw(task)
            raise
        if not sites:
            await self.client.report_error_async(f"no site is connected to {self.config.name}")
            return
        gathered = await self._gather(task, files)
        if gathered is not None:
            await self._send_up(*gathered)

    async def _gather(
        self, task: Task, files: _TaskFiles
    ) -> tuple[RoundAggregation, list[ClientResult], _TaskFiles] | None:
        """The sites' results folded into sums; None when the upstream moved on meanwhile (a
        newer task, or the end of the job): the sites' transfers are cancelled then."""
        model = ModelFile(files.model)
        sums = FileSums(
            files.sums, accumulate_dtype=torch.float32, slice_elements=FOLD_SLICE_ELEMENTS
        )
        aggregation = RoundAggregation(model.tensors(), model.layouts, sums, FedAvgUpdate())
        gathering = asyncio.ensure_future(
            self.server.gather(task, aggregation, stage_dir=self.state_dir)
        )
        newer = asyncio.ensure_future(self.client.next_task_async())
        try:
            await asyncio.wait({gathering, newer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            newer.cancel()
            if not gathering.done():
                log.warning("the upstream moved on: giving up task %s", task.task_id)
                gathering.cancel()
                aggregation.close()
            await asyncio.gather(gathering, newer, return_exceptions=True)
            model.close()
        if gathering.cancelled():
            return None
        return aggregation, gathering.result(), files

    async def _send_up(
        self, aggregation: RoundAggregation, results: list[ClientResult], files: _TaskFiles
    ) -> None:
        """One partial sum upstream, or the sites' failures as this relay's error."""
        delivered = [result for result in results if result.ok and result.info is not None]
        if not delivered:
            aggregation.close()
            failures = "; ".join(f"{r.client}: {r.error}" for r in results)
            await self.client.report_error_async(f"no site delivered a result ({failures})")
            return
        layouts = {
            name: TensorLayout(layout.shape, torch.float32)
            for name, layout in aggregation.layouts.items()
        }
        writer = ModelFileWriter(files.partial, layouts)
        try:  # a model's size of reads and writes: off the loop, whose heartbeats must go on
            outcome = await asyncio.to_thread(aggregation.write_sums, writer.write)
            await asyncio.to_thread(writer.commit)
        except BaseException:
            writer.abort()
            raise
        partial = partial_sum_of(outcome.weights, outcome.clients, results)
        result = FLModel(
            params=SafetensorsSource(files.partial, chunk_size=self._chunk_size()),
            params_type=outcome.mode,
            metrics=mean_metrics(delivered),
            meta={"sample_count": partial.weight},
        )
        await self.client.send_async(result, partial=partial)

    def _chunk_size(self) -> int:
        """The relay's own chunk size for what it sends upstream (as its endpoint would)."""
        return upstream_settings(self.config).endpoint_config().chunk_size


def partial_sum_of(
    weights: dict[str, float], contributors: Sequence[str], results: list[ClientResult]
) -> PartialSum:
    """What the sums stand for: the largest weight (every tensor of every delivered result),
    the tensors that stand for less, and every site behind them (a child relay's own sites)."""
    total = max(weights.values())
    behind: dict[str, tuple[str, ...]] = {
        r.client: r.info.partial.sites for r in results if r.info and r.info.partial
    }
    sites = sorted({site for client in contributors for site in behind.get(client, (client,))})
    less = {name: weight for name, weight in weights.items() if weight != total}
    return PartialSum(total, less, tuple(sites))


def mean_metrics(results: list[ClientResult]) -> dict[str, float]:
    """Each metric's mean over the results that report it, weighted by their sample counts
    (what the server's FedAvg does with the sites' metrics)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for result in results:
        assert result.info is not None
        partial = result.info.partial
        weight = partial.weight if partial else FLModel(meta=result.info.meta).sample_count
        for name, value in result.info.metrics.items():
            sums[name] = sums.get(name, 0.0) + weight * value
            weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sums}


def _forwarded(info: TaskInfo, source: Any) -> FLModel:
    """The upstream's task, as it is sent on (same round, mode and meta)."""
    return FLModel(
        params=source,
        params_type=info.params_type,
        current_round=info.round,
        total_rounds=info.total_rounds,
        meta=dict(info.meta),
    )


async def _opened(relayed: RelayFile, receiving: asyncio.Future[Any]) -> Manifest:
    """The manifest, once the upstream transfer opened its file (or the receive's error)."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(changed.set)

    stop = relayed.when_changed(wake)
    try:
        while relayed.manifest is None:
            changed.clear()
            if relayed.manifest is not None:
                break
            waiting = asyncio.ensure_future(changed.wait())
            await asyncio.wait({waiting, receiving}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if receiving.done() and relayed.manifest is None:
                receiving.result()  # its error
                raise RuntimeError("the upstream transfer ended before it opened")
        return relayed.manifest
    finally:
        stop()


class _TaskFiles:
    """A task's files in the relay's state directory, named after the task."""

    def __init__(self, state_dir: Path, task_id: str) -> None:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", task_id)
        self.state_dir = state_dir
        self.model = state_dir / f"{stem}.model.safetensors"
        self.sums = state_dir / f"{stem}.sums"
        self.partial = state_dir / f"{stem}.partial.safetensors"

    def remove_older(self) -> None:
        """Files of earlier tasks (kept until now for a RESEND); the partial files of this one
        (a restarted relay resumes its receive from them) stay."""
        mine = {self.model.name, self.sums.name, self.partial.name}
        for path in self.state_dir.iterdir():
            if path.is_file() and not any(path.name.startswith(name) for name in mine):
                path.unlink(missing_ok=True)


# --- the daemon ----------------------------------------------------------------------------------


def run_relay_daemon(config: RelayConfig, ops: Any = None) -> int:
    """`tensorwire relay`: relay until the upstream ends the job (0), a signal stops it (0: its
    sites turn to their fallbacks), or the upstream is lost (69) or refuses it (77)."""
    from fl.cli_ops import watched
    from fl.rss import return_freed_memory
    from transport import metrics

    return_freed_memory()  # its RSS follows the windows and slices it holds, not their peak
    if ops is not None:
        ops.ready = metrics.is_listening
    return asyncio.run(watched(serve_relay(config, ops), ops))


async def serve_relay(config: RelayConfig, ops: Any = None) -> int:
    from fl.cli_ops import say
    from fl.client_settings import NotAdmitted, ServerLost
    from fl.daemons import _ignore_sighup
    from fl.exit_codes import EXIT_NOT_ADMITTED, EXIT_OK, EXIT_SERVER_LOST
    from fl.status import follow_job

    relay = Relay(config)
    urls = await relay.listen()
    job = asyncio.ensure_future(_joined_then_run(relay))
    follow_job(relay.server, relay, job, ops)
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, job.cancel)
    # As the other daemons: the configuration is read once, so SIGHUP is logged and ignored.
    loop.add_signal_handler(signal.SIGHUP, _ignore_sighup, "relay")
    # Said once the signals are handled (whoever waits for this line may signal at once), and
    # before the upstream is joined: sites may connect first.
    say(
        "listening",
        f"tensorwire relay {config.name}: listening on {' '.join(urls)}, upstream "
        f"{config.upstream}",
        urls=urls,
        upstream=config.upstream,
    )
    status = EXIT_OK
    try:
        await job
        say(
            "finished",
            f"tensorwire relay {config.name}: the job ended ({relay.client.stop_reason})",
        )
    except asyncio.CancelledError:
        say("stopping", f"tensorwire relay {config.name}: stopping on a signal")
    except ServerLost as lost:
        say("lost", f"tensorwire relay {config.name}: {lost}", logging.ERROR)
        status = EXIT_SERVER_LOST
    except NotAdmitted as refused:
        say("refused", f"tensorwire relay {config.name}: {refused}", logging.ERROR)
        status = EXIT_NOT_ADMITTED
    finally:
        await relay.close()
    return status


async def _joined_then_run(relay: Relay) -> None:
    await relay.join()
    await relay.run()
