"""Hashed batches: equal to direct hashing wherever windows are cut, dedup, shard split, ranks and resume."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from compute.config import EngramConfig
from compute.data import BatchHasher, DataConfig, HashedBatch, PackedSequences, hashed_batches
from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor

ENGRAM = EngramConfig(engram_vocab_size=(1009, 1013), max_ngram_size=3, n_embed_per_ngram=8,
                      n_head_per_ngram=2, layer_ids=(0, 2))
DATA = DataConfig(max_files=6, seq_len=32, batch_size=4, num_workers=0, seed=3)
NUM_SLOTS = 16
ROUTING = {0: np.arange(NUM_SLOTS) % 3, 2: (np.arange(NUM_SLOTS) // 4) % 2}


@pytest.fixture(autouse=True, scope="module")
def isolated_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def compressor() -> TokenizerCompressor:
    return TokenizerCompressor.from_file()


def take(loader, n: int) -> list[HashedBatch]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def assert_batches_equal(a: HashedBatch, b: HashedBatch) -> None:
    assert a.step == b.step
    for field in ("input_ids", "labels", "compressed_ids"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)
    assert a.layers.keys() == b.layers.keys()
    for layer in a.layers:
        x, y = a.layers[layer], b.layers[layer]
        for field in ("row_ids", "unique", "inverse"):
            torch.testing.assert_close(getattr(x, field), getattr(y, field), rtol=0, atol=0)
        assert (x.shard_positions is None) == (y.shard_positions is None)
        if x.shard_positions is not None:
            assert x.shard_positions.keys() == y.shard_positions.keys()
            for shard in x.shard_positions:
                torch.testing.assert_close(x.shard_positions[shard], y.shard_positions[shard], rtol=0, atol=0)


def test_row_ids_do_not_depend_on_where_windows_are_cut(compressor):
    hasher = NgramHasher.from_compressor(ENGRAM, compressor)
    stream = compressor.encode("import os\nprint(os.getcwd())\n" * 20)
    whole = hasher.row_ids(compressor.compress(stream[None, :-1]))  # the stream hashed in one piece
    batch_hasher = BatchHasher(compressor, hasher)
    for seq_len in (5, 16, 37):
        packed = PackedSequences(stream, seq_len, batch_hasher.context_len, ENGRAM.pad_id)
        indices = np.arange(len(packed))[::-1].copy()  # any order: each window carries its own context
        batch = batch_hasher(0, *packed.windows(indices))
        for i, index in enumerate(indices):
            span = slice(index * seq_len, (index + 1) * seq_len)
            np.testing.assert_array_equal(batch.input_ids[i].numpy(), stream[span])
            np.testing.assert_array_equal(batch.labels[i].numpy(), stream[span.start + 1 : span.stop + 1])
            np.testing.assert_array_equal(batch.compressed_ids[i].numpy(), compressor.compress(stream[span]))
            for layer in ENGRAM.layer_ids:
                np.testing.assert_array_equal(batch.layers[layer].row_ids[i].numpy(), whole[layer][0, span])


def test_unique_inverse_and_shard_split_describe_the_row_ids():
    batch = take(hashed_batches(DATA, ENGRAM, routing=ROUTING), 1)[0]
    assert batch.input_ids.shape == batch.labels.shape == batch.compressed_ids.shape == (4, 32)
    for layer, rows in batch.layers.items():
        assert rows.row_ids.shape == rows.inverse.shape == (4, 32, ENGRAM.heads_per_layer)
        assert rows.row_ids.dtype == rows.unique.dtype == rows.inverse.dtype == torch.int64
        assert (rows.unique[1:] > rows.unique[:-1]).all()  # sorted and distinct
        torch.testing.assert_close(rows.unique[rows.inverse], rows.row_ids, rtol=0, atol=0)
        positions = torch.cat(list(rows.shard_positions.values()))
        assert sorted(positions.tolist()) == list(range(len(rows.unique)))  # each unique id exactly once
        for shard, where in rows.shard_positions.items():
            assert (ROUTING[layer][rows.unique[where].numpy() % NUM_SLOTS] == shard).all()
            assert (where[1:] > where[:-1]).all()


def test_bad_routing_is_named(compressor):
    hasher = NgramHasher.from_compressor(ENGRAM, compressor)
    with pytest.raises(ValueError, match=r"routing: no owners array for Engram layer\(s\) \[2\]"):
        BatchHasher(compressor, hasher, {0: np.zeros(4, dtype=np.int64)})
    with pytest.raises(ValueError, match=r"routing\[2\]"):
        BatchHasher(compressor, hasher, {0: np.zeros(4, dtype=np.int64), 2: np.array([0.5])})


def test_same_seed_same_batches_with_or_without_workers():
    in_process = take(hashed_batches(DATA, ENGRAM, routing=ROUTING), 3)
    in_workers = take(hashed_batches(dataclasses.replace(DATA, num_workers=2), ENGRAM, routing=ROUTING), 3)
    assert [b.step for b in in_process] == [0, 1, 2]
    for a, b in zip(in_process, in_workers):
        assert_batches_equal(a, b)
    other_seed = take(hashed_batches(dataclasses.replace(DATA, seed=4), ENGRAM), 1)[0]
    assert not torch.equal(other_seed.input_ids, in_process[0].input_ids)


def test_dataset_pickles_without_its_token_stream():
    """Workers started by spawn or forkserver receive the dataset pickled: the stream travels as its path."""
    small = hashed_batches(DATA, ENGRAM, routing=ROUTING).dataset
    large = hashed_batches(dataclasses.replace(DATA, max_files=40), ENGRAM, routing=ROUTING).dataset
    pickled = pickle.dumps(large)
    stream_growth = 4 * (len(large.packed.tokens) - len(small.packed.tokens))  # int32 ids
    assert len(pickled) - len(pickle.dumps(small)) < stream_growth / 10
    assert_batches_equal(pickle.loads(pickled)[5], large[5])


def test_two_ranks_with_half_batches_cover_one_rank_with_the_whole_batch():
    whole = take(hashed_batches(DATA, ENGRAM), 3)
    halves = [take(hashed_batches(DATA, ENGRAM, rank=rank, world_size=2), 3) for rank in range(2)]
    for step in range(3):
        for field in ("input_ids", "labels", "compressed_ids"):
            joined = torch.cat([getattr(halves[rank][step], field) for rank in range(2)])
            torch.testing.assert_close(joined, getattr(whole[step], field), rtol=0, atol=0)
        for layer in ENGRAM.layer_ids:
            joined = torch.cat([halves[rank][step].layers[layer].row_ids for rank in range(2)])
            torch.testing.assert_close(joined, whole[step].layers[layer].row_ids, rtol=0, atol=0)
    with pytest.raises(ValueError, match="world_size 3"):
        hashed_batches(DATA, ENGRAM, world_size=3)


def test_resumed_loader_continues_with_the_next_batch():
    loader = hashed_batches(DATA, ENGRAM, num_steps=5)
    first_two = take(loader, 2)
    position = loader.state_dict()
    assert position["next_step"] == 2
    rest = list(loader)  # iterating again continues from the position too
    assert [b.step for b in first_two + rest] == [0, 1, 2, 3, 4]

    resumed = list(hashed_batches(DATA, ENGRAM, position=position, num_steps=3))
    for a, b in zip(rest, resumed, strict=True):
        assert_batches_equal(a, b)
    # Across an epoch boundary the position still means the same batch.
    steps_per_epoch = loader.steps_per_epoch
    late = dict(position, next_step=steps_per_epoch + 1)
    [expected] = list(hashed_batches(DATA, ENGRAM, num_steps=steps_per_epoch + 2))[-1:]
    assert_batches_equal(take(hashed_batches(DATA, ENGRAM, position=late), 1)[0], expected)

    with pytest.raises(ValueError, match=r"position: saved with different \['seed'\]"):
        hashed_batches(dataclasses.replace(DATA, seed=5), ENGRAM, position=position)


def test_validation_split_reads_other_files():
    train = take(hashed_batches(DATA, ENGRAM), 1)[0]
    validation = hashed_batches(dataclasses.replace(DATA, split="validation"), ENGRAM)
    assert validation.state_dict()["corpus"] != hashed_batches(DATA, ENGRAM).state_dict()["corpus"]
    assert not torch.equal(take(validation, 1)[0].input_ids, train.input_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_every_tensor():
    loader = hashed_batches(DATA, ENGRAM, routing=ROUTING, pin_memory=True)
    batch = take(loader, 1)[0]
    assert batch.input_ids.is_pinned() and batch.labels.is_pinned()
    for rows in batch.layers.values():
        assert rows.row_ids.is_pinned() and rows.inverse.is_pinned() and rows.unique.is_pinned()
        assert all(p.is_pinned() for p in rows.shard_positions.values())
