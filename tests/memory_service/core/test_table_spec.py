"""TableSpec / OptimizerSpec: validation naming the field, dict and YAML round trips, slot sizes."""
from __future__ import annotations

import json

import pytest
import yaml

from memory_service.core.table_spec import OptimizerSpec, SpecError, TableSpec, TierSpec, load_table_specs


def test_dict_round_trip_is_json_safe():
    spec = TableSpec("layer1", rows=1000, dim=32, optimizer=OptimizerSpec(kind="adagrad", lr=0.05), seed=7)
    restored = TableSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec
    assert restored.optimizer == OptimizerSpec(kind="adagrad", lr=0.05)
    assert "tier" not in spec.to_dict()  # specs without a tier read as before tiers existed
    tiered = TableSpec("layer1", rows=1000, dim=32, tier=TierSpec(dram_bytes=1 << 20))
    assert tiered.to_dict()["tier"] == {"dram_bytes": 1 << 20}
    assert TableSpec.from_dict(json.loads(json.dumps(tiered.to_dict()))) == tiered


@pytest.mark.parametrize(
    "values, field",
    [
        ({"name": "", "rows": 10, "dim": 4}, "name"),
        ({"name": "../../x", "rows": 10, "dim": 4}, "name"),
        ({"name": "a/b", "rows": 10, "dim": 4}, "name"),
        ({"name": "..", "rows": 10, "dim": 4}, "name"),
        ({"name": "x" * 65, "rows": 10, "dim": 4}, "name"),
        ({"name": 7, "rows": 10, "dim": 4}, "name"),
        ({"name": "t", "rows": 0, "dim": 4}, "rows"),
        ({"name": "t", "rows": 10, "dim": 2.5}, "dim"),
        ({"name": "t", "rows": 10, "dim": 4, "storage_dtype": "float16"}, "storage_dtype"),
        ({"name": "t", "rows": 10, "dim": 4, "init_std": float("nan")}, "init_std"),
        ({"name": "t", "rows": 10, "dim": 4, "seed": -1}, "seed"),
        ({"name": "t", "rows": 10, "dim": 4, "num_slots": 0}, "num_slots"),
        ({"name": "t", "rows": 10, "dim": 4, "colour": "red"}, "colour"),
        ({"name": "t", "dim": 4}, "rows"),
        ({"name": "t", "rows": 10, "dim": 4, "optimizer": {"kind": "lion"}}, "optimizer.kind"),
        ({"name": "t", "rows": 10, "dim": 4, "optimizer": {"lr": -1.0}}, "optimizer.lr"),
        ({"name": "t", "rows": 10, "dim": 4, "optimizer": {"beta2": 1.0}}, "optimizer.beta2"),
        ({"name": "t", "rows": 10, "dim": 4, "optimizer": {"eps": 0.0}}, "optimizer.eps"),
        ({"name": "t", "rows": 10, "dim": 4, "optimizer": {"momentum": 0.9}}, "optimizer.momentum"),
        ({"name": "t", "rows": 10, "dim": 4, "optimizer": {"kind": "sgd", "decoupled_weight_decay": True}},
         "optimizer.decoupled_weight_decay"),
        ({"name": "t", "rows": 10, "dim": 4, "optimizer": "adam"}, "optimizer"),
        ({"name": "t", "rows": 10, "dim": 4, "tier": "ssd"}, "tier"),
        ({"name": "t", "rows": 10, "dim": 4, "tier": {}}, "tier"),
        ({"name": "t", "rows": 10, "dim": 4, "tier": {"dram_rows": 5, "dram_bytes": 500}}, "tier"),
        ({"name": "t", "rows": 10, "dim": 4, "tier": {"dram_rows": 0}}, "tier.dram_rows"),
        ({"name": "t", "rows": 10, "dim": 4, "tier": {"dram_rows": 2.5}}, "tier.dram_rows"),
        ({"name": "t", "rows": 10, "dim": 4, "tier": {"dram_bytes": 51}}, "tier.dram_bytes"),  # a row takes 52
        ({"name": "t", "rows": 10, "dim": 4, "tier": {"dram_gb": 1}}, "tier.dram_gb"),
    ],
)
def test_bad_fields_are_named(values, field):
    with pytest.raises(SpecError) as caught:
        TableSpec.from_dict(values)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_rows_in_slot_covers_every_row_once():
    spec = TableSpec("t", rows=1003, dim=4, num_slots=16)
    sizes = [spec.rows_in_slot(slot) for slot in range(16)]
    assert sum(sizes) == 1003
    assert sizes[:11] == [63] * 11 and sizes[11:] == [62] * 5
    tiny = TableSpec("t", rows=3, dim=4, num_slots=8)
    assert [tiny.rows_in_slot(s) for s in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(SpecError, match="slot"):
        spec.rows_in_slot(16)


def test_bytes_per_row_counts_optimizer_state():
    assert TableSpec("t", 10, 64, optimizer=OptimizerSpec(kind="sgd")).bytes_per_row() == 256
    assert TableSpec("t", 10, 64, optimizer=OptimizerSpec(kind="adagrad")).bytes_per_row() == 260
    assert TableSpec("t", 10, 64, optimizer=OptimizerSpec(kind="adam")).bytes_per_row() == 256 * 3 + 4
    assert TableSpec("t", 10, 64, storage_dtype="bfloat16").bytes_per_row() == 128


def test_load_table_specs(tmp_path):
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump({"tables": [
        {"name": "layer1", "rows": 5000, "dim": 64, "optimizer": {"kind": "adam", "lr": 0.005},
         "tier": {"dram_bytes": 1 << 20}},
        {"name": "layer15", "rows": 7000, "dim": 64, "storage_dtype": "bfloat16", "seed": 3},
    ]}))
    first, second = load_table_specs(path)
    assert first.optimizer.lr == 0.005 and first.optimizer.kind == "adam" and first.tier == TierSpec(dram_bytes=1 << 20)
    assert second.read_only and second.seed == 3


def test_load_table_specs_names_the_bad_entry(tmp_path):
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump({"tables": [{"name": "a", "rows": 5, "dim": 4},
                                               {"name": "b", "rows": 5, "dim": -4}]}))
    with pytest.raises(SpecError) as caught:
        load_table_specs(path)
    assert caught.value.field == "tables[1].dim"
    path.write_text(yaml.safe_dump({"tables": [{"name": "a", "rows": 5, "dim": 4}] * 2}))
    with pytest.raises(SpecError, match="duplicate"):
        load_table_specs(path)
