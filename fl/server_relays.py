"""The server's side of a relay that dies mid-round (fl/relay.py): its sites, which turn to their
fallbacks, are gathered directly. FLServer inherits this; it is apart only to keep the modules
short.

A relay lists its sites in its hellos and heartbeats. When its result for a task fails, the sites
it listed last (less those its partial sum already counted for, if any of it was folded) are
added to the task: each, once connected here and having said which task it holds, is sent the
task unless it holds it already (then its result is awaited, or asked for again), and gathered
like any other client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from fl.aggregation import RoundAggregation
from fl.server_types import MAX_PARKED_RESULTS, ClientResult, Task, _Intake
from transport import IncomingTransfer

if TYPE_CHECKING:
    from fl.server_types import ClientRecord

log = logging.getLogger("fl.server")


class RelayFailover:
    """FLServer's methods for a dead relay's sites (they use its clients, sends and collects)."""

    clients: dict[str, ClientRecord]
    heartbeat_timeout: float
    _joined: asyncio.Event
    _parked: dict[tuple[str, str], IncomingTransfer]

    def _may_park_moved(self, task: Task, client: str) -> bool:
        """A result from a client that is not in `task` but behind a relay that is: its relay
        died and the site reached us first (fl/server.py parks it until it is gathered)."""
        behind = any(
            client in (record.sites or ())
            for name in task.clients
            if (record := self.clients.get(name)) is not None
        )
        return behind and len(self._parked) < MAX_PARKED_RESULTS

    def _refuse_parked(self, task_id: str) -> None:
        """Results parked for a task that was gathered without them."""
        for key in [key for key in self._parked if key[0] == task_id]:
            self._parked.pop(key).reject(f"no result for task {task_id!r} is expected")

    def _stranded_sites(
        self, task: Task, result: ClientResult, aggregation: RoundAggregation | None
    ) -> list[str]:
        """The sites of a relay that failed this task, to be gathered directly: those it listed
        last, less those its partial sum already counted for (some of its tensors were folded
        before it failed: they count for those, like any upload that fails half way)."""
        record = self.clients.get(result.client)
        if result.ok or record is None or not record.sites:
            return []
        counted: set[str] = set()
        partial = result.info.partial if result.info else None
        contributed = aggregation is not None and any(
            result.client in names for names in aggregation.all_contributors().values()
        )
        if partial is not None and contributed:
            counted = set(partial.sites)
        stranded = [s for s in record.sites if s not in task.clients and s not in counted]
        task.clients += stranded
        if stranded:
            log.warning(
                "relay %s failed task %s; gathering its sites directly: %s",
                result.client,
                task.task_id,
                " ".join(stranded),
            )
        return stranded

    async def _collect_moved(self, task: Task, site: str, intake: _Intake) -> ClientResult:
        """A stranded site, once it reached this server (its fallback): sent the task unless it
        holds it already (working on it, or its result sent: then asked for it again), then
        gathered like any other."""
        if not await self._wait_for_state(site, self.heartbeat_timeout):
            limit = f"{self.heartbeat_timeout:g} s"
            why = f"its relay failed and it did not reach the server within {limit}"
            return ClientResult(site, error=why)
        loop = asyncio.get_running_loop()
        task.arrivals[site] = loop.create_future()
        task.reported_errors[site] = loop.create_future()
        record = self.clients[site]
        if task.task_id in (record.working_task, record.sent_task):
            held: asyncio.Future[int] = loop.create_future()
            held.set_result(0)
            task.sends[site] = asyncio.ensure_future(held)
        else:
            assert task.model is not None
            task.sends[site] = asyncio.ensure_future(self._send(site, task.model, task.meta, task))
        parked = self._parked.pop((task.task_id, site), None)  # it came before we asked
        if parked is not None:
            task.arrivals[site].set_result(parked)
        return await self._collect(task, site, intake)

    async def _wait_for_state(self, site: str, within: float) -> bool:
        """Until `site` is connected here and said which task it holds (False after `within`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            record = self.clients.get(site)
            if record is not None and record.connected and record.state_known:
                return True
            self._joined.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), min(0.2, deadline - loop.time()))
        return False
