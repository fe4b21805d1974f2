"""What a deploy says about shard memory: bytes per row by optimizer and dtype, in all and per shard."""
from __future__ import annotations

from memory_service.core.table_spec import OptimizerSpec, TableSpec, TierSpec
from memory_service.deploy import describe_shard_memory


def test_a_large_adam_table_states_its_bytes_per_row_and_share_per_shard():
    spec = TableSpec("layer2", rows=100_000_000, dim=64)
    assert describe_shard_memory(spec, 2) == (
        "table layer2: 100,000,000 rows x 64 float32 + adam state = 772 B/row, 71.9 GiB over 2 shard(s) "
        "(35.9 GiB on the fullest)")


def test_uneven_shares_name_the_fullest_shard_and_copies():
    # 10 slots on 3 shards: 3, 3 and 4 slots of 100 rows; row-wise Adagrad keeps one float a row.
    spec = TableSpec("t", rows=1000, dim=16, num_slots=10, optimizer=OptimizerSpec(kind="adagrad"))
    line = describe_shard_memory(spec, 3, replicas=2)
    assert "+ adagrad state = 68 B/row" in line and "over 3 shard(s) x 2 copies" in line
    assert "(26.6 KiB on the fullest)" in line  # 400 rows x 68 B


def test_read_only_and_sgd_tables_hold_no_optimizer_state():
    assert "64 bfloat16 + no optimizer state (read-only) = 128 B/row" in describe_shard_memory(
        TableSpec("s", rows=10, dim=64, storage_dtype="bfloat16"), 1)
    assert "64 float32 + no optimizer state (sgd) = 256 B/row" in describe_shard_memory(
        TableSpec("s", rows=10, dim=64, optimizer=OptimizerSpec(kind="sgd")), 1)


def test_a_tiered_table_states_the_dram_it_keeps():
    spec = TableSpec("layer2", rows=100_000_000, dim=64, tier=TierSpec(dram_rows=10_000_000))
    assert describe_shard_memory(spec, 2).endswith(  # 10M cached rows x (772 + 13 B) + 50M rows x 4 B
        "(35.9 GiB on the fullest); tiered: 7.5 GiB of DRAM on the fullest, the rest on its disk")
