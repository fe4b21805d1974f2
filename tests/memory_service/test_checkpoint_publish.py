"""A checkpoint becomes visible whole or not at all: written in a hidden sibling, renamed into place."""
from __future__ import annotations

import json

import pytest

from memory_service import checkpoint
from memory_service.checkpoint import PathRefused


def _write(folder, text: str) -> None:
    (folder / "t").mkdir()
    (folder / "t" / "shard-0000.npz").write_text(text)
    (folder / checkpoint.MANIFEST).write_text(json.dumps({"text": text}))


def test_a_new_checkpoint_appears_only_when_published(tmp_path):
    target = tmp_path / "ckpt"
    staging = checkpoint.staging_folder(target)
    assert staging.parent == tmp_path and staging.name.startswith(".ckpt.partial-")
    _write(staging, "new")
    assert not target.exists()
    checkpoint.publish(staging, target)
    assert (target / "t" / "shard-0000.npz").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_replacing_a_checkpoint_swaps_it_whole_and_a_failed_one_leaves_the_old(tmp_path):
    target = tmp_path / "ckpt"
    first = checkpoint.staging_folder(target)
    _write(first, "old")
    checkpoint.publish(first, target)
    failed = checkpoint.staging_folder(target)
    (failed / "t").mkdir()  # a checkpoint that fails halfway
    checkpoint.discard(failed)
    assert (target / "t" / "shard-0000.npz").read_text() == "old"
    second = checkpoint.staging_folder(target)
    _write(second, "new")
    checkpoint.publish(second, target)
    assert (target / "t" / "shard-0000.npz").read_text() == "new"
    assert json.loads((target / checkpoint.MANIFEST).read_text()) == {"text": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_folder_that_is_not_a_checkpoint_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PathRefused, match="not a checkpoint"):
        checkpoint.staging_folder(tmp_path / "mine")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(PathRefused, match="not a checkpoint"):
        checkpoint.staging_folder(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]


@pytest.mark.parametrize("steps", [{"synchronous": "x"}, {"ranks": {"a": 1}}, {"ranks": [1]}])
def test_step_counters_are_checked(steps):
    with pytest.raises(ValueError, match="not step counters"):
        checkpoint.step_counters(steps)
    assert checkpoint.step_counters({"synchronous": 4, "ranks": {"1": 7}}) == {"synchronous": 4, "ranks": {1: 7}}
