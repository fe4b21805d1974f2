"""The data plane's contract: one dtype table, and the LookupResponse codec held to protobuf's own."""
from __future__ import annotations

import pytest
import torch

from protos import engram_memory_v1_pb2 as pb
from protos.wire import (WIRE_DTYPE_BY_ENUM, WIRE_DTYPE_BY_NAME, WIRE_DTYPE_BY_TORCH, WIRE_DTYPES,
                         decode_lookup_rows, encode_lookup_response)


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
