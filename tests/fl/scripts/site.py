"""A federated client script for the subprocess tests (run as a separate process).

SITE_SLOW_MARKER=path: in the first round, write that file and then hang (the test kills us).
SITE_SYNTHETIC_BYTES=n: answer with a synthetic float32 model of n bytes instead of training.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fl import client as flare
from transport import DigestSink, SyntheticSource


def main() -> None:
    slow_marker = os.environ.get("SITE_SLOW_MARKER")
    synthetic = int(os.environ.get("SITE_SYNTHETIC_BYTES", "0"))
    flare.init()
    while flare.is_running():
        received = flare.receive(sink=DigestSink() if synthetic else None)
        if slow_marker and received.current_round == 0:
            Path(slow_marker).write_text("training")
            time.sleep(600)
        if synthetic:
            seed = len(os.environ["TENSORWIRE_SITE"])
            params: object = SyntheticSource(synthetic, seed=seed, dtype="F32", values="weights")
        else:
            assert isinstance(received.params, dict)
            params = {name: t + 1 for name, t in received.params.items()}
        flare.send(flare.FLModel(params, meta={"sample_count": 1}))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
