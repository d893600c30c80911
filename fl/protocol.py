"""The FL layer's messages: meta on state-dict transfers and small requests, all plain JSON.

    server -> client  transfer  {"fl": "task", task_id, task, round, total_rounds,
                                 params_type, meta}
    client -> server  transfer  {"fl": "result", task_id, params_type, metrics, meta
                                 [, partial]}   (transfer id "<task_id>/<site>/result")
    client -> server  request   {"fl": "hello", task_id, sent} |
                                {"fl": "heartbeat", task_id, sent} |
                                {"fl": "error", task_id, message}
    server -> client  request   {"fl": "stop", reason} | {"fl": "resend", task_id}

A hello's or heartbeat's `task_id` is the task the client is working on (received, result not
delivered yet) and `sent` the task whose result it last delivered with a committed verdict, as
long as no newer task has arrived (both null otherwise). The server answers a hello or a
heartbeat with {"fl": <kind>, job}, or with {"fl": "stop", reason, job} once the job is over.

STOP ends the job for the client: it stops waiting for tasks and its script exits 0; a receive
in progress is cancelled, a send in progress may still finish. RESEND asks the client to send its
result for `task_id` again (a server restarted after it took the result, and lost it): the client
answers {"fl": "resend", "ok": true} and sends it again in the background, with the same transfer
id and meta, when it still holds that result (it keeps the last one until the next task arrives);
{"fl": "resend", "ok": false} otherwise.

A relay (fl/relay.py) is a client to its upstream and a server to its sites. Its result for a
task is one partial sum over its sites: `partial` = {"weight": W, "weights": {name: w}, "sites":
[...]}, where each tensor of the transfer is the sum of its sites' weighted tensors (in F32 or
F64), W the weight (sample counts) each sum stands for and `weights` the tensors whose sum stands
for less (a site whose upload failed half way counts only for the tensors it completed). Its
hello and heartbeats carry "sites": the sites connected to it now, which the server turns to
directly when the relay dies mid-round.

Task ids name a task across server restarts (e.g. "job/round-3"): a restarted server sends the
same task again under the same id, so neither side may assume an id is new per server process.

Everything that arrives is checked here; a malformed message is a ProtocolViolation naming the
field, which the receiver turns into a rejected transfer or a failed request, never a crash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fl.model import FLModel, ParamsType

TASK, RESULT, HELLO, HEARTBEAT, ERROR, STOP, RESEND = (
    "task",
    "result",
    "hello",
    "heartbeat",
    "error",
    "stop",
    "resend",
)


class ProtocolViolation(ValueError):
    """A peer sent an FL message that does not have the expected shape."""


@dataclass(frozen=True)
class TaskInfo:
    """What a task transfer says about the model it carries."""

    task_id: str
    task: str
    round: int | None
    total_rounds: int | None
    params_type: ParamsType
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PartialSum:
    """What a relay's result stands for: its tensors are sums of its sites' weighted tensors."""

    weight: float  # the sites' total weight (sample counts): what each tensor's sum stands for
    weights: dict[str, float] = field(default_factory=dict)  # the tensors that stand for less
    sites: tuple[str, ...] = ()

    def weight_of(self, name: str) -> float:
        return self.weights.get(name, self.weight)

    def to_json(self) -> dict[str, Any]:
        return {"weight": self.weight, "weights": self.weights, "sites": list(self.sites)}


@dataclass(frozen=True)
class ResultInfo:
    """What a result transfer says about the update it carries."""

    task_id: str
    params_type: ParamsType
    metrics: dict[str, float]
    meta: dict[str, Any]
    partial: PartialSum | None = None


def task_meta(task_id: str, task: str, model: FLModel) -> dict[str, Any]:
    return {
        "fl": TASK,
        "task_id": task_id,
        "task": task,
        "round": model.current_round,
        "total_rounds": model.total_rounds,
        "params_type": model.params_type.value,
        "meta": json_checked(model.meta, "meta"),
    }


def result_meta(task_id: str, model: FLModel, partial: PartialSum | None = None) -> dict[str, Any]:
    meta = {
        "fl": RESULT,
        "task_id": task_id,
        "params_type": model.params_type.value,
        "metrics": json_checked(model.metrics, "metrics"),
        "meta": json_checked(model.meta, "meta"),
    }
    if partial is not None:
        meta["partial"] = partial.to_json()
    return meta


def result_transfer_id(task_id: str, site: str) -> str:
    """The transfer id of a site's result for a task: the same on every (re-)send of it, so a
    server that already committed it is not sent it twice, and an interrupted one resumes."""
    return f"{task_id}/{site}/result"


def heartbeat(task_id: str | None, sent: str | None) -> dict[str, Any]:
    """A client's heartbeat: its open task and the task whose result it last delivered."""
    return {"fl": HEARTBEAT, "task_id": task_id, "sent": sent}


