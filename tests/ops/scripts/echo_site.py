"""A federated client script for the ops tests: answers every round with the model plus one."""

from __future__ import annotations

from fl import client as flare


def main() -> None:
    flare.init()
    while flare.is_running():
        received = flare.receive()
        assert isinstance(received.params, dict)
        params = {name: tensor + 1 for name, tensor in received.params.items()}
        flare.send(flare.FLModel(params, meta={"sample_count": 1}))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
