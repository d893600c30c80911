"""The client each `python -m benchmarks fl-memory` site runs (its own process, Client API).

    TENSORWIRE_SERVER=tcp://127.0.0.1:8765 TENSORWIRE_SITE=site-0 python -m benchmarks.fl_site 0

It trains nothing: it receives each round's global model, the first time into a new dict and
then in place into that same dict (one model in this process, whatever its dtype: float32,
bfloat16, float16), adds a small constant that depends only on the site (deterministic, cheap, in
place), and sends it back as a FULL update with a sample count. At the end it prints one JSON line
with the rounds it did and its own peak memory above its baseline (after imports).
"""

from __future__ import annotations

import argparse
import json

import torch

from fl import client as flare
from fl.rss import RssSampler

SAMPLES_PER_SITE = 1000


def delta_of(site: int) -> float:
    """What site `site` adds to every element each round (exact in bf16: a power of two)."""
    return 2.0 ** -(8 + site)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("site", type=int, help="this site's index (0, 1, ...)")
    args = parser.parse_args(argv)
    sampler = RssSampler().start()
    params: dict[str, torch.Tensor] | None = None
    rounds = 0
    flare.init()
    while flare.is_running():
        received = flare.receive(into=params)  # None: a new dict (the first round)
        assert isinstance(received.params, dict)
        params = received.params
        with torch.no_grad():
            for tensor in params.values():
                tensor.add_(delta_of(args.site))
        meta = {"sample_count": SAMPLES_PER_SITE * (args.site + 1)}
        flare.send(flare.FLModel(params, params_type=flare.ParamsType.FULL, meta=meta))
        rounds += 1
    sampler.stop()
    report = {
        "site": args.site,
        "rounds": rounds,
        "peak_rss_mib": round(sampler.peak_above_baseline_mib, 1),
        "peak_anon_mib": round(sampler.anon_peak_above_baseline_mib, 1),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
