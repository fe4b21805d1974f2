"""The data plane's contract, the one Python home of what the client and the shards must agree on.

Wire dtypes (name <-> ``DType`` enum <-> torch dtype) and the FP8 rows' per-row scales, call
metadata keys, message limits and gRPC channel options, the controller's Ray name, the
``LookupResponse`` codec, and conversions between the wire's raw bytes and numpy/torch arrays.
Imports nothing from ``compute`` or ``memory_service``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path

import grpc
import numpy as np
import torch

from protos import engram_memory_v1_pb2 as pb


@dataclasses.dataclass(frozen=True)
class WireDtype:
    """An element type rows and gradients travel in: its name (configs, the store), its ``DType``
    enum value and its torch dtype."""

    name: str
    enum: int
    torch: torch.dtype
    scaled: bool = False  # each row's float32 scale follows its values (float8_e4m3); lookups only

    def row_bytes(self, dim: int) -> int:
        """Bytes one row of ``dim`` values takes on the wire, its scale included."""
        return dim * self.torch.itemsize + (SCALE_BYTES if self.scaled else 0)

    def row_layout(self, dim: int) -> tuple[torch.dtype, int]:
        """How rows of ``dim`` values are held as they travel: (element type, elements a row); scaled rows
        as uint8 bytes, values then scale."""
        return (torch.uint8, self.row_bytes(dim)) if self.scaled else (self.torch, dim)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows [n, dim] of values as they travel in this wire dtype (``row_layout``); the inverse of ``values``."""
        return quantize_rows(rows) if self.scaled else rows.to(self.torch)

    def values(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Looked-up rows as they came in this wire dtype, as values in ``dtype`` on their device."""
        return dequantize_rows(rows, dtype) if self.scaled else rows.to(dtype)


SCALE_BYTES = 4  # a scaled row's float32 scale
FLOAT8_E4M3_MAX = 448.0  # E4M3's largest finite value: a row's largest magnitude maps to it

WIRE_DTYPES = (WireDtype("float32", pb.FLOAT32, torch.float32), WireDtype("bfloat16", pb.BFLOAT16, torch.bfloat16),
               WireDtype("float16", pb.FLOAT16, torch.float16),
               WireDtype("float8_e4m3", pb.FLOAT8_E4M3, torch.float8_e4m3fn, scaled=True))
WIRE_DTYPE_BY_NAME = {dtype.name: dtype for dtype in WIRE_DTYPES}
WIRE_DTYPE_BY_ENUM = {dtype.enum: dtype for dtype in WIRE_DTYPES}
WIRE_DTYPE_BY_TORCH = {dtype.torch: dtype for dtype in WIRE_DTYPES}
# Gradients travel unscaled: float8_e4m3 is for lookups only.
GRAD_WIRE_DTYPES = tuple(dtype for dtype in WIRE_DTYPES if not dtype.scaled)

# Call metadata. Every call carries ``authorization: Bearer <token>``; a shard refusing a request
# for routing reasons (a slot it does not own, frozen or moved) adds the routing-epoch trailing key,
# and clients refresh the routing and retry only such refusals (and transient failures).
AUTHORIZATION_KEY = "authorization"
ROUTING_EPOCH_KEY = "engram-routing-epoch"

# 64 MiB: a 256K-row bfloat16 batch of dim 64 is 32 MiB; clients chunk anything larger.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# HTTP/2's largest frame: a multi-MiB reply moves in a few frames instead of hundreds of 16 KiB ones.
MAX_FRAME_BYTES = (1 << 24) - 1

# Co-located clients' shared-memory segments: ``<dir>/<prefix><pid>-<hex>``; shards open only such names.
SHARED_SEGMENT_DIR = "/dev/shm"
SHARED_SEGMENT_PREFIX = "engram-rows-"
# Shards' tables in shared memory (``MapRows``): ``<dir>/<prefix><shard pid>-<hex>``, a header (int64s: retired
# flag, write count), then rows.
SHARED_TABLE_PREFIX = "engram-table-"
SHARED_TABLE_HEADER_BYTES = 64

# The controller actor's Ray name and namespace: clients inside Ray find the directory through it.
CONTROLLER_NAME = "engram-memory-controller"
NAMESPACE = "engram"

LOOKUP_METHOD = f"/{pb.DESCRIPTOR.services_by_name['ShardService'].full_name}/Lookup"

# Received payloads are immutable bytes viewed without a copy and only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """How a client checks the servers' certificates (PEM ``ca_file``) and, where the servers ask for
    mutual TLS, proves who it is (``cert_file`` and ``key_file``)."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: give a client certificate and its key together, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        identity = {}
        if self.cert_file is not None:
            identity = {"private_key": Path(self.key_file).read_bytes(),
                        "certificate_chain": Path(self.cert_file).read_bytes()}
        return grpc.ssl_channel_credentials(Path(self.ca_file).read_bytes(), **identity)


def open_channel(address: str, tls: ClientTls | None, options: list[tuple[str, int]]) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: TLS with ``tls``, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)


