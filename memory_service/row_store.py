"""The rows a shard holds: per table, the dense rows and optimizer state of the slots it owns.

Storage is one flat tensor per table (and per optimizer state) with each owned slot's rows
contiguous, so a lookup is ``position = slot_base[row % num_slots] + row // num_slots`` and one
``index_select``. Every call validates all of its input before changing anything; errors carry a
gRPC-style ``code`` and the ``field`` at fault. Methods are thread-safe (one call at a time).

An update is validated once, by ``check_update``, into a ``RowUpdate`` that also holds its rows'
storage positions; ``apply_update`` steps the optimizer at those positions, resolving them again only
if slots moved in or out since (a synchronous step can wait across a move).

A table holding more than ``fill_at_once_rows`` rows on the shard is filled lazily, so that it serves at once:
its rows get their deterministic initial values on first use (lookup, state lookup, update) and from a
background thread a chunk at a time, computed outside the lock and stored only where a row has none yet;
anything that reads the table as a whole (exports, checksums, slot moves) fills the rest first.

Where the store is made with ``share_rows``, a table's rows are kept in a shared-memory file (``shared_table``):
clients on the machine read them without a request. That holds for every read-only table (filled at once,
whatever its size) and, on x86-64, for a table that trains and is filled at once (not tiered): its updates
write inside ``SharedTableRows.writing``, so a read that overlapped one is asked for again. A slot move writes
the rows to a new file and retires the old one.

A table whose spec has a ``tier`` keeps its rows and state in files under the store's ``tier_dir``
with only its hot rows in DRAM (``core.tiered_rows``); lookups and updates go through that cache, and
anything that reads the table as a whole (exports, checksums, slot moves) first writes the cache back.

Exported slots are ``{"slots": int64 [k], "rows": [m, dim], "state.<name>": [m, ...]}`` with the
slots' rows in the order of ``slots``, each slot's rows by local index; bfloat16 rows travel as
their uint16 bit patterns because numpy has no bfloat16.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch

from memory_service.core import push_checks
from memory_service.core.optimizers import SparseOptimizer, make_optimizer
from memory_service.core.row_init import fill_initial_rows
from memory_service.core.slots import slot_and_local
from memory_service.core.table_spec import TableSpec
from memory_service.core.tiered_rows import TieredRows, TierStats, numpy_storage_dtype
from memory_service.shared_table import SharedTableRows
from protos.wire import WIRE_DTYPE_BY_NAME

log = logging.getLogger(__name__)

_STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_PREFIX = "state."


class RowStoreError(Exception):
    """A refused call: ``code`` is a gRPC status name, ``field`` the input at fault."""

    def __init__(self, code: str, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field


class SlotNotOwned(RowStoreError):
    """Rows or slots that this shard does not own (any more); the client should refresh its routing."""

    def __init__(self, table: str, slots: Iterable[int], field: str = "row_ids"):
        self.slots = sorted(int(slot) for slot in slots)
        shown = self.slots[:8] + (["..."] if len(self.slots) > 8 else [])
        super().__init__("FAILED_PRECONDITION", field,
                         f"table {table!r}: slots {shown} are not owned by this shard")


def table_bytes(spec: TableSpec, slots: Iterable[int]) -> int:
    """Bytes of DRAM a shard needs to hold ``slots`` of ``spec``: rows and optimizer state (with a tier, its cache
    and index), and the slot index (the row ids that initialise the rows come a bounded batch at a time). Exact in
    Python integers, whatever the sizes."""
    rows = sum(spec.rows_in_slot(slot) for slot in slots)
    return spec.dram_bytes(rows) + spec.num_slots * 8


def default_tier_dir() -> Path:
    """Where tiered tables keep their files unless the shard is told otherwise: under the system's temporary
    folder (put it on a local SSD with ``--tier-dir``)."""
    return Path(tempfile.gettempdir()) / "engram-tier"


_FILL_CHUNK_ROWS = 1 << 16  # rows given their initial values per chunk: 16 MiB of float32 rows at dim 64
# A table holding more rows than this on a shard is filled lazily: its rows get their initial values on first
# use and from a background thread, so that it serves at once (a 50M-row share takes a minute or more to fill).
FILL_AT_ONCE_ROWS = 1 << 22
# Whether a reader in another process sees a table's write count and its rows in the order written, with no
# fences (x86-64's memory model): only then are the rows of a table that trains shared (``SharedTableRows``).
_READERS_SEE_WRITES_IN_ORDER = platform.machine().lower() in ("x86_64", "amd64")


def _storage_chunks(spec: TableSpec, slots: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """``(first storage position, row ids)`` of consecutive pieces of the storage of ``slots`` (stored slot after
    slot), at most ``_FILL_CHUNK_ROWS`` rows each: small slots share a chunk, a large one spans several, and the
    row ids of a large table are never all in memory."""
    start, pieces, held = 0, [], 0
    for slot in slots:
        rows = spec.rows_in_slot(slot)
        for first in range(0, rows, _FILL_CHUNK_ROWS):
            count = min(rows - first, _FILL_CHUNK_ROWS)
            if held + count > _FILL_CHUNK_ROWS:
                yield start, np.concatenate(pieces)
                start, pieces, held = start + held, [], 0
            pieces.append(slot + spec.num_slots * np.arange(first, first + count, dtype=np.int64))
            held += count
    if pieces:
        yield start, np.concatenate(pieces)


def _fill_initial_slots(rows: torch.Tensor, spec: TableSpec, slots: list[int]) -> None:
    """The initial values of ``slots``' rows into ``rows``, stored slot after slot."""
    for start, row_ids in _storage_chunks(spec, slots):
        fill_initial_rows(rows[start:start + len(row_ids)], spec.seed, row_ids, spec.init_std)


