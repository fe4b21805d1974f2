"""Tokenizer compression: the golden table, negative ids, the memo and disk caches, cheap pickling."""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest

from compute.hashing import tokenizer_compression
from compute.hashing.tokenizer_compression import TokenizerCompressor


@pytest.fixture(scope="module")
def golden(golden_dir):
    return json.loads((golden_dir / "hash_demo_config.json").read_text())


@pytest.fixture(scope="module")
def compressor():
    return TokenizerCompressor.from_file()


def table_sha256(table: np.ndarray) -> str:
    return hashlib.sha256(table.astype("<i8").tobytes()).hexdigest()


def test_reproduces_the_golden_table(compressor, golden):
    assert compressor.vocab_size == 129280
    assert compressor.compressed_vocab_size == golden["compressed_vocab_size"]
    assert int(compressor.compress(np.array([golden["config"]["pad_id"]]))[0]) == golden["compressed_pad_id"]
    assert table_sha256(compressor.table) == golden["compression_table_sha256"]


def test_golden_texts_encode_and_compress(compressor, golden):
    for case in golden["cases"]:
        input_ids = compressor.encode(case["text"])
        assert input_ids.tolist() == case["input_ids"]
        assert compressor.compress(input_ids).tolist() == case["compressed_ids"]


def test_negative_ids_pass_through_and_shape_is_kept(compressor):
    ids = np.array([[5, -1, 2], [-100, 0, 129279]])
    out = compressor.compress(ids)
    assert out.shape == ids.shape and out.dtype == np.int64
    assert out[0, 1] == -1 and out[1, 0] == -100
    assert out[0, 0] == compressor.table[5] and out[1, 2] == compressor.table[129279]


def test_ids_outside_the_vocabulary_are_rejected(compressor):
    with pytest.raises(ValueError, match="ids"):
        compressor.compress(np.array([129280]))


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        TokenizerCompressor.from_file(tmp_path / "no_such.json")


def test_pickles_cheaply_and_still_encodes(compressor):
    blob = pickle.dumps(compressor)
    assert len(blob) < compressor.table.nbytes + 10_000  # the table, not the tokenizer
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.table, compressor.table)
    assert clone.encode("hello world").tolist() == compressor.encode("hello world").tolist()


def test_disk_cache_is_written_and_read(tmp_path, monkeypatch, compressor):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer_compression, "_memo", {})
    built = TokenizerCompressor.from_file()
    np.testing.assert_array_equal(built.table, compressor.table)
    (cached,) = tmp_path.glob("compression-*.npy")
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary behind

    # A new process (an empty memo) reads the file: a marked table proves it came from disk.
    marked = compressor.table.copy()
    marked[0] = 424242
    np.save(cached, marked)
    monkeypatch.setattr(tokenizer_compression, "_memo", {})
    assert TokenizerCompressor.from_file().table[0] == 424242
    # ...and the in-process memo answers without touching the disk again.
    cached.unlink()
    assert TokenizerCompressor.from_file().table[0] == 424242


def test_corrupt_disk_cache_is_rebuilt(tmp_path, monkeypatch, compressor, caplog):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer_compression, "_memo", {})
    TokenizerCompressor.from_file()
    (cached,) = tmp_path.glob("compression-*.npy")
    cached.write_bytes(b"not a numpy file")
    monkeypatch.setattr(tokenizer_compression, "_memo", {})
    rebuilt = TokenizerCompressor.from_file()
    assert table_sha256(rebuilt.table) == table_sha256(compressor.table)
    assert "unreadable compression cache" in caplog.text
