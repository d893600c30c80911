"""A federated client whose result depends only on the model it received and the round: the
resume tests compare a job whose server was killed and restarted with an uninterrupted one, bit
for bit. Argument: the site's index (of two). SITE_PADDING_BYTES makes the model big enough for
transfers to be in flight when the test kills the server.
"""

from __future__ import annotations

import os
import sys

import torch

from fl import client as flare
from fl.task import MLP, local_data, train


def main() -> None:
    site = int(sys.argv[1])
    torch.set_num_threads(1)  # the same reduction order in every run
    features, labels = local_data(site, 2, samples=512)
    model = MLP(padding_bytes=int(os.environ.get("SITE_PADDING_BYTES", "0")))
    flare.init()
    while flare.is_running():
        received = flare.receive(into=model.state_dict())
        assert received.current_round is not None
        torch.manual_seed(1000 * received.current_round + site)
        loss = train(model, features, labels, epochs=1)
        result = flare.FLModel(
            model.state_dict(), metrics={"loss": loss}, meta={"sample_count": len(labels)}
        )
        flare.send(result)


if __name__ == "__main__":
    main()
