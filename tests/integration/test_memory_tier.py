"""Integration: a tiered table on real shards, 4x the DRAM each shard may give it, trains, moves slots, checkpoints
and restores bit for bit like the same table held all in DRAM; a run whose config puts its tables on the tier trains
like one that does not."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray
import torch

from compute.train.config import TierConfig
from compute.train.job import run_training
from memory_service.core.table_spec import TierSpec
from tests.integration.memory_deploy import deployment, spec
from tests.integration.tiny_runs import tiny_run

pytestmark = pytest.mark.ray

DRAM = spec("dram", rows=8000, dim=8)
TIERED = dataclasses.replace(DRAM, name="tiered", tier=TierSpec(dram_rows=1000))  # 4000 rows a shard on 2 shards


def _train_both(client, rng: np.random.Generator, first_step: int, steps: int) -> None:
    for step in range(first_step, first_step + steps):
        ids = np.unique(rng.integers(0, DRAM.rows, 2500))
        grads = torch.from_numpy(rng.standard_normal((len(ids), DRAM.dim)).astype(np.float32))
        for table in ("dram", "tiered"):
            client.push(table, ids, grads, step=step).result(timeout=60)
        lookup = rng.integers(0, DRAM.rows, 3000)
        assert torch.equal(client.lookup("tiered", lookup, torch.float32).result(timeout=60),
                           client.lookup("dram", lookup, torch.float32).result(timeout=60))


def test_a_tiered_table_trains_moves_and_restores_like_an_all_dram_one(ray_cluster, tmp_path):
    tier_dir, data_root = tmp_path / "tier", tmp_path / "data"
    data_root.mkdir()
    rng = np.random.default_rng(0)
    with deployment([DRAM, TIERED], shards=2, data_root=str(data_root), tier_dir=str(tier_dir)) as (controller, client):
        tables = sorted(path.name.split("-", 2)[2].rsplit("-", 1)[0] for path in tier_dir.iterdir())  # table-<pid>-
        assert tables == ["tiered", "tiered"]
        _train_both(client, rng, first_step=0, steps=4)
        ray.get(controller.checkpoint.remote("saved"))
        ray.get(controller.scale.remote(3))  # slots move between shards: exported from and imported into files
        client.refresh_routing()
        checksums = ray.get(controller.checksums.remote())
        assert len(checksums["tiered"]) == 3 and checksums["tiered"] == checksums["dram"]
        _train_both(client, rng, first_step=4, steps=2)
        ray.get(controller.restore.remote("saved"))
        client.refresh_routing()
        checksums = ray.get(controller.checksums.remote())
        assert checksums["tiered"] == checksums["dram"]
        assert len(list(tier_dir.iterdir())) == 3  # the replaced tables' files are gone
        every_row = np.arange(DRAM.rows)
        assert torch.equal(client.lookup("tiered", every_row, torch.float32).result(timeout=60),
                           client.lookup("dram", every_row, torch.float32).result(timeout=60))


def test_a_run_with_its_tables_on_the_tier_trains_like_one_without(ray_cluster, tmp_path):
    config = tiny_run(tmp_path, final_checkpoint=False)
    tier_dir = tmp_path / "tier"
    tiered = config.replace(output_dir=str(tmp_path / "tiered"),
                            memory__tier=TierConfig(dram_rows=40, dir=str(tier_dir)))  # of ~450 rows a shard
    assert run_training(tiered)["loss"] == run_training(config)["loss"]
    # The run's shards kept the tables' files there, and removed them when it ended.
    assert tier_dir.is_dir() and not list(tier_dir.iterdir())
