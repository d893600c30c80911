"""The owner rule of the receiver registry: a transfer belongs to the identity that opened it.

Whatever another identity opens, resumes or re-offers under the same transfer id, it reaches a
transfer of its own (never the owner's held chunks, streams or verdict), and the owner's own
transfer of that id goes on (or is re-offered) exactly as if the other had never spoken."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.exceptions import ConnectionClosedError
from transport.transfer import (
    DUPLICATE,
    JOINED,
    NEW,
    REFUSED,
    IncomingRegistry,
    StreamKey,
    TransferState,
)

TID = "round-7/site-1/result"
VICTIM, ATTACKER = "cert:site-1", "cert:site-2"


def header(attempt: int = 0, manifest: object = None, tid: str = TID) -> dict[str, object]:
    return {
        "kind": "state_dict",
        "transfer": tid,
        "attempt": attempt,
        "stripes": 1,
        "manifest": manifest if manifest is not None else {"n": 4},
    }


def victim_with(registry: IncomingRegistry, stage: str) -> None:
    """The victim's transfer of TID at `stage`: none, running (2 chunks held), lost (its
    connection dropped, waiting for the sender), committed."""
    if stage == "none":
        return
    opened = registry.on_open(("victim-1", 1), header(), 0.0, VICTIM)
    assert opened.action == NEW
    assert opened.transfer is not None
    transfer = opened.transfer
    transfer.take()
    for index in (0, 1):
        transfer.on_data(("victim-1", 1), index, 100 + index)
    if stage == "lost":
        registry.connection_lost("victim-1", 1.0, ConnectionClosedError("cut"), said_goodbye=False)
    if stage == "committed":
        transfer.on_data(("victim-1", 1), 2, 102)
        transfer.on_data(("victim-1", 1), 3, 103)
        transfer.on_end(("victim-1", 1), {})
        transfer.commit()
        registry.finished(transfer)


@pytest.mark.parametrize("stage", ["none", "running", "lost", "committed"])
@pytest.mark.parametrize(
    "attack", [header(), header(attempt=1), header(attempt=9), header(manifest={"n": 5})]
)
def test_another_identity_reusing_the_id_gets_a_transfer_of_its_own(
    stage: str, attack: dict[str, object]
) -> None:
    registry = IncomingRegistry()
    victim_with(registry, stage)
    opened = registry.on_open(("attacker", 1), attack, 2.0, ATTACKER)
    # A new, empty transfer owned by the attacker: no "all held", no held ranges, no join.
    assert opened.action == NEW
    assert opened.transfer is not None
    assert opened.transfer.owner == ATTACKER
    assert opened.transfer.received == {}
    assert opened.held_chunks == 0
    assert opened.transfer.resume_point() == {"held": []}
    # The victim's transfer is untouched and resumes (or is re-offered) as before.
    resumed = registry.on_open(("victim-2", 1), header(attempt=1), 3.0, VICTIM)
    if stage == "committed":
        assert resumed.action == DUPLICATE
        assert resumed.held_chunks == 4
    elif stage == "none":
        assert resumed.action == NEW
        assert resumed.transfer is not opened.transfer
    else:
        assert resumed.action == JOINED
        assert resumed.transfer is not None
        assert resumed.transfer.owner == VICTIM
        assert resumed.transfer.resume_point() == {"held": [[0, 2]]}
    assert registry.route(("attacker", 1)) is opened.transfer


def test_pre_emption_does_not_block_or_merge_the_owners_transfer() -> None:
    registry = IncomingRegistry()
    first = registry.on_open(("attacker", 1), header(), 0.0, ATTACKER)
    assert first.transfer is not None
    first.transfer.take()
    first.transfer.on_data(("attacker", 1), 0, 666)
    honest = registry.on_open(("victim", 1), header(), 1.0, VICTIM)
    assert honest.action == NEW
    assert honest.transfer is not None
    assert honest.transfer.received == {}
    assert honest.transfer.state is TransferState.ANNOUNCED
    honest.transfer.take()
    for index in range(4):
        assert honest.transfer.on_data(("victim", 1), index, 100 + index).value == "new"
    assert first.transfer.received == {0: 666}


# One step: (who, action) with action open attempt n / lose connection / finish (commit).
step = st.tuples(
    st.sampled_from([VICTIM, ATTACKER, "token:abc", "node:site-1"]),
    st.sampled_from(["open", "lose", "commit"]),
    st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40))
def test_a_stream_only_ever_reaches_its_own_identitys_transfer(
    steps: list[tuple[str, str, int]],
) -> None:
    registry = IncomingRegistry()
    owners: dict[StreamKey, str] = {}  # stream key -> the identity that opened it
    committed: dict[str, int] = {}  # identity -> chunk count of its committed TID
    for serial, (who, action, attempt) in enumerate(steps, 1):
        if action == "open":
            key = (f"{who}#{serial}", 1)
            opened = registry.on_open(key, header(attempt=attempt), float(serial), who)
            if opened.action == DUPLICATE:
                assert committed.get(who) == opened.held_chunks  # only its own verdict
            elif opened.action in (NEW, JOINED):
                assert opened.transfer is not None
                assert opened.transfer.owner == who
                assert all(owners[k] == who for k in opened.transfer.streams if k != key)
                owners[key] = who
                if opened.action == NEW:
                    opened.transfer.take()
                opened.transfer.on_data(key, attempt, hash((who, attempt)))
            else:
                assert opened.action == REFUSED
        elif action == "lose":
            for stream in [k for k, o in owners.items() if o == who]:
                registry.connection_lost(
                    stream[0], float(serial), ConnectionClosedError("cut"), said_goodbye=False
                )
        else:
            mine = [t for t in registry.transfers() if t.owner == who]
            for transfer in mine:
                if transfer.current:
                    transfer.on_end(next(iter(transfer.current)), {})
                if transfer.state is TransferState.VERIFYING:
                    transfer.commit()
                    committed[who] = len(transfer.received)
                    registry.finished(transfer)
        for transfer in registry.transfers():
            # Every chunk a transfer holds came from its owner.
            assert all(
                checksum == hash((transfer.owner, index))
                for index, checksum in transfer.received.items()
            )
            assert all(owners[k] == transfer.owner for k in transfer.streams)
