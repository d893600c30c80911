"""The `tensorwire` command."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Annotated, Any

import typer

# Nothing imported here loads torch or the transport: `tensorwire --version` and `tensorwire
# health` answer in a fraction of a second. Commands import what they need when they run.
from fl.admin import register_admin_commands
from fl.cli_certs import certs_app
from fl.cli_ops import QuietOption, register_ops_commands
from fl.daemons_cli import client as fl_client
from fl.daemons_cli import relay as fl_relay
from fl.daemons_cli import run_demo_command
from fl.daemons_cli import server as fl_server

app = typer.Typer(
    name="tensorwire",
    help="Stream state dicts of any size between federated-learning sites.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(certs_app, name="certs")
app.command(name="server")(fl_server)
app.command(name="client")(fl_client)
app.command(name="relay")(fl_relay)
register_ops_commands(app)
register_admin_commands(app)


def package_version() -> str:
    """The installed distribution's version (importlib.metadata: no package is imported)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("tensorwire")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tensorwire {package_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the installed version and exit.",
        ),
    ] = False,
) -> None:
    pass


@app.command()
def demo(
    task: Annotated[
        str,
        typer.Option(
            help="classify (a padded MLP), lora, sft or embeddings (docs/applications.md)"
        ),
    ] = "classify",
    rounds: Annotated[
        int | None, typer.Option(min=1, help="FedAvg rounds (default: 3, the task's own)")
    ] = None,
    model_size: Annotated[
        str, typer.Option(help="classify: bytes streamed per model, e.g. 1GiB")
    ] = "1GiB",
    clients: Annotated[int, typer.Option(min=1, help="classify: client processes")] = 2,
    size: Annotated[str, typer.Option(help="lora/sft/embeddings: default or tiny")] = "default",
    driver: Annotated[str, typer.Option(help="tcp, grpc or http")] = "tcp",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary")] = False,
    quiet: QuietOption = False,
) -> None:
    """A server and clients on loopback run FedAvg rounds of a real small task. classify: one row
    per round (bytes moved, throughput, peak RSS of server and each client, accuracy); lora, sft,
    embeddings: the paper's applications, federated vs local-only vs centralized."""
    if task == "classify":
        run_demo_command(rounds or 3, model_size, clients, driver, as_json, quiet)
        return
    _app_demo(task, size, rounds, driver, as_json, quiet)


def _app_demo(
    task: str, size: str, rounds: int | None, driver: str, as_json: bool, quiet: bool
) -> None:
    from fl.apps import SIZES, TASKS  # names only: transformers is imported by the tasks

    for value, known, option in ((task, TASKS, "--task"), (size, SIZES, "--size")):
        if value not in known:
            choices = ", ".join(("classify", *known) if option == "--task" else known)
            typer.echo(f"error: unknown {option[2:]} {value!r}: one of {choices}", err=True)
            raise typer.Exit(2)
    try:
        from fl.apps.demo import AppDemoOptions, run_app_demo
        from fl.apps.report import format_table
    except ImportError as error:  # the llm extra is not installed
        typer.echo(
            f"error: {error}; install the llm extra: pip install 'tensorwire[llm]'", err=True
        )
        raise typer.Exit(2) from None
    options = AppDemoOptions(task, size, rounds, driver, progress=not (quiet or as_json))
    try:
        summary = run_app_demo(options)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary) if as_json else format_table(summary))


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(package_version())


@app.command(name="stream-demo")
def stream_demo(
    size: Annotated[
        str, typer.Option(help="bytes of generated state dict to stream, e.g. 1GiB")
    ] = "1GiB",
    driver: Annotated[str, typer.Option(help="tcp, grpc, http or memory")] = "tcp",
    tls: Annotated[bool, typer.Option("--tls", help="mutual TLS (tcps, grpcs, https)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quiet: QuietOption = False,
) -> None:
    """Stream a generated state dict between two local endpoints (two processes) and report
    throughput and each side's peak memory above its baseline."""
    from fl.sizes import format_size, parse_size

    try:
        nbytes = parse_size(size)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--size") from None
    if not as_json:
        scheme = f"{driver}s" if tls and driver != "memory" else driver
        typer.echo(f"streaming {format_size(nbytes)} of bf16 tensors over {scheme}://127.0.0.1 ...")
    result = _run_stream_benchmark(nbytes, driver, tls, quiet=quiet or as_json)
    if as_json:
        typer.echo(json.dumps(result))
        return
    digest = "verified" if result["digest_ok"] else "MISMATCH"
    chunk, window = format_size(result["chunk_size"]), format_size(result["stream_window"])
    typer.echo(
        f"moved {format_size(result['bytes'])} in {result['seconds']:.2f} s: "
        f"{result['bytes'] / max(result['seconds'], 1e-9) / 2**20:,.0f} MiB/s, digest {digest}\n"
        f"peak RSS above baseline: sender {result['sender_peak_rss_mib']:.0f} MiB, "
        f"receiver {result['receiver_peak_rss_mib']:.0f} MiB (chunks of {chunk}, window {window})"
    )
    if not result["digest_ok"]:
        raise typer.Exit(1)


def _run_stream_benchmark(nbytes: int, driver: str, tls: bool, quiet: bool) -> dict[str, Any]:
    """`python -m benchmarks stream ... --json` in a child process; its JSON result.

    A child, not an import: fl never imports benchmarks (the layering in DESIGN.md). The
    benchmark's own parser still checks every setting (a bad --driver is refused there), so this
    command cannot drift from it. Our stderr is the child's: it draws the progress bar there when
    that is a terminal, and reports its errors there.
    """
    command = [sys.executable, "-m", "benchmarks", "stream", "--json"]
    command += ["--size", str(nbytes), "--driver", driver]
    command += (["--tls"] if tls else []) + (["--quiet"] if quiet else [])
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode != 0:
        typer.echo(f"error: the stream benchmark exited with status {child.returncode}", err=True)
        raise typer.Exit(child.returncode)
    # --json prints the result as the last line; anything a library printed before is not ours.
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    app()
