"""ClientApp: receives the ArrayRecord, turns it into a new dict of torch tensors, reports."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from twbench.work import describe, report, wait_release

# When the SuperNode started this ClientApp process and it loaded the app (flwr and torch imported).
APP_LOADED = time.time()

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t_message = time.time()
    record = msg.content.array_records["arrays"]
    received = record.to_torch_state_dict()
    t1 = time.time()
    out_dir = str(context.run_config["out-dir"])
    types = sorted({type(t).__name__ for t in received.values()})
    report(
        out_dir,
        "receiver-done",
        t1=t1,
        t_message=t_message,
        t_app_loaded=APP_LOADED,
        tensors=describe(received),
        types=types,
    )
    wait_release(out_dir)
    return Message(content=RecordDict({"result": ConfigRecord({"ok": True})}), reply_to=msg)
