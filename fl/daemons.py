"""The server and client daemons behind `tensorwire server` and `tensorwire client`.

The server listens on every configured URL, admits clients (tokens and/or certificates), runs the
job's FedAvg controller and, on SIGTERM, stops the job, tells the clients to stop and exits 0.
The client supervises the site's training script: it runs it in a subprocess (restarted with
exponential backoff when it fails, so a crashed site rejoins) or in-process; the script itself
connects through the Client API, with retry and backoff, and sends heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from fl.cli_ops import ScriptOutput, json_logs, relay_line, say, tracebacks
from fl.client import ClientSettings, FLClient, NotAdmitted, bound_to, install_stop_signals
from fl.config import ClientConfig, FedAvgSettings, ServerConfig
from fl.controller import Controller
from fl.exit_codes import (
    EXIT_FAILURE,
    EXIT_NOT_ADMITTED,
    EXIT_OK,
    EXIT_SERVER_LOST,
    EXIT_USAGE,
    daemon_status,
)
from fl.fedadam import FedAdam
from fl.fedavg import FedAvg, RoundReport
from fl.rss import return_freed_memory
from fl.server import FLServer
from fl.status import follow_job
from fl.task import MLP
from transport import EndpointConfig, metrics, server_tls

log = logging.getLogger(__name__)


# --- server --------------------------------------------------------------------------------------


def server_endpoint_config(config: ServerConfig) -> EndpointConfig:
    return EndpointConfig(
        node_id=f"server-{config.job}",
        idle_timeout=config.idle_timeout,
        tls=server_tls(Path(config.pki_dir)) if config.pki_dir else None,
        # Admins connect like sites: their tokens and certificate names are admitted too.
        auth_tokens=_admitted(config.auth_tokens, config.admin_tokens),
        allowed_identities=_admitted(config.allowed_clients, config.admins),
    )


def _admitted(only: list[str] | None, admins: list[str] | None) -> frozenset[str] | None:
    """A server that admits only some tokens or names admits its admins' as well."""
    return frozenset([*only, *(admins or [])]) if only else None


def initial_model(settings: FedAvgSettings) -> Path | Callable[[], dict[str, torch.Tensor]]:
    """The configured initial model file, or a builder of the built-in task's MLP (seeded: every
    start builds the same one; called only when the job starts fresh)."""
    if settings.initial_model:
        return Path(settings.initial_model)
    dtype = getattr(torch, settings.model_dtype)

    def build() -> dict[str, torch.Tensor]:
        model = MLP(padding_bytes=int(settings.model_size), dtype=dtype)
        return {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}

    return build


def build_fedavg(settings: FedAvgSettings, state_dir: str | Path | None = None) -> FedAvg:
    """The job's controller: FedAvg, or FedAdam when `algorithm = "fedadam"`."""
    options: dict[str, Any] = {
        "rounds": settings.rounds,
        "num_clients": settings.num_clients,
        "min_clients": settings.min_clients,
        "wait_after_min": settings.wait_after_min,
        "round_timeout": settings.round_timeout,
        "cast_dtypes": settings.cast_dtypes,
        "max_sample_count": settings.max_sample_count,
        "join_timeout": settings.join_timeout,
        "state_dir": state_dir,
        "accumulator_dir": settings.accumulator_dir,
        "clip_norm": settings.robust.clip_norm,
        "trim_fraction": settings.robust.trim_fraction,
        "median": settings.robust.median,
        "on_round": _log_round,
    }
    if settings.algorithm == "fedadam":
        adam = settings.fedadam
        return FedAdam(
            initial_model(settings),
            eta=adam.eta,
            beta1=adam.beta1,
            beta2=adam.beta2,
            tau=adam.tau,
            **options,
        )
    return FedAvg(initial_model(settings), **options)


def _log_round(report: RoundReport) -> None:
    moved = report.bytes_sent + report.bytes_received
    say(
        "round_end",
        f"round {report.round + 1}: {len(report.succeeded)} ok {sorted(report.failed) or ''} "
        f"{moved / 2**20:,.0f} MiB in {report.seconds:.1f} s, metrics {report.metrics}",
        round=report.round + 1,
        succeeded=sorted(report.succeeded),
        failed=sorted(report.failed),
        bytes=moved,
        seconds=round(report.seconds, 3),
        metrics=report.metrics,
    )


