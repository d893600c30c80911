"""The Client API: an ordinary training script becomes a federated client in a few lines.

    from fl import client as flare

    flare.init()
    while flare.is_running():
        model.load_state_dict(flare.receive().params)
        ...train...
        flare.send(flare.FLModel(params=model.state_dict(), meta={"sample_count": n}))

`init()` reads where the server is from the environment (TENSORWIRE_SERVER, TENSORWIRE_SITE and
the optional TENSORWIRE_TOKEN, TENSORWIRE_PKI_DIR, TENSORWIRE_IDLE_TIMEOUT, TENSORWIRE_HEARTBEAT,
TENSORWIRE_CONNECT_TIMEOUT, and TENSORWIRE_PROGRESS=1 for progress bars on a terminal), which
`tensorwire client` sets for the script it runs; a runner that runs scripts in-process binds an
FLClient to the script's thread instead (`bound_to`). The transport runs on an event loop in a
background thread; async code can use FLClient's `*_async` methods on its own loop instead.

How a client's job ends (the script's exit status in brackets, see fl/exit_codes.py):

- The server says STOP (its job finished, or it was stopped with SIGTERM), in a request or in the
  answer to a heartbeat: `is_running()` is False, and a receive or send under way ends the script
  through JobStoppedExit [0]. A send the server no longer takes because it is closing counts as
  stopped too, not as an error.
- The server vanishes (killed, its machine rebooted): the client keeps dialling it, and transfers
  resume once it is back (a restarted server continues its job). Only when it has not answered for
  `idle_timeout` (or could not be reached for `connect_timeout` at the start) does the client give
  up: ServerLost, ServerLostExit [69, EX_UNAVAILABLE].
- SIGTERM or SIGINT to the script: the task under way is reported to the server as failed (the
  round goes on without this site), a transfer under way is cancelled (the server learns it at
  once), the connection is closed, and the script ends through StoppedBySignal [0].
- The server refuses the site's credentials: NotAdmitted [77, EX_NOPERM].

For a server restarted in the middle of a round, the client keeps the last result it delivered
(a reference, not a copy) until the next task arrives, reports that task in its heartbeats
(`sent`) and sends the result again, with the same transfer id, when the server asks (RESEND).

Where things are: this module holds the script API (init, is_running, receive, send,
report_error, the exit hooks init() installs, bound_to and install_stop_signals) and re-exports
the rest; fl/client_core.py holds FLClient (async and sync API, the background event loop);
fl/client_settings.py holds ClientSettings, the exceptions above and the stop-signal handler.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType

import torch

from fl.client_core import REPORT_TIMEOUT_S as REPORT_TIMEOUT_S
from fl.client_core import STOP_GRACE_S as STOP_GRACE_S
from fl.client_core import FLClient
from fl.client_settings import (
    _STOP_SIGNALS,
    ClientSettings,
    JobStopped,
    JobStoppedExit,
    NotAdmitted,
    ServerLost,
    ServerLostExit,
    StoppedBySignal,
)
from fl.exit_codes import EXIT_NOT_ADMITTED, EXIT_SERVER_LOST
from fl.model import FLModel, ParamsType
from transport import Sink, TransferResult

__all__ = [
    "EXIT_NOT_ADMITTED",
    "EXIT_SERVER_LOST",
    "ClientSettings",
    "FLClient",
    "FLModel",
    "JobStopped",
    "JobStoppedExit",
    "NotAdmitted",
    "ParamsType",
    "ServerLost",
    "ServerLostExit",
    "StoppedBySignal",
    "bound_to",
    "init",
    "is_running",
    "receive",
    "report_error",
    "send",
]


# --- signals -------------------------------------------------------------------------------------


def install_stop_signals() -> Callable[[], None]:
    """Make SIGTERM and SIGINT end this (main) thread with StoppedBySignal, once; returns what
    restores the previous handlers. `init()` does it for scripts; runners that run a script
    in-process (tensorwire client --in-process) do it around it."""
    return _STOP_SIGNALS.install()


# --- module-level API: one client per script ----------------------------------------------------

_bound = threading.local()
_process_client: FLClient | None = None


@contextlib.contextmanager
def bound_to(client: FLClient) -> Iterator[FLClient]:
    """Make the module-level calls in this thread use `client` (in-process script runners)."""
    previous = getattr(_bound, "client", None)
    _bound.client = client
    try:
        yield client
    finally:
        _bound.client = previous


def _client() -> FLClient:
    bound: FLClient | None = getattr(_bound, "client", None)
    if bound is not None:
        return bound
    if _process_client is None:
        raise RuntimeError("call fl.client.init() first")
    return _process_client


def init() -> FLClient:
    """Connect this script to its server (from the environment, or the runner's binding)."""
    global _process_client
    bound: FLClient | None = getattr(_bound, "client", None)
    if bound is not None:
        return bound.init()
    if _process_client is None:
        client = _process_client = FLClient(ClientSettings.from_env())
        _install_exit_hooks(client)  # first: a signal while connecting ends the script cleanly
        try:
            client.init()
        except NotAdmitted as refusal:
            print(f"fl.client.init(): {refusal}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_NOT_ADMITTED) from None
    return _process_client


def is_running() -> bool:
    """True while the server has another task for this site (waits for it)."""
    return _client().is_running()


def receive(into: Mapping[str, torch.Tensor] | None = None, sink: Sink | None = None) -> FLModel:
    """The next task's model (in place into `into`, or into a transport `sink`)."""
    return _client().receive(into, sink)


def send(model: FLModel) -> TransferResult | None:
    """Send this task's result (None: the server closed the round without it)."""
    return _client().send(model)


def report_error(message: str) -> None:
    """Report that this task failed."""
    _client().report_error(message)


def _install_exit_hooks(client: FLClient) -> None:
    """A script that dies mid-task reports why (the server records the error and goes on);
    SIGTERM and SIGINT end the script the same way, with status 0."""
    last_error: list[str] = []
    previous_hook = sys.excepthook

    def remember(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        last_error.append(f"{kind.__name__}: {error}")
        previous_hook(kind, error, tb)

    def at_exit() -> None:
        _STOP_SIGNALS.disarm()
        if _STOP_SIGNALS.received is not None:
            why = f"the client was {StoppedBySignal(_STOP_SIGNALS.received)}"
        else:
            why = last_error[-1] if last_error else "the script exited mid-task"
        client.report_quietly(why)
        client.close()

    sys.excepthook = remember
    atexit.register(at_exit)
    install_stop_signals()
