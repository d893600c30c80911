"""The training script each `tensorwire demo` client runs (in its own process).

It is an ordinary federated script on the Client API: receive the global model in place into the
model's own tensors (no second copy), train on this site's skewed shard, send the update with its
sample count, and report this process's peak memory for the round as a metric.
"""

from __future__ import annotations

import argparse

from fl import client as flare
from fl.rss import RssSampler
from fl.task import MLP, evaluate, held_out_data, local_data, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--site", type=int, required=True)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--padding-bytes", type=int, default=0)
    args = parser.parse_args()
    features, labels = local_data(args.site, args.sites)
    test_features, test_labels = held_out_data()
    model = MLP(padding_bytes=args.padding_bytes)
    # Sampled for the whole run: each result reports the peak so far (the model itself, received
    # in place, plus what receiving and sending cost; the send streams from the model's tensors).
    sampler = RssSampler().start()
    flare.init()
    while flare.is_running():
        flare.receive(into=model.state_dict())
        loss = train(model, features, labels)
        metrics = {
            "loss": loss,
            "accuracy": evaluate(model, test_features, test_labels),
            "peak_rss_mib": sampler.peak_above_baseline_mib,
        }
        meta = {"sample_count": len(labels)}
        flare.send(flare.FLModel(model.state_dict(), metrics=metrics, meta=meta))
    sampler.stop()


if __name__ == "__main__":
    main()
