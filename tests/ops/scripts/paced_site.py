"""A client script for the status page and admin tests: answers every round with the model plus
one after "training" for the seconds given as its argument, so a job of small models lasts long
enough to be watched and steered."""

from __future__ import annotations

import sys
import time

from fl import client as flare


def main(seconds: float) -> None:
    flare.init()
    while flare.is_running():
        received = flare.receive()
        assert isinstance(received.params, dict)
        time.sleep(seconds)  # the site's training, as far as the server can tell
        params = {name: tensor + 1 for name, tensor in received.params.items()}
        flare.send(flare.FLModel(params, meta={"sample_count": 1}))  # type: ignore[arg-type]


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.5)
