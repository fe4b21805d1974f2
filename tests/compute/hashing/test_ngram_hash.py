"""N-gram hashing: bit-exact with the golden vectors and with a plain Python reference on any config."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compute.config import EngramConfig
from compute.hashing import ngram_hash
from compute.hashing.ngram_hash import NgramHasher, is_prime

DEMO_VOCAB, DEMO_PAD = 99092, 2

CONFIGS = [
    EngramConfig(),  # the demo's
    EngramConfig(engram_vocab_size=(5_000_000,), max_ngram_size=2, n_embed_per_ngram=4, n_head_per_ngram=1,
                 layer_ids=(3,), seed=7),
    EngramConfig(engram_vocab_size=(1000, 2000, 3000), max_ngram_size=4, n_embed_per_ngram=6, n_head_per_ngram=3,
                 layer_ids=(0, 5, 9), seed=123),
    EngramConfig(engram_vocab_size=(2**28, 977), max_ngram_size=3, n_embed_per_ngram=4, n_head_per_ngram=2,
                 layer_ids=(2, 1), seed=99),  # primes near the largest the float path supports
    EngramConfig(engram_vocab_size=(2, 5), max_ngram_size=3, n_embed_per_ngram=2, n_head_per_ngram=2,
                 layer_ids=(4,), seed=5),  # primes 2..7: remainders 0 and p - 1 are everywhere
]


@pytest.fixture(scope="module")
def golden(golden_dir):
    return json.loads((golden_dir / "hash_demo_config.json").read_text())


@pytest.fixture(scope="module")
def demo_hasher(golden):
    return NgramHasher(EngramConfig(**golden["config"]), golden["compressed_vocab_size"], golden["compressed_pad_id"])


def reference_hash_ids(hasher: NgramHasher, ids: np.ndarray, layer_id: int, context=()) -> np.ndarray:
    """The demo's definition, one position and one head at a time, in Python integers."""
    n_max, pad = hasher.config.max_ngram_size, hasher.compressed_pad_id
    m = [int(v) for v in hasher.multipliers[layer_id]]
    primes = hasher.head_primes[layer_id].tolist()
    result = []
    for row, row_context in zip(ids.tolist(), context or [[]] * len(ids)):
        x = [pad] * (n_max - 1) + list(row_context) + row
        start = len(x) - len(row)
        per_position = []
        for t in range(start, len(x)):
            heads = []
            for n in range(2, n_max + 1):
                mix = 0
                for k in range(n):
                    mix ^= x[t - k] * m[k]
                heads += [mix % p for p in primes[n - 2]]
            per_position.append(heads)
        result.append(per_position)
    return np.array(result, dtype=np.int64).reshape(len(ids), ids.shape[1], -1)


def test_primes_and_multipliers_match_golden(demo_hasher, golden):
    for layer_id in demo_hasher.layer_ids:
        assert demo_hasher.head_primes[layer_id].tolist() == golden["head_primes"][str(layer_id)]
        assert demo_hasher.multipliers[layer_id].tolist() == golden["multipliers"][str(layer_id)]


def test_every_golden_case(demo_hasher, golden):
    for case in golden["cases"]:
        ids = np.array([case["compressed_ids"]])
        hash_ids, row_ids = demo_hasher.hash(ids), demo_hasher.row_ids(ids)
        for layer_id in demo_hasher.layer_ids:
            expected = case["layers"][str(layer_id)]
            assert hash_ids[layer_id][0].tolist() == expected["hash_ids"], (case["text"], layer_id)
            assert row_ids[layer_id][0].tolist() == expected["row_ids"], (case["text"], layer_id)


def test_golden_cases_as_one_batch(demo_hasher, golden):
    length = min(len(case["compressed_ids"]) for case in golden["cases"])
    ids = np.array([case["compressed_ids"][:length] for case in golden["cases"]])
    row_ids = demo_hasher.row_ids(ids)
    for b, case in enumerate(golden["cases"]):
        for layer_id in demo_hasher.layer_ids:
            assert row_ids[layer_id][b].tolist() == case["layers"][str(layer_id)]["row_ids"][:length]


def test_table_layout(demo_hasher):
    for layer_id in demo_hasher.layer_ids:
        primes = demo_hasher.head_primes[layer_id].reshape(-1)
        assert demo_hasher.table_rows(layer_id) == primes.sum()
        assert demo_hasher.head_offsets[layer_id].tolist() == [0, *np.cumsum(primes)[:-1].tolist()]


@pytest.mark.parametrize("config", CONFIGS[1:])
def test_head_primes_are_distinct_primes_above_each_order_size(config):
    hasher = NgramHasher(config, 50, 0)
    all_primes = np.concatenate([p.reshape(-1) for p in hasher.head_primes.values()])
    assert len(set(all_primes.tolist())) == all_primes.size
    for primes in hasher.head_primes.values():
        for order_primes, size in zip(primes, config.engram_vocab_size):
            assert all(is_prime(int(p)) and p >= size for p in order_primes)
            assert np.all(np.diff(order_primes) > 0)


