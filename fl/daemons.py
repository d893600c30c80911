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
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from fl.client import EXIT_NOT_ADMITTED, ClientSettings, FLClient, NotAdmitted, bound_to
from fl.config import ClientConfig, FedAvgSettings, ServerConfig
from fl.controller import Controller
from fl.fedavg import FedAvg, RoundReport
from fl.model import FLModel
from fl.server import FLServer
from fl.task import MLP
from transport import EndpointConfig, server_tls

log = logging.getLogger(__name__)


# --- server --------------------------------------------------------------------------------------


def server_endpoint_config(config: ServerConfig) -> EndpointConfig:
    return EndpointConfig(
        node_id=f"server-{config.job}",
        idle_timeout=config.idle_timeout,
        tls=server_tls(Path(config.pki_dir)) if config.pki_dir else None,
        auth_tokens=frozenset(config.auth_tokens) if config.auth_tokens else None,
        allowed_identities=frozenset(config.allowed_clients) if config.allowed_clients else None,
    )


def initial_model(settings: FedAvgSettings) -> FLModel:
    if settings.initial_model:
        return Controller.load_model(settings.initial_model)
    return FLModel(params=MLP(padding_bytes=int(settings.model_size)).state_dict())


def build_fedavg(settings: FedAvgSettings) -> FedAvg:
    return FedAvg(
        initial_model(settings),
        rounds=settings.rounds,
        num_clients=settings.num_clients,
        min_clients=settings.min_clients,
        wait_after_min=settings.wait_after_min,
        join_timeout=settings.join_timeout,
        accumulator_dir=settings.accumulator_dir,
        on_round=_log_round,
    )


def _log_round(report: RoundReport) -> None:
    print(
        f"round {report.round + 1}: {len(report.succeeded)} ok {sorted(report.failed) or ''} "
        f"{(report.bytes_sent + report.bytes_received) / 2**20:,.0f} MiB in "
        f"{report.seconds:.1f} s, metrics {report.metrics}",
        flush=True,
    )


async def serve(config: ServerConfig, controller: Controller | None = None) -> bool:
    """Run one job to its end; False when SIGTERM/SIGINT stopped it first."""
    controller = controller or build_fedavg(config.fedavg)
    server = FLServer(
        server_endpoint_config(config),
        job=config.job,
        heartbeat_timeout=config.heartbeat_timeout,
        reconnect_grace=config.reconnect_grace,
    )
    urls = await server.start(config.listen)
    print(f"tensorwire server: job {config.job} listening on {' '.join(urls)}", flush=True)
    controller.attach(server)
    job = asyncio.ensure_future(controller.run())
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, job.cancel)
    finished = False
    try:
        await job
        finished = True
        _save_final(controller, config.fedavg.save_path)
    except asyncio.CancelledError:
        print("tensorwire server: stopping on a signal", flush=True)
    finally:
        await server.close(reason="job finished" if finished else "server stopped")
    return finished


def _save_final(controller: Controller, path: str | None) -> None:
    if path and isinstance(controller, FedAvg):
        Controller.save_model(controller.model, path)
        print(f"tensorwire server: final model saved to {path}", flush=True)


# --- client --------------------------------------------------------------------------------------


def client_settings(config: ClientConfig, *, progress: bool = False) -> ClientSettings:
    return ClientSettings(
        server_url=config.server,
        site=config.site,
        token=config.token,
        pki_dir=config.pki_dir,
        heartbeat_interval=config.heartbeat_interval,
        connect_timeout=config.connect_timeout,
        idle_timeout=config.idle_timeout,
        progress=progress,
    )


def run_client(config: ClientConfig, *, progress: bool = False) -> int:
    """Run the site's script until the job ends; returns the exit status. With `progress`
    the script's transfers draw bars (on a terminal)."""
    script = Path(config.script)
    if not script.is_file():
        raise FileNotFoundError(f"the training script {script} does not exist")
    settings = client_settings(config, progress=progress)
    if config.mode == "in-process":
        return _run_in_process(settings, script, config.args)
    return _supervise(config, script, settings)


def _run_in_process(settings: ClientSettings, script: Path, args: list[str]) -> int:
    client = FLClient(settings)
    saved_argv = sys.argv
    sys.argv = [str(script), *args]
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        with bound_to(client), client:
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:  # JobStopped, sys.exit() in the script, or SIGTERM
        return exit.code if isinstance(exit.code, int) else 1
    except NotAdmitted as refusal:
        print(f"tensorwire client: {refusal}", file=sys.stderr, flush=True)
        return EXIT_NOT_ADMITTED
    finally:
        sys.argv = saved_argv
    return 0


class _Supervisor:
    """Forwards SIGTERM/SIGINT to the running script and stops restarting it."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` (a signal cuts it short); True when a signal asked us to stop."""
        with contextlib.suppress(InterruptedError):
            time.sleep(seconds)
        return self.stopping

    def on_signal(self, number: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def _supervise(config: ClientConfig, script: Path, settings: ClientSettings) -> int:
    supervisor = _Supervisor()
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    env = {**os.environ, **settings.environment()}
    restarts = 0
    while True:
        supervisor.child = subprocess.Popen([sys.executable, str(script), *config.args], env=env)
        status = supervisor.child.wait()
        if status == 0 or supervisor.stopping:
            return 0 if supervisor.stopping else status
        if status == EXIT_NOT_ADMITTED:
            print(f"tensorwire client: the server refused {config.site}; not restarting")
            return status
        if restarts >= config.max_restarts:
            print(f"tensorwire client: {script} failed {restarts + 1} times; giving up")
            return status
        delay = config.restart_backoff * 2**restarts
        restarts += 1
        print(f"tensorwire client: {script} exited {status}; restart {restarts} in {delay:g} s")
        if supervisor.wait(delay):
            return 0
