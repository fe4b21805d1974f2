"""The configuration of a training run: model, data, optimisers, where the Engram rows live, schedule."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from compute.config import EngramConfig, ModelConfig, dataclass_from_mapping, load_yaml
from compute.data.config import DataConfig
from memory_service.core.table_spec import TierSpec
from protos.wire import GRAD_WIRE_DTYPES, WIRE_DTYPE_BY_NAME

TABLE_KINDS = ("remote", "local")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW for the dense weights; the shards' sparse optimizer for the Engram rows."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    engram_optimizer: str = "adam"  # sgd | adagrad | adam, applied on the shards
    engram_lr_mult: float = 5.0  # the paper trains Engram rows at 5x the dense rate, no weight decay

    def __post_init__(self):
        if self.lr <= 0 or self.engram_lr_mult <= 0:
            raise ValueError("optim.lr and optim.engram_lr_mult must be positive")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")


def _check_sizes(section: str, **sizes: int) -> None:
    """A section's ``sizes`` are integers >= 0 (0: unset), at most one of them set."""
    for field, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{section}.{field} must be an integer >= 0, got {value!r}")
    if sum(bool(value) for value in sizes.values()) > 1:
        raise ValueError(f"{section}: give its size in one of {list(sizes)}, not several")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """A hot-row cache on the compute device in front of each remote table (``CachedRowTable``), serving or
    training. Its size is ``rows`` a table, or ``bytes`` a table of device rows (compute dtype, 4 bytes a value);
    neither: no cache."""

    rows: int = 0
    bytes: int = 0
    readmit_every: int = 64  # lookups between choices of the cached rows by their lookup counts, once warmed up

    def __post_init__(self):
        _check_sizes("memory.cache", rows=self.rows, bytes=self.bytes)
        if isinstance(self.readmit_every, bool) or not isinstance(self.readmit_every, int) or self.readmit_every < 1:
            raise ValueError(f"memory.cache.readmit_every must be >= 1, got {self.readmit_every}")

    @property
    def enabled(self) -> bool:
        return bool(self.rows or self.bytes)

    def capacity(self, dim: int) -> int:
        """Rows of ``dim`` float32 values the cache holds a table."""
        return self.rows or self.bytes // (4 * dim)


