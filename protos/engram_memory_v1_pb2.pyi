from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT8_E4M3: _ClassVar[DType]

class RestorePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESTORE_STAGE: _ClassVar[RestorePhase]
    RESTORE_COMMIT: _ClassVar[RestorePhase]
    RESTORE_DISCARD: _ClassVar[RestorePhase]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
FLOAT8_E4M3: DType
RESTORE_STAGE: RestorePhase
RESTORE_COMMIT: RestorePhase
RESTORE_DISCARD: RestorePhase

class NamedArray(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "row_ids", "dtype", "shared_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARED_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    row_ids: bytes
    dtype: DType
    shared_rows: SharedRows
    def __init__(self, table: _Optional[str] = ..., row_ids: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shared_rows: _Optional[_Union[SharedRows, _Mapping]] = ...) -> None: ...

class SharedRows(_message.Message):
    __slots__ = ("name", "offset", "positions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    positions: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., positions: _Optional[bytes] = ...) -> None: ...

class RowStreamHello(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class RowStreamReply(_message.Message):
    __slots__ = ("code", "message", "refresh_routing", "header", "row_bytes")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REFRESH_ROUTING_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    refresh_routing: bool
    header: LookupResponse
    row_bytes: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., refresh_routing: bool = ..., header: _Optional[_Union[LookupResponse, _Mapping]] = ..., row_bytes: _Optional[int] = ...) -> None: ...

class LookupStateRequest(_message.Message):
    __slots__ = ("table", "row_ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    row_ids: bytes
    def __init__(self, table: _Optional[str] = ..., row_ids: _Optional[bytes] = ...) -> None: ...

class LookupStateResponse(_message.Message):
    __slots__ = ("tensors", "epoch")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[RowValues]
    epoch: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[RowValues, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class MapRowsRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class MapRowsResponse(_message.Message):
    __slots__ = ("segment", "rows", "dim", "dtype", "slot_base", "epoch")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SLOT_BASE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    segment: str
    rows: int
    dim: int
    dtype: DType
    slot_base: bytes
    epoch: int
    def __init__(self, segment: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., slot_base: _Optional[bytes] = ..., epoch: _Optional[int] = ...) -> None: ...

class RowValues(_message.Message):
    __slots__ = ("name", "width", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    width: int
    values: bytes
    def __init__(self, name: _Optional[str] = ..., width: _Optional[int] = ..., values: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("rows", "num_rows", "dim", "dtype", "epoch")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    rows: bytes
    num_rows: int
    dim: int
    dtype: DType
    epoch: int
    def __init__(self, rows: _Optional[bytes] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., epoch: _Optional[int] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("table", "row_ids", "grads", "grad_dtype", "step", "rank", "world_size", "synchronous", "shared_grads", "more_parts", "pull_row_ids", "pull_dtype")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    GRAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SYNCHRONOUS_FIELD_NUMBER: _ClassVar[int]
    SHARED_GRADS_FIELD_NUMBER: _ClassVar[int]
    MORE_PARTS_FIELD_NUMBER: _ClassVar[int]
    PULL_ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    PULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    row_ids: bytes
    grads: bytes
    grad_dtype: DType
    step: int
    rank: int
    world_size: int
    synchronous: bool
    shared_grads: SharedRows
    more_parts: bool
    pull_row_ids: bytes
    pull_dtype: DType
    def __init__(self, table: _Optional[str] = ..., row_ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., grad_dtype: _Optional[_Union[DType, str]] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., synchronous: bool = ..., shared_grads: _Optional[_Union[SharedRows, _Mapping]] = ..., more_parts: bool = ..., pull_row_ids: _Optional[bytes] = ..., pull_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("applied_rows", "duplicate", "pending", "epoch", "pulled", "pulled_rows")
    APPLIED_ROWS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    PULLED_ROWS_FIELD_NUMBER: _ClassVar[int]
    applied_rows: int
    duplicate: bool
    pending: bool
    epoch: int
    pulled: bool
    pulled_rows: bytes
    def __init__(self, applied_rows: _Optional[int] = ..., duplicate: bool = ..., pending: bool = ..., epoch: _Optional[int] = ..., pulled: bool = ..., pulled_rows: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("name", "rows", "slots", "bytes", "tier", "unfilled_rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    UNFILLED_ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    slots: int
    bytes: int
    tier: TierStats
    unfilled_rows: int
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., slots: _Optional[int] = ..., bytes: _Optional[int] = ..., tier: _Optional[_Union[TierStats, _Mapping]] = ..., unfilled_rows: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("capacity_rows", "cached_rows", "hits", "misses", "rows_read", "evictions", "written_back")
    CAPACITY_ROWS_FIELD_NUMBER: _ClassVar[int]
    CACHED_ROWS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ROWS_READ_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BACK_FIELD_NUMBER: _ClassVar[int]
    capacity_rows: int
    cached_rows: int
    hits: int
    misses: int
    rows_read: int
    evictions: int
    written_back: int
    def __init__(self, capacity_rows: _Optional[int] = ..., cached_rows: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., rows_read: _Optional[int] = ..., evictions: _Optional[int] = ..., written_back: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_index", "address", "node", "epoch", "memory_bytes", "tables", "requests_total", "requests_per_s", "p50_lookup_ms", "p99_lookup_ms", "pending_steps", "aborted_steps", "step_barrier_held", "step_timeout_s")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    P50_LOOKUP_MS_FIELD_NUMBER: _ClassVar[int]
    P99_LOOKUP_MS_FIELD_NUMBER: _ClassVar[int]
    PENDING_STEPS_FIELD_NUMBER: _ClassVar[int]
    ABORTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_BARRIER_HELD_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    address: str
    node: str
    epoch: int
    memory_bytes: int
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    requests_total: int
    requests_per_s: float
    p50_lookup_ms: float
    p99_lookup_ms: float
    pending_steps: _containers.RepeatedCompositeFieldContainer[PendingStepInfo]
    aborted_steps: int
    step_barrier_held: bool
    step_timeout_s: float
    def __init__(self, shard_index: _Optional[int] = ..., address: _Optional[str] = ..., node: _Optional[str] = ..., epoch: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ..., requests_total: _Optional[int] = ..., requests_per_s: _Optional[float] = ..., p50_lookup_ms: _Optional[float] = ..., p99_lookup_ms: _Optional[float] = ..., pending_steps: _Optional[_Iterable[_Union[PendingStepInfo, _Mapping]]] = ..., aborted_steps: _Optional[int] = ..., step_barrier_held: bool = ..., step_timeout_s: _Optional[float] = ...) -> None: ...

class PendingStepInfo(_message.Message):
    __slots__ = ("table", "step", "world_size", "reported_ranks", "age_s")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPORTED_RANKS_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    table: str
    step: int
    world_size: int
    reported_ranks: _containers.RepeatedScalarFieldContainer[int]
    age_s: float
    def __init__(self, table: _Optional[str] = ..., step: _Optional[int] = ..., world_size: _Optional[int] = ..., reported_ranks: _Optional[_Iterable[int]] = ..., age_s: _Optional[float] = ...) -> None: ...

class ChecksumRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class ChecksumResponse(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class AddTableRequest(_message.Message):
    __slots__ = ("spec_json", "slots", "epoch")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    def __init__(self, spec_json: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ...) -> None: ...

class AddTableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DropTableRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class DropTableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetEpochRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class SetEpochResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FreezeSlotsRequest(_message.Message):
    __slots__ = ("table", "slots", "frozen")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    table: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    frozen: bool
    def __init__(self, table: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ..., frozen: bool = ...) -> None: ...

class FreezeSlotsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportSlotsRequest(_message.Message):
    __slots__ = ("table", "slots")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    table: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, table: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class ExportSlotsResponse(_message.Message):
    __slots__ = ("arrays",)
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    arrays: _containers.RepeatedCompositeFieldContainer[NamedArray]
    def __init__(self, arrays: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ...) -> None: ...

class ImportSlotsRequest(_message.Message):
    __slots__ = ("table", "arrays")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    table: str
    arrays: _containers.RepeatedCompositeFieldContainer[NamedArray]
    def __init__(self, table: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ...) -> None: ...

class ImportSlotsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseSlotsRequest(_message.Message):
    __slots__ = ("table", "slots")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    table: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, table: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseSlotsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("directory", "require_step_barrier")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_STEP_BARRIER_FIELD_NUMBER: _ClassVar[int]
    directory: str
    require_step_barrier: bool
    def __init__(self, directory: _Optional[str] = ..., require_step_barrier: bool = ...) -> None: ...

class CheckpointFile(_message.Message):
    __slots__ = ("table", "path", "slots")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    table: str
    path: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, table: _Optional[str] = ..., path: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("files", "step_counters_json")
    FILES_FIELD_NUMBER: _ClassVar[int]
    STEP_COUNTERS_JSON_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[CheckpointFile]
    step_counters_json: str
    def __init__(self, files: _Optional[_Iterable[_Union[CheckpointFile, _Mapping]]] = ..., step_counters_json: _Optional[str] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("directory", "table", "paths", "slots", "spec_json", "phase", "step_counters_json", "epoch")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_COUNTERS_JSON_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    directory: str
    table: str
    paths: _containers.RepeatedScalarFieldContainer[str]
    slots: _containers.RepeatedScalarFieldContainer[int]
    spec_json: str
    phase: RestorePhase
    step_counters_json: str
    epoch: int
    def __init__(self, directory: _Optional[str] = ..., table: _Optional[str] = ..., paths: _Optional[_Iterable[str]] = ..., slots: _Optional[_Iterable[int]] = ..., spec_json: _Optional[str] = ..., phase: _Optional[_Union[RestorePhase, str]] = ..., step_counters_json: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortStepRequest(_message.Message):
    __slots__ = ("table", "step", "world_size")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    table: str
    step: int
    world_size: int
    def __init__(self, table: _Optional[str] = ..., step: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...

class AbortStepResponse(_message.Message):
    __slots__ = ("aborted", "missing_ranks")
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    MISSING_RANKS_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    missing_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, aborted: bool = ..., missing_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class StepBarrierStep(_message.Message):
    __slots__ = ("table", "step", "state")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    table: str
    step: int
    state: str
    def __init__(self, table: _Optional[str] = ..., step: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class StepBarrierRequest(_message.Message):
    __slots__ = ("hold", "admit", "lease_s")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    hold: bool
    admit: _containers.RepeatedCompositeFieldContainer[StepBarrierStep]
    lease_s: float
    def __init__(self, hold: bool = ..., admit: _Optional[_Iterable[_Union[StepBarrierStep, _Mapping]]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class StepBarrierResponse(_message.Message):
    __slots__ = ("pending", "admitted")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    pending: _containers.RepeatedCompositeFieldContainer[StepBarrierStep]
    admitted: _containers.RepeatedCompositeFieldContainer[StepBarrierStep]
    def __init__(self, pending: _Optional[_Iterable[_Union[StepBarrierStep, _Mapping]]] = ..., admitted: _Optional[_Iterable[_Union[StepBarrierStep, _Mapping]]] = ...) -> None: ...

class ReplicaTarget(_message.Message):
    __slots__ = ("index", "address")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    address: str
    def __init__(self, index: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("primary", "replicas", "epoch", "copying")
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COPYING_FIELD_NUMBER: _ClassVar[int]
    primary: bool
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaTarget]
    epoch: int
    copying: bool
    def __init__(self, primary: bool = ..., replicas: _Optional[_Iterable[_Union[ReplicaTarget, _Mapping]]] = ..., epoch: _Optional[int] = ..., copying: bool = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicatedOp(_message.Message):
    __slots__ = ("seq", "update", "abort", "restore_commit")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    RESTORE_COMMIT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    update: UpdateRequest
    abort: AbortStepRequest
    restore_commit: RestoreRequest
    def __init__(self, seq: _Optional[int] = ..., update: _Optional[_Union[UpdateRequest, _Mapping]] = ..., abort: _Optional[_Union[AbortStepRequest, _Mapping]] = ..., restore_commit: _Optional[_Union[RestoreRequest, _Mapping]] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("stream", "ops")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    stream: str
    ops: _containers.RepeatedCompositeFieldContainer[ReplicatedOp]
    def __init__(self, stream: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[ReplicatedOp, _Mapping]]] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("applied_seq",)
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    applied_seq: int
    def __init__(self, applied_seq: _Optional[int] = ...) -> None: ...

class AddReplicaRequest(_message.Message):
    __slots__ = ("replica",)
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    replica: ReplicaTarget
    def __init__(self, replica: _Optional[_Union[ReplicaTarget, _Mapping]] = ...) -> None: ...

class AddReplicaResponse(_message.Message):
    __slots__ = ("copied_rows",)
    COPIED_ROWS_FIELD_NUMBER: _ClassVar[int]
    copied_rows: int
    def __init__(self, copied_rows: _Optional[int] = ...) -> None: ...

class GetRoutingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "address", "node", "local_address", "hostname", "replicas", "row_stream_address")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ROW_STREAM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    address: str
    node: str
    local_address: str
    hostname: str
    replicas: _containers.RepeatedScalarFieldContainer[int]
    row_stream_address: str
    def __init__(self, index: _Optional[int] = ..., address: _Optional[str] = ..., node: _Optional[str] = ..., local_address: _Optional[str] = ..., hostname: _Optional[str] = ..., replicas: _Optional[_Iterable[int]] = ..., row_stream_address: _Optional[str] = ...) -> None: ...

class TableRouting(_message.Message):
    __slots__ = ("name", "num_slots", "owners", "rows", "dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_slots: int
    owners: bytes
    rows: int
    dim: int
    def __init__(self, name: _Optional[str] = ..., num_slots: _Optional[int] = ..., owners: _Optional[bytes] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("epoch", "shards", "tables")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    tables: _containers.RepeatedCompositeFieldContainer[TableRouting]
    def __init__(self, epoch: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., tables: _Optional[_Iterable[_Union[TableRouting, _Mapping]]] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableSpecInfo(_message.Message):
    __slots__ = ("name", "rows", "dim", "num_slots", "storage_dtype", "spec_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    dim: int
    num_slots: int
    storage_dtype: str
    spec_json: str
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., num_slots: _Optional[int] = ..., storage_dtype: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableSpecInfo]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableSpecInfo, _Mapping]]] = ...) -> None: ...
