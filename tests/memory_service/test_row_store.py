"""ShardStore: lookups equal the deterministic init, updates are validated then applied atomically,
slots move between stores exactly."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest
import torch

from memory_service.core.optimizers import make_optimizer
from memory_service.core.row_init import init_rows
from memory_service.core.slots import SlotMap, split_by_shard
from memory_service.core.table_spec import OptimizerSpec, TableSpec
from memory_service import row_store
from memory_service.row_store import RowStoreError, ShardStore, SlotNotOwned

SPEC = TableSpec("layer1", rows=1000, dim=8, optimizer=OptimizerSpec(kind="adam", lr=0.01), seed=3, num_slots=16)


def _store(spec: TableSpec = SPEC, slots=None, lazy: bool = False) -> ShardStore:
    """A store holding ``slots`` of ``spec`` (all by default); ``lazy``: its rows are filled on first use only."""
    store = ShardStore(fill_at_once_rows=0, fill_in_background=False) if lazy else ShardStore()
    store.add_table(spec, range(spec.num_slots) if slots is None else slots)
    return store


def _grads(n: int, dim: int = SPEC.dim, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _apply(store: ShardStore, name: str, row_ids, grads) -> None:
    """Validate and apply one update, as a shard does when nothing waits for other ranks."""
    store.apply_update(name, store.check_update(name, row_ids, grads))


def test_gather_returns_the_deterministic_rows_in_each_transport_dtype():
    store = _store()
    row_ids = np.array([999, 0, 17, 17, 512], dtype=np.int64)
    expected = torch.from_numpy(init_rows(SPEC.seed, row_ids, SPEC.dim, SPEC.init_std))
    assert torch.equal(store.gather("layer1", row_ids, "float32"), expected)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(store.gather("layer1", torch.from_numpy(row_ids), str(dtype).split(".")[1]),
                           expected.to(dtype))
    assert store.gather("layer1", np.empty(0, dtype=np.int64)).shape == (0, SPEC.dim)
    # Ids straight from wire bytes arrive as a read-only array.
    wire = np.frombuffer(row_ids.tobytes(), dtype="<i8")
    assert torch.equal(store.gather("layer1", wire), expected)


def test_content_does_not_depend_on_the_shard_count():
    whole = _store()
    slot_map = SlotMap.even(SPEC.num_slots, 3)
    shards = [_store(slots=slot_map.slots_of(shard)) for shard in range(3)]
    row_ids = np.random.default_rng(1).integers(0, SPEC.rows, 300)
    gathered = torch.empty(300, SPEC.dim)
    for shard, positions in split_by_shard(row_ids, slot_map.owners).items():
        gathered[positions] = shards[shard].gather("layer1", row_ids[positions])
    assert torch.equal(gathered, whole.gather("layer1", row_ids))
    assert sum(store.num_rows("layer1") for store in shards) == SPEC.rows


@pytest.mark.parametrize("num_slots, chunk_rows, lazy", [(128, 5, False), (4, 7, False), (4, 7, True)])
def test_rows_initialised_a_chunk_at_a_time_equal_the_deterministic_init(monkeypatch, num_slots, chunk_rows, lazy):
    """Chunks of a few rows, holding several small slots (some slots empty: fewer rows than slots) or a piece
    of a large one, fill every owned row with its own initial values; optimizer state starts at zero."""
    monkeypatch.setattr(row_store, "_FILL_CHUNK_ROWS", chunk_rows)
    spec = TableSpec("t", rows=90, dim=6, seed=4, num_slots=num_slots)
    slots = list(range(num_slots - 1, 0, -2))  # storage order is the given order
    store = _store(spec, slots, lazy)
    row_ids = np.flatnonzero(np.isin(np.arange(spec.rows) % spec.num_slots, slots))
    assert store.num_rows("t") == len(row_ids) == 45
    expected = torch.from_numpy(init_rows(spec.seed, row_ids, spec.dim, spec.init_std))
    assert torch.equal(store.gather("t", row_ids), expected)
    exported = store.export_slots("t", slots)
    assert [key for key in exported if key.startswith("state.")] == ["state.exp_avg", "state.exp_avg_sq", "state.step"]
    assert all(not exported[key].any() for key in exported if key.startswith("state."))


def test_a_lazily_filled_table_fills_the_rows_it_serves_or_updates_and_equals_a_filled_one():
    lazy, filled = _store(lazy=True), _store()
    assert lazy.unfilled_rows("layer1") == SPEC.rows and filled.unfilled_rows("layer1") == 0
    looked_up = np.array([999, 0, 17, 17, 512])
    assert torch.equal(lazy.gather("layer1", looked_up), filled.gather("layer1", looked_up))
    assert lazy.unfilled_rows("layer1") == SPEC.rows - 4
    updated = np.array([0, 3, 512, 700])  # some rows already filled by the lookup, some not
    for store in (lazy, filled):
        _apply(store, "layer1", updated, _grads(4))
    assert lazy.unfilled_rows("layer1") == SPEC.rows - 6
    state = lazy.gather_state("layer1", [3, 5, 999])
    assert all(torch.equal(value, filled.gather_state("layer1", [3, 5, 999])[key]) for key, value in state.items())
    assert lazy.unfilled_rows("layer1") == SPEC.rows - 7
    # Whatever reads the table whole fills it first.
    assert lazy.checksum("layer1") == filled.checksum("layer1")
    assert lazy.unfilled_rows("layer1") == 0


def test_the_background_fill_never_overwrites_an_update_and_stops_with_its_table(monkeypatch):
    """Updates race the background fill chunk by chunk; the filled table equals one filled at once."""
    monkeypatch.setattr(row_store, "_FILL_CHUNK_ROWS", 3)
    spec = TableSpec("big", rows=20_000, dim=8, optimizer=OptimizerSpec(kind="adam", lr=0.01), seed=5, num_slots=16)
    lazy, filled = ShardStore(fill_at_once_rows=100), _store(spec)
    lazy.add_table(spec, range(spec.num_slots))
    lazy.add_table(TableSpec("dropped", rows=20_000, dim=8), range(16))
    lazy.drop_table("dropped")
    for step in range(5):
        row_ids = np.sort(np.random.default_rng(step).choice(spec.rows, 500, replace=False))
        for store in (lazy, filled):
            _apply(store, "big", row_ids, _grads(500, spec.dim, seed=step))
    deadline = time.monotonic() + 60
    while lazy.unfilled_rows("big") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lazy.unfilled_rows("big") == 0
    assert lazy.checksum("big") == filled.checksum("big")
    fills = [thread for thread in threading.enumerate() if thread.name in ("fill-big", "fill-dropped")]
    for thread in fills:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in fills)


def test_an_export_fills_a_lazy_table_outside_the_lock(monkeypatch):
    """While an export computes the rows a lazy table still lacks, lookups and updates go on; the export and
    the table then equal those of a table filled at once that took the same update."""
    monkeypatch.setattr(row_store, "_FILL_CHUNK_ROWS", 100)
    spec = TableSpec("big", rows=2_000, dim=8, optimizer=OptimizerSpec(kind="adam", lr=0.01), seed=5, num_slots=4)
    lazy, filled = _store(spec, lazy=True), _store(spec)
    computing, go_on = threading.Event(), threading.Event()
    initial_values = row_store._initial_values

    def held_back(*args):  # the export's first chunk waits here, outside the lock, until the lookup is done
        computing.set()
        assert go_on.wait(timeout=30)
        return initial_values(*args)

    monkeypatch.setattr(row_store, "_initial_values", held_back)
    exported = {}
    export = threading.Thread(target=lambda: exported.update(lazy.export_slots("big", range(spec.num_slots))))
    export.start()
    assert computing.wait(timeout=30)
    monkeypatch.setattr(row_store, "_initial_values", initial_values)  # lookups fill their own rows as before
    row_ids = np.array([3, 1500, 42], dtype=np.int64)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as meanwhile:  # a call that waited for the lock would time out
            assert torch.equal(meanwhile.submit(lazy.gather, "big", row_ids).result(timeout=30),
                               filled.gather("big", row_ids))
            for store in (lazy, filled):
                meanwhile.submit(_apply, store, "big", row_ids, _grads(3, spec.dim)).result(timeout=30)
    finally:
        go_on.set()
    export.join(timeout=30)
    assert not export.is_alive() and lazy.unfilled_rows("big") == 0
    assert lazy.checksum("big") == filled.checksum("big")
    # The export copied the rows once it had filled them, after the update made meanwhile.
    reference = filled.export_slots("big", range(spec.num_slots))
    assert exported.keys() == reference.keys()
    assert all(np.array_equal(exported[key], reference[key]) for key in reference)


@pytest.mark.parametrize(
    "call, code, field",
    [
        (lambda s: s.gather("nope", [1]), "NOT_FOUND", "table"),
        (lambda s: s.gather("layer1", [0, 1000]), "INVALID_ARGUMENT", "row_ids"),
        (lambda s: s.gather("layer1", [-1]), "INVALID_ARGUMENT", "row_ids"),
        (lambda s: s.gather("layer1", np.array([1.0])), "INVALID_ARGUMENT", "row_ids"),
        (lambda s: s.gather("layer1", np.zeros((2, 2), dtype=np.int64)), "INVALID_ARGUMENT", "row_ids"),
        (lambda s: s.gather("layer1", [1], "int8"), "INVALID_ARGUMENT", "dtype"),
        (lambda s: s.gather("layer1", [0, 12]), "FAILED_PRECONDITION", "row_ids"),
    ],
)
def test_gather_errors_name_their_field(call, code, field):
    store = _store(slots=range(8))  # slots 8..15 live elsewhere
    with pytest.raises(RowStoreError) as caught:
        call(store)
    assert (caught.value.code, caught.value.field) == (code, field)
    assert field in str(caught.value)


def test_slot_not_owned_lists_the_slots():
    store = _store(slots=range(8))
    with pytest.raises(SlotNotOwned) as caught:
        store.gather("layer1", [1, 9, 25, 10, 2])
    assert caught.value.slots == [9, 10]


@pytest.mark.parametrize("lazy", [False, True], ids=["filled", "lazy"])
def test_updates_equal_the_optimizer_on_the_reference_rows(lazy):
    spec = TableSpec("t", rows=500, dim=4, optimizer=OptimizerSpec(kind="adam", lr=0.05), num_slots=8)
    store = _store(spec, lazy=lazy)
    reference = torch.from_numpy(init_rows(spec.seed, np.arange(spec.rows), spec.dim, spec.init_std))
    optimizer = make_optimizer(spec.optimizer)
    state = optimizer.initial_state(spec.rows, spec.dim)
    for step in range(3):
        row_ids = np.random.default_rng(step).choice(spec.rows, 60, replace=False)
        grads = _grads(60, spec.dim, seed=step)
        _apply(store, "t", row_ids, grads)
        index = torch.from_numpy(row_ids)
        rows, touched = reference[index], {k: v[index] for k, v in state.items()}
        optimizer.apply(rows, touched, torch.from_numpy(grads))
        reference[index] = rows
        for key, value in touched.items():
            state[key][index] = value
    assert torch.equal(store.gather("t", np.arange(spec.rows)), reference)


BAD_UPDATES = [
    ("nope", [1], _grads(1), "NOT_FOUND", "table"),
    ("layer1", [1, 1], _grads(2), "INVALID_ARGUMENT", "row_ids"),
    ("layer1", [1, 1000], _grads(2), "INVALID_ARGUMENT", "row_ids"),
    ("layer1", [1, 2], _grads(2).astype(np.float64), "INVALID_ARGUMENT", "grads"),
    ("layer1", [1, 2], _grads(3), "INVALID_ARGUMENT", "grads"),
    ("layer1", [1, 2], _grads(2, dim=7), "INVALID_ARGUMENT", "grads"),
    ("layer1", [1, 2], np.array([[0.0] * 7 + [np.nan]] * 2, dtype=np.float32), "INVALID_ARGUMENT", "grads"),
    ("layer1", [1, 2], np.array([[np.inf] * 8] * 2, dtype=np.float32), "INVALID_ARGUMENT", "grads"),
    ("layer1", [1, 2, 9], _grads(3), "FAILED_PRECONDITION", "row_ids"),  # slot 9 not owned
]


@pytest.mark.parametrize("name, row_ids, grads, code, field", BAD_UPDATES)
def test_bad_updates_are_refused_and_change_nothing(name, row_ids, grads, code, field):
    store = _store(slots=range(8))
    _apply(store, "layer1", [0, 5], _grads(2))  # non-trivial optimizer state
    before = store.checksum("layer1")
    with pytest.raises(RowStoreError) as caught:
        store.check_update(name, row_ids, grads)
    assert (caught.value.code, caught.value.field) == (code, field)
    assert store.checksum("layer1") == before


def test_random_mixed_updates_only_change_the_store_when_valid():
    """Property: a failed update leaves the checksum unchanged; a valid one changes it."""
    rng = np.random.default_rng(7)
    store = _store(slots=range(8))
    for _ in range(40):
        n = int(rng.integers(1, 20))
        row_ids = rng.integers(-5, SPEC.rows + 5, n)
        grads = _grads(n, seed=int(rng.integers(1 << 30)))
        if rng.random() < 0.3:
            grads[rng.integers(n), rng.integers(SPEC.dim)] = np.nan
        before = store.checksum("layer1")
        try:
            _apply(store, "layer1", row_ids, grads)
        except RowStoreError:
            assert store.checksum("layer1") == before
        else:
            assert store.checksum("layer1") != before


def test_read_only_tables_serve_but_refuse_updates():
    spec = TableSpec("frozen", rows=300, dim=8, storage_dtype="bfloat16", seed=1, num_slots=4)
    store = _store(spec)
    row_ids = np.array([5, 299])
    expected = torch.from_numpy(init_rows(1, row_ids, 8, spec.init_std)).to(torch.bfloat16)
    assert torch.equal(store.gather("frozen", row_ids, "bfloat16"), expected)
    assert torch.equal(store.gather("frozen", row_ids, "float32"), expected.float())
    before = store.checksum("frozen")
    with pytest.raises(RowStoreError) as caught:
        _apply(store, "frozen", row_ids, _grads(2))
    assert (caught.value.code, caught.value.field) == ("FAILED_PRECONDITION", "table")
    assert store.checksum("frozen") == before
    assert store.memory_bytes() == 300 * 8 * 2


@pytest.mark.parametrize("spec", [SPEC, TableSpec("frozen", rows=301, dim=8, storage_dtype="bfloat16", num_slots=16),
                                  TableSpec("ada", rows=100, dim=3, optimizer=OptimizerSpec(kind="adagrad"), num_slots=16)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("lazy", [False, True], ids=["filled", "lazy"])
def test_slot_moves_round_trip_exactly(spec, lazy):
    source, target = _store(spec, slots=range(10), lazy=lazy), _store(spec, slots=range(10, 16), lazy=lazy)
    if not spec.read_only:
        touched = np.arange(0, spec.rows, 3)
        touched = touched[touched % 16 < 10]  # the source's slots
        _apply(source, spec.name, touched, _grads(len(touched), spec.dim))
    all_rows = np.arange(spec.rows)
    before = torch.empty(spec.rows, spec.dim, dtype=source.gather(spec.name, [0]).dtype)
    slot_map = SlotMap(epoch=1, owners=[0] * 10 + [1] * 6)
    for shard, store in enumerate((source, target)):
        positions = split_by_shard(all_rows, slot_map.owners)[shard]
        before[positions] = store.gather(spec.name, all_rows[positions])
    checksum_of_all = _store(spec, slots=[])
    checksum_of_all.import_slots(spec.name, source.export_slots(spec.name, range(10)))
    checksum_of_all.import_slots(spec.name, target.export_slots(spec.name, range(10, 16)))

    moved = [9, 2, 7]
    # Imported arrays may be read-only views of received bytes.
    exported = {key: np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)
                for key, array in source.export_slots(spec.name, moved).items()}
    target.import_slots(spec.name, exported)
    source.release_slots(spec.name, moved)
    assert source.owned_slots(spec.name) == [0, 1, 3, 4, 5, 6, 8]
    assert target.owned_slots(spec.name) == [2, 7, 9, 10, 11, 12, 13, 14, 15]
    with pytest.raises(SlotNotOwned):
        source.gather(spec.name, [2])
    slot_map.owners[moved] = 1
    for shard, store in enumerate((source, target)):
        positions = split_by_shard(all_rows, slot_map.owners)[shard]
        assert torch.equal(store.gather(spec.name, all_rows[positions]), before[positions])
    # Optimizer state moved too: both shards' slots, gathered on one store, checksum as before.
    merged = _store(spec, slots=[])
    merged.import_slots(spec.name, source.export_slots(spec.name, source.owned_slots(spec.name)))
    merged.import_slots(spec.name, target.export_slots(spec.name, target.owned_slots(spec.name)))
    assert merged.checksum(spec.name) == checksum_of_all.checksum(spec.name)
    assert merged.num_rows(spec.name) == spec.rows


def test_moved_rows_keep_training_identically():
    """Updates after a move equal updates on a store that never moved its slots."""
    stay, source, target = _store(), _store(slots=range(8)), _store(slots=range(8, 16))
    first = np.arange(0, 1000, 7)
    for store, ids in ((stay, first), (source, first[first % 16 < 8]), (target, first[first % 16 >= 8])):
        _apply(store, "layer1", ids, _grads(len(first))[np.isin(first, ids)])
    target.import_slots("layer1", source.export_slots("layer1", range(8)))
    source.release_slots("layer1", range(8))
    second = np.arange(0, 1000, 5)
    _apply(stay, "layer1", second, _grads(len(second), seed=1))
    _apply(target, "layer1", second, _grads(len(second), seed=1))
    assert target.checksum("layer1") == stay.checksum("layer1")
    assert source.owned_slots("layer1") == [] and source.num_rows("layer1") == 0


def test_an_update_checked_before_its_storage_moved_lands_on_its_rows():
    """A synchronous step can wait across a slot move: its positions are resolved again if needed."""
    moved, unmoved = _store(slots=range(8)), _store(slots=range(8))
    row_ids, grads = np.array([1, 2, 17, 34]), _grads(4)  # slots 1, 2, 1, 2
    waiting = moved.check_update("layer1", row_ids, grads)
    moved.release_slots("layer1", [0])  # slots 1 and 2 now start at storage position 0
    unmoved.release_slots("layer1", [0])
    moved.apply_update("layer1", waiting)
    _apply(unmoved, "layer1", row_ids, grads)
    assert moved.checksum("layer1") == unmoved.checksum("layer1")
    gone = moved.check_update("layer1", row_ids, grads)
    moved.release_slots("layer1", [2])
    before = moved.checksum("layer1")
    with pytest.raises(SlotNotOwned):
        moved.apply_update("layer1", gone)
    assert moved.checksum("layer1") == before


@pytest.mark.parametrize(
    "mutate, field, code",
    [
        (lambda d: d.update(slots=np.array([0])), "slots", "FAILED_PRECONDITION"),  # already owned here
        (lambda d: d.update(slots=np.array([16])), "slots", "INVALID_ARGUMENT"),
        (lambda d: d.pop("state.exp_avg"), "state.exp_avg", "INVALID_ARGUMENT"),
        (lambda d: d.update(rows=d["rows"][:-1]), "rows", "INVALID_ARGUMENT"),
        (lambda d: d.update(rows=d["rows"].astype(np.float64)), "rows", "INVALID_ARGUMENT"),
        (lambda d: d.update(extra=np.zeros(1)), "extra", "INVALID_ARGUMENT"),
        (lambda d: d.pop("slots"), "slots", "INVALID_ARGUMENT"),
        # found by the RPC fuzzer (bench/rpc_fuzzing.py): ImportSlots answered INTERNAL (TypeError) for these
        (lambda d: d.update(slots=d["slots"].reshape(1, 2)), "slots", "INVALID_ARGUMENT"),
        (lambda d: d.update(slots=np.array(8)), "slots", "INVALID_ARGUMENT"),
        (lambda d: d.update(slots=np.array([8.0, 9.0])), "slots", "INVALID_ARGUMENT"),
        (lambda d: d.update(slots=np.array([b"8", b"9"])), "slots", "INVALID_ARGUMENT"),
    ],
)
def test_bad_imports_are_refused_and_change_nothing(mutate, field, code):
    source, target = _store(slots=[8, 9]), _store(slots=range(8))
    data = source.export_slots("layer1", [8, 9])
    mutate(data)
    before = target.checksum("layer1")
    with pytest.raises(RowStoreError) as caught:
        target.import_slots("layer1", data)
    assert (caught.value.field, caught.value.code) == (field, code)
    assert target.checksum("layer1") == before and target.owned_slots("layer1") == list(range(8))


def test_slot_operations_validate_slots():
    store = _store(slots=range(8))
    with pytest.raises(SlotNotOwned) as caught:
        store.export_slots("layer1", [1, 12])
    assert caught.value.slots == [12] and caught.value.field == "slots"
    with pytest.raises(RowStoreError, match="unique"):
        store.release_slots("layer1", [1, 1])
    with pytest.raises(RowStoreError) as caught:
        store.add_table(SPEC, [0])
    assert caught.value.field == "name"
    assert store.owned_slots("layer1") == list(range(8))


def test_tables_are_listed_sized_and_dropped():
    store = _store()
    other = TableSpec("layer2", rows=64, dim=4, optimizer=OptimizerSpec(kind="sgd"), num_slots=8)
    store.add_table(other, [1, 3])
    assert [spec.name for spec in store.specs()] == ["layer1", "layer2"] and store.spec("layer2") == other
    assert store.num_rows("layer2") == 16
    assert store.memory_bytes() == SPEC.rows * SPEC.bytes_per_row() + 16 * other.bytes_per_row()
    store.drop_table("layer1")
    with pytest.raises(RowStoreError) as caught:
        store.num_rows("layer1")
    assert caught.value.code == "NOT_FOUND"


@pytest.mark.parametrize("sizes", [
    dict(rows=2**62, num_slots=16),  # numpy's MemoryError for the row ids
    dict(rows=1000, num_slots=2**62),  # torch's "Storage size calculation overflowed" for the slot index
    dict(rows=100, dim=2**62, num_slots=16),
    dict(rows=10**30, num_slots=10**40),  # OverflowError: Python int too large to convert to C long
])
def test_a_table_larger_than_the_machine_is_refused_before_allocating(sizes):
    """Found by the RPC fuzzer (bench/rpc_fuzzing.py): AddTable with these sizes answered INTERNAL."""
    store = _store()
    spec = TableSpec(name="huge", dim=sizes.pop("dim", 8), **sizes)
    with pytest.raises(RowStoreError) as caught:
        store.add_table(spec, [0, 1])
    assert (caught.value.code, caught.value.field) == ("RESOURCE_EXHAUSTED", "rows")
    assert [s.name for s in store.specs()] == ["layer1"]
