"""What FLServer (fl/server.py) knows of its clients and tasks; fl.server exports these too."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from fl.aggregation import RoundAggregation
from fl.model import FLModel
from fl.protocol import ResultInfo
from fl.results import ResultRules, TensorHook
from fl.status import TransferProgress
from transport import IncomingTransfer, Peer

# Results for a task that is not open yet (a restarted server, its clients' uploads resuming
# before the round is set up again) wait this many at most; more are refused.
MAX_PARKED_RESULTS = 1024


@dataclass
class ClientRecord:
    """What the server knows about one client."""

    name: str
    peer: Peer
    last_seen: float = field(default_factory=time.monotonic)
    lost_since: float | None = None
    # The task whose result the client last delivered (as its heartbeat says): a restarted
    # server that has no such result asks for it again.
    sent_task: str | None = None
    # For the status page and the admin commands (fl/status.py).
    joined_at: float = field(default_factory=time.time)
    transfer: TransferProgress | None = None
    last_error: str | None = None
    # A relay's sites, as its hello and heartbeats list them (None: a site). The task the client
    # is working on as it last said, and whether it has said (a hello or heartbeat since it
    # joined): a site whose relay died is sent the task only if it does not hold it already.
    sites: tuple[str, ...] | None = None
    working_task: str | None = None
    state_known: bool = False

    @property
    def connected(self) -> bool:
        return not self.peer.closed


@dataclass
class ClientResult:
    """One client's answer to a task: `error` is None on success. `value` is what the sink's
    commit() returned (a state dict for the default sink)."""

    client: str
    info: ResultInfo | None = None
    value: Any = None
    error: str | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Task:
    """A model sent to some clients; its results are gathered by task id."""

    task_id: str
    name: str
    clients: list[str]
    sends: dict[str, asyncio.Task[int]] = field(default_factory=dict)
    arrivals: dict[str, asyncio.Future[IncomingTransfer]] = field(default_factory=dict)
    reported_errors: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    resend_asked: set[str] = field(default_factory=set)
    # What was sent, for the sites of a relay that dies mid-round (sent to them directly).
    model: FLModel | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class _Intake(NamedTuple):
    """How a gather takes results: folded into `aggregation` (None: each a state dict), checked
    against `rules`, `on_tensor` told, staged in files under `stage_dir` (None: in memory)."""

    aggregation: RoundAggregation | None
    rules: ResultRules
    on_tensor: TensorHook | None
    stage_dir: Path | None
