"""What a site's client is configured with and how its job can end, for fl.client and
fl.client_core: ClientSettings (where the server is and how to reach it, from or to the
TENSORWIRE_* environment), the exceptions that end a client's job (JobStopped, ServerLost,
NotAdmitted, and the SystemExits the sync API raises for them: JobStoppedExit, ServerLostExit,
StoppedBySignal), and the SIGTERM/SIGINT handler state that raises StoppedBySignal
(fl.client.install_stop_signals installs it). See fl/client.py for how a job ends.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fl.exit_codes import EXIT_OK, EXIT_SERVER_LOST
from transport import EndpointConfig, client_tls


class JobStopped(Exception):
    """The server ended the job while this client was receiving or sending (async API)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the server ended the job: {reason}")
        self.reason = reason


class ServerLost(ConnectionError):
    """The server could not be reached for longer than this client waits for it: connect_timeout
    at the start, idle_timeout once connected (async API)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"lost the server: {reason}")
        self.reason = reason


class NotAdmitted(PermissionError):
    """The server refused this site: its token, or the identity in its certificate."""


class JobStoppedExit(SystemExit):
    """JobStopped, as the sync API raises it: a SystemExit with status 0, so that uncaught it
    ends the script cleanly and a runner does not restart it."""

    def __init__(self, stopped: JobStopped) -> None:
        super().__init__(EXIT_OK)
        self.reason = stopped.reason


class ServerLostExit(SystemExit):
    """ServerLost, as the sync API raises it: status 69 (EX_UNAVAILABLE), which `tensorwire
    client` reports as a failure without restarting the script (it already waited)."""

    def __init__(self, lost: ServerLost) -> None:
        super().__init__(EXIT_SERVER_LOST)
        self.reason = lost.reason


class StoppedBySignal(SystemExit):
    """SIGTERM or SIGINT ended the script: status 0 once the server was told (see
    `install_stop_signals`)."""

    def __init__(self, number: int) -> None:
        super().__init__(EXIT_OK)
        self.signal = number

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signal).name}"


@dataclass
class ClientSettings:
    """Where the server is and how to reach it."""

    server_url: str
    site: str
    # Where to turn, in order, once server_url is gone for good (fl/relay.py: a relay that died).
    fallback_urls: tuple[str, ...] = ()
    # How long the upstream may stay unreachable before the next URL is tried (with fallbacks
    # only); None: three heartbeat intervals (see failover_delay).
    failover_after: float | None = None
    token: str | None = None
    pki_dir: str | None = None
    heartbeat_interval: float = 5.0
    connect_timeout: float = 60.0
    idle_timeout: float = 120.0
    progress: bool = False  # bars for the model in and the result out, on a terminal only
    endpoint_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if environ is None else environ
        missing = [name for name in ("TENSORWIRE_SERVER", "TENSORWIRE_SITE") if not env.get(name)]
        if missing:
            raise RuntimeError(
                f"fl.client.init(): set {' and '.join(missing)} (tensorwire client does this "
                "for the scripts it runs)"
            )
        return cls(
            server_url=env["TENSORWIRE_SERVER"],
            site=env["TENSORWIRE_SITE"],
            fallback_urls=tuple(env.get("TENSORWIRE_FALLBACKS", "").split()),
            failover_after=_optional_float(env.get("TENSORWIRE_FAILOVER_AFTER")),
            token=env.get("TENSORWIRE_TOKEN") or None,
            pki_dir=env.get("TENSORWIRE_PKI_DIR") or None,
            heartbeat_interval=float(env.get("TENSORWIRE_HEARTBEAT", 5.0)),
            connect_timeout=float(env.get("TENSORWIRE_CONNECT_TIMEOUT", 60.0)),
            idle_timeout=float(env.get("TENSORWIRE_IDLE_TIMEOUT", 120.0)),
            progress=env.get("TENSORWIRE_PROGRESS") == "1",
        )

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables from_env() reads."""
        env = {
            "TENSORWIRE_SERVER": self.server_url,
            "TENSORWIRE_SITE": self.site,
            "TENSORWIRE_HEARTBEAT": str(self.heartbeat_interval),
            "TENSORWIRE_CONNECT_TIMEOUT": str(self.connect_timeout),
            "TENSORWIRE_IDLE_TIMEOUT": str(self.idle_timeout),
            "TENSORWIRE_PROGRESS": "1" if self.progress else "0",
        }
        if self.fallback_urls:  # URLs hold no spaces: one variable carries the list
            env["TENSORWIRE_FALLBACKS"] = " ".join(self.fallback_urls)
        if self.failover_after is not None:
            env["TENSORWIRE_FAILOVER_AFTER"] = str(self.failover_after)
        if self.token:
            env["TENSORWIRE_TOKEN"] = self.token
        if self.pki_dir:
            env["TENSORWIRE_PKI_DIR"] = self.pki_dir
        return env

    def failover_delay(self) -> float:
        """How long the upstream may stay unreachable before the client turns to the next URL:
        long enough that a dropped connection the transport redials is not a failover."""
        if self.failover_after is not None:
            return self.failover_after
        return 3 * self.heartbeat_interval

    def endpoint_config(self) -> EndpointConfig:
        # The site name is the node id: a restarted client is the same client to the server.
        tls = client_tls(Path(self.pki_dir), self.site) if self.pki_dir else None
        return EndpointConfig(
            node_id=self.site, token=self.token, tls=tls, idle_timeout=self.idle_timeout
        ).replace(**self.endpoint_overrides)


def _optional_float(value: str | None) -> float | None:
    return float(value) if value else None


# --- stop signals --------------------------------------------------------------------------------


class _StopSignals:
    """SIGTERM and SIGINT end the script through StoppedBySignal (status 0): the exit paths tell
    the server about the task under way and close the connection. Only the first signal does
    it; later ones (a terminal's Ctrl-C reaches the script and its runner, which forwards it)
    would only cut that short, so they are ignored while the script winds down."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False

    def install(self) -> Callable[[], None]:
        """Install the handlers (main thread only); returns what restores the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        numbers = (signal.SIGTERM, signal.SIGINT)
        previous = {number: signal.getsignal(number) for number in numbers}
        self.received, self.armed = None, True
        for number in numbers:
            signal.signal(number, self._handle)

        def restore() -> None:
            self.armed = False
            for number, handler in previous.items():
                signal.signal(number, handler)

        return restore

    def disarm(self) -> None:
        self.armed = False

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if not self.armed or self.received is not None:
            return
        self.received = number
        raise StoppedBySignal(number)


_STOP_SIGNALS = _StopSignals()
