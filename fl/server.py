"""FLServer: the server side of a job. It owns the endpoint, knows the clients, sends tasks and
routes their results back to whoever gathers them. Controllers use it through `Communicator`
calls (see fl/controller.py); nothing here knows about any algorithm.

A client is known by its node id (its site name), so a client process that restarts and connects
again is the same client. A client that failed is data: `gather()` returns a ClientResult with
`error` set for it, and the round goes on with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl.admin import ADMIN, authorize, command_of, is_admin_connection
from fl.aggregation import RoundAggregation
from fl.model import FLModel
from fl.protocol import (
    ERROR,
    HEARTBEAT,
    HELLO,
    RESEND,
    STOP,
    ProtocolViolation,
    kind_of,
    parse_result,
    result_transfer_id,
    sites_of,
    task_meta,
)
from fl.results import ResultRules, TensorHook, sink_or_reject
from fl.server_relays import RelayFailover
from fl.server_types import MAX_PARKED_RESULTS, ClientRecord, ClientResult, Task, _Intake
from fl.status import JobProgress, TransferProgress, snapshot
from transport import (
    Endpoint,
    EndpointConfig,
    IncomingTransfer,
    Peer,
)

log = logging.getLogger(__name__)


class FLServer(RelayFailover):
    """Listens, admits clients, sends tasks, gathers results (and a dead relay's sites:
    fl/server_relays.py)."""

    def __init__(
        self,
        config: EndpointConfig | None = None,
        *,
        job: str = "job",
        heartbeat_timeout: float = 60.0,
        reconnect_grace: float = 10.0,
        admins: Sequence[str] = (),
        admin_tokens: Sequence[str] = (),
    ) -> None:
        self.endpoint = Endpoint(config)
        # Who may run the admin commands (fl/admin.py), and what `abort` calls (the daemon sets
        # it: it owns the job); the job's progress that they and the status page show.
        self.admins, self.admin_tokens = tuple(admins), tuple(admin_tokens)
        self.on_abort: Callable[[str], None] | None = None
        self.abort_reason: str | None = None  # set once an admin aborted the job
        self.progress = JobProgress(job)
        self.job = job
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect_grace = reconnect_grace
        self.clients: dict[str, ClientRecord] = {}
        self.tasks: dict[str, Task] = {}
        self.urls: list[str] = []
        self._joined = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._task_numbers = itertools.count(1)
        # Results that arrived before their task was opened, by (task id, client).
        self._parked: dict[tuple[str, str], IncomingTransfer] = {}
        # Tasks this process gathered: a result for one of them (a replay, a late upload) is
        # refused at once rather than parked.
        self._closed_tasks: set[str] = set()
        self._stop_reason: str | None = None  # set once the job told its clients to stop

    async def start(self, urls: Sequence[str]) -> list[str]:
        """Listen on every URL (one or more drivers); returns the bound URLs."""
        self.endpoint.on_request(self._serve_request)
        for url in urls:
            self.urls.append(await self.endpoint.listen(url))
        self._loops = [
            asyncio.ensure_future(self._admit_clients()),
            asyncio.ensure_future(self._route_results()),
        ]
        return self.urls

    async def close(self, *, stop_clients: bool = True, reason: str = "job finished") -> None:
        """Tell the clients to stop (see stop_clients), then close everything: what is still
        being sent or received fails, and a client that was told takes that as the job's end,
        not as an error. Without `stop_clients` (a server going away that will be back) the
        clients keep dialling and resume with the next server process. A job an admin aborted
        tells the clients the admin's reason."""
        if self.abort_reason is not None:
            reason = f"aborted by an admin: {self.abort_reason}"
        if stop_clients:
            told = await self.stop_clients(reason)
            log.info("told %d client(s) to stop (%s): %s", len(told), reason, " ".join(told))
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.endpoint.close()

    async def __aenter__(self) -> FLServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(stop_clients=exc_info[0] is None)

    # --- clients ---------------------------------------------------------------------------------

    def live_clients(self) -> list[str]:
        """Clients connected now whose heartbeat is recent, by name."""
        now = time.monotonic()
        return sorted(
            name
            for name, record in self.clients.items()
            if record.connected and now - record.last_seen < self.heartbeat_timeout
        )

    async def wait_for_clients(self, count: int, within: float) -> list[str]:
        """Wait until `count` clients are live or `within` seconds pass; returns the live ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(self.live_clients()) < count and loop.time() < deadline:
            self._joined.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), min(0.2, deadline - loop.time()))
        return self.live_clients()

    async def wait_for_clients_named(self, names: Sequence[str], within: float) -> list[str]:
        """Wait until every client in `names` is live or `within` seconds pass (a restarted
        server waiting for the sites of the round it resumes); returns those that are live."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        wanted = set(names)
        while not wanted <= set(self.live_clients()) and loop.time() < deadline:
            self._joined.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), min(0.2, deadline - loop.time()))
        return sorted(wanted & set(self.live_clients()))

    async def stop_clients(self, reason: str, *, within: float = 5.0) -> list[str]:
        """Tell every client to stop and wait, up to `within` seconds, for each to acknowledge;
        returns those that did. Call it before anything else of the job is torn down, so that a
        client learns the job's end from the STOP rather than from a transfer failing under it.
        A client whose connection is being replaced (seen within reconnect_grace) is told on its
        new one; a client that misses it anyway is told in the answer to its next heartbeat or
        hello, for as long as this server still listens."""
        self._stop_reason = reason
        now = time.monotonic()
        reachable = [
            record
            for record in self.clients.values()
            if record.connected or now - record.last_seen < self.reconnect_grace
        ]

        async def stop(record: ClientRecord) -> str | None:
            try:
                stopping = record.peer.request({"fl": STOP, "reason": reason})
                await asyncio.wait_for(stopping, within)
            except Exception as error:
                log.info("could not tell client %s to stop: %s", record.name, error)
                return None
            return record.name

        told = await asyncio.gather(*(stop(record) for record in reachable))
        return [name for name in told if name is not None]

    async def _admit_clients(self) -> None:
        async for peer in self.endpoint.accepted():
            if is_admin_connection(peer.node_id, self.admins):
                continue  # an operator asking (fl/admin.py), not a site
            name = peer.node_id or f"anonymous-{len(self.clients)}"
            self.clients[name] = ClientRecord(name, peer)
            info = peer.info  # names, not a dataclass repr, in the log line
            identity = f" as {info.peer_identity}" if info.peer_identity else ""
            log.info("client %s joined from %s://%s%s", name, info.scheme, info.address, identity)
            self._joined.set()

    def _seen(self, peer: Peer) -> ClientRecord | None:
        record = self.clients.get(peer.node_id or "")
        if record is not None:
            record.last_seen = time.monotonic()
            record.lost_since = None
            self._joined.set()
        return record

    async def _serve_request(
        self, peer: Peer, header: Mapping[str, Any], body: bytes
    ) -> tuple[Mapping[str, Any], bytes]:
        kind = kind_of(header)
        if kind == ADMIN:
            return self._serve_admin(peer, header), b""
        record = self._seen(peer)
        if record is None or kind not in (HELLO, HEARTBEAT, ERROR):
            raise ProtocolViolation(f"unexpected FL request {kind!r} from {peer.node_id!r}")
        if kind in (HELLO, HEARTBEAT):
            self._note_state(record, header)
        if kind == ERROR:
            self._client_reported(record.name, header)
        elif kind == HELLO:
            self._client_restarted(record.name, header)
        if self._stop_reason is not None and kind in (HELLO, HEARTBEAT):
            return {"fl": STOP, "reason": self._stop_reason, "job": self.job}, b""
        return {"fl": kind, "job": self.job}, b""

    @staticmethod
    def _note_state(record: ClientRecord, header: Mapping[str, Any]) -> None:
        """What a hello or heartbeat says: a relay's sites, the client's open and sent tasks."""
        sites = sites_of(header)
        if sites is not None:
            record.sites = sites
        if "task_id" in header or "sent" in header:
            working, sent = header.get("task_id"), header.get("sent")
            record.working_task = working if isinstance(working, str) else None
            record.sent_task = sent if isinstance(sent, str) else None
            record.state_known = True

    def _serve_admin(self, peer: Peer, header: Mapping[str, Any]) -> dict[str, Any]:
        """An admin command (fl/admin.py), from an admin only (AdminRefused otherwise)."""
        admin = authorize(peer.info, header, self.admins, self.admin_tokens)
        command = command_of(header)
        if command == "abort":
            if self.on_abort is None:
                raise RuntimeError("this server runs no job that can be aborted")
            reason = str(header.get("reason") or "aborted by an admin")[:500]
            log.warning("job %s aborted by %s: %s", self.job, admin, reason)
            self.abort_reason = reason
            self.on_abort(reason)
        return {"fl": ADMIN, "command": command, "ok": True, "status": snapshot(self)}

    def _client_restarted(self, client: str, hello: Mapping[str, Any]) -> None:
        """A client says hello once per process: a task it had already received died with its
        previous process (which may have come back faster than reconnect_grace). Unless the
        hello says it holds that task: a client that failed over (fl/client_failover.py)."""
        held = {hello.get("task_id"), hello.get("sent")}
        for task in self.tasks.values():
            if task.task_id in held:
                continue
            reported = task.reported_errors.get(client)
            send = task.sends.get(client)
            if reported and not reported.done() and send and send.done():
                reported.set_result("the client restarted before returning its result")

    def _client_reported(self, client: str, header: Mapping[str, Any]) -> None:
        task = self.tasks.get(str(header.get("task_id")))
        waiting = task.reported_errors.get(client) if task else None
        if waiting is None or waiting.done():
            raise ProtocolViolation(f"client {client} reported an error for no task of its own")
        waiting.set_result(str(header.get("message", "the client reported an error"))[:4000])

    # --- tasks -----------------------------------------------------------------------------------

    def send_model(
        self,
        model: FLModel,
        clients: Sequence[str],
        task_name: str = "train",
        task_id: str | None = None,
    ) -> Task:
        """Start streaming `model` to each client (in the background); gather() the results.

        `task_id` names the task across server restarts (FedAvg: "<job>/round-<n>"): the model
        and result transfers are named after it, so a restarted server sending the same task
        again resumes the clients' downloads and takes their uploads in flight."""
        if model.params is None:
            raise ValueError("send_model needs a model with params")
        task_id = task_id or f"{self.job}/{task_name}-{next(self._task_numbers)}"
        if task_id in self.tasks:
            raise ValueError(f"task {task_id!r} is already open")
        self._closed_tasks.discard(task_id)  # sent again on purpose (a restarted upstream)
        meta = task_meta(task_id, task_name, model)
        task = Task(task_id, task_name, list(clients), model=model, meta=meta)
        loop = asyncio.get_running_loop()
        for client in task.clients:
            task.arrivals[client] = loop.create_future()
            task.reported_errors[client] = loop.create_future()
            task.sends[client] = asyncio.ensure_future(self._send(client, model, meta, task))
        self.tasks[task.task_id] = task
        self._unpark(task)
        return task

    def withdraw(self, task: Task) -> None:
        """Give up `task` without gathering it: its sends are cancelled (the clients skip it)
        and no result for it is taken."""
        for send in task.sends.values():
            send.cancel()
        self.tasks.pop(task.task_id, None)
        self._closed_tasks.add(task.task_id)

    def _unpark(self, task: Task) -> None:
        """Hand the task the results that arrived before it was opened; refuse the others."""
        for (task_id, client), transfer in list(self._parked.items()):
            arrival = task.arrivals.get(client) if task_id == task.task_id else None
            if arrival is not None and not arrival.done():
                arrival.set_result(transfer)
            else:
                transfer.reject(f"no result for task {task_id!r} is expected")
        self._parked.clear()

    async def _send(self, client: str, model: FLModel, meta: dict[str, Any], task: Task) -> int:
        record = self.clients.get(client)
        if record is None:
            raise LookupError(f"no client named {client!r} has joined")
        assert model.params is not None
        transfer_id = f"{task.task_id}/{client}"
        progress = record.transfer = TransferProgress("sent", task.task_id)
        result = await record.peer.send_state_dict(
            model.params, meta=meta, transfer_id=transfer_id, progress=progress
        )
        progress.finish()
        return result.bytes

    async def _route_results(self) -> None:
        async for transfer in self.endpoint.incoming():
            try:
                self._route_result(transfer)
            except ProtocolViolation as violation:
                log.warning("refusing a transfer from %s: %s", transfer.peer_node, violation)
                transfer.reject(str(violation))

    def _route_result(self, transfer: IncomingTransfer) -> None:
        """One result per site per task, as the site's own transfer: a replay (under another
        transfer id, for a closed task, or a second one) or another site's transfer id is
        refused. A RESEND after a server restart comes as the original transfer id, to a server
        that has no result from the site."""
        info = parse_result(transfer.meta)
        client = transfer.peer_node or ""
        expected_id = result_transfer_id(info.task_id, client)
        if transfer.transfer_id != expected_id:
            raise ProtocolViolation(
                f"{client}'s result for task {info.task_id!r} came as transfer "
                f"{transfer.transfer_id!r}, not {expected_id!r} (a replay or another site's)"
            )
        if info.task_id in self._closed_tasks:
            raise ProtocolViolation(f"task {info.task_id!r} is closed; no result is expected")
        task = self.tasks.get(info.task_id)
        if task is None and self._may_park(info.task_id, client):
            # A restarted server: the client's upload resumed before the task was opened again.
            self._parked[(info.task_id, client)] = transfer
            return
        arrival = task.arrivals.get(client) if task else None
        if arrival is None and task is not None and self._may_park_moved(task, client):
            # A relay's site whose relay died: here before the relay is given up on.
            self._parked[(info.task_id, client)] = transfer
            return
        if arrival is None:
            raise ProtocolViolation(f"no result for task {info.task_id!r} is expected")
        if arrival.done():
            raise ProtocolViolation(f"{client} already sent its result for task {info.task_id!r}")
        arrival.set_result(transfer)

    def _may_park(self, task_id: str, client: str) -> bool:
        return (
            task_id.startswith(f"{self.job}/")
            and (task_id, client) not in self._parked
            and len(self._parked) < MAX_PARKED_RESULTS
        )

    async def gather(
        self,
        task: Task,
        aggregation: RoundAggregation | None = None,
        *,
        min_clients: int = 1,
        wait_after_min: float | None = None,
        round_timeout: float | None = None,
        rules: ResultRules | None = None,
        on_result: Callable[[ClientResult], None] | None = None,
        on_tensor: TensorHook | None = None,
        stage_dir: Path | None = None,
    ) -> list[ClientResult]:
        """Every client's result for `task`, failures included (as errors).

        With `aggregation` each result is streamed into it tensor by tensor (weighted by the
        client's sample count) and never held whole; without, each result's value is a new
        state dict.

        Waiting is progress-aware: a client is given up on when it is disconnected for longer
        than reconnect_grace, silent for heartbeat_timeout, or its upload stalls for the
        endpoint's idle_timeout; never because a large upload takes long. Once `min_clients`
        results are in, the others get `wait_after_min` seconds more (None: as long as they are
        alive). `round_timeout` (None: none) is the round's deadline, from the start of the
        gather: a client that has not delivered by then fails ("no result within round_timeout")
        and its upload in progress is cancelled.

        Each result is checked against `rules` (default ResultRules()) before any of its bytes
        are taken; a refused one is a failure of that client, told to it. With `stage_dir`
        results are staged in files there and folded from disk (fl/staging.py: a relay's
        bounded memory)."""
        intake = _Intake(aggregation, rules or ResultRules(), on_tensor, stage_dir)
        pending = {
            asyncio.ensure_future(self._collect(task, client, intake)): client
            for client in task.clients
        }
        results: list[ClientResult] = []
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        round_deadline = None if round_timeout is None else loop.time() + round_timeout
        while pending:
            ends = [end for end in (deadline, round_deadline) if end is not None]
            timeout = max(0.0, min(ends) - loop.time()) if ends else None
            done, _ = await asyncio.wait(pending, timeout=timeout, return_when="FIRST_COMPLETED")
            if not done:
                if round_deadline is not None and round_deadline <= min(ends):
                    reason = f"no result within round_timeout ({round_timeout:g} s)"
                else:
                    reason = (
                        f"late: still running {wait_after_min:g} s after min_clients results "
                        "were in"
                    )
                results += await _cancel_late(pending, reason)
                break
            for finished in done:
                pending.pop(finished)
                results.append(finished.result())
                for site in self._stranded_sites(task, results[-1], aggregation):
                    moved = self._collect_moved(task, site, intake)
                    pending[asyncio.ensure_future(moved)] = site
                if on_result is not None:
                    on_result(results[-1])
            ok_count = sum(result.ok for result in results)
            if deadline is None and wait_after_min is not None and ok_count >= min_clients:
                deadline = loop.time() + wait_after_min
        self.tasks.pop(task.task_id, None)
        self._closed_tasks.add(task.task_id)
        self._refuse_parked(task.task_id)
        return sorted(results, key=lambda result: result.client)

    async def _collect(self, task: Task, client: str, intake: _Intake) -> ClientResult:
        started = time.perf_counter()
        result = ClientResult(client)
        try:
            result.bytes_sent = await task.sends[client]
            transfer = await self._await_result(task, client)
            result.info = parse_result(transfer.meta)
            sink = sink_or_reject(
                transfer, client, result.info, *intake[:3], stage_dir=intake.stage_dir
            )
            progress = self._receiving(client, task.task_id)
            result.value = await transfer.receive_into(sink, progress=progress)
            progress.finish()
            result.bytes_received = transfer.manifest.total_bytes if transfer.manifest else 0
        except asyncio.CancelledError:
            task.sends[client].cancel()
            raise
        except Exception as error:
            task.sends[client].cancel()
            result.error = f"{type(error).__name__}: {error}"
            log.warning("client %s failed task %s: %s", client, task.task_id, result.error)
            if client in self.clients:  # what the status page shows: the error, no transfer
                record = self.clients[client]
                record.last_error, record.transfer = result.error, None
        result.seconds = time.perf_counter() - started
        return result

    def _receiving(self, client: str, task_id: str) -> TransferProgress:
        progress = TransferProgress("received", task_id)
        if client in self.clients:
            self.clients[client].transfer = progress
        return progress

    async def _await_result(self, task: Task, client: str) -> IncomingTransfer:
        """The client's result transfer, or an error once it reported one or was lost."""
        arrival, reported = task.arrivals[client], task.reported_errors[client]
        either: list[asyncio.Future[Any]] = [arrival, reported]
        while True:
            await asyncio.wait(either, timeout=0.2)
            if arrival.done():
                return arrival.result()
            if reported.done():
                raise ClientFailed(f"the client reported: {reported.result()}")
            self._check_alive(client)
            self._ask_again_if_lost(task, client)

    def _ask_again_if_lost(self, task: Task, client: str) -> None:
        """A client says it delivered this task's result, and this server does not have it: the
        server restarted after taking it. Ask the client to send it again (once)."""
        record = self.clients[client]
        if record.sent_task != task.task_id or client in task.resend_asked:
            return
        task.resend_asked.add(client)
        log.info("asking %s to send its result for %s again", client, task.task_id)
        request = record.peer.request({"fl": RESEND, "task_id": task.task_id})
        asking = asyncio.ensure_future(asyncio.wait_for(request, self.heartbeat_timeout))
        asking.add_done_callback(_log_failed_request)

    def _check_alive(self, client: str) -> None:
        record = self.clients[client]
        now = time.monotonic()
        if record.connected:
            record.lost_since = None
        elif record.lost_since is None:
            record.lost_since = now
        elif now - record.lost_since > self.reconnect_grace:
            raise ClientFailed(f"disconnected for more than {self.reconnect_grace:g} s")
        if now - record.last_seen > self.heartbeat_timeout:
            raise ClientFailed(f"no heartbeat for {self.heartbeat_timeout:g} s")


def _log_failed_request(asking: asyncio.Future[Any]) -> None:
    if not asking.cancelled() and asking.exception() is not None:
        log.warning("a request to a client failed: %s", asking.exception())


class ClientFailed(Exception):
    """A client did not deliver its result (reported error, lost, silent)."""


async def _cancel_late(
    pending: dict[asyncio.Task[ClientResult], str], reason: str
) -> list[ClientResult]:
    for waiting in pending:
        waiting.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [ClientResult(client, error=reason) for client in pending.values()]