async def serve(
    config: ServerConfig,
    controller: Controller | None = None,
    ops: metrics.OpsServer | None = None,
) -> bool:
    """Run the job to its end (or continue it from its state directory); False when
    SIGTERM/SIGINT stopped it first. A job that already finished is reported, not run again."""
    return_freed_memory()  # the server's RSS follows what it holds (fl/rss.py)
    controller = controller or build_fedavg(config.fedavg, config.state_dir)
    server = FLServer(
        server_endpoint_config(config),
        job=config.job,
        heartbeat_timeout=config.heartbeat_timeout,
        reconnect_grace=config.reconnect_grace,
        admins=config.admins,
        admin_tokens=config.admin_tokens or (),
    )
    controller.attach(server)
    if isinstance(controller, FedAvg) and _already_finished(controller, config):
        return True
    urls = await server.start(config.listen)
    job = asyncio.ensure_future(controller.run())
    follow_job(server, controller, job, ops)  # status page and gauges; `tensorwire abort`
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, job.cancel)
    # SIGHUP (a closed terminal, `systemctl reload`, `kill -HUP`) would otherwise end the
    # server without a word: the configuration is read once, so it is logged and ignored.
    loop.add_signal_handler(signal.SIGHUP, _ignore_sighup, "server")
    # Said once the signals are handled: whoever waits for this line may signal at once.
    message = f"tensorwire server: job {config.job} listening on {' '.join(urls)}"
    say("listening", message, job=config.job, urls=urls)
    finished = False
    try:
        await job
        finished = True
        _save_final(controller, config.fedavg.save_path)
    except asyncio.CancelledError:
        why = "aborted by an admin" if server.abort_reason is not None else "on a signal"
        say("stopping", f"tensorwire server: stopping ({why})", job=config.job)
    finally:
        # Told after the job is cancelled, a client whose transfer the closing server cut takes
        # the STOP as the end of the job (fl/client.py), not as a failure.
        await server.close(reason="job finished" if finished else "server stopped")
    return finished


def _already_finished(controller: FedAvg, config: ServerConfig) -> bool:
    """Open the job's state; a finished job prints what it did (and saves its model again if
    that file went missing) instead of running again."""
    state = controller.open_state()
    if not state.finished:
        if controller.resumed_from is not None:
            say(
                "resumed",
                f"tensorwire server: job {config.job} continues at round "
                f"{state.round + 1} of {state.rounds} (state in {config.state_dir})",
                job=config.job,
                round=state.round + 1,
                rounds=state.rounds,
            )
        return False
    say(
        "already_finished",
        f"tensorwire server: job {config.job} already finished its {state.rounds} rounds "
        f"(state in {config.state_dir}); nothing to do",
        job=config.job,
        rounds=state.rounds,
    )
    if config.fedavg.save_path and not Path(config.fedavg.save_path).is_file():
        _save_final(controller, config.fedavg.save_path)
    return True


def _save_final(controller: Controller, path: str | None) -> None:
    if path and isinstance(controller, FedAvg):
        controller.save_final(path)
        say("final_model_saved", f"tensorwire server: final model saved to {path}", path=path)


def _ignore_sighup(role: str, *_: object) -> None:
    say(
        "sighup_ignored",
        f"tensorwire {role}: SIGHUP ignored (the configuration is read at start: restart to "
        "change it)",
        logging.WARNING,
    )


# --- client --------------------------------------------------------------------------------------
#
# `tensorwire client` runs the site's script until the job ends, and exits with one of the
# statuses of fl/exit_codes.py: 0 when the job finished, the server stopped it, or SIGTERM/SIGINT
# stopped the client (the script first tells the server, and the round goes on without this
# site); 1 on failure (the server unreachable for longer than connect_timeout or idle_timeout, the
# script failing more than max_restarts times); 2 on a configuration or usage error; 77 when the
# server refused the site's credentials. Neither 2 nor 77 is worth a restart.

# How long a script told to stop (SIGTERM) may take to report and close before it is killed;
# its own exit is bounded well below this (REPORT_TIMEOUT_S, the transport's close grace).
SCRIPT_STOP_GRACE_S = 30.0


def client_settings(config: ClientConfig, *, progress: bool = False) -> ClientSettings:
    return ClientSettings(
        server_url=config.server,
        site=config.site,
        fallback_urls=tuple(config.fallbacks),
        token=config.token,
        pki_dir=config.pki_dir,
        heartbeat_interval=config.heartbeat_interval,
        connect_timeout=config.connect_timeout,
        idle_timeout=config.idle_timeout,
        progress=progress,
    )


def run_client(config: ClientConfig, *, progress: bool = False) -> int:
    """Run the site's script until the job ends; returns the exit status (fl/exit_codes.py).
    With `progress` the script's transfers draw bars (on a terminal)."""
    script = Path(config.script)
    if not script.is_file():
        raise FileNotFoundError(f"the training script {script} does not exist")
    settings = client_settings(config, progress=progress)
    signal.signal(signal.SIGHUP, functools.partial(_ignore_sighup, "client"))
    if config.mode == "in-process":
        return _run_in_process(settings, script, config.args)
    return _supervise(config, script, settings)