def _initial_values(spec: TableSpec, row_ids: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    values = torch.empty(len(row_ids), spec.dim, dtype=dtype)
    fill_initial_rows(values, spec.seed, row_ids, spec.init_std)
    return values


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _tier_files_error(table: str, directory: Path, error: OSError) -> RowStoreError:
    """A tiered table's files that could not be made: RESOURCE_EXHAUSTED where the disk (or the process's file
    size limit) has no room, else FAILED_PRECONDITION (the folder cannot be written, say)."""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return RowStoreError("RESOURCE_EXHAUSTED" if full else "FAILED_PRECONDITION", "tier",
                         f"table {table!r}: cannot make its files under {directory} ({error})")


def _invalid(field: str, message: str) -> RowStoreError:
    return RowStoreError("INVALID_ARGUMENT", field, message)


def refused_as_invalid(check, *args):
    """Run one of ``push_checks``' checks; its InvalidPush as a RowStoreError (INVALID_ARGUMENT)."""
    try:
        return check(*args)
    except push_checks.InvalidPush as error:
        raise _invalid(error.field, error.reason) from None


_LAYOUT_STAMPS = itertools.count()  # a fresh stamp each time any table's storage is laid out


@dataclasses.dataclass(frozen=True)
class RowUpdate:
    """A validated update of one table: unique int64 ``row_ids`` [n] with float32 ``grads`` [n, dim],
    and the rows' storage ``positions``, which hold while the table's storage ``layout`` is the same."""

    row_ids: torch.Tensor
    grads: torch.Tensor
    positions: torch.Tensor
    layout: int | None  # None: positions not known to hold

    def select(self, index) -> "RowUpdate":
        """The rows ``index`` (a mask, slice or positions) picks."""
        return RowUpdate(self.row_ids[index], self.grads[index], self.positions[index], self.layout)


@dataclasses.dataclass
class _TableShard:
    """One table's share on this shard: rows and state of ``slots``, stored in that order."""

    spec: TableSpec
    optimizer: SparseOptimizer | None  # None for read-only (bfloat16) tables
    slots: list[int]
    rows: torch.Tensor  # with a tier: views of its files, current after tier.flush()
    state: dict[str, torch.Tensor]
    tier: TieredRows | None = None
    # bool [rows]: True where a row has no values yet (a lazily filled table); None once every row has them
    unfilled: torch.Tensor | None = None
    shared: SharedTableRows | None = None  # where ``rows`` are, for readers on this machine
    slot_base: torch.Tensor = dataclasses.field(init=False)  # int64 [num_slots]; -1 where not owned
    layout: int = dataclasses.field(init=False)  # stamp of this storage order, for RowUpdate.positions

    def __post_init__(self):
        self.index_slots()

    def index_slots(self) -> None:
        """Recompute ``slot_base`` from the storage order of ``slots``, under a new layout stamp."""
        self.layout = next(_LAYOUT_STAMPS)
        self.slot_base = torch.full((self.spec.num_slots,), -1, dtype=torch.int64)
        offset = 0
        for slot in self.slots:
            self.slot_base[slot] = offset
            offset += self.spec.rows_in_slot(slot)

    def slot_positions(self, slots: Iterable[int]) -> torch.Tensor:
        """Storage positions of the rows of ``slots`` (owned), slot after slot."""
        pieces = [torch.arange(self.rows_of(slot), dtype=torch.int64) + int(self.slot_base[slot]) for slot in slots]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)

    def rows_of(self, slot: int) -> int:
        return self.spec.rows_in_slot(slot)

    def fill_rows(self, row_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Give the rows ``row_ids`` (at storage ``positions``) their initial values where they have none yet."""
        if self.unfilled is None:
            return
        missing = self.unfilled.index_select(0, positions)
        if bool(missing.any()):
            positions = positions[missing]
            self.rows.index_copy_(0, positions, _initial_values(self.spec, row_ids[missing].numpy(), self.rows.dtype))
            self.unfilled.index_fill_(0, positions, False)

    def fill_chunk(self, start: int, values: torch.Tensor) -> None:
        """Store the initial ``values`` of the rows from storage position ``start`` on, where they have none yet."""
        unfilled = self.unfilled.narrow(0, start, len(values))
        rows = self.rows.narrow(0, start, len(values))
        if bool(unfilled.all()):
            rows.copy_(values)
        else:
            rows[unfilled] = values[unfilled]
        unfilled.fill_(False)

    def fill_all(self) -> None:
        """Give every row that has no values yet its initial values."""
        if self.unfilled is None:
            return
        if not bool(self.unfilled.any()):
            self.unfilled = None
            return
        for start, row_ids in _storage_chunks(self.spec, self.slots):
            if bool(self.unfilled.narrow(0, start, len(row_ids)).any()):
                self.fill_chunk(start, _initial_values(self.spec, row_ids, self.rows.dtype))
        self.unfilled = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Rows and each state, keyed as in an export: every row filled, a tiered table's cache written back."""
        self.fill_all()
        if self.tier is not None:
            self.tier.flush()
        return {"rows": self.rows, **{STATE_PREFIX + name: tensor for name, tensor in self.state.items()}}

    def dram_bytes(self) -> int:
        """DRAM held by rows and state: all of them, or a tier's cache and index."""
        if self.tier is not None:
            return self.tier.dram_bytes()
        return self.rows.nbytes + sum(tensor.nbytes for tensor in self.state.values())

    def view_tier_files(self) -> None:
        """Point ``rows`` and ``state`` at the tier's current files."""
        files = self.tier.files()
        self.rows = files["rows"]
        self.state = {key[len(STATE_PREFIX):]: tensor for key, tensor in files.items() if key != "rows"}

    def relayout_tier(self, slots: list[int], kept: torch.Tensor, incoming: Mapping[str, torch.Tensor]) -> None:
        """A tiered table's storage becomes the rows at positions ``kept`` then ``incoming``, holding ``slots``;
        RowStoreError, and nothing changed, where its new files cannot be made."""
        try:
            self.tier.relayout(kept, incoming)
        except OSError as error:
            raise _tier_files_error(self.spec.name, self.tier.directory, error) from None
        self.slots = slots
        self.view_tier_files()
        self.index_slots()


def _release_files(table: _TableShard) -> None:
    """Remove a dropped table's tier files, and retire its shared rows."""
    if table.tier is not None:
        table.tier.close()
    if table.shared is not None:
        table.shared.retire()


def to_tensor(values) -> torch.Tensor:
    """A tensor sharing memory with ``values``; read-only arrays (from wire bytes) are never written."""
    if isinstance(values, torch.Tensor):
        return values
    array = np.asarray(values)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view; bfloat16 as its uint16 bit patterns."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``_as_numpy``."""
    if dtype == torch.bfloat16:
        return to_tensor(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return to_tensor(np.ascontiguousarray(array))


def _empty_rows(num_rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Storage for rows, in transparent huge pages where the kernel offers them on request (numpy advises
    MADV_HUGEPAGE for large arrays): a random lookup in a table of tens of GB then rarely misses the TLB."""
    return _as_tensor(np.empty((num_rows, dim), dtype=numpy_storage_dtype(dtype)), dtype)


def as_serving_export(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A float32 table's ``export_slots`` as its read-only serving table's: rows rounded to bfloat16
    (as their uint16 bit patterns), optimizer state dropped."""
    rows = torch.from_numpy(np.ascontiguousarray(arrays["rows"], dtype=np.float32)).to(torch.bfloat16)
    return {"slots": arrays["slots"], "rows": _as_numpy(rows)}


class ShardStore:
    """Many tables' rows for the slots this shard owns: lookup, sparse updates and slot moves."""

    def __init__(self, tier_dir: str | Path | None = None, fill_at_once_rows: int = FILL_AT_ONCE_ROWS,
                 fill_in_background: bool = True, share_rows: bool = False):
        """``fill_at_once_rows``: a table holding more rows here is filled lazily, on first use of each row and
        (with ``fill_in_background``) by a thread of its own. ``share_rows``: tables' rows go in shared memory
        where there is room for them (read-only tables, filled at once; tables that train, where filled at once
        and the machine orders memory loads, see the module's docstring)."""
        self._tables: dict[str, _TableShard] = {}
        self._lock = threading.Lock()
        self.tier_dir = Path(tier_dir) if tier_dir else default_tier_dir()  # tiered tables' files, a folder each
        self.fill_at_once_rows, self.fill_in_background = fill_at_once_rows, fill_in_background
        self.share_rows = share_rows

    # ----- tables -----

    def add_table(self, spec: TableSpec, slots: Iterable[int]) -> None:
        """Hold ``slots`` of a new table, with freshly initialised rows and optimizer state."""
        with self._lock:
            if spec.name in self._tables:
                raise RowStoreError("FAILED_PRECONDITION", "name", f"table {spec.name!r} already exists")
            slots = self._checked_new_slots(spec, slots, owned=())
            needed, available = table_bytes(spec, slots), physical_memory_bytes()
            if needed > available:
                raise RowStoreError("RESOURCE_EXHAUSTED", "rows",
                                    f"table {spec.name!r}: its {len(slots)} slots here need {needed} bytes, more than "
                                    f"this machine's {available} bytes of memory")
            started = time.perf_counter()
            num_rows = sum(spec.rows_in_slot(slot) for slot in slots)
            optimizer = None if spec.read_only else make_optimizer(spec.optimizer)
            try:
                if spec.tier is not None:
                    table = self._new_tiered_table(spec, optimizer, slots, num_rows)
                else:
                    shared = self._shared_storage(spec, num_rows)
                    storage_dtype = _STORAGE_DTYPES[spec.storage_dtype]
                    rows = shared.rows if shared else _empty_rows(num_rows, spec.dim, storage_dtype)
                    state = optimizer.initial_state(num_rows, spec.dim) if optimizer else {}
                    table = _TableShard(spec, optimizer, slots, rows, state, shared=shared)
                    if num_rows > self.fill_at_once_rows and shared is None:
                        table.unfilled = torch.ones(num_rows, dtype=torch.bool)
                    else:
                        _fill_initial_slots(rows, spec, slots)
            except MemoryError as error:  # within the machine's memory, but not free now
                raise RowStoreError("RESOURCE_EXHAUSTED", "rows",
                                    f"table {spec.name!r}: cannot allocate {needed} bytes ({error})") from None
            self._tables[spec.name] = table
            log.info("table %s: holding %d slots, %d rows, %.2f GiB at %d B/row, %s in %.1f s", spec.name, len(slots),
                     num_rows, num_rows * spec.bytes_per_row() / 2**30, spec.bytes_per_row(),
                     "initialised" if table.unfilled is None else "allocated (rows fill on first use and in the "
                     "background)", time.perf_counter() - started)
        if table.unfilled is not None and self.fill_in_background:
            threading.Thread(target=self._fill_in_background, args=(table, started), name=f"fill-{spec.name}",
                             daemon=True).start()

    def _shared_storage(self, spec: TableSpec, num_rows: int) -> SharedTableRows | None:
        """Shared-memory storage for a table's rows, where this store shares them and there is room."""
        shareable = spec.read_only or (num_rows <= self.fill_at_once_rows and _READERS_SEE_WRITES_IN_ORDER)
        if not (self.share_rows and shareable and num_rows):
            return None
        try:
            return SharedTableRows(num_rows, spec.dim, _STORAGE_DTYPES[spec.storage_dtype])
        except OSError as error:
            log.warning("table %s: rows kept in private memory, readers on this machine will ask for them: no room "
                        "for %d rows in shared memory (%s)", spec.name, num_rows, error)
            return None

    def _fill_in_background(self, table: _TableShard, started: float) -> None:
        """A lazily filled table's thread: give its rows their initial values, unless it goes first."""
        if self._fill_remaining(table):
            log.info("table %s: all %d rows initialised, %.1f s after it was added", table.spec.name,
                     len(table.rows), time.perf_counter() - started)

    def _fill_remaining(self, table: _TableShard) -> bool:
        """Give a lazily filled table's rows without values their initial values chunk by chunk, each computed
        outside the lock so that lookups and updates go on meanwhile; chunks already filled are skipped. False
        where there was nothing left to fill, or the table was dropped or filled by another caller meanwhile."""
        for start, row_ids in _storage_chunks(table.spec, table.slots):
            unfilled = table.unfilled  # rows only ever gain their values: a chunk seen filled stays filled
            if unfilled is None:
                return False
            if not bool(unfilled.narrow(0, start, len(row_ids)).any()):
                continue
            values = _initial_values(table.spec, row_ids, table.rows.dtype)
            with self._lock:
                if table.unfilled is None or self._tables.get(table.spec.name) is not table:
                    return False
                table.fill_chunk(start, values)
        with self._lock:
            if table.unfilled is None:
                return False
            table.unfilled = None
            return True

    def _filled(self, name: str) -> None:
        """Before a call that needs every row of ``name`` (an export, a checksum, a slot move): fill what a lazily
        filled table still lacks, outside the lock, so the call's own hold of the lock stays short."""
        with self._lock:
            table = self._tables.get(name)
        if table is not None and table.unfilled is not None:
            self._fill_remaining(table)

    def _new_tiered_table(self, spec: TableSpec, optimizer: SparseOptimizer | None, slots: list[int],
                          num_rows: int) -> _TableShard:
        """A table whose rows live in files under ``tier_dir``, initialised there a batch of slots at a time."""
        needed_disk = num_rows * spec.bytes_per_row()
        self.tier_dir.mkdir(parents=True, exist_ok=True)
        free_disk = shutil.disk_usage(self.tier_dir).free
        if needed_disk > free_disk:
            raise RowStoreError("RESOURCE_EXHAUSTED", "tier",
                                f"table {spec.name!r}: its {len(slots)} slots here need {needed_disk} bytes of disk, "
                                f"more than the {free_disk} bytes free under {self.tier_dir}")
        state_shapes = optimizer.state_shapes(spec.dim) if optimizer else {}
        layout = {"rows": (_STORAGE_DTYPES[spec.storage_dtype], (spec.dim,)),
                  **{STATE_PREFIX + name: (torch.float32, shape) for name, shape in state_shapes.items()}}
        try:
            tier = TieredRows(self.tier_dir, spec.name, num_rows, spec.tier.cache_rows(spec.bytes_per_row()), layout)
        except OSError as error:
            raise _tier_files_error(spec.name, self.tier_dir, error) from None
        files = tier.files()
        _fill_initial_slots(files["rows"], spec, slots)
        for name, initial in (optimizer.initial_state(1, spec.dim) if optimizer else {}).items():
            if initial.any():  # the files start as zeros
                files[STATE_PREFIX + name][:] = initial[0]
        table = _TableShard(spec, optimizer, slots, files["rows"], {}, tier)
        table.view_tier_files()
        return table

    def drop_table(self, name: str) -> None:
        with self._lock:
            _release_files(self._table(name))
            del self._tables[name]

    def drop_all_tables(self) -> None:
        """Drop every table (a shard that stops): tiered tables' files and shared rows go with them."""
        with self._lock:
            for table in self._tables.values():
                _release_files(table)
            self._tables = {}

    def shared_rows(self, name: str) -> tuple[SharedTableRows, torch.Tensor]:
        """A table's shared-memory rows and its slot bases (int64 [num_slots], -1 where not owned)."""
        with self._lock:
            table = self._table(name)
            if table.shared is None:
                raise RowStoreError("FAILED_PRECONDITION", "table", f"table {name!r}: its rows are not in shared "
                                    "memory on this shard")
            return table.shared, table.slot_base.clone()

    def tier_stats(self, name: str) -> TierStats | None:
        """A tiered table's cache: rows held, hits, misses, evictions, rows written back; None without a tier."""
        with self._lock:
            tier = self._table(name).tier
            return None if tier is None else tier.stats()

    def specs(self) -> list[TableSpec]:
        with self._lock:
            return [table.spec for table in self._tables.values()]

    def spec(self, name: str) -> TableSpec:
        with self._lock:
            return self._table(name).spec

    def owned_slots(self, name: str) -> list[int]:
        """The slots of ``name`` held here, ascending."""
        with self._lock:
            return sorted(self._table(name).slots)

    def num_rows(self, name: str) -> int:
        with self._lock:
            return len(self._table(name).rows)

    def unfilled_rows(self, name: str) -> int:
        """Rows of a lazily filled table still without their initial values (0 once every row has them)."""
        with self._lock:
            unfilled = self._table(name).unfilled
            return 0 if unfilled is None else int(unfilled.sum())

    def memory_bytes(self) -> int:
        """Bytes of DRAM held by rows and optimizer state (a tiered table's cache and index, not its files)."""
        with self._lock:
            return sum(table.dram_bytes() for table in self._tables.values())

    # ----- lookup and update -----

    def gather(self, name: str, row_ids, dtype: str = "float32") -> torch.Tensor:
        """The rows ``row_ids`` [n] as a [n, dim] tensor of transport ``dtype``; for ``float8_e4m3``
        the wire rows [n, dim + 4] uint8 of ``protos.wire.quantize_rows``."""
        if dtype not in WIRE_DTYPE_BY_NAME:
            raise _invalid("dtype", f"must be one of {list(WIRE_DTYPE_BY_NAME)}, got {dtype!r}")
        wire = WIRE_DTYPE_BY_NAME[dtype]
        with self._lock:
            table = self._table(name)
            ids = self._checked_row_ids(table.spec, row_ids)
            positions = self._positions(table, ids)
            table.fill_rows(ids, positions)
            rows = table.rows.index_select(0, positions) if table.tier is None else table.tier.gather("rows", positions)
        return wire.encode(rows)

    def gather_state(self, name: str, row_ids) -> dict[str, torch.Tensor]:
        """The float32 rows ``row_ids`` [n] of an updatable table with their optimizer state, keyed as in an
        export (``rows``, ``state.<name>``): what a client needs to step copies of them as this shard would."""
        with self._lock:
            table = self._updatable_table(name)
            ids = self._checked_row_ids(table.spec, row_ids)
            positions = self._positions(table, ids)
            table.fill_rows(ids, positions)
            if table.tier is not None:
                return {key: table.tier.gather(key, positions) for key in table.tier.layout}
            return {"rows": table.rows.index_select(0, positions),
                    **{STATE_PREFIX + key: values.index_select(0, positions) for key, values in table.state.items()}}

    def check_servable(self, name: str, row_ids, field: str = "row_ids") -> None:
        """Refuse ``row_ids`` that ``gather`` could not serve (out of range, or on slots not owned here)."""
        with self._lock:
            table = self._table(name)
            self._positions(table, self._checked_row_ids(table.spec, row_ids, field), field)

    def check_update(self, name: str, row_ids, grads) -> RowUpdate:
        """Validate an update of an updatable table: ``row_ids`` [n] unique integers in range on owned
        slots, ``grads`` float32 [n, dim] and finite. Changes nothing."""
        with self._lock:
            table = self._updatable_table(name)
            ids = self._checked_row_ids(table.spec, row_ids)
            refused_as_invalid(push_checks.check_unique, ids)
            grads = to_tensor(grads)
            if grads.dtype != torch.float32:
                raise _invalid("grads", f"must be float32, got {grads.dtype}")
            refused_as_invalid(push_checks.check_grads, grads, len(ids), table.spec.dim)
            return RowUpdate(ids, grads, self._positions(table, ids), table.layout)

    def apply_update(self, name: str, update: RowUpdate) -> None:
        """Step the table's optimizer on the rows of ``update`` (from ``check_update``); all-or-nothing."""
        with self._lock:
            table = self._updatable_table(name)
            positions = update.positions if update.layout == table.layout else self._positions(table, update.row_ids)
            table.fill_rows(update.row_ids, positions)
            if table.tier is None:
                with table.shared.writing() if table.shared else contextlib.nullcontext():
                    table.optimizer.apply_at(table.rows, table.state, positions, update.grads)
            else:
                table.tier.update(positions, lambda cache, entries, part: table.optimizer.apply_at(
                    cache["rows"], {key[len(STATE_PREFIX):]: t for key, t in cache.items() if key != "rows"},
                    entries, update.grads[part]))

    # ----- slot moves -----

    def export_slots(self, name: str, slots: Iterable[int]) -> dict[str, np.ndarray]:
        """Copies of the rows and optimizer state of owned ``slots``, enough to rebuild them exactly."""
        self._filled(name)
        with self._lock:
            table = self._table(name)
            slots = self._checked_owned_slots(table, slots)
            positions = table.slot_positions(slots)
            exported = {key: _as_numpy(tensor.index_select(0, positions)) for key, tensor in table.tensors().items()}
            return {"slots": np.asarray(slots, dtype=np.int64), **exported}

    def import_slots(self, name: str, data: Mapping[str, np.ndarray]) -> None:
        """Take over slots exported by another shard's ``export_slots`` (the table must exist here)."""
        self._filled(name)
        with self._lock:
            table = self._table(name)
            if "slots" not in data:
                raise _invalid("slots", "missing from the imported data")
            slots = self._checked_new_slots(table.spec, self._slot_array(data["slots"]), owned=table.slots)
            incoming = self._checked_import_tensors(table, slots, data)
            if table.tier is not None:
                table.relayout_tier(table.slots + slots, torch.arange(len(table.rows)), incoming)
                return
            merged = {key: torch.cat([tensor, incoming[key]]) for key, tensor in table.tensors().items()}
            self._replace_storage(table, table.slots + slots, merged)

    def release_slots(self, name: str, slots: Iterable[int]) -> None:
        """Forget owned ``slots`` (after they were exported and imported elsewhere)."""
        self._filled(name)
        with self._lock:
            table = self._table(name)
            released = set(self._checked_owned_slots(table, slots))
            kept = [slot for slot in table.slots if slot not in released]
            positions = table.slot_positions(kept)
            if table.tier is not None:
                table.relayout_tier(kept, positions, {})
                return
            self._replace_storage(table, kept, {key: t.index_select(0, positions) for key, t in table.tensors().items()})

    def checksum(self, name: str) -> str:
        """sha256 over the owned slots in slot order: each slot's rows, then each optimizer state."""
        self._filled(name)
        with self._lock:
            table = self._table(name)
            digest = hashlib.sha256()
            tensors = table.tensors().values()
            for slot in sorted(table.slots):
                start, length = int(table.slot_base[slot]), table.rows_of(slot)
                for tensor in tensors:
                    digest.update(_as_numpy(tensor.narrow(0, start, length)).tobytes())
            return digest.hexdigest()

    # ----- validation helpers (called with the lock held) -----

    def _table(self, name: str) -> _TableShard:
        table = self._tables.get(name)
        if table is None:
            raise RowStoreError("NOT_FOUND", "table", f"no table named {name!r} on this shard")
        return table

    def _updatable_table(self, name: str) -> _TableShard:
        table = self._table(name)
        if table.optimizer is None:
            raise RowStoreError("FAILED_PRECONDITION", "table",
                                f"table {name!r} is stored as {table.spec.storage_dtype} for read-only serving")
        return table

    @staticmethod
    def _checked_row_ids(spec: TableSpec, row_ids, field: str = "row_ids") -> torch.Tensor:
        try:
            return push_checks.check_row_ids(to_tensor(row_ids), spec.rows, spec.name)
        except push_checks.InvalidPush as error:
            raise _invalid(field, error.reason) from None

    @staticmethod
    def _positions(table: _TableShard, ids: torch.Tensor, field: str = "row_ids") -> torch.Tensor:
        """Storage positions of in-range ``ids``; SlotNotOwned if any slot is not here."""
        slots, local = slot_and_local(ids, table.spec.num_slots)
        base = table.slot_base.index_select(0, slots)
        if len(base) and int(base.min()) < 0:
            raise SlotNotOwned(table.spec.name, torch.unique(slots[base < 0]).tolist(), field)
        return base.add_(local)

    @staticmethod
    def _slot_array(values) -> list[int]:
        """The imported ``slots``: a one-dimensional array of integers (not floats, booleans or objects)."""
        array = np.asarray(values)
        if array.dtype.kind not in "iu" or array.ndim != 1:
            raise _invalid("slots", f"must be a one-dimensional integer array, got {array.dtype} of shape "
                                    f"{array.shape}")
        return array.tolist()

    @staticmethod
    def _checked_new_slots(spec: TableSpec, slots: Iterable[int], owned: Iterable[int]) -> list[int]:
        slots = [int(slot) for slot in slots]
        bad = [slot for slot in slots if not 0 <= slot < spec.num_slots]
        if bad:
            raise _invalid("slots", f"slot {bad[0]} outside [0, {spec.num_slots}) of table {spec.name!r}")
        if len(set(slots)) != len(slots):
            raise _invalid("slots", "must be unique")
        already = sorted(set(slots) & set(owned))
        if already:
            raise RowStoreError("FAILED_PRECONDITION", "slots",
                                f"table {spec.name!r}: slots {already[:8]} are already owned by this shard")
        return slots

    @staticmethod
    def _checked_owned_slots(table: _TableShard, slots: Iterable[int]) -> list[int]:
        slots = [int(slot) for slot in slots]
        if len(set(slots)) != len(slots):
            raise _invalid("slots", "must be unique")
        missing = set(slots) - set(table.slots)
        if missing:
            raise SlotNotOwned(table.spec.name, missing, field="slots")
        return slots

    @staticmethod
    def _checked_import_tensors(table: _TableShard, slots: list[int], data: Mapping[str, np.ndarray]):
        num_rows = sum(table.rows_of(slot) for slot in slots)
        expected = {key: (tensor.dtype, (num_rows, *tensor.shape[1:])) for key, tensor in table.tensors().items()}
        unknown = sorted(set(data) - set(expected) - {"slots"})
        if unknown:
            raise _invalid(unknown[0], f"unexpected in the imported data of table {table.spec.name!r}")
        incoming = {}
        for key, (dtype, shape) in expected.items():
            if key not in data:
                raise _invalid(key, "missing from the imported data")
            array = np.asarray(data[key])
            wanted = numpy_storage_dtype(dtype)
            if array.dtype != wanted or array.shape != shape:
                raise _invalid(key, f"must be {wanted} of shape {shape}, got {array.dtype} of shape {array.shape}")
            incoming[key] = _as_tensor(array, dtype)
        return incoming

    def _replace_storage(self, table: _TableShard, slots: list[int], tensors: dict[str, torch.Tensor]) -> None:
        rows = tensors["rows"]
        shared = self._shared_storage(table.spec, len(rows))
        if shared is not None:
            rows = shared.rows.copy_(rows)
        if table.shared is not None:  # readers keep the old file's rows until they see it retired
            table.shared.retire()
        table.shared = shared
        table.slots = slots
        table.rows = rows
        table.state = {key[len(STATE_PREFIX):]: tensor for key, tensor in tensors.items() if key != "rows"}
        table.index_slots()