def transport_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel and server arguments: explicit message limits and large HTTP/2 frames."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.http2.max_frame_size", MAX_FRAME_BYTES),
    ]


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only-backed tensor view of ``data`` (no copy); callers must not write into it."""
    element = WIRE_DTYPE_BY_NAME[dtype].torch
    if not data:
        return torch.empty(shape, dtype=element)
    return torch.frombuffer(data, dtype=element).view(shape)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """``tensor``'s values as raw little-endian bytes, row-major (``tensor_from_bytes`` reads them back)."""
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


# ---- FP8 rows: E4M3 values, then the row's float32 scale (layout in the .proto's DType) -------------


def quantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows [n, dim] as float8_e4m3 wire rows: [n, dim + 4] uint8, each row's E4M3 values (``row / scale``
    rounded to nearest) then its float32 scale, max|row| / 448 (1 where that is 0)."""
    rows = rows.float()
    scales = rows.abs().amax(dim=1, keepdim=True) / FLOAT8_E4M3_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = (rows / scales).clamp_(-FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.cat((values.view(torch.uint8), scales.view(torch.uint8)), dim=1)


def dequantize_rows(wire_rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3 wire rows [n, dim + 4] uint8 as [n, dim] values in ``dtype``, computed on their device."""
    dim = wire_rows.shape[1] - SCALE_BYTES
    scales = wire_rows[:, dim:].clone(memory_format=torch.contiguous_format).view(torch.float32)
    return (wire_rows[:, :dim].view(torch.float8_e4m3fn).float() * scales).to(dtype)


def as_row_records(rows: torch.Tensor) -> np.ndarray:
    """Contiguous CPU rows [n, ...] as a numpy array of n opaque records, a view: numpy gathers and scatters those
    with one memcpy each, two to three times faster than torch's index_select and index_copy_ on one thread."""
    row_bytes = rows[0].numel() * rows.element_size() if len(rows) else 1
    return rows.view(torch.uint8).numpy().view(np.dtype((np.void, row_bytes))).reshape(len(rows))


def as_row_words(rows: torch.Tensor) -> torch.Tensor:
    """Contiguous rows viewed as int64 words when a row is whole words (copies by index run several times faster)."""
    return rows.view(torch.int64) if rows.shape[-1] * rows.element_size() % 8 == 0 else rows


