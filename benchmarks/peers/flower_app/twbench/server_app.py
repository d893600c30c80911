"""ServerApp: builds the dict, then times Flower sending it to the one connected ClientApp."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from twbench.work import build_dict, describe, report, wait_release

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    count = int(context.run_config["count"])
    seed = int(context.run_config["seed"])
    out_dir = str(context.run_config["out-dir"])
    sd = build_dict(count, seed)
    tensors = describe(sd)
    deadline = time.time() + 120
    node_ids = list(grid.get_node_ids())
    while not node_ids and time.time() < deadline:
        time.sleep(0.2)
        node_ids = list(grid.get_node_ids())
    report(out_dir, "sender-ready", tensors=tensors)
    t0 = time.time()
    report(out_dir, "sender-start", t0=t0)
    # Flower's own way: the torch state dict becomes an ArrayRecord (each tensor serialised to
    # .npy bytes) and travels in a Message through the SuperLink to the SuperNode.
    record = ArrayRecord(sd)
    message = Message(
        content=RecordDict({"arrays": record}), dst_node_id=node_ids[0], message_type="train"
    )
    replies = list(grid.send_and_receive([message], timeout=3600))
    t_sent = time.time()
    ok = len(replies) == 1 and replies[0].has_content()
    error = "" if ok else str([r.error for r in replies])
    report(out_dir, "sender-sent", t0=t0, t_sent=t_sent, ok=ok, error=error)
    wait_release(out_dir)