def _run_in_process(settings: ClientSettings, script: Path, args: list[str]) -> int:
    """Run the script in this thread, on a client bound to it. SIGTERM/SIGINT end it through
    StoppedBySignal: the open task is reported, the connection closed, and the status is 0."""
    client = FLClient(settings)
    saved_argv = sys.argv
    restore_signals = install_stop_signals()
    relayed = contextlib.ExitStack()
    if json_logs():  # the script's prints become log records (the log handler keeps its stream)
        relayed.enter_context(contextlib.redirect_stdout(ScriptOutput(str(script))))
        relayed.enter_context(contextlib.redirect_stderr(ScriptOutput(str(script))))
    try:
        sys.argv = [str(script), *args]
        with bound_to(client), client, relayed:
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:  # the job's end, a signal, the server lost, or sys.exit()
        return _script_ended(exit.code, script)
    except NotAdmitted as refusal:
        say("not_admitted", f"tensorwire client: {refusal}", logging.ERROR, reason=str(refusal))
        return EXIT_NOT_ADMITTED
    except Exception as error:
        say(
            "script_failed",
            f"tensorwire client: {script} failed: {type(error).__name__}: {error}",
            logging.ERROR,
            script=str(script),
            error=f"{type(error).__name__}: {error}",
            exc_info=error if tracebacks() else None,
        )
        return EXIT_FAILURE
    finally:
        sys.argv = saved_argv
        restore_signals()
    return EXIT_OK


def _script_ended(status: object, script: Path) -> int:
    """The daemon's status for a script that ended with `status` and is not restarted."""
    if status == EXIT_SERVER_LOST:
        say("gave_up", f"tensorwire client: {script} lost the server; giving up", logging.WARNING)
    elif status == EXIT_USAGE:
        message = f"tensorwire client: {script} was started wrongly (status 2); check its args"
        say("script_usage_error", message, logging.WARNING, script=str(script))
    return daemon_status(status)


class _Supervisor:
    """Runs the script; on SIGTERM/SIGINT forwards SIGTERM to it (once), stops restarting it,
    and kills it if it has not ended SCRIPT_STOP_GRACE_S later."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self._stop_asked_at: float | None = None  # set by a signal
        self._relay: threading.Thread | None = None  # the script's output, as log records

    def start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if json_logs():  # the script's output becomes log records: the whole log is JSON
            self.child = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self._relay = threading.Thread(
                target=_relay, args=(self.child, command[1]), daemon=True
            )
            self._relay.start()
        else:
            self.child = subprocess.Popen(command, env=env)
        if self.stopping():  # a signal came while it was being started
            self._forward()
        return self.child

    def wait_child(self) -> int:
        """The script's exit status, once it ended (killed if it outlives a stop's grace)."""
        assert self.child is not None
        while True:
            try:
                status = self.child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                asked = self._stop_asked_at
                if asked is not None and time.monotonic() - asked > SCRIPT_STOP_GRACE_S:
                    say(
                        "script_killed",
                        f"tensorwire client: the script did not stop within "
                        f"{SCRIPT_STOP_GRACE_S:g} s; killing it",
                        logging.WARNING,
                    )
                    self.child.kill()
            else:
                if self._relay is not None:  # its last lines are still in the pipe
                    self._relay.join(timeout=5)
                return status

    def wait(self, seconds: float) -> bool:
        """Wait `seconds` (a signal cuts it short); True when a signal asked us to stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.stopping()

    def stopping(self) -> bool:
        """Whether SIGTERM/SIGINT asked the daemon to stop."""
        return self._stop_asked_at is not None

    def on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.stopping():
            return  # the script was told once; a second SIGTERM would only cut its exit short
        self._stop_asked_at = time.monotonic()
        self._forward()

    def _forward(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def _relay(child: subprocess.Popen[bytes], script: str) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        relay_line(script, line.decode(errors="replace"))


def _supervise(config: ClientConfig, script: Path, settings: ClientSettings) -> int:
    """Run the script in a subprocess, restarted with exponential backoff when it fails (at most
    max_restarts times); not when the server refused the site, the script was started wrongly,
    or it gave up on an unreachable server (it already waited as long as it was told to)."""
    supervisor = _Supervisor()
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    env = {**os.environ, **settings.environment()}
    restarts = 0
    while not supervisor.stopping():
        supervisor.start([sys.executable, str(script), *config.args], env)
        status = supervisor.wait_child()
        if supervisor.stopping():  # told to stop: the script told the server, whatever its status
            return EXIT_OK
        if status == EXIT_NOT_ADMITTED:
            message = f"tensorwire client: the server refused {config.site}; not restarting"
            say("not_admitted", message, logging.WARNING, site=config.site)
            return EXIT_NOT_ADMITTED
        if status in (EXIT_OK, EXIT_USAGE, EXIT_SERVER_LOST):
            return _script_ended(status, script)
        if restarts >= config.max_restarts:
            message = f"tensorwire client: {script} failed {restarts + 1} times; giving up"
            say("gave_up", message, logging.WARNING, failures=restarts + 1)
            return EXIT_FAILURE
        delay = config.restart_backoff * 2**restarts
        restarts += 1
        message = f"tensorwire client: {script} exited {status}; restart {restarts} in {delay:g} s"
        say("script_restart", message, logging.WARNING, status=status, restart=restarts)
        supervisor.wait(delay)
    return EXIT_OK