# ---- LookupResponse codec ----------------------------------------------------------------------
# Hand-written because the rows dominate the message: at 64K rows of dim 64 in bfloat16 (8 MiB)
# protobuf takes ~25 ms to encode (three copies of the rows) and ~1 ms to decode (one copy), these
# ~0.5 ms (one copy) and ~0.01 ms (a view). Same bytes on the wire as protobuf's; the tests hold
# both halves to protobuf's own encoding and parsing.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_lookup_response(rows: torch.Tensor, dtype: int, epoch: int, rows_in_reply: bool = True) -> bytes:
    """``LookupResponse`` bytes, identical to protobuf's, built with one copy of the rows (``quantize_rows``'
    wire rows for ``FLOAT8_E4M3``).

    Without ``rows_in_reply`` (rows written to the client's shared memory) the ``rows`` field stays empty.
    """
    payload = rows.contiguous().view(torch.uint8).numpy().reshape(-1)
    if not rows_in_reply:
        payload = payload[:0]
    num_rows, dim = rows.shape[0], reply_dim(rows, dtype)
    head = b"\x0a" + _varint(payload.nbytes) if payload.nbytes else b""
    tail = b"".join(tag + _varint(value) for tag, value in
                    ((b"\x10", num_rows), (b"\x18", dim), (b"\x20", dtype), (b"\x28", epoch)) if value)
    return b"".join((head, payload.data, tail))


def reply_dim(rows: torch.Tensor, dtype: int) -> int:
    """The row width a ``LookupResponse`` names for wire ``rows`` of ``dtype`` (a scaled row's scale not counted)."""
    return rows.shape[1] - (SCALE_BYTES if WIRE_DTYPE_BY_ENUM[dtype].scaled else 0)


def decode_lookup_rows(data: bytes) -> memoryview:
    """The ``rows`` field of ``LookupResponse`` bytes, as a view of ``data`` (the other fields are skipped)."""
    view, pos, rows = memoryview(data), 0, memoryview(b"")
    while pos < len(view):
        key, pos = _read_varint(view, pos)
        if key & 7 == 2:
            length, pos = _read_varint(view, pos)
            if key >> 3 == 1:
                rows = view[pos:pos + length]
            pos += length
        elif key & 7 == 0:
            _, pos = _read_varint(view, pos)
        else:
            raise ValueError(f"LookupResponse: unexpected wire type {key & 7} of field {key >> 3}")
    return rows


# ---- named arrays (slot moves, checkpoints) -----------------------------------------------------


def arrays_to_proto(arrays: dict[str, np.ndarray]) -> list[pb.NamedArray]:
    out = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        out.append(pb.NamedArray(name=name, dtype=array.dtype.str, shape=array.shape, data=array.tobytes()))
    return out


