"""The data plane's contract: one dtype table, the LookupResponse codec held to protobuf's own, and the
named-array and pending-record codecs refusing what they cannot decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protos import engram_memory_v1_pb2 as pb
from protos.wire import (WIRE_DTYPE_BY_ENUM, WIRE_DTYPE_BY_NAME, WIRE_DTYPE_BY_TORCH, WIRE_DTYPES, WireError,
                         arrays_from_proto, arrays_to_proto, decode_lookup_rows, encode_lookup_response,
                         pending_from_arrays, pending_to_arrays)


def test_every_wire_dtype_maps_name_enum_and_torch_dtype_both_ways():
    assert {d.enum for d in WIRE_DTYPES} == set(pb.DType.values()) - {0}
    for dtype in WIRE_DTYPES:
        assert WIRE_DTYPE_BY_NAME[dtype.name] is WIRE_DTYPE_BY_ENUM[dtype.enum] is WIRE_DTYPE_BY_TORCH[dtype.torch]
        assert pb.DType.Name(dtype.enum) == dtype.name.upper()


@pytest.mark.parametrize("num_rows, epoch, rows_in_reply", [(300, 7, True), (0, 1, True), (5, 0, False)])
def test_lookup_codec_matches_protobuf(num_rows, epoch, rows_in_reply):
    rows = torch.randn(num_rows, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    payload = rows.view(torch.uint8).numpy().tobytes() if rows_in_reply else b""
    expected = pb.LookupResponse(rows=payload, num_rows=num_rows, dim=16, dtype=pb.BFLOAT16, epoch=epoch)
    encoded = encode_lookup_response(rows, pb.BFLOAT16, epoch, rows_in_reply)
    assert encoded == expected.SerializeToString()
    assert bytes(decode_lookup_rows(encoded)) == payload
    assert bytes(decode_lookup_rows(expected.SerializeToString())) == pb.LookupResponse.FromString(encoded).rows


# ---- named arrays and pending records: bad input raises WireError naming its part (found by the RPC fuzzer,
# bench/rpc_fuzzing.py, where ImportSlots answered INTERNAL with numpy's TypeError/ValueError) ----------------

def _named(name="rows", dtype="<f4", shape=(2, 3), data=None) -> pb.NamedArray:
    data = np.arange(6, dtype="<f4").tobytes() if data is None else data
    return pb.NamedArray(name=name, dtype=dtype, shape=shape, data=data)


def test_named_arrays_round_trip():
    arrays = {"slots": np.asarray([3, 1], dtype=np.int64), "rows": np.ones((2, 4), np.float32),
              "bits": np.asarray([1, 2], np.uint16), "empty": np.empty((0, 4), np.float32)}
    decoded = arrays_from_proto(arrays_to_proto(arrays))
    assert decoded.keys() == arrays.keys()
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype and np.array_equal(decoded[name], array)


@pytest.mark.parametrize("named, field", [
    (_named(dtype="garbage"), "arrays[0].dtype"),
    (_named(dtype="O"), "arrays[0].dtype"),  # objects: never from bytes
    (_named(dtype="V0"), "arrays[0].dtype"),  # "itemsize cannot be zero"
    (_named(dtype="<U3"), "arrays[0].dtype"),
    (_named(dtype="(2,)i4"), "arrays[0].dtype"),
    (_named(shape=(2, 2)), "arrays[0].data"),  # "cannot reshape array of size 6 into shape (2, 2)"
    (_named(shape=()), "arrays[0].data"),
    (_named(shape=(-2, -3)), "arrays[0].shape"),
    (_named(data=b"\x00" * 5), "arrays[0].data"),  # "buffer size must be a multiple of element size"
    (_named(shape=(2**62, 2**62), data=b""), "arrays[0].data"),
])
def test_undecodable_named_arrays_raise_wire_error_naming_the_field(named, field):
    with pytest.raises(WireError) as caught:
        arrays_from_proto([named])
    assert caught.value.field == field and isinstance(caught.value, ValueError)


def test_a_named_array_given_twice_is_refused():
    with pytest.raises(WireError) as caught:
        arrays_from_proto([_named(), _named()])
    assert caught.value.field == "arrays[1].name"


PENDING = [{"step": 4, "world_size": 2, "ranks": [1], "parts": [
    {"rank": 1, "row_ids": np.asarray([2, 5], np.int64), "grads": np.ones((2, 3), np.float32)}]}]


def test_pending_records_round_trip_and_leave_other_arrays():
    arrays = {**pending_to_arrays(PENDING), "rows": np.zeros((1, 3), np.float32)}
    (record,) = pending_from_arrays(arrays)
    assert list(arrays) == ["rows"]
    assert (record["step"], record["world_size"], record["ranks"]) == (4, 2, [1])
    assert np.array_equal(record["parts"][0]["row_ids"], [2, 5]) and record["parts"][0]["rank"] == 1


@pytest.mark.parametrize("mutate, field", [
    (lambda a: a.pop("pending.0.header"), "pending.0.header"),
    (lambda a: a.pop("pending.0.ranks"), "pending.0.ranks"),
    (lambda a: a.pop("pending.0.0.grads"), "pending.0.0.grads"),
    (lambda a: a.update({"pending.0.header": np.asarray([4], np.int64)}), "pending.0.header"),
    (lambda a: a.update({"pending.0.header": np.asarray([4.0, 2.0])}), "pending.0.header"),
    (lambda a: a.update({"pending.0.0.rank": np.asarray([[1]])}), "pending.0.0.rank"),
    (lambda a: a.update({"pending.0.0.grads": np.ones((1, 3), np.float32)}), "pending.0.0.grads"),
    (lambda a: a.update({"pending.0.0.row_ids": np.ones(2, np.float32)}), "pending.0.0.row_ids"),
    (lambda a: a.update({"pending.x.y": np.zeros(1)}), "pending.x.y"),  # int('x'): ValueError before
    (lambda a: a.update({"pending.": np.zeros(1)}), "pending."),
    (lambda a: a.update({"pending.7.0.rank": np.zeros(1, np.int64)}), "pending.7.header"),  # KeyError before
])
def test_malformed_pending_records_raise_wire_error_and_pop_nothing(mutate, field):
    arrays = pending_to_arrays(PENDING)
    mutate(arrays)
    names = list(arrays)
    with pytest.raises(WireError) as caught:
        pending_from_arrays(arrays)
    assert caught.value.field == field and list(arrays) == names
