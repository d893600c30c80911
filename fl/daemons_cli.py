"""The FL commands of `tensorwire`: server, client and demo (see fl/cli.py for the whole CLI).

Run them directly with `python -m fl.daemons_cli COMMAND ...`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fl.cli_ops import (
    LogFormatOption,
    LogLevelOption,
    MetricsHostOption,
    MetricsPortOption,
    QuietOption,
    run_client_daemon,
    run_server_daemon,
    setup_ops,
)
from fl.config import ClientConfig, ConfigFileError, ServerConfig, load_config
from transport import progress

fl_app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

ConfigOption = Annotated[str | None, typer.Option("--config", "-c", help="TOML or YAML file")]


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(2)


@fl_app.command()
def server(
    config: ConfigOption = None,
    listen: Annotated[list[str] | None, typer.Option(help="URL to listen on (repeatable)")] = None,
    rounds: Annotated[int | None, typer.Option(help="FedAvg rounds")] = None,
    min_clients: Annotated[int | None, typer.Option(help="results needed per round")] = None,
    num_clients: Annotated[int | None, typer.Option(help="clients sampled per round")] = None,
    model_size: Annotated[str | None, typer.Option(help="built-in task model size")] = None,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
    log_format: LogFormatOption = "kv",
    log_level: LogLevelOption = "INFO",
    quiet: QuietOption = False,
) -> None:
    """Listen for clients and run the job's FedAvg controller; SIGTERM stops it gracefully."""
    overrides = {
        "listen": listen or None,
        "fedavg.rounds": rounds,
        "fedavg.min_clients": min_clients,
        "fedavg.num_clients": num_clients,
        "fedavg.model_size": model_size,
    }
    try:
        settings = load_config(ServerConfig, config, overrides)
    except ConfigFileError as error:
        raise _fail(error) from None
    ops = setup_ops(metrics_port, metrics_host, log_format, log_level)
    run_server_daemon(settings, ops, quiet=quiet)


@fl_app.command()
def client(
    config: ConfigOption = None,
    server: Annotated[str | None, typer.Option(help="the server's URL")] = None,
    site: Annotated[str | None, typer.Option(help="this site's name (its node id)")] = None,
    script: Annotated[str | None, typer.Option(help="the training script")] = None,
    in_process: Annotated[bool, typer.Option(help="run the script in this process")] = False,
    args: Annotated[list[str] | None, typer.Argument(help="arguments for the script")] = None,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
    log_format: LogFormatOption = "kv",
    log_level: LogLevelOption = "INFO",
    quiet: QuietOption = False,
) -> None:
    """Run this site's training script (restarted on failure) until the server ends the job."""
    overrides = {
        "server": server,
        "site": site,
        "script": script,
        "args": args or None,
        "mode": "in-process" if in_process else None,
    }
    try:
        settings = load_config(ClientConfig, config, overrides)
        ops = setup_ops(metrics_port, metrics_host, log_format, log_level)
        status = run_client_daemon(settings, ops, quiet=quiet)
    except (ConfigFileError, FileNotFoundError) as error:
        raise _fail(error) from None
    raise typer.Exit(status)


@fl_app.command()
def demo(
    rounds: Annotated[int, typer.Option(min=1, help="FedAvg rounds")] = 3,
    model_size: Annotated[str, typer.Option(help="bytes streamed per model, e.g. 1GiB")] = "1GiB",
    clients: Annotated[int, typer.Option(min=1, help="client processes")] = 2,
    driver: Annotated[str, typer.Option(help="tcp, grpc or http")] = "tcp",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary")] = False,
    quiet: QuietOption = False,
) -> None:
    """A server and clients on loopback run FedAvg rounds of a real small task; one row per
    round: bytes moved, throughput, peak RSS of server and each client, accuracy."""
    run_demo_command(rounds, model_size, clients, driver, as_json, quiet)


def run_demo_command(
    rounds: int, model_size: str, clients: int, driver: str, as_json: bool, quiet: bool = False
) -> None:
    """What `tensorwire demo` does (fl/cli.py calls this)."""
    from fl.demo import DemoOptions, format_table, run_demo

    wanted = progress.progress_wanted(quiet or as_json)
    options = DemoOptions(rounds, model_size, clients, driver, progress=wanted)
    try:
        summary = run_demo(options)
    except ValueError as error:
        raise _fail(error) from None
    typer.echo(json.dumps(summary) if as_json else format_table(summary))


if __name__ == "__main__":
    fl_app()
