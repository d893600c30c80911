"""The FL commands of `tensorwire`: server, client and demo (see fl/cli.py for the whole CLI).

Run them directly with `python -m fl.daemons_cli COMMAND ...`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer

# fl.config (pydantic models) loads when a daemon starts: this module is imported by every
# `tensorwire` command, `health` among them, which must start in a fraction of a second.
from fl.cli_ops import (
    DebugOption,
    LogFormatOption,
    LogLevelOption,
    MetricsHostOption,
    MetricsPortOption,
    QuietOption,
    run_client_daemon,
    run_server_daemon,
    say,
    setup_logging,
    show_tracebacks,
    start_ops,
)
from fl.exit_codes import EXIT_FAILURE, EXIT_USAGE

fl_app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", envvar="TENSORWIRE_CONFIG", help="TOML or YAML file"),
]


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(2)


@contextmanager
def fatal_errors(role: str, debug: bool) -> Iterator[None]:
    """A daemon's fatal error as ONE log line (what, where, the fix) and an exit status of
    fl/exit_codes.py; its traceback only with --debug. A configuration error exits 2, which
    systemd (RestartPreventExitStatus) and Kubernetes (podFailurePolicy) do not retry."""
    show_tracebacks(debug)
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        if _is_click_error(error):
            raise  # a usage error: click prints it with the usage line
        _fatal(role, error, debug)


def _is_click_error(error: Exception) -> bool:
    import click

    return isinstance(error, click.ClickException)


def _fatal(role: str, error: Exception, debug: bool) -> NoReturn:
    status, fields = _classify(error)
    problem = fields.pop("problem")
    say(
        "fatal",
        f"tensorwire {role}: error: {problem}",
        logging.CRITICAL,
        exit_code=status,
        exc_info=error if debug else None,
        **fields,
    )
    raise typer.Exit(status)


def _classify(error: Exception) -> tuple[int, dict[str, str]]:
    """(exit status, log fields) of a fatal error."""
    from fl.config import ConfigFileError

    if isinstance(error, ConfigFileError):
        fields = {"problem": error.one_line()}
        if error.problems:
            first = error.problems[0]
            fields |= {"file": first.source, "field": first.field, "fix": first.fix}
        return EXIT_USAGE, fields
    from transport import ConfigError

    if isinstance(error, ConfigError | FileNotFoundError):
        fix = "correct the configuration (pki_dir, paths, URLs) and start again"
        return EXIT_USAGE, {"problem": _described(error), "fix": fix}
    if isinstance(error, OSError):
        fix = "free or change the port or path it names; rerun with --debug for the traceback"
        return EXIT_FAILURE, {"problem": _described(error), "fix": fix}
    fix = "rerun with --debug for the traceback and report it"
    return EXIT_FAILURE, {"problem": _described(error), "fix": fix}


def _described(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    debug: DebugOption = False,
) -> None:
    """Listen for clients and run the job's FedAvg controller; SIGTERM stops it gracefully."""
    overrides = {
        "listen": listen or None,
        "fedavg.rounds": rounds,
        "fedavg.min_clients": min_clients,
        "fedavg.num_clients": num_clients,
        "fedavg.model_size": model_size,
    }
    from fl.config import ServerConfig, load_daemon_config

    with fatal_errors("server", debug):
        setup_logging(log_format, log_level)
        settings = load_daemon_config(ServerConfig, config, overrides)
        ops = start_ops(metrics_port, metrics_host)
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
    debug: DebugOption = False,
) -> None:
    """Run this site's training script (restarted on failure) until the server ends the job."""
    overrides = {
        "server": server,
        "site": site,
        "script": script,
        "args": args or None,
        "mode": "in-process" if in_process else None,
    }
    from fl.config import ClientConfig, load_daemon_config

    with fatal_errors("client", debug):
        setup_logging(log_format, log_level)
        settings = load_daemon_config(ClientConfig, config, overrides)
        ops = start_ops(metrics_port, metrics_host)
        status = run_client_daemon(settings, ops, quiet=quiet)
    raise typer.Exit(status)


@fl_app.command()
def relay(
    config: ConfigOption = None,
    name: Annotated[str | None, typer.Option(help="this relay's name (its node id)")] = None,
    upstream: Annotated[
        str | None, typer.Option(help="the server's (or parent relay's) URL")
    ] = None,
    listen: Annotated[
        list[str] | None, typer.Option(help="URL its sites dial (repeatable)")
    ] = None,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
    log_format: LogFormatOption = "kv",
    log_level: LogLevelOption = "INFO",
    debug: DebugOption = False,
) -> None:
    """Forward the server's tasks to a group of sites and send one partial sum of their results
    upstream; SIGTERM stops it (its sites turn to their fallbacks)."""
    overrides = {"name": name, "upstream": upstream, "listen": listen or None}
    from fl.config import RelayConfig, load_daemon_config
    from fl.relay import run_relay_daemon

    with fatal_errors("relay", debug):
        setup_logging(log_format, log_level)
        settings = load_daemon_config(RelayConfig, config, overrides)
        ops = start_ops(metrics_port, metrics_host)
        status = run_relay_daemon(settings, ops)
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
    from transport import progress

    wanted = progress.progress_wanted(quiet or as_json)
    options = DemoOptions(rounds, model_size, clients, driver, progress=wanted)
    try:
        summary = run_demo(options)
    except ValueError as error:
        raise _fail(error) from None
    typer.echo(json.dumps(summary) if as_json else format_table(summary))


if __name__ == "__main__":
    fl_app()