@dataclasses.dataclass(frozen=True)
class TierConfig:
    """Remote tables on the shards' SSD tier (docs/memory-service.md, "The SSD tier"): each shard keeps
    ``dram_rows`` rows of each table in DRAM, or as many as ``dram_bytes`` holds (rows with their optimizer
    state), and the rest in files on its disk; neither: every row in DRAM."""

    dram_rows: int = 0
    dram_bytes: int = 0
    dir: str = ""  # where the files go on each shard's node (a local SSD) when the run deploys its own service;
    # "": engram-tier in the node's temporary folder

    def __post_init__(self):
        _check_sizes("memory.tier", dram_rows=self.dram_rows, dram_bytes=self.dram_bytes)

    def spec(self) -> TierSpec | None:
        """The tables' ``TierSpec``, or None for all rows in DRAM."""
        if self.dram_rows:
            return TierSpec(dram_rows=self.dram_rows)
        return TierSpec(dram_bytes=self.dram_bytes) if self.dram_bytes else None


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Where the Engram tables live and how rows reach the model."""

    tables: str = "remote"  # remote: memory shards over gRPC; local: in-process tables (one worker)
    shards: int = 2  # shard groups to deploy when the run starts its own memory service
    replicas: int = 1  # copies of each group's slots (2: a shard can die without losing a row)
    num_slots: int = 256
    init_std: float = 0.02
    wire_dtype: str = "bfloat16"  # rows on the wire; float32 makes remote runs match local ones exactly; float8_e4m3
    # (E4M3 and a float32 scale a row) about halves bfloat16's bytes
    grad_wire_dtype: str = "float32"  # row gradients on the wire; bfloat16 halves the push's bytes
    prefetch: bool = True  # issue the next step's lookup before this step's compute
    # read serving (read-only) tables' rows out of the shared memory of shards on this machine, without a request
    read_shared_rows: bool = True
    staleness: int = 0  # 0: lookups see every earlier step's update; 1: may miss the last one (overlapped)
    cache: CacheConfig = CacheConfig()  # hot rows kept on the device (serving tables)
    tier: TierConfig = TierConfig()  # remote tables on the shards' SSD tier

    def __post_init__(self):
        if self.tables not in TABLE_KINDS:
            raise ValueError(f"memory.tables must be one of {TABLE_KINDS}, got {self.tables!r}")
        for field, allowed in (("wire_dtype", list(WIRE_DTYPE_BY_NAME)),
                               ("grad_wire_dtype", [dtype.name for dtype in GRAD_WIRE_DTYPES])):
            if getattr(self, field) not in allowed:
                raise ValueError(f"memory.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.staleness not in (0, 1):
            raise ValueError(f"memory.staleness must be 0 or 1, got {self.staleness!r}")
        if self.shards < 1:
            raise ValueError(f"memory.shards must be >= 1, got {self.shards}")
        if self.replicas < 1:
            raise ValueError(f"memory.replicas must be >= 1 (1: no copy), got {self.replicas}")
        if self.cache.enabled and self.tables != "remote":
            raise ValueError("memory.cache: caches rows of remote tables; in-process tables are on the device already")
        if self.tier.spec() is not None and self.tables != "remote":
            raise ValueError("memory.tier: only remote tables (on memory shards) have an SSD tier")

    @property
    def wire_torch_dtype(self) -> torch.dtype:
        return WIRE_DTYPE_BY_NAME[self.wire_dtype].torch

    @property
    def grad_wire_torch_dtype(self) -> torch.dtype:
        return WIRE_DTYPE_BY_NAME[self.grad_wire_dtype].torch

    def wire_row_bytes(self, dim: int) -> int:
        """Bytes a row of ``dim`` values takes on the wire in ``wire_dtype``, a float8_e4m3 row's scale included."""
        return WIRE_DTYPE_BY_NAME[self.wire_dtype].row_bytes(dim)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run. ``steps`` counts optimizer steps over the global batch (``data.batch_size``)."""

    model: ModelConfig = ModelConfig()
    # Engram in layers 1 and 3 of the default 4-layer model, with CPU-sized tables.
    engram: EngramConfig = EngramConfig(engram_vocab_size=(20011, 20011), n_embed_per_ngram=128,
                                        n_head_per_ngram=4, layer_ids=(1, 3))
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    memory: MemoryConfig = MemoryConfig()
    steps: int = 200
    num_workers: int = 1  # data-parallel training workers (Ray Train)
    use_gpu: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    final_checkpoint: bool = True  # False: no checkpoint at the end either (benchmarks that only time steps)
    eval_batches: int = 8
    output_dir: str = "runs/engram"

    def __post_init__(self):
        if self.steps < 1 or self.num_workers < 1 or self.log_every < 1:
            raise ValueError("steps, num_workers and log_every must be >= 1")
        if self.data.batch_size % self.num_workers:
            raise ValueError(f"data.batch_size ({self.data.batch_size}) must be divisible by num_workers "
                             f"({self.num_workers})")
        if self.memory.tables == "local" and self.num_workers > 1:
            raise ValueError("memory.tables: local tables train on one worker; use remote tables for num_workers > 1")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        bad = [i for i in self.engram.layer_ids if not 0 <= i < self.model.num_layers]
        if bad:
            raise ValueError(f"engram.layer_ids {bad} outside 0..{self.model.num_layers - 1}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return dataclass_from_mapping(cls, load_yaml(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "TrainConfig":
        """A copy with whole fields or ``section__field`` values replaced (e.g. ``memory__staleness=1``)."""
        top = {k: v for k, v in sections.items() if "__" not in k}
        fields_by_section: dict[str, dict] = {}
        for key, value in sections.items():
            if "__" in key:
                section, field = key.split("__", 1)
                fields_by_section.setdefault(section, {})[field] = value
        # A section's fields change together: each may be valid only with the others (memory.tables and cache).
        for section, fields in fields_by_section.items():
            top[section] = dataclasses.replace(top.get(section, getattr(self, section)), **fields)
        return dataclasses.replace(self, **top)


def table_name(layer_id: int) -> str:
    """The memory service's name for an Engram layer's table."""
    return f"engram_layer_{layer_id}"
