"""The data plane's contract: one dtype table, the LookupResponse codec held to protobuf's own, FP8 rows
within E4M3's rounding and decodable from the .proto's words, and the named-array and pending-record codecs refusing what they cannot decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protos import engram_memory_v1_pb2 as pb
from protos.wire import (GRAD_WIRE_DTYPES, WIRE_DTYPE_BY_ENUM, WIRE_DTYPE_BY_NAME, WIRE_DTYPE_BY_TORCH, WIRE_DTYPES,
                         WireError, arrays_from_proto, arrays_to_proto, decode_lookup_rows, dequantize_rows,
                         encode_lookup_response, pending_from_arrays, pending_to_arrays, quantize_rows)


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


def test_float8_lookup_reply_carries_its_scales_and_counts_values_in_dim():
    wire_rows = quantize_rows(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)))
    expected = pb.LookupResponse(rows=wire_rows.numpy().tobytes(), num_rows=5, dim=16, dtype=pb.FLOAT8_E4M3, epoch=3)
    assert encode_lookup_response(wire_rows, pb.FLOAT8_E4M3, 3) == expected.SerializeToString()
    assert WIRE_DTYPE_BY_NAME["float8_e4m3"].row_bytes(16) == 16 + 4
    assert [d.name for d in GRAD_WIRE_DTYPES] == ["float32", "bfloat16", "float16"]


def _rows_of_every_scale() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 48, generator=generator) * torch.logspace(-30, 30, 64)[:, None]
    rows[0] = 0  # an all-zero row: scale 1
    rows[1, :] = 1e-3
    rows[1, 5] = 300.0  # one large value: the others fall into E4M3's subnormals
    rows[2] = torch.linspace(-1, 1, 48)
    return rows


def test_float8_rows_round_trip_within_e4m3_rounding():
    rows = _rows_of_every_scale()
    wire_rows = quantize_rows(rows)
    assert wire_rows.dtype == torch.uint8 and wire_rows.shape == (64, 48 + 4)
    scales = wire_rows[:, 48:].clone().view(torch.float32)
    torch.testing.assert_close(scales[1:], rows[1:].abs().amax(dim=1, keepdim=True) / 448, rtol=1e-6, atol=0)
    assert scales[0].item() == 1.0
    error = (dequantize_rows(wire_rows) - rows).abs()
    assert (error <= 2**-4 * rows.abs() + 2**-10 * scales).all()  # 3 mantissa bits; subnormals below 2^-6 * scale
    assert (error <= 2**-4 * rows.abs().amax(dim=1, keepdim=True)).all()
    assert dequantize_rows(wire_rows, torch.bfloat16).dtype == torch.bfloat16
    assert dequantize_rows(quantize_rows(torch.empty(0, 48))).shape == (0, 48)


def _e4m3_as_the_proto_says(data: np.ndarray) -> np.ndarray:
    """E4M3 bytes decoded from the .proto's words alone: 1 sign, 4 exponent bits of bias 7, 3 mantissa bits."""
    sign = np.where(data & 0x80, -1.0, 1.0)
    exponent, mantissa = (data >> 3) & 0xF, (data & 0x7).astype(np.float64)
    value = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent.astype(int) - 7))
    return sign * value


def test_a_client_without_torch_decodes_float8_rows_from_the_proto_alone():
    rows = _rows_of_every_scale()
    reply = pb.LookupResponse.FromString(encode_lookup_response(quantize_rows(rows), pb.FLOAT8_E4M3, 1))
    records = np.frombuffer(reply.rows, dtype=np.uint8).reshape(reply.num_rows, reply.dim + 4)
    scales = records[:, reply.dim:].copy().view("<f4").astype(np.float64)
    decoded = _e4m3_as_the_proto_says(records[:, :reply.dim]) * scales
    np.testing.assert_allclose(decoded, dequantize_rows(quantize_rows(rows)).double().numpy(), rtol=1e-6, atol=0)


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