class WireError(ValueError):
    """Named arrays (or pending records in them) that do not decode; ``field`` names the part at fault,
    e.g. ``arrays[2].dtype``. Bad input, never a bug: servers answer it INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# What arrays may hold on the wire: booleans, integers and floats (never objects, strings, records or voids).
_ARRAY_KINDS = "biuf"


def _array_dtype(text: str, field: str) -> np.dtype:
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError, SyntaxError, KeyError, OverflowError):
        raise WireError(field, f"{text!r} is not a numpy dtype") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.subdtype is not None or dtype.itemsize == 0:
        raise WireError(field, f"{text!r} is not a boolean, integer or floating-point dtype")
    return dtype


def arrays_from_proto(named: list[pb.NamedArray]) -> dict[str, np.ndarray]:
    """The arrays ``arrays_to_proto`` sent, each a copy; WireError naming the first one that does not
    decode: a dtype that is not a plain number, a negative dimension, data not the shape's size or a
    name given twice."""
    arrays = {}
    for index, array in enumerate(named):
        field = f"arrays[{index}]"
        dtype = _array_dtype(array.dtype, f"{field}.dtype")
        shape = tuple(array.shape)
        if any(size < 0 for size in shape):
            raise WireError(f"{field}.shape", f"{list(shape)} has a negative dimension")
        expected = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
        if len(array.data) != expected:
            raise WireError(f"{field}.data", f"{len(array.data)} bytes, expected {expected} for shape {list(shape)} "
                                             f"of {dtype.str}")
        if array.name in arrays:
            raise WireError(f"{field}.name", f"{array.name!r} appears twice")
        arrays[array.name] = np.frombuffer(array.data, dtype=dtype).reshape(shape).copy()
    return arrays


PENDING_PREFIX = "pending."


def pending_to_arrays(records: list[dict]) -> dict[str, np.ndarray]:
    """``StepAggregator.export_pending`` records as flat named arrays (for ``NamedArray``)."""
    arrays = {}
    for i, record in enumerate(records):
        prefix = f"{PENDING_PREFIX}{i}."
        arrays[prefix + "header"] = np.asarray([record["step"], record["world_size"]], dtype=np.int64)
        arrays[prefix + "ranks"] = np.asarray(record["ranks"], dtype=np.int64)
        for j, part in enumerate(record["parts"]):
            arrays[f"{prefix}{j}.rank"] = np.asarray([part["rank"]], dtype=np.int64)
            arrays[f"{prefix}{j}.row_ids"] = np.asarray(part["row_ids"], dtype=np.int64)
            arrays[f"{prefix}{j}.grads"] = np.asarray(part["grads"], dtype=np.float32)
    return arrays


_PENDING_NAME = re.compile(r"(\d+)\.(header|ranks)|(\d+)\.(\d+)\.(rank|row_ids|grads)")


def _pending_array(flat: dict[str, np.ndarray], name: str, kinds: str, ndim: int, size: int | None = None) -> np.ndarray:
    array = flat.get(name)
    if array is None:
        raise WireError(PENDING_PREFIX + name, "missing from the pending entries")
    if array.dtype.kind not in kinds or array.ndim != ndim or (size is not None and array.size != size):
        raise WireError(PENDING_PREFIX + name, f"unexpected {array.dtype} array of shape {array.shape}")
    return array


def pending_from_arrays(arrays: dict[str, np.ndarray]) -> list[dict]:
    """The inverse of ``pending_to_arrays``; pops the pending entries out of ``arrays``. WireError naming
    the entry when they are not what ``pending_to_arrays`` writes (an unknown name, a missing header,
    ranks or part, integers where floats belong...); ``arrays`` is then left as it was."""
    flat = {name[len(PENDING_PREFIX):]: array for name, array in arrays.items() if name.startswith(PENDING_PREFIX)}
    records, parts_of = {}, {}
    for name in flat:
        match = _PENDING_NAME.fullmatch(name)
        if match is None:
            raise WireError(PENDING_PREFIX + name, "not a pending entry (expected <i>.header, <i>.ranks or "
                                                   "<i>.<j>.rank|row_ids|grads)")
        if match.group(1) is not None:
            records.setdefault(int(match.group(1)), None)
        else:
            parts_of.setdefault(int(match.group(3)), set()).add(int(match.group(4)))
    orphans = sorted(set(parts_of) - set(records))
    if orphans:
        raise WireError(f"{PENDING_PREFIX}{orphans[0]}.header", "missing from the pending entries")
    decoded = []
    for i in sorted(records):
        step, world_size = _pending_array(flat, f"{i}.header", "iu", 1, 2).tolist()
        ranks = _pending_array(flat, f"{i}.ranks", "iu", 1).tolist()
        parts = []
        for j in sorted(parts_of.get(i, ())):
            row_ids = _pending_array(flat, f"{i}.{j}.row_ids", "iu", 1)
            grads = _pending_array(flat, f"{i}.{j}.grads", "f", 2)
            if len(grads) != len(row_ids):
                raise WireError(f"{PENDING_PREFIX}{i}.{j}.grads", f"{len(grads)} rows for {len(row_ids)} row ids")
            rank = int(_pending_array(flat, f"{i}.{j}.rank", "iu", 1, 1)[0])
            parts.append({"rank": rank, "row_ids": row_ids, "grads": grads})
        decoded.append({"step": step, "world_size": world_size, "ranks": ranks, "parts": parts})
    for name in flat:
        del arrays[PENDING_PREFIX + name]
    return decoded
