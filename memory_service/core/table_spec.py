"""Table and optimizer specs: the data that describes an Engram table, saved with every checkpoint.

A table's rows start as ``Normal(0, init_std)`` values that depend only on ``(seed, row id)``
(see ``row_init``). ``storage_dtype='bfloat16'`` halves the memory and is for read-only serving:
such a table refuses updates and keeps no optimizer state.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

OPTIMIZER_KINDS = ("sgd", "adagrad", "adam")
STORAGE_DTYPES = ("float32", "bfloat16")

# A table name becomes a file name in checkpoints: letters, digits, '_', '-' and '.', starting with a
# letter or digit (so never '.' or '..'), at most 64 characters.
TABLE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# DRAM a tier spends besides the cached rows: per row of the shard, which cache entry holds it (int32); per cache
# entry, the position it holds (int64), its access count (int32) and dirty flag (bool).
TIER_INDEX_BYTES_PER_ROW = 4
TIER_BYTES_PER_CACHE_ENTRY = 8 + 4 + 1

# Bytes of optimizer state per row: (values per row element, values per row) for each kind.
_STATE_VALUES = {"sgd": (0, 0), "adagrad": (0, 1), "adam": (2, 1)}


class SpecError(ValueError):
    """A spec field holds a bad value; ``.field`` names it (dotted for nested fields)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _check_number(field: str, value: Any, *, minimum: float, inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(field, f"must be a finite number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        relation = ">=" if inclusive else ">"
        raise SpecError(field, f"must be {relation} {minimum}, got {value!r}")


def _check_int(field: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(field, f"must be >= {minimum}, got {value}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(field, f"must be one of {list(choices)}, got {value!r}")


def _from_mapping(cls, values: Any, field: str):
    """Build ``cls`` from a mapping, naming any unknown key; field checks run in ``__post_init__``."""
    if not isinstance(values, Mapping):
        raise SpecError(field, f"must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{field}." if field else ""
        raise SpecError(f"{prefix}{unknown[0]}", f"unknown field; known: {sorted(known)}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The sparse optimizer applied on the shard and its hyper-parameters.

    ``weight_decay`` is L2 added to the gradient (as torch.optim) unless ``decoupled_weight_decay``
    (AdamW-style, Adam only). ``initial_accumulator`` seeds row-wise Adagrad's accumulator.
    """

    kind: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    initial_accumulator: float = 0.0
    decoupled_weight_decay: bool = False

    def __post_init__(self):
        _check_choice("optimizer.kind", self.kind, OPTIMIZER_KINDS)
        _check_number("optimizer.lr", self.lr, minimum=0.0)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check_number(f"optimizer.{name}", value, minimum=0.0)
            if value >= 1.0:
                raise SpecError(f"optimizer.{name}", f"must be < 1, got {value!r}")
        _check_number("optimizer.eps", self.eps, minimum=0.0, inclusive=False)
        _check_number("optimizer.weight_decay", self.weight_decay, minimum=0.0)
        _check_number("optimizer.initial_accumulator", self.initial_accumulator, minimum=0.0)
        if not isinstance(self.decoupled_weight_decay, bool):
            raise SpecError("optimizer.decoupled_weight_decay",
                            f"must be a boolean, got {self.decoupled_weight_decay!r}")
        if self.decoupled_weight_decay and self.kind != "adam":
            raise SpecError("optimizer.decoupled_weight_decay", f"only applies to adam, not {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OptimizerSpec":
        return _from_mapping(cls, values, "optimizer")


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """An SSD tier: the table's rows and optimizer state live in files on the shard's local disk, and each shard
    keeps at most ``dram_rows`` of them (rows with their state) in DRAM, or as many as ``dram_bytes`` holds.
    Give exactly one of the two."""

    dram_rows: int | None = None
    dram_bytes: int | None = None

    def __post_init__(self):
        if (self.dram_rows is None) == (self.dram_bytes is None):
            raise SpecError("tier", f"give exactly one of dram_rows and dram_bytes, got {self.to_dict()}")
        if self.dram_rows is not None:
            _check_int("tier.dram_rows", self.dram_rows, minimum=1)
        else:
            _check_int("tier.dram_bytes", self.dram_bytes, minimum=1)

    def cache_rows(self, bytes_per_row: int) -> int:
        """Rows a shard keeps in DRAM, for rows of ``bytes_per_row`` (rows and state)."""
        return self.dram_rows if self.dram_rows is not None else self.dram_bytes // bytes_per_row

    def to_dict(self) -> dict[str, Any]:
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TierSpec":
        return _from_mapping(cls, values, "tier")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One Engram table: ``rows`` rows of ``dim`` values, cut into ``num_slots`` slots (slot = row % num_slots)."""

    name: str
    rows: int
    dim: int
    storage_dtype: str = "float32"
    optimizer: OptimizerSpec = OptimizerSpec()
    init_std: float = 0.02
    seed: int = 0
    num_slots: int = 1024
    tier: TierSpec | None = None  # None: every row in DRAM

    def __post_init__(self):
        if not isinstance(self.name, str) or not TABLE_NAME_PATTERN.fullmatch(self.name):
            raise SpecError("name", "must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or "
                            f"digit, got {self.name!r}")
        _check_int("rows", self.rows, minimum=1)
        _check_int("dim", self.dim, minimum=1)
        _check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        if not isinstance(self.optimizer, OptimizerSpec):
            raise SpecError("optimizer", f"must be an OptimizerSpec, got {type(self.optimizer).__name__}")
        _check_number("init_std", self.init_std, minimum=0.0)
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= 2**63:
            raise SpecError("seed", f"must be < 2**63, got {self.seed}")
        _check_int("num_slots", self.num_slots, minimum=1)
        if self.tier is not None:
            if not isinstance(self.tier, TierSpec):
                raise SpecError("tier", f"must be a TierSpec, got {type(self.tier).__name__}")
            if self.tier.cache_rows(self.bytes_per_row()) < 1:
                raise SpecError("tier.dram_bytes", f"must hold at least one row of {self.bytes_per_row()} bytes "
                                f"(values and optimizer state), got {self.tier.dram_bytes}")

    @property
    def read_only(self) -> bool:
        """bfloat16 tables serve lookups only."""
        return self.storage_dtype != "float32"

    def rows_in_slot(self, slot: int) -> int:
        """How many of the table's rows fall in ``slot``."""
        if not 0 <= slot < self.num_slots:
            raise SpecError("slot", f"must be in [0, {self.num_slots}), got {slot}")
        return max(0, -(-(self.rows - slot) // self.num_slots))

    def slots_per_message(self, message_bytes: int) -> int:
        """How many slots' rows and optimizer state fit in half of ``message_bytes`` (at least one): the slot
        batch of a message that moves or copies slots between shards."""
        rows_per_slot = -(-self.rows // self.num_slots)
        return max(1, message_bytes // 2 // max(1, rows_per_slot * self.bytes_per_row()))

    def bytes_per_row(self) -> int:
        """Bytes one row takes on a shard: its values plus its optimizer state."""
        value_bytes = 2 if self.storage_dtype == "bfloat16" else 4
        if self.read_only:
            return self.dim * value_bytes
        per_element, per_row = _STATE_VALUES[self.optimizer.kind]
        return self.dim * value_bytes + 4 * (per_element * self.dim + per_row)

    def dram_bytes(self, rows: int) -> int:
        """DRAM a shard needs for ``rows`` of the table: all of them, or with a tier its cache of rows and their
        state, its bookkeeping and its index of the rows."""
        if self.tier is None:
            return rows * self.bytes_per_row()
        cached = min(rows, self.tier.cache_rows(self.bytes_per_row()))
        return cached * (self.bytes_per_row() + TIER_BYTES_PER_CACHE_ENTRY) + rows * TIER_INDEX_BYTES_PER_ROW

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe mapping that ``from_dict`` turns back into an equal spec (no ``tier`` key without one,
        as before tiers existed)."""
        values = dataclasses.asdict(self)
        if self.tier is None:
            del values["tier"]
        else:
            values["tier"] = self.tier.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TableSpec":
        """Build and validate a spec; a bad or unknown field raises ``SpecError`` naming it."""
        if not isinstance(values, Mapping):
            raise SpecError("table", f"must be a mapping, got {type(values).__name__}")
        values = dict(values)
        if "optimizer" in values:
            values["optimizer"] = OptimizerSpec.from_dict(values["optimizer"])
        if values.get("tier") is not None:
            values["tier"] = TierSpec.from_dict(values["tier"])
        missing = [name for name in ("name", "rows", "dim") if name not in values]
        if missing:
            raise SpecError(missing[0], "is required")
        return _from_mapping(cls, values, "")


def load_table_specs(path: str | Path) -> list[TableSpec]:
    """Read ``tables: [{name, rows, dim, optimizer: {...}, ...}, ...]`` from a YAML file."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    tables = data.get("tables") if isinstance(data, Mapping) else None
    if not isinstance(tables, list) or not tables:
        raise SpecError("tables", f"{path}: expected a non-empty list under 'tables'")
    specs = []
    for index, values in enumerate(tables):
        try:
            specs.append(TableSpec.from_dict(values))
        except SpecError as error:
            raise SpecError(f"tables[{index}].{error.field}", f"{error.reason} (in {path})") from None
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise SpecError("tables", f"{path}: duplicate table names {duplicated}")
    return specs
