"""The `tensorwire` command."""

from __future__ import annotations

import argparse
import json
from typing import Annotated

import typer

import transport
from fl.cli_certs import certs_app
from fl.cli_ops import QuietOption, register_ops_commands
from fl.daemons_cli import client as fl_client
from fl.daemons_cli import demo as fl_demo
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
app.command(name="demo")(fl_demo)
register_ops_commands(app)


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(transport.__version__)


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
    from benchmarks import stream
    from benchmarks.probes import format_size

    # The stream benchmark's own parser fills every setting it has, so this command cannot
    # drift from it when the benchmark grows an option.
    parser = argparse.ArgumentParser(prog="tensorwire stream-demo", exit_on_error=False)
    stream.add_arguments(parser)
    try:
        args = parser.parse_args(["--size", size, "--driver", driver, *(["--tls"] if tls else [])])
    except argparse.ArgumentError as error:
        raise typer.BadParameter(str(error)) from None
    args.quiet = quiet or as_json
    if not as_json:
        scheme = stream.scheme({"driver": driver, "tls_dir": tls})
        typer.echo(
            f"streaming {format_size(args.size)} of bf16 tensors over {scheme}://127.0.0.1 ..."
        )
    result = stream.run(args)
    if as_json:
        typer.echo(json.dumps(result))
        return
    digest = "verified" if result["digest_ok"] else "MISMATCH"
    chunk, window = format_size(result["chunk_size"]), format_size(result["stream_window"])
    typer.echo(
        f"moved {format_size(result['bytes'])} in {result['seconds']:.2f} s: "
        f"{result['throughput_mb_s']:,.0f} MB/s, digest {digest}\n"
        f"peak RSS above baseline: sender {result['sender_peak_rss_mib']:.0f} MiB, "
        f"receiver {result['receiver_peak_rss_mib']:.0f} MiB (chunks of {chunk}, window {window})"
    )
    if not result["digest_ok"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
