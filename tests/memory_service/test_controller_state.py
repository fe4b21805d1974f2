"""The controller's persisted state: a faithful round trip, and stored bytes it cannot read refused by name."""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest

from memory_service.auth import TlsFiles
from memory_service.controller import ControllerOptions, Shard, _saved_tokens
from memory_service.controller_state import ControllerState, StateError, shard_record


def _shard(index: int) -> Shard:
    return Shard(index=index, address=f"127.0.0.1:{5000 + index}", local_address="", node="n" * 56,
                 hostname="memory-0", reserved_bytes=1 << 20, actor_name=f"c.shard-{index}.0123abcd",
                 actor=object(), stub=object(), channel=object(), group=index // 2, primary=index % 2 == 0)


def _state() -> ControllerState:
    options = ControllerOptions(data_token="d" * 20, admin_token="a" * 20, tls=TlsFiles("c.pem", "k.pem", "ca.pem"),
                                host="127.0.0.1", data_root="/data")
    return ControllerState(options=dataclasses.asdict(options), tokens=["d" * 20, "a" * 20],
                           replaced_tokens=["D" * 20, "A" * 20], replaced_until=time.time() + 30,
                           directory="127.0.0.1:4321", epoch=7,
                           tables=[{"spec": {"name": "t", "rows": 10}, "epoch": 7, "owners": [0, 1, 1]}],
                           shards=[shard_record(_shard(0)), shard_record(_shard(1))], replicas=2, next_index=4,
                           lost=[shard_record(_shard(2))], last_checkpoint="runs/step_000002",
                           failovers=[{"shard": 2, "group": 1, "was": "primary", "at": 1.5e9, "promoted": None}])


def test_state_round_trips_and_options_come_back_whole():
    state = _state()
    again = ControllerState.from_json(state.to_json())
    assert again == state
    options = ControllerOptions.from_dict(again.options)
    assert options.tls == TlsFiles("c.pem", "k.pem", "ca.pem") and options.data_root == "/data"
    assert ControllerOptions.from_dict(dataclasses.asdict(ControllerOptions())) == ControllerOptions()


def test_a_shard_record_holds_every_field_but_the_live_objects():
    record = shard_record(_shard(1))
    assert set(record) == {f.name for f in dataclasses.fields(Shard)} - {"actor", "stub", "channel"}
    assert record["primary"] is False and record["group"] == 0 and record["actor_name"] == "c.shard-1.0123abcd"
    json.dumps(record)  # JSON-ready


def test_tokens_replaced_by_a_rotation_keep_their_grace_period_across_a_restart():
    state = ControllerState.from_json(_state().to_json())
    tokens = _saved_tokens(state)
    assert (tokens.data, tokens.admin) == ("d" * 20, "a" * 20)
    assert tokens.right_of(f"Bearer {'D' * 20}") == "data" and tokens.right_of(f"Bearer {'A' * 20}") == "admin"
    (replaced, grace_s), = [tokens.in_grace()]
    assert replaced == ("D" * 20, "A" * 20) and 25 < grace_s <= 30
    expired = _saved_tokens(dataclasses.replace(state, replaced_until=time.time() - 1))
    assert expired.in_grace() is None and expired.right_of(f"Bearer {'D' * 20}") is None
    assert _saved_tokens(dataclasses.replace(state, replaced_tokens=[], replaced_until=0.0)).in_grace() is None


def _stored(**changes: Any) -> bytes:
    fields = json.loads(_state().to_json())
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


@pytest.mark.parametrize("data, message", [
    (b"\xff\x00", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (_stored(version=2), "format version 2, this code reads 1"),
    (_stored(version=None), "format version None"),
    (_stored(epoch=None), "fields missing ['epoch'], unknown []"),
    (_stored(shard_count=3), "fields missing [], unknown ['shard_count']"),
])
def test_unreadable_state_is_refused_naming_what_is_wrong(data, message):
    with pytest.raises(StateError, match=r"^state of c: .*") as error:
        ControllerState.from_json(data, "state of c")
    assert message in str(error.value)
