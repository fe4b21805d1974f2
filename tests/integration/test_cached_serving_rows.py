"""The hot-row cache in front of remote serving tables: lookups give the rows the shards hold whether they hit or
miss, the cache fills with the most looked-up rows within its capacity from the lookups' own misses (no fetch of its
own), generation keeps its tokens, and updates are refused. (Tables that train behind the cache: tests/integration/test_training.py.)"""
from __future__ import annotations

import time

import pytest
import torch

from bench.generate import serving_runtimes
from compute.generate import Generator
from compute.memory.cached_table import CachedRowTable
from compute.train.config import CacheConfig
from tests.integration.tiny_runs import tiny_run

CAPACITY = 24


def wait_for_cache(table: CachedRowTable, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not len(table.cached_ids) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.ray
def test_cached_rows_equal_the_shards_rows_hit_or_miss_and_generation_keeps_its_tokens(ray_cluster, tmp_path):
    # Asking the shards for the rows the cache misses (not reading them out of the shards' shared memory): what a
    # cache on another machine than the shards does, and the wire bytes it saves.
    config = tiny_run(tmp_path, memory__cache=CacheConfig(rows=CAPACITY, readmit_every=3), memory__read_shared_rows=False)
    local, cached, handle = serving_runtimes(config, torch.device("cpu"), shards=2)
    try:
        layer = config.engram.layer_ids[0]
        table, in_process = cached.tables[layer], local.tables[layer]
        assert isinstance(table, CachedRowTable)
        generator = torch.Generator().manual_seed(0)
        hot = torch.randperm(table.num_rows, generator=generator)[:CAPACITY // 2]
        fetched_before = table.client.moved().get("lookup", {}).get("rows", 0)
        for batch in range(12):
            # Mostly hot rows, some of the rest: both hits and misses once the cache holds the hot ones.
            ids = torch.where(torch.rand(2, 8, 3, generator=generator) < 0.8,
                              hot[torch.randint(len(hot), (2, 8, 3), generator=generator)],
                              torch.randint(table.num_rows, (2, 8, 3), generator=generator))
            rows, expected = table.lookup(ids).result(), in_process.lookup(ids).result()
            assert torch.equal(rows.unique_rows[rows.inverse], expected.unique_rows[expected.inverse]), batch
            if batch == 2:
                wait_for_cache(table)
        cached_ids = table.cached_ids
        assert 0 < len(cached_ids) <= CAPACITY
        assert set(hot.tolist()) <= set(cached_ids.tolist())  # the most looked-up rows
        assert table.stats.hits > 0 and table.stats.rows > table.stats.hits
        assert table.stats.bytes_saved == table.stats.hits * table.dim * 2  # bfloat16 rows on the wire
        # Admitted rows come with the lookups that miss them: the rows fetched are the misses, no more.
        assert table.client.moved()["lookup"]["rows"] - fetched_before == table.stats.rows - table.stats.hits
        assert table.stats.bytes_admitted == 0
        with pytest.raises(ValueError, match="a serving table takes no updates"):
            table.apply_gradients(torch.arange(3), rows, step=0)

        prompts = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12]]
        tokens = [Generator(runtime.model, runtime.compressor, runtime.hasher).generate_ids(
            prompts, 8, stop_at_eos=False) for runtime in (local, cached)]
        assert tokens[0] == tokens[1]
    finally:
        local.close()
        cached.close()
        handle.stop()