def resend_task_id(request: Mapping[str, Any]) -> str:
    """The task id of a RESEND request, checked."""
    _expect_kind(request, RESEND)
    return _string(request, "task_id")


def json_checked(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`value` as a plain dict, refused early (here, not on the wire) if JSON cannot carry it."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"FLModel.{what} must be JSON-able: {error}") from None
    return dict(value)


def kind_of(message: Mapping[str, Any]) -> str:
    kind = message.get("fl")
    return kind if isinstance(kind, str) else ""


def parse_task(meta: Mapping[str, Any]) -> TaskInfo:
    """A task transfer's meta, checked."""
    _expect_kind(meta, TASK)
    return TaskInfo(
        task_id=_string(meta, "task_id"),
        task=_string(meta, "task"),
        round=_optional_int(meta, "round"),
        total_rounds=_optional_int(meta, "total_rounds"),
        params_type=_params_type(meta),
        meta=_mapping(meta, "meta"),
    )


def parse_result(meta: Mapping[str, Any]) -> ResultInfo:
    """A result transfer's meta, checked (metrics must be numbers)."""
    _expect_kind(meta, RESULT)
    metrics = _mapping(meta, "metrics")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolViolation(f"result metric {name!r} is {value!r}, not a number")
    return ResultInfo(
        task_id=_string(meta, "task_id"),
        params_type=_params_type(meta),
        metrics={name: float(value) for name, value in metrics.items()},
        meta=_mapping(meta, "meta"),
        partial=_partial(meta.get("partial")),
    )


def _partial(value: Any) -> PartialSum | None:
    """A relay's `partial` field, checked: numbers that are weights, names that are strings."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ProtocolViolation(f"field 'partial' must be an object, got {type(value).__name__}")
    weights = _mapping(value, "weights")
    for name, weight in [("weight", value.get("weight")), *weights.items()]:
        if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise ProtocolViolation(f"partial weight of {name!r} is {weight!r}, not a weight")
    sites = value.get("sites", [])
    if not isinstance(sites, list) or not all(isinstance(site, str) for site in sites):
        raise ProtocolViolation("field 'partial.sites' must be a list of site names")
    if not value["weight"] > 0:
        raise ProtocolViolation("a partial sum must stand for a positive weight")
    return PartialSum(
        float(value["weight"]),
        {str(name): float(weight) for name, weight in weights.items()},
        tuple(sites),
    )


def sites_of(message: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The `sites` a relay's hello or heartbeat lists (None: not a relay), checked."""
    sites = message.get("sites")
    if sites is None:
        return None
    if not isinstance(sites, list) or not all(isinstance(s, str) and s for s in sites):
        raise ProtocolViolation("field 'sites' must be a list of site names")
    return tuple(sites)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _expect_kind(meta: Mapping[str, Any], kind: str) -> None:
    if kind_of(meta) != kind:
        raise ProtocolViolation(f"expected an FL {kind!r} message, got fl={meta.get('fl')!r}")


def _string(meta: Mapping[str, Any], key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ProtocolViolation(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _optional_int(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolViolation(f"field {key!r} must be an integer, got {value!r}")
    return value


def _mapping(meta: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = meta.get(key, {})
    if not isinstance(value, Mapping):
        raise ProtocolViolation(f"field {key!r} must be an object, got {type(value).__name__}")
    return dict(value)


def _params_type(meta: Mapping[str, Any]) -> ParamsType:
    try:
        return ParamsType.parse(meta.get("params_type"))
    except ValueError as error:
        raise ProtocolViolation(str(error)) from None
