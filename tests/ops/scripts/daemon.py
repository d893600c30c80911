"""`tensorwire server|client` as the CLI runs them with --metrics-port 0, then kept alive (until
stdin closes) so the test can scrape the final counters.

    python daemon.py server CONFIG      python daemon.py client CONFIG
"""

from __future__ import annotations

import sys

from fl.cli_ops import run_client_daemon, run_server_daemon, setup_ops
from fl.config import ClientConfig, ServerConfig, load_config


def main(role: str, config: str) -> None:
    ops = setup_ops(0, "127.0.0.1")
    assert ops is not None
    if role == "server":
        outcome: object = run_server_daemon(load_config(ServerConfig, config), ops)
    else:
        outcome = run_client_daemon(load_config(ClientConfig, config), ops)
    print(f"daemon done: {outcome}", flush=True)
    sys.stdin.read()
    ops.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
