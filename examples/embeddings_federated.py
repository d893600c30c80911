"""An MLP on a frozen Llama's embeddings: which library family a docstring is from.

See docs/applications.md. embeddings_centralized.py is an ordinary training script;
embeddings_federated.py is the same script as a federated client, five lines apart. `--site all`
trains on every site's data pooled (centralized), `--site K` on site K's alone (local-only):

    python examples/embeddings_centralized.py --site all
    tensorwire client --server tcp://HOST:8765 --site site-0 \
        --script examples/embeddings_federated.py -- --site 0

Run federated, the server decides how many rounds there are. Needs the llm extra.
"""

import argparse

from fl import client as flare
from fl.apps import make_task
from fl.apps.common import exchanged_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--site", default="all", help="a site number, or all")
    parser.add_argument("--size", default="default", help="default or tiny")
    args = parser.parse_args()
    task = make_task("embeddings", args.size)
    site = None if args.site == "all" else int(args.site)
    model = task.new_model()
    tensors = task.exchanged(model)  # the MLP's weights (the encoder is frozen and never travels)
    n = (
        sum(task.sample_count(s) for s in range(task.sites))
        if site is None
        else task.sample_count(site)
    )
    print(f"{n} samples; {exchanged_bytes(tensors):,} of {task.model_bytes(model):,} bytes train")
    flare.init()
    while flare.is_running():
        flare.receive(into=tensors)
        task.train_round(model, site)
        metrics = task.evaluate(model)
        print(f"site {args.site}: accuracy {metrics}")
        flare.send(flare.FLModel(tensors, metrics=metrics, meta={"sample_count": n}))


if __name__ == "__main__":
    main()
