"""Train the task's MLP on one site's data. centralized.py is an ordinary PyTorch script;
federated.py is the same script with five lines changed, a federated client (docs/fl.md):

    python examples/centralized.py --site 0 --sites 2 --rounds 3
    tensorwire client --server tcp://HOST:8765 --site s0 --script examples/federated.py -- --site 0

Run federated, the server decides how many rounds there are (--rounds goes unused).
"""

import argparse

from fl import client as flare
from fl.task import MLP, evaluate, held_out_data, local_data, train


def main() -> None:
    parser = argparse.ArgumentParser(description="Train an MLP on one site's data.")
    parser.add_argument("--site", type=int, default=0)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    features, labels = local_data(args.site, args.sites)
    test_features, test_labels = held_out_data()
    n = len(labels)
    model = MLP()
    flare.init()
    while flare.is_running():
        flare.receive(into=model.state_dict())
        loss = train(model, features, labels)
        metrics = {"loss": loss, "accuracy": evaluate(model, test_features, test_labels)}
        print(f"site {args.site}: {n} samples, {metrics}")
        flare.send(flare.FLModel(model.state_dict(), metrics=metrics, meta={"sample_count": n}))


if __name__ == "__main__":
    main()