@pytest.fixture(params=["default", "tiny"])
def block_sizes(request, monkeypatch):
    """Run with the real block and chunk sizes, and with tiny ones that put boundaries everywhere."""
    if request.param == "tiny":
        monkeypatch.setattr(ngram_hash, "_BLOCK_TOKENS", 50)
        monkeypatch.setattr(ngram_hash, "_CHUNK_TOKENS", 16)
    return request.param


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(3, 37), (1, 5000), (700, 7)])  # one long row, many short ones
def test_random_ids_match_reference(config, shape, block_sizes):
    vocab = 50 if shape == (700, 7) else DEMO_VOCAB  # tiny vocab: large multipliers, mixes near 2^63
    hasher = NgramHasher(config, vocab, vocab - 1)
    ids = np.random.default_rng(sum(shape)).integers(0, vocab, size=shape)
    hash_ids, row_ids = hasher.hash(ids), hasher.row_ids(ids)
    for layer_id in config.layer_ids:
        expected = reference_hash_ids(hasher, ids, layer_id)
        np.testing.assert_array_equal(hash_ids[layer_id], expected)
        np.testing.assert_array_equal(row_ids[layer_id], expected + hasher.head_offsets[layer_id])


@pytest.mark.parametrize("config", CONFIGS)
def test_newest_position_equals_batch(config):
    hasher = NgramHasher(config, DEMO_VOCAB, DEMO_PAD)
    ids = np.random.default_rng(1).integers(0, DEMO_VOCAB, size=(4, 12))
    batch_rows, batch_hashes = hasher.row_ids(ids), hasher.hash(ids)
    for t in range(ids.shape[1]):
        for first in (max(0, t - config.max_ngram_size + 1), 0):  # the shortest window, and the whole prefix
            rows = hasher.row_ids_at_newest(ids[:, first : t + 1])
            hashes = hasher.hash_at_newest(ids[:, first : t + 1])
            for layer_id in config.layer_ids:
                np.testing.assert_array_equal(rows[layer_id], batch_rows[layer_id][:, t])
                np.testing.assert_array_equal(hashes[layer_id], batch_hashes[layer_id][:, t])


@pytest.mark.parametrize("config", CONFIGS)
def test_left_context_continues_a_sequence(config):
    hasher = NgramHasher(config, DEMO_VOCAB, DEMO_PAD)
    ids = np.random.default_rng(2).integers(0, DEMO_VOCAB, size=(3, 30))
    whole = hasher.row_ids(ids)
    for split in (1, config.max_ngram_size - 1, 10):
        continued = hasher.row_ids(ids[:, split:], left_context=ids[:, :split])
        for layer_id in config.layer_ids:
            np.testing.assert_array_equal(continued[layer_id], whole[layer_id][:, split:])
    context = ids[:, :5]
    layer_id = config.layer_ids[0]
    np.testing.assert_array_equal(
        hasher.hash(ids[:, 5:], left_context=context)[layer_id],
        reference_hash_ids(hasher, ids[:, 5:], layer_id, context=context.tolist())[:, :, :],
    )


def test_results_can_land_in_a_reused_buffer(demo_hasher, golden):
    ids = np.array([golden["cases"][0]["compressed_ids"]])
    buffer = np.full((2, *ids.shape, 16), -1, dtype=np.int64)
    for _ in range(2):
        rows = demo_hasher.row_ids(ids, out=buffer)
        for index, layer_id in enumerate(demo_hasher.layer_ids):
            assert np.shares_memory(rows[layer_id], buffer[index])
            assert rows[layer_id][0].tolist() == golden["cases"][0]["layers"][str(layer_id)]["row_ids"]
    with pytest.raises(ValueError, match="out"):
        demo_hasher.row_ids(ids, out=np.empty((2, *ids.shape, 15), dtype=np.int64))


def test_empty_batches(demo_hasher):
    for shape in [(0, 5), (2, 0)]:
        out = demo_hasher.row_ids(np.zeros(shape, dtype=np.int64))
        assert all(v.shape == (*shape, 16) and v.dtype == np.int64 for v in out.values())


@pytest.mark.parametrize(
    "ids, field",
    [
        (np.array([[1, -1]]), "compressed_ids"),
        (np.array([[1, DEMO_VOCAB]]), "compressed_ids"),
        (np.array([1, 2]), "compressed_ids"),
        (np.array([[1.0, 2.0]]), "compressed_ids"),
    ],
)
def test_bad_ids_are_rejected_by_name(demo_hasher, ids, field):
    with pytest.raises(ValueError, match=field):
        demo_hasher.row_ids(ids)


def test_bad_context_and_windows_are_rejected_by_name(demo_hasher):
    ids = np.ones((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="left_context"):
        demo_hasher.row_ids(ids, left_context=np.ones((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="recent_ids"):
        demo_hasher.row_ids_at_newest(np.ones((2, 0), dtype=np.int64))


def test_bad_construction_is_rejected():
    with pytest.raises(ValueError, match="compressed_pad_id"):
        NgramHasher(EngramConfig(), 10, 10)
    with pytest.raises(ValueError, match="engram_vocab_size"):
        NgramHasher(EngramConfig(engram_vocab_size=(2**31, 2**31)), DEMO_VOCAB, DEMO_PAD)
