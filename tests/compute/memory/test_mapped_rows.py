"""A shard's shared table rows as a client maps them: reads give the shard's rows, and a retired file, a slot the
mapping lacks, a dead shard or a write the shard makes meanwhile make the read decline (the client then asks
the shard)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from compute.memory.mapped_rows import MappedRows
from memory_service import row_store
from memory_service.core.table_spec import OptimizerSpec, TableSpec
from memory_service.row_store import RowStoreError, ShardStore
from memory_service.shared_table import SharedTableRows
from protos import engram_memory_v1_pb2 as pb
from protos.wire import SHARED_SEGMENT_DIR, SHARED_TABLE_PREFIX

SPEC = TableSpec("serving", rows=100, dim=8, storage_dtype="bfloat16", num_slots=4, seed=2)


def mapping_of(store: ShardStore, spec: TableSpec | None = None, dtype: int = pb.BFLOAT16) -> MappedRows:
    """A client's mapping of ``spec``'s (default: the serving table's) rows in ``store``."""
    spec = spec or SPEC
    shared, slot_base = store.shared_rows(spec.name)
    return MappedRows(pb.MapRowsResponse(segment=shared.name, rows=len(shared.rows), dim=spec.dim, dtype=dtype,
                                         slot_base=slot_base.numpy().astype("<i8").tobytes()), spec.num_slots,
                      spec.rows)


def test_a_mapped_table_reads_the_rows_the_store_serves_until_its_file_is_retired():
    store = ShardStore(share_rows=True)
    store.add_table(SPEC, [3, 1])
    mapped = mapping_of(store)
    ids = np.array([3, 1, 97, 5, 3, 41])  # slots 3 and 1, a duplicate included
    assert torch.equal(mapped.read(ids), store.gather(SPEC.name, ids, "bfloat16"))
    assert mapped.read(np.array([1, 2])) is None  # slot 2 is not in this file
    for not_the_tables in ([SPEC.rows + 3], [-1]):  # slot 3 and 1 are, but not these rows: the shard says why
        assert mapped.read(np.array(not_the_tables)) is None
    assert mapped.read(np.empty(0, dtype=np.int64)).shape == (0, SPEC.dim)

    store.release_slots(SPEC.name, [3])  # the rows move to a new file; the old one is retired
    assert mapped.read(np.array([1])) is None and not os.path.exists(f"{SHARED_SEGMENT_DIR}/{mapped.segment}")
    remapped = mapping_of(store)
    assert remapped.segment != mapped.segment
    assert torch.equal(remapped.read(np.array([1, 97])), store.gather(SPEC.name, [1, 97], "bfloat16"))
    store.drop_table(SPEC.name)
    assert remapped.read(np.array([1])) is None


def test_a_mapping_of_a_dead_shards_file_declines_to_read():
    shared = SharedTableRows(4, SPEC.dim, torch.bfloat16)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = f"{SHARED_TABLE_PREFIX}{int(dead.stdout)}-0123abcd"
    os.link(f"{SHARED_SEGMENT_DIR}/{shared.name}", f"{SHARED_SEGMENT_DIR}/{name}")
    try:
        mapped = MappedRows(pb.MapRowsResponse(segment=name, rows=4, dim=SPEC.dim, dtype=pb.BFLOAT16,
                                               slot_base=np.zeros(1, "<i8").tobytes()), 1, 4)
        assert not mapped.current() and mapped.read(np.array([0])) is None
    finally:
        os.unlink(f"{SHARED_SEGMENT_DIR}/{name}")
        shared.retire()


TRAINS = TableSpec("trains", rows=100, dim=8, optimizer=OptimizerSpec(kind="adam", lr=0.01), num_slots=4, seed=5)


@pytest.mark.skipif(not row_store._READERS_SEE_WRITES_IN_ORDER, reason="rows that change are shared on x86-64 only")
def test_a_mapped_table_that_trains_reads_its_updates_and_declines_while_the_shard_writes():
    store = ShardStore(share_rows=True)
    store.add_table(TRAINS, range(TRAINS.num_slots))
    mapped = mapping_of(store, TRAINS, pb.FLOAT32)
    ids = np.array([7, 0, 99, 7])
    store.apply_update(TRAINS.name, store.check_update(TRAINS.name, [0, 99], np.ones((2, 8), np.float32)))
    assert torch.equal(mapped.read(ids), store.gather(TRAINS.name, ids))  # the update, in place
    shared, _ = store.shared_rows(TRAINS.name)
    with shared.writing():  # a write under way: the read declines, and the mapping stays current
        assert mapped.read(ids) is None and mapped.current()
    assert torch.equal(mapped.read(ids), store.gather(TRAINS.name, ids))


def test_a_read_that_overlaps_a_write_declines():
    """The shard writes between the read's two looks at its write count: the rows read may be torn."""
    store = ShardStore(share_rows=True)
    store.add_table(SPEC, range(SPEC.num_slots))
    mapped = mapping_of(store)
    shared, _ = store.shared_rows(SPEC.name)

    class WrittenWhileGathered:
        def __init__(self, rows: torch.Tensor):
            self.rows = rows

        def index_select(self, *args) -> torch.Tensor:
            with shared.writing():
                return self.rows.index_select(*args)

    mapped._rows = WrittenWhileGathered(mapped._rows)
    assert mapped.read(np.array([1, 2])) is None


def test_which_tables_are_shared():
    """Read-only ones whatever their size; ones that train where filled at once (and on x86-64); only by a store
    that shares rows."""
    store = ShardStore(share_rows=True, fill_at_once_rows=50, fill_in_background=False)
    store.add_table(TRAINS, range(TRAINS.num_slots))  # 100 rows, filled lazily
    store.add_table(dataclasses.replace(TRAINS, name="small", rows=40), range(TRAINS.num_slots))
    store.add_table(SPEC, range(SPEC.num_slots))  # read-only, 100 rows: filled at once
    with pytest.raises(RowStoreError, match="not in shared memory"):
        store.shared_rows(TRAINS.name)
    assert len(store.shared_rows(SPEC.name)[0].rows) == SPEC.rows
    if row_store._READERS_SEE_WRITES_IN_ORDER:
        assert len(store.shared_rows("small")[0].rows) == 40
    private = ShardStore()
    private.add_table(SPEC, range(SPEC.num_slots))
    with pytest.raises(RowStoreError, match="not in shared memory"):
        private.shared_rows(SPEC.name)


@pytest.mark.parametrize("reply", [
    pb.MapRowsResponse(segment="../etc/passwd", rows=1, dim=1, dtype=pb.BFLOAT16, slot_base=np.zeros(4, "<i8").tobytes()),
    pb.MapRowsResponse(segment=f"{SHARED_TABLE_PREFIX}1-ab", rows=1, dim=1, dtype=pb.BFLOAT16,
                       slot_base=np.zeros(3, "<i8").tobytes()),
    pb.MapRowsResponse(segment=f"{SHARED_TABLE_PREFIX}1-ab", rows=1, dim=1, dtype=99,
                       slot_base=np.zeros(4, "<i8").tobytes()),
])
def test_a_mapping_refuses_what_is_not_a_shared_table(reply):
    with pytest.raises(ValueError, match="not a shared table"):
        MappedRows(reply, num_slots=4, table_rows=100)
