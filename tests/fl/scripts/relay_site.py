"""A site whose result is exact arithmetic on what it received, for the relay tests: site i (first
argument) returns received + (i + 1) / 4 (FULL) or just (i + 1) / 4 (DIFF, second argument) with
sample_count i + 1, so every weighted sum is exact in float32 and the final model can be compared
bit for bit with flat FedAvg computed directly.

Mode FAIL raises once the model is in: the site reports the task failed.

With RELAY_SITE_GATE set to a folder, the site writes `<gate>/received-<i>` once it holds the
model and waits for `<gate>/go` before it sends its result (the test kills a relay meanwhile).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from fl import client as flare


def delta(site: int) -> float:
    return (site + 1) / 4


def wait_at_gate(site: int) -> None:
    gate = os.environ.get("RELAY_SITE_GATE")
    if not gate:
        return
    (Path(gate) / f"received-{site}").touch()
    deadline = time.monotonic() + 120
    while not (Path(gate) / "go").exists():  # the test opens the gate; no timing assumed
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.02)


def main() -> None:
    site, mode = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "FULL"
    flare.init()
    while flare.is_running():
        received = flare.receive()
        assert isinstance(received.params, dict)
        if mode == "FAIL":
            raise RuntimeError(f"site {site} failed on purpose")
        wait_at_gate(site)
        step = delta(site)
        if mode == "DIFF":
            params = {name: torch.full_like(t, step) for name, t in received.params.items()}
        else:
            params = {name: t + step for name, t in received.params.items()}
        flare.send(
            flare.FLModel(
                params,
                params_type=mode,
                metrics={"site": float(site)},
                meta={"sample_count": site + 1},
            )
        )


if __name__ == "__main__":
    main()
