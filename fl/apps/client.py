"""The federated client of every application (`tensorwire demo --task ...` starts one per site).

An ordinary Client API script: receive the global tensors straight into the model's own (for
LoRA, the PEFT model's adapter tensors in place), train one round on this site's data, send the
same tensors back with the site's sample count as FedAvg's weight.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from fl import client as flare
from fl.apps import SIZES, TASKS, make_task
from fl.apps.common import AppTask
from fl.client import ClientSettings, FLClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--size", choices=SIZES, default="default")
    parser.add_argument("--site", type=int, required=True)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # several sites share the machine's cores
    task = make_task(args.task, args.size)
    task.sites = args.sites
    model = task.new_model()
    tensors = task.exchanged(model)  # views of the model: receiving fills the model itself
    meta = {"sample_count": task.sample_count(args.site)}
    flare.init()
    while flare.is_running():
        flare.receive(into=tensors)
        started = time.perf_counter()
        task.train_round(model, args.site)
        metrics = {"train_seconds": time.perf_counter() - started}
        flare.send(flare.FLModel(tensors, metrics=metrics, meta=meta))


async def run_site_async(task: AppTask, site: int, settings: ClientSettings) -> None:
    """The same loop on an event loop (the demo's in-process sites, for the tests): training
    runs in a thread so the server and the other sites on this loop keep moving."""
    model = task.new_model()
    tensors = task.exchanged(model)
    meta = {"sample_count": task.sample_count(site)}
    client = FLClient(settings)
    await client.start_async()
    try:
        while await client.is_running_async():
            await client.receive_async(into=tensors)
            await asyncio.to_thread(task.train_round, model, site)
            await client.send_async(flare.FLModel(tensors, meta=meta))
    finally:
        await client.close_async()


if __name__ == "__main__":
    main()
