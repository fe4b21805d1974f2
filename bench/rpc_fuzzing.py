"""A seeded, bounded fuzzer of every RPC of the memory service, shared by the CI test and the long run.

``tests/integration/test_memory_fuzz.py`` runs it briefly in ``make test``; ``python -m bench.fuzz``
runs it for longer (see that module). Both build one in-process shard server (three small tables:
``adam`` and ``sgd`` float32 tables owning half their slots, ``frozen`` a bfloat16 read-only table
owning all of them) and one directory server, each on its own asyncio loop thread, and send raw
bytes through a generic ``channel.unary_unary`` (no serializers), so every byte is the fuzzer's.

Every method of both services (enumerated from the proto descriptor: a new RPC is fuzzed without
a change here) gets five kinds of request (``KINDS``):

``random``      random bytes;
``truncated``   a prefix of a serialized hostile message;
``oversized``   more than the server's ``max_message_bytes``, garbage or a valid message padded
                with an unknown field;
``confused``    the bytes of another request type, or the message's fields sent with wrong wire types;
``hostile``     structurally valid messages built from the message descriptors with hypothesis
                strategies: boundary and huge integers, unknown enum values, table names and
                directories with ``../``, absolute paths and NUL bytes, row ids out of range, NaN and
                Inf gradients, mangled ``TableSpec`` JSON (deep nesting, absurd sizes), and slot exports
                of the real tables taken apart (structured mutation of real ``ImportSlots`` messages).

Each is sent with the admin token (most), the data token, a wrong token or none.

The verdict on each example (``FuzzTarget.check``):

* the status is one the case allows, never UNKNOWN, INTERNAL or a transport failure: a wrong or
  missing token UNAUTHENTICATED, the data token on an admin method PERMISSION_DENIED, more than
  ``max_message_bytes`` RESOURCE_EXHAUSTED, bytes that do not parse as the request type (tried
  here with the same protobuf) INVALID_ARGUMENT naming the message type, and a request that parses
  OK or a refusal (``SEMANTIC_CODES``);
* both servers still answer Health (SERVING) and a valid Lookup (and GetRouting) gets its rows;
* the shard's row stream (``memory_service.row_stream``) answers each Lookup case as gRPC did: the same status
  (a hello with a wrong or no token refused UNAUTHENTICATED, a frame over ``max_message_bytes`` closing the
  stream for RESOURCE_EXHAUSTED; the two may swap for a request with both) and, when answered, the same rows;
* the state did not change unless it legitimately could. The state is every table's
  ``ShardStore.checksum`` (rows and optimizer state of the owned slots), its owned slots, the table
  set and the routing epoch. A refused request (any non-OK status) and an OK answer of a method that
  only reads (``READ_ONLY_METHODS``) must leave it exactly as it was. An OK answer of a method that
  may change state (Update, AddTable, SetEpoch, FreezeSlots, ...) is legitimate whatever it did, so
  the shard is then rebuilt from scratch (``reset``) and the comparison starts again from the
  fresh state; a state change is therefore only ever compared across requests that could not make one;
* no file appeared outside the data root (the whole work folder, with the process's cwd inside it,
  every folder above it and /dev/shm are compared, the latter two for the names the fuzzer sends),
  and the data root holds only the files present at the start and those that successful Checkpoints
  reported.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import dataclasses
import functools
import json
import os
import threading
from pathlib import Path
import grpc
import numpy as np
from google.protobuf import descriptor as pb_descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st

from memory_service.auth import DATA_METHODS, AccessTokens
from memory_service.core.table_spec import OptimizerSpec, TableSpec
from memory_service.directory import DirectoryServicer
from memory_service.row_store import ShardStore
from memory_service.row_stream import RowStreamServer
from memory_service.server import UndecodableRequest, decoder, start_server
from memory_service.servicer import ShardServicer
from protos import engram_memory_v1_pb2 as pb
from protos.row_stream import BlockingRowStream
from protos.wire import (SHARED_SEGMENT_DIR, SHARED_SEGMENT_PREFIX, arrays_to_proto, bearer_metadata,
                         pending_to_arrays)

KINDS = ("random", "truncated", "oversized", "confused", "hostile")
FUZZ_MAX_MESSAGE_BYTES = 1 << 20  # small, so that oversized requests stay cheap
SERVICES = ("ShardService", "DirectoryService")

# Answers a request that parses may get; never UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, ...
SEMANTIC_CODES = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
                            "OUT_OF_RANGE", "ALREADY_EXISTS"})
# Methods whose OK answer must leave the tables, slots and epoch as they were.
READ_ONLY_METHODS = frozenset({"Lookup", "LookupState", "MapRows", "Stats", "Checksum", "ExportSlots", "Checkpoint",
                               "GetRouting", "ListTables"})

DATA_TOKEN = "fuzz-data-token-0123456789abcdef"
ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"
TOKENS = {"admin": ADMIN_TOKEN, "data": DATA_TOKEN, "wrong": "not-the-token-0123456789abcdef", "none": None}

NUM_SLOTS = 16
DIM = 8


def table_specs() -> list[tuple[TableSpec, list[int]]]:
    """The fuzzed shard's tables and the slots it owns of each."""
    half = list(range(NUM_SLOTS // 2))
    return [
        (TableSpec(name="adam", rows=1000, dim=DIM, optimizer=OptimizerSpec(kind="adam"), num_slots=NUM_SLOTS), half),
        (TableSpec(name="sgd", rows=1000, dim=DIM, optimizer=OptimizerSpec(kind="sgd"), num_slots=NUM_SLOTS), half),
        (TableSpec(name="frozen", rows=1000, dim=DIM, storage_dtype="bfloat16", num_slots=NUM_SLOTS),
         list(range(NUM_SLOTS))),
    ]


@dataclasses.dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type
    response: type

    @property
    def path(self) -> str:
        return f"/{pb.DESCRIPTOR.package}.{self.service}/{self.name}"

    @property
    def admin_only(self) -> bool:
        return self.path not in DATA_METHODS

    @property
    def label(self) -> str:
        return f"{self.service}/{self.name}"


METHODS = [Method(service, m.name, getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
           for service in SERVICES for m in pb.DESCRIPTOR.services_by_name[service].methods]
REQUEST_TYPES = sorted({m.request for m in METHODS}, key=lambda cls: cls.DESCRIPTOR.name)


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzzed call: ``payload`` sent to ``method`` with the token named ``token``."""

    method: Method
    kind: str
    payload: bytes
    token: str

    def __repr__(self) -> str:  # hypothesis prints the falsifying example with this
        shown = self.payload if len(self.payload) <= 300 else self.payload[:300] + b"..."
        return f"Case({self.method.label}, {self.kind}, token={self.token}, {len(self.payload)} bytes: {shown!r})"


@dataclasses.dataclass
class Outcome:
    code: str
    details: str
    response: bytes | None


# ---- strategies ------------------------------------------------------------------------------

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)

TABLE_NAMES = ["adam", "sgd", "frozen", "", "nope", "ADAM", "adam ", "../adam", "..", ".", "/etc/passwd",
               "a\x00b", "adam/../sgd", "x" * 300, "é", "\u202e", "adam\n", "-", "state.rows"]
FOLDER_NAMES = ["ckpt", "fresh", "ckpt/adam", "", ".", "..", "../", "../outside", "../outside/new",
                "../../escape-fuzz", "/tmp/escape-fuzz", "/", "/etc", "a\x00b", "~", "$HOME", "ckpt/../../outside",
                "link-out", "link-out/new", "x" * 300, "./nested/deeper", "ckpt/adam/shard-0000.npz"]
FILE_NAMES = ["adam/shard-0000.npz", "sgd/shard-0000.npz", "frozen/shard-0000.npz", "bad.npz", "pickle.npz",
              "manifest.json", "", ".", "..", "../../outside/keep.txt", "/etc/passwd", "adam", "a\x00b",
              "adam/../adam/shard-0000.npz", "link-out/keep.txt", "missing.npz"]
ARRAY_NAMES = ["slots", "rows", "state.exp_avg", "state.exp_avg_sq", "state.step", "state.sum", "pending.0.header",
               "pending.0.ranks", "pending.0.0.rank", "pending.0.0.row_ids", "pending.0.0.grads", "pending.",
               "pending.x.y", "pending.0", "applied.synchronous.lane", "applied.synchronous.step",
               "applied.synchronous.world_size", "applied.synchronous.rank", "applied.synchronous.row_count",
               "applied.synchronous.row_ids", "applied.asynchronous.row_ids", "", "unknown"]
NUMPY_DTYPES = ["<f4", "float32", "<i8", "int64", "<u2", "uint16", ">f8", "f2", "|b1", "O", "V0", "V3", "<U3",
                "S0", "M8", "", "garbage", "<f4\x00", "(2,)i4", "[('a','<i4')]", "int"]
SEGMENT_NAMES = ["", "engram-rows-absent", "engram-rows-../../etc/passwd", "../engram-rows-x", "passwd",
                 "engram-rows-", "engram-rows-x\x00"]  # plus the real segment, added by the target
FLOATS = [0.0, -0.0, 1e-3, -1.0, 1e38, -3.4e38, float("nan"), float("inf"), float("-inf"), 1e-45]

# The strategies map through named functions (with functools.partial for what they close over), never lambdas:
# Hypothesis describes a lambda by parsing its source, and on CPython 3.11 that parse has failed in
# make test-floors, once with a SystemError (gh-106905) and once on a lambda continued on a second line
# ("unmatched ')'"), which made the draws of two runs differ (FlakyStrategyDefinition).

def ints(bounds: tuple[int, int], small: tuple[int, int] = (-3, 1100)) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = [low, high, low + 1, high - 1, 0, -1, 1, NUM_SLOTS, NUM_SLOTS - 1, 1000, 999]
    return st.one_of(st.integers(max(low, small[0]), min(high, small[1])),
                     st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high))


def int64_bytes(values: st.SearchStrategy[int] = ints(INT64), max_size: int = 12) -> st.SearchStrategy[bytes]:
    arrays = st.lists(values, max_size=max_size).map(_int64_array_bytes)
    return st.one_of(arrays, st.binary(max_size=40))


def float_bytes(dtype: str = "<f4") -> st.SearchStrategy[bytes]:
    """``n * DIM`` floats for n in 0..4 (the size a grad of n rows needs), mostly tame, some hostile."""
    value = st.one_of(st.floats(-1, 1, width=32), st.sampled_from(FLOATS))
    arrays = st.integers(0, 4).flatmap(functools.partial(_rows_of, value)).map(
        functools.partial(_float_array_bytes, dtype))
    return st.one_of(arrays, st.binary(max_size=64))


def _int64_array_bytes(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i8").tobytes()


def _rows_of(value: st.SearchStrategy[float], rows: int) -> st.SearchStrategy[list[float]]:
    return st.lists(value, min_size=rows * DIM, max_size=rows * DIM)


def _float_array(values, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):  # 1e38 as float16 is meant to be inf
        return np.asarray(values, dtype=dtype)


def _float_array_bytes(dtype: str, values: list[float]) -> bytes:
    return _float_array(values, dtype).tobytes()


def spec_json() -> st.SearchStrategy[str]:
    """TableSpec JSON mostly near-valid with hostile fields; sizes are tiny or absurd (over a terabyte,
    never in between, so a fuzzed table never fills the machine's memory)."""
    huge = [2**62, 2**63 - 1, 2**64, 10**30, 10**40]
    fields = {
        "name": st.one_of(st.sampled_from(["fuzzed", "fuzzed.2", "f" * 64]), st.sampled_from(TABLE_NAMES + ["f" * 65])),
        "rows": st.sampled_from([1, 7, 100, 1000, 0, -1, 1.5, "100", None, True, float("nan"), *huge]),
        "dim": st.sampled_from([1, 8, 64, 0, -3, 8.0, "8", None, *huge]),
        "num_slots": st.sampled_from([1, 16, 1024, 0, -1, 2.0, *huge]),
        "storage_dtype": st.sampled_from(["float32", "bfloat16", "float16", "", None, 3]),
        "optimizer": st.one_of(st.fixed_dictionaries({}, optional={
            "kind": st.sampled_from(["sgd", "adam", "adagrad", "lion", "", None]),
            "lr": st.sampled_from([1e-3, 0.0, -1.0, float("nan"), float("inf"), "0.1", 1e308]),
            "beta1": st.sampled_from([0.9, 1.0, -0.1, float("nan")]),
            "eps": st.sampled_from([1e-8, 0.0, -1e-8]),
            "decoupled_weight_decay": st.sampled_from([False, True, "yes", 1]),
            "bogus": st.just(1)}), st.sampled_from([None, [], "adam", 7])),
        "init_std": st.sampled_from([0.02, -1.0, float("nan"), float("inf"), 1e308]),
        "seed": st.sampled_from([0, 1, -1, 2**63, 2**64, 1.0]),
        "bogus": st.just("x"),
    }
    near_valid = st.fixed_dictionaries({"name": fields["name"], "rows": fields["rows"], "dim": fields["dim"]},
                                       optional={k: v for k, v in fields.items() if k not in ("name", "rows", "dim")})
    valid = st.builds(_valid_spec, st.sampled_from(["fuzzed", "adam"]), st.sampled_from(["sgd", "adam", "adagrad"]))
    as_json = st.one_of(near_valid, valid).map(json.dumps)
    weird = st.sampled_from(["", "{", "null", "[]", "7", '"adam"', "NaN", "[" * 100_000, '{"a":' * 50_000,
                             '{"name": "x", "name": "y"}', "\x00", '{"rows": 1e999}'])
    return st.one_of(as_json, weird, st.text(max_size=40))


def _valid_spec(name: str, kind: str) -> dict:
    return {"name": name, "rows": 1000, "dim": DIM, "num_slots": NUM_SLOTS, "optimizer": {"kind": kind}}


def _segment_names(target: "FuzzTarget | None") -> st.SearchStrategy[str]:
    names = SEGMENT_NAMES + ([target.segment_name] * 4 if target else [])
    return st.one_of(st.sampled_from(names), st.text(max_size=20))


def named_array() -> st.SearchStrategy[pb.NamedArray]:
    return st.builds(
        pb.NamedArray,
        name=st.one_of(st.sampled_from(ARRAY_NAMES), st.text(max_size=12)),
        dtype=st.one_of(st.sampled_from(NUMPY_DTYPES), st.text(max_size=6)),
        shape=st.lists(st.one_of(st.integers(-2, 8), st.sampled_from([2**31, 2**62, -(2**63), 2**63 - 1])), max_size=3),
        data=st.one_of(int64_bytes(ints(INT64, (-2, 20))), float_bytes(), st.binary(max_size=64)))


def real_export(table: str, slots: list[int]) -> dict[str, np.ndarray]:
    """What ``ExportSlots`` of ``slots`` (owned by no one on the fuzzed shard) would carry."""
    spec = {s.name: s for s, _ in table_specs()}[table]
    store = ShardStore()
    store.add_table(spec, range(NUM_SLOTS))
    return store.export_slots(table, slots)


@st.composite
def mutated_import(draw) -> pb.ImportSlotsRequest:
    """A real slot export of an unowned slot, taken apart: arrays dropped, renamed, retyped, reshaped,
    truncated or joined by pending/applied entries (structured mutation of a real message)."""
    table = draw(st.sampled_from(["adam", "sgd", "frozen"]))
    slots = draw(st.lists(st.integers(NUM_SLOTS // 2, NUM_SLOTS - 1), min_size=1, max_size=2, unique=True))
    arrays = arrays_to_proto(real_export(table, slots))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "rename", "dtype", "shape", "truncate", "add", "nan", "slots",
                                       "pending", "applied", "applied"]))
        index = draw(st.integers(0, max(0, len(arrays) - 1)))
        if not arrays:
            action = "add"
        if action == "drop":
            del arrays[index]
        elif action == "rename":
            arrays[index].name = draw(st.sampled_from(ARRAY_NAMES))
        elif action == "dtype":
            arrays[index].dtype = draw(st.sampled_from(NUMPY_DTYPES))
        elif action == "shape":
            arrays[index].shape[:] = draw(st.lists(st.integers(-2, 2000), max_size=3))
        elif action == "truncate":
            arrays[index].data = arrays[index].data[:draw(st.integers(0, len(arrays[index].data)))]
        elif action == "add":
            arrays.append(draw(named_array()))
        elif action == "nan" and arrays[index].dtype == "<f4" and len(arrays[index].data) % 4 == 0 \
                and arrays[index].data:
            values = np.frombuffer(arrays[index].data, dtype="<f4").copy()
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
            arrays[index].data = values.tobytes()
        elif action == "pending":  # a pending synchronous step, well formed or not
            record = {"step": draw(ints(INT64, (-2, 20))), "world_size": draw(ints(INT64, (-1, 4))),
                      "ranks": draw(st.lists(st.integers(-1, 4), max_size=3)), "parts": [
                          {"rank": draw(st.integers(-1, 4)), "row_ids": np.asarray(ids, np.int64),
                           "grads": _float_array(draw(st.lists(st.sampled_from(FLOATS), min_size=len(ids) * DIM,
                                                               max_size=len(ids) * DIM)), np.float32).reshape(-1, DIM)}
                          for ids in draw(st.lists(st.lists(ints(INT64, (-1, 1100)), max_size=3), max_size=2))]}
            arrays += arrays_to_proto(pending_to_arrays([record]))
        elif action == "applied":  # the memory of applied pushes, whole or with columns missing or uneven
            prefix = draw(st.sampled_from(["applied.synchronous.", "applied.asynchronous."]))
            count = draw(st.integers(0, 3))
            for column in draw(st.sets(st.sampled_from(["lane", "step", "world_size", "rank", "row_count", "row_ids"]),
                                       min_size=4)):
                values = draw(st.lists(ints(INT64, (-2, 1100)), min_size=count, max_size=count + 1))
                arrays.append(pb.NamedArray(name=prefix + column, dtype="<i8", shape=[len(values)],
                                            data=np.asarray(values, "<i8").tobytes()))
        elif action == "slots":
            arrays.append(pb.NamedArray(name="slots", dtype="<i8", shape=[1],
                                        data=np.asarray([draw(ints(INT64))], dtype="<i8").tobytes()))
    return pb.ImportSlotsRequest(table=draw(st.sampled_from([table, table, "adam", "nope"])), arrays=arrays)


def _scalar(field: pb_descriptor.FieldDescriptor, target: "FuzzTarget | None") -> st.SearchStrategy:
    """Values for one scalar field, by type and, where it helps reach deeper code, by name."""
    T = pb_descriptor.FieldDescriptor
    name, kind = field.name, field.type
    if kind == T.TYPE_STRING:
        if name in ("table",) or (name == "name" and field.containing_type.name != "SharedRows"):
            return st.one_of(st.sampled_from(TABLE_NAMES), st.text(max_size=12))
        if name == "name":
            return _segment_names(target)
        if name == "directory":
            return st.one_of(st.sampled_from(FOLDER_NAMES), st.text(max_size=12))
        if name == "paths":
            return st.one_of(st.sampled_from(FILE_NAMES), st.text(max_size=12))
        if name == "spec_json":
            return spec_json()
        if name == "dtype":
            return st.one_of(st.sampled_from(NUMPY_DTYPES), st.text(max_size=6))
        return st.text(max_size=30)
    if kind == T.TYPE_BYTES:
        if name in ("row_ids", "positions"):
            return int64_bytes(ints(INT64, (-3, 1100)))
        if name == "grads":
            return st.one_of(float_bytes("<f4"), float_bytes("<f2"), st.binary(max_size=64))
        return st.binary(max_size=64)
    if kind == T.TYPE_BOOL:
        return st.booleans()
    if kind == T.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), ints(INT32, (-3, 10)))
    if kind in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        return st.one_of(st.sampled_from(FLOATS), st.floats(width=32 if kind == T.TYPE_FLOAT else 64))
    if kind in (T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32):
        return ints(INT32, (-3, 20) if name in ("slots", "rank", "world_size", "shard_index") else (-3, 1100))
    if kind in (T.TYPE_UINT32, T.TYPE_FIXED32):
        return ints((0, 2**32 - 1))
    if kind in (T.TYPE_UINT64, T.TYPE_FIXED64):
        return ints(UINT64)
    return ints(INT64, (-3, 20) if name in ("step", "epoch", "offset") else (-3, 1100))


def _repeated(field: pb_descriptor.FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; older ones have only ``label``
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def message_strategy(descriptor, target: "FuzzTarget | None" = None, depth: int = 0) -> st.SearchStrategy:
    """Structurally valid messages of ``descriptor``'s type with hostile values in every field."""
    cls = getattr(pb, descriptor.name)
    if descriptor.name == "NamedArray":
        return named_array()
    fields = {}
    for field in descriptor.fields:
        if field.type == field.TYPE_MESSAGE:
            value = message_strategy(field.message_type, target, depth + 1) if depth < 2 else st.nothing()
        else:
            value = _scalar(field, target)
        if _repeated(field):
            value = st.lists(value, max_size=6)
        fields[field.name] = value
    built = st.fixed_dictionaries({}, optional=fields).map(functools.partial(_message_from_fields, cls))
    if descriptor.name == "ImportSlotsRequest":
        return st.one_of(built, mutated_import())
    return built


def _message_from_fields(cls: type, values: dict):
    return cls(**values)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_WIRE_TYPE = {pb_descriptor.FieldDescriptor.TYPE_DOUBLE: 1, pb_descriptor.FieldDescriptor.TYPE_FLOAT: 5,
              pb_descriptor.FieldDescriptor.TYPE_FIXED64: 1, pb_descriptor.FieldDescriptor.TYPE_SFIXED64: 1,
              pb_descriptor.FieldDescriptor.TYPE_FIXED32: 5, pb_descriptor.FieldDescriptor.TYPE_SFIXED32: 5,
              pb_descriptor.FieldDescriptor.TYPE_STRING: 2, pb_descriptor.FieldDescriptor.TYPE_BYTES: 2,
              pb_descriptor.FieldDescriptor.TYPE_MESSAGE: 2}


@st.composite
def wrong_wire_types(draw, request: type) -> bytes:
    """The request's fields (and a few unknown ones) each encoded with a wire type, mostly the wrong one."""
    numbers = [f.number for f in request.DESCRIPTOR.fields] + [draw(st.integers(1, 2**29 - 1))]
    wire = {f.number: _WIRE_TYPE.get(f.type, 0) for f in request.DESCRIPTOR.fields}
    out = bytearray()
    for number in draw(st.lists(st.sampled_from(numbers), min_size=1, max_size=6)):
        wire_type = draw(st.sampled_from([t for t in (0, 1, 2, 3, 4, 5, 6, 7) if t != wire.get(number)] * 3
                                         + [wire.get(number, 0)]))
        out += _varint(number << 3 | wire_type)
        if wire_type == 0:
            out += _varint(draw(ints(UINT64)))
        elif wire_type == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 2:
            body = draw(st.binary(max_size=24))
            out += _varint(draw(st.sampled_from([len(body)] * 4 + [len(body) + 5, 2**31, 2**63]))) + body
        elif wire_type == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire_type == 3:  # a group start, with or without its end
            out += draw(st.sampled_from([b"", _varint(number << 3 | 4)]))
    return bytes(out)


def case_strategy(method: Method, kind: str, target: "FuzzTarget | None" = None) -> st.SearchStrategy[Case]:
    """Cases of ``kind`` for ``method``."""
    hostile = message_strategy(method.request.DESCRIPTOR, target).map(_serialized)
    if kind == "random":
        payload = st.binary(max_size=512)
    elif kind == "truncated":
        # with an unknown field after it, so that a message without fields has bytes to cut too
        whole = st.builds(_joined, hostile, st.one_of(st.just(b""), st.binary(max_size=16).map(_unknown_field)))
        payload = st.builds(_cut, whole, st.floats(0, 1, exclude_max=True))
    elif kind == "oversized":
        limit = target.max_message_bytes if target else FUZZ_MAX_MESSAGE_BYTES
        payload = st.builds(_oversized, hostile, st.integers(limit + 1, limit + 64 * 1024), st.booleans(),
                            st.integers(0, 2**32))
    elif kind == "confused":
        others = st.sampled_from([cls for cls in REQUEST_TYPES if cls is not method.request]).flatmap(
            functools.partial(_messages_of_type, target)).map(_serialized)
        payload = st.one_of(others, wrong_wire_types(method.request))
    elif kind == "hostile":
        payload = hostile
    else:
        raise ValueError(f"kind: one of {KINDS}, got {kind!r}")
    tokens = st.sampled_from(["admin"] * 6 + ["data"] * 2 + ["wrong", "none"])
    return st.builds(functools.partial(Case, method, kind), payload, tokens)


def _serialized(message) -> bytes:
    return message.SerializeToString()


def _messages_of_type(target: "FuzzTarget | None", cls: type) -> st.SearchStrategy:
    return message_strategy(cls.DESCRIPTOR, target)


def _unknown_field(body: bytes) -> bytes:
    """``body`` as field 1000, length-delimited: a field no request of ours has."""
    return _varint(1000 << 3 | 2) + _varint(len(body)) + body


def _joined(message: bytes, extra: bytes) -> bytes:
    return (message + extra) or b"\x0a"


def _cut(whole: bytes, fraction: float) -> bytes:
    return whole[:int(len(whole) * fraction)]


def _oversized(message: bytes, size: int, garbage: bool, seed: int) -> bytes:
    """``size`` bytes: garbage, or ``message`` padded with an unknown length-delimited field 1000."""
    if garbage:
        return np.random.default_rng(seed).bytes(size)
    head = _varint(1000 << 3 | 2)
    pad = max(0, size - len(message) - len(head))
    return message + head + _varint(pad) + bytes(pad)


# ---- the target ------------------------------------------------------------------------------


def _decodes(cls, data: bytes) -> bool:
    """Whether the server's decoder parses ``data`` as ``cls`` (the same code, the same errors)."""
    return not isinstance(decoder(cls)(data), UndecodableRequest)


def allowed_codes(case: Case, max_message_bytes: int) -> tuple[frozenset[str], str | None]:
    """The status codes ``case`` may get, and a text the details must hold (None: any)."""
    auth = set()
    if case.token in ("wrong", "none"):
        auth = {"UNAUTHENTICATED"}
    elif case.token == "data" and case.method.admin_only:
        auth = {"PERMISSION_DENIED"}
    if len(case.payload) > max_message_bytes:
        return frozenset(auth | {"RESOURCE_EXHAUSTED"}), None
    if auth:
        return frozenset(auth), None
    if not _decodes(case.method.request, case.payload):
        return frozenset({"INVALID_ARGUMENT"}), case.method.request.DESCRIPTOR.full_name
    return SEMANTIC_CODES, None


class FuzzTarget:
    """The servers under fuzz, in this process, each on its own event loop thread; ``workdir`` holds
    the data root (``data``), a sibling folder that must stay untouched (``outside``) and the cwd."""

    def __init__(self, workdir: Path, max_message_bytes: int = FUZZ_MAX_MESSAGE_BYTES):
        self.workdir = Path(workdir).resolve()
        self.max_message_bytes = max_message_bytes
        self.data_root = self.workdir / "data"
        self.outside = self.workdir / "outside"
        self.cwd = self.workdir / "cwd"
        for folder in (self.data_root, self.outside, self.cwd):
            folder.mkdir(parents=True, exist_ok=True)
        (self.outside / "keep.txt").write_text("must stay as it is\n")
        (self.data_root / "link-out").symlink_to(self.outside, target_is_directory=True)
        self._plant_checkpoint()
        self.segment_name = f"{SHARED_SEGMENT_PREFIX}fuzz-{os.getpid()}-{id(self):x}"
        self.segment_path = Path(SHARED_SEGMENT_DIR) / self.segment_name
        self.segment_path.write_bytes(bytes(64 * 1024))
        atexit.register(self.segment_path.unlink, missing_ok=True)  # also when a run is cut short
        self.tokens = AccessTokens(DATA_TOKEN, ADMIN_TOKEN)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzz-servers")
        self.thread.start()
        self.resets = 0
        self.shard = self.shard_server = self.shard_channel = None
        self._start_shard()
        directory = DirectoryServicer(self._routing, self._tables)
        self.directory_server, address = self._run(start_server(
            directory.add_to_server, [f"{pb.DESCRIPTOR.package}.DirectoryService"], tokens=self.tokens,
            max_message_bytes=max_message_bytes))
        self.directory_channel = self._channel(address)
        self.allowed_files = self._data_files()  # the planted checkpoint; successful Checkpoints add theirs
        self.outside_before = self._tree(self.workdir, skip=self.data_root)
        self.above_before = self._above()
        self.stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.problems_found: list[str] = []

    # -- setup --

    def _plant_checkpoint(self) -> None:
        """A real checkpoint (``ckpt``) for Restore to read, with a corrupt and a pickled shard file."""
        from memory_service.checkpoint import write_shard_file

        folder = self.data_root / "ckpt"
        for spec, _ in table_specs():
            write_shard_file(folder, spec.name, 0, real_export(spec.name, list(range(NUM_SLOTS // 2, NUM_SLOTS))))
        (folder / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
        np.savez(folder / "pickle.npz", slots=np.asarray([object()], dtype=object))
        (folder / "manifest.json").write_text("{")

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def _channel(self, address: str) -> grpc.Channel:
        return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                       ("grpc.max_receive_message_length", 4 * self.max_message_bytes)])

    def _start_shard(self) -> None:
        self.shard = ShardServicer(0, max_message_bytes=self.max_message_bytes, data_root=self.data_root)
        for spec, slots in table_specs():
            self.shard.store.add_table(spec, slots)
        self.shard.epoch = 1
        self.shard_server, address = self._run(start_server(
            self.shard.add_to_server, [f"{pb.DESCRIPTOR.package}.ShardService"], tokens=self.tokens,
            max_message_bytes=self.max_message_bytes))
        self.shard.address = address
        self.shard_channel = self._channel(address)
        self.row_stream = RowStreamServer(self.shard, self.tokens)
        self.row_stream_address = self._run(self.row_stream.start("127.0.0.1"))
        self.initial_state = self.state()

    def reset(self) -> None:
        """A fresh shard with the initial tables (after a request that legitimately changed state)."""
        self.shard_channel.close()
        self._run(self.shard_server.stop(None))
        self._run(self.row_stream.stop())
        self.resets += 1
        self._start_shard()

    def close(self) -> None:
        for channel in (self.shard_channel, self.directory_channel):
            channel.close()
        for server in (self.shard_server, self.directory_server):
            self._run(server.stop(None))
        self._run(self.row_stream.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self.segment_path.unlink(missing_ok=True)

    def _routing(self) -> pb.Routing:
        shard = pb.ShardInfo(index=0, address=self.shard.address, hostname="fuzz")
        tables = [pb.TableRouting(name=spec.name, num_slots=spec.num_slots, rows=spec.rows, dim=spec.dim,
                                  owners=np.zeros(spec.num_slots, dtype="<i4").tobytes())
                  for spec in self.shard.store.specs()]
        return pb.Routing(epoch=self.shard.epoch, shards=[shard], tables=tables)

    def _tables(self) -> list[pb.TableSpecInfo]:
        return [pb.TableSpecInfo(name=s.name, rows=s.rows, dim=s.dim, num_slots=s.num_slots,
                                 storage_dtype=s.storage_dtype, spec_json=json.dumps(s.to_dict()))
                for s in self.shard.store.specs()]

    # -- observing --

    def call(self, method: Method, payload: bytes, token: str | None, timeout: float = 30) -> Outcome:
        channel = self.shard_channel if method.service == "ShardService" else self.directory_channel
        stub = channel.unary_unary(method.path, request_serializer=None, response_deserializer=None)
        metadata = bearer_metadata(TOKENS.get(token, token)) if TOKENS.get(token, token) else None
        try:
            return Outcome("OK", "", stub(payload, metadata=metadata, timeout=timeout))
        except grpc.RpcError as error:
            return Outcome(error.code().name, error.details() or "", None)

    def call_row_stream(self, payload: bytes, token: str | None) -> Outcome:
        """``payload`` as a Lookup on the shard's row stream, on a new connection; the response is the rows."""
        try:
            stream = BlockingRowStream(self.row_stream_address, TOKENS.get(token, token) or "")
        except ConnectionRefusedError as error:
            return Outcome("UNAUTHENTICATED", str(error), None)
        try:
            reply, rows = stream.lookup(payload)
        except ConnectionResetError as error:  # what a frame over the limit gets
            return Outcome("RESOURCE_EXHAUSTED" if len(payload) > self.max_message_bytes else "CLOSED", str(error),
                           None)
        finally:
            stream.close()
        return Outcome(reply.code or "OK", reply.message, rows if not reply.code else None)

    def row_stream_problems(self, case: Case, outcome: Outcome) -> list[str]:
        """How the row stream's answer to a Lookup case differs from gRPC's ``outcome``."""
        streamed = self.call_row_stream(case.payload, case.token)
        expected = {outcome.code}
        if outcome.code == "OK" and _names_shared_rows(case.payload):  # rows into shared memory: not on the stream
            expected = {"INVALID_ARGUMENT"}
        if len(case.payload) > self.max_message_bytes and outcome.code in ("UNAUTHENTICATED", "RESOURCE_EXHAUSTED"):
            expected = {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}  # gRPC looks at the size first, the stream at the hello
        if streamed.code not in expected:
            return [f"the row stream answered {streamed.code} ({streamed.details!r}), gRPC {outcome.code}"]
        if outcome.code == "OK" and streamed.response != pb.LookupResponse.FromString(outcome.response).rows:
            return ["the row stream's rows differ from gRPC's"]
        return []

    def state(self) -> dict:
        store = self.shard.store
        return {"epoch": self.shard.epoch,
                "tables": {spec.name: (store.checksum(spec.name), tuple(store.owned_slots(spec.name)))
                           for spec in store.specs()}}

    def liveness_problems(self) -> list[str]:
        problems = []
        for name, channel in (("shard", self.shard_channel), ("directory", self.directory_channel)):
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    problems.append(f"{name} health: {reply.status}")
            except grpc.RpcError as error:
                problems.append(f"{name} health: {error.code().name} {error.details()}")
        lookup = pb.LookupRequest(table="adam", row_ids=np.asarray([0, 1, 2], "<i8").tobytes(), dtype=pb.FLOAT32)
        outcome = self.call(METHODS_BY_LABEL["ShardService/Lookup"], lookup.SerializeToString(), "data")
        if outcome.code != "OK" or pb.LookupResponse.FromString(outcome.response).num_rows != 3:
            problems.append(f"valid Lookup: {outcome.code} {outcome.details}")
        outcome = self.call_row_stream(lookup.SerializeToString(), "data")
        if outcome.code != "OK" or len(outcome.response) != 3 * DIM * 4:
            problems.append(f"valid Lookup on the row stream: {outcome.code} {outcome.details}")
        outcome = self.call(METHODS_BY_LABEL["DirectoryService/GetRouting"], b"", "data")
        if outcome.code != "OK":
            problems.append(f"valid GetRouting: {outcome.code} {outcome.details}")
        return problems

    @staticmethod
    def _tree(root: Path, skip: Path | None = None) -> dict[str, tuple]:
        """Every path under ``root`` (not following links) with its size and mtime, ``skip`` left out."""
        found = {}
        for folder, dirs, files in os.walk(root):
            if skip is not None and Path(folder) == skip:
                dirs[:] = []
                continue
            for name in dirs + files:
                path = os.path.join(folder, name)
                info = os.lstat(path)
                found[path] = (info.st_size, info.st_mtime_ns) if name in files else ()
        return found

    def _above(self) -> dict[str, set[str]]:
        """The entries in every folder above the work folder that only the fuzzer's paths name (the
        ``escape-fuzz`` of ``../../escape-fuzz`` and ``/tmp/escape-fuzz``); other names there are
        other programs' business."""
        return {str(folder): {n for n in os.listdir(folder) if "escape-fuzz" in n}
                for folder in self.workdir.parents if os.access(folder, os.R_OK)}

    def _data_files(self) -> set[str]:
        return {p for p, info in self._tree(self.data_root).items() if info}

    def file_problems(self) -> list[str]:
        problems = []
        now = self._tree(self.workdir, skip=self.data_root)
        if now != self.outside_before:
            changed = sorted(set(now.items()) ^ set(self.outside_before.items()))
            problems.append(f"files outside the data root changed: {changed[:5]}")
        if self._above() != self.above_before:
            problems.append(f"files above the work folder appeared: {self._above()}")
        made = [name for name in SEGMENT_NAMES if name and "/" not in name and "\x00" not in name
                and os.path.lexists(os.path.join(SHARED_SEGMENT_DIR, name))]
        if made:
            problems.append(f"shared-memory segments the fuzzer named appeared: {made}")
        stray = self._data_files() - self.allowed_files
        if stray:
            problems.append(f"files in the data root no successful Checkpoint reported: {sorted(stray)[:5]}")
        return problems

    # -- the verdict on one case --

    def check(self, case: Case) -> Outcome:
        """Send ``case``; AssertionError listing what went wrong (after which the shard is rebuilt)."""
        before = self.state()
        outcome = self.call(case.method, case.payload, case.token)
        self.stats[case.method.label][outcome.code] += 1
        problems = []
        allowed, must_name = allowed_codes(case, self.max_message_bytes)
        if outcome.code not in allowed:
            problems.append(f"{case.method.label} answered {outcome.code} ({outcome.details!r}), "
                            f"expected one of {sorted(allowed)}")
        elif must_name and must_name not in outcome.details:
            problems.append(f"{case.method.label}: {outcome.code} details {outcome.details!r} do not name {must_name}")
        if outcome.code == "OK" and case.method.name == "Checkpoint":
            self._allow_checkpoint(case.payload, outcome.response)
        if case.method.name == "Lookup":
            problems += self.row_stream_problems(case, outcome)
        changed = self.state() != before
        may_change = outcome.code == "OK" and case.method.name not in READ_ONLY_METHODS
        if changed and not may_change:
            problems.append(f"{case.method.label} answered {outcome.code} but changed the state: "
                            f"{_state_diff(before, self.state())}")
        if may_change:  # legitimately changed, perhaps dropped a table: start again from the initial state
            self.reset()
        problems += self.liveness_problems()
        problems += self.file_problems()
        if problems:
            if not may_change:
                self.reset()
            self.problems_found.append(f"{case!r}: {problems}")
            raise AssertionError("; ".join(problems))
        return outcome

    def _allow_checkpoint(self, payload: bytes, response: bytes) -> None:
        from memory_service.checkpoint import inside_root

        folder = inside_root(self.data_root, pb.CheckpointRequest.FromString(payload).directory, "directory")
        self.allowed_files |= {str(folder / f.path) for f in pb.CheckpointResponse.FromString(response).files}


METHODS_BY_LABEL = {m.label: m for m in METHODS}


def _names_shared_rows(payload: bytes) -> bool:
    request = decoder(pb.LookupRequest)(payload)
    return not isinstance(request, UndecodableRequest) and request.HasField("shared_rows")


def _state_diff(before: dict, after: dict) -> str:
    if before["epoch"] != after["epoch"]:
        return f"epoch {before['epoch']} -> {after['epoch']}"
    names = set(before["tables"]) | set(after["tables"])
    return ", ".join(f"table {n}" for n in sorted(names) if before["tables"].get(n) != after["tables"].get(n))


def fuzz(target: FuzzTarget, method: Method, kind: str, examples: int, *, seed: int | None = None,
         keep_going: bool = False) -> None:
    """Run ``examples`` cases of ``kind`` at ``method``: derandomized (the same cases every run) without
    ``seed``, else drawn from ``seed``. Raises the AssertionError of the (shrunk) failing case, or with
    ``keep_going`` only records it in ``target.problems_found`` and goes on."""
    options = dict(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                   suppress_health_check=list(HealthCheck), print_blob=False)

    @settings(**options)
    @given(case_strategy(method, kind, target))
    def run(case: Case) -> None:
        try:
            target.check(case)
        except AssertionError:
            if not keep_going:
                raise

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    run()


def count(counter_by_method: dict[str, collections.Counter]) -> dict[str, dict[str, int]]:
    return {label: dict(sorted(counter.items())) for label, counter in sorted(counter_by_method.items())}

