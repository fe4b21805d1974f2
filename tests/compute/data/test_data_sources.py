"""Data sources, the stdlib split, DataConfig and the cached token stream."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from compute.data import DataConfig, load_token_stream, read_documents, resolve_sources, stdlib_files
from compute.data.sources import SourceFile, stdlib_root
from compute.hashing.tokenizer_compression import default_tokenizer_path

EOS_ID = 1  # DeepSeek's <｜end▁of▁sentence｜>


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(default_tokenizer_path()))


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_each_source_kind_yields_its_documents(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("one document\nover two lines", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second"})])
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma"], "n": [1, 2, 3]}), parquet, row_group_size=2)

    files = resolve_sources((str(text), str(jsonl), str(parquet)), "train", 0.02)

    assert [f.kind for f in files] == ["text", "jsonl", "parquet"]
    assert [list(read_documents(f)) for f in files] == [
        ["one document\nover two lines"], ["first", "second"], ["alpha", "beta", "gamma"]]


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated', "not valid JSON"),
    ('{"body": "no text field"}', "string 'text' field"),
    ('["a", "list"]', "string 'text' field"),
])
def test_bad_jsonl_line_is_named_by_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), bad_line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        list(read_documents(SourceFile(path, "jsonl")))


def test_bad_parquet_and_text_files_are_named(tmp_path):
    parquet = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    with pytest.raises(ValueError, match=r"no_text\.parquet: no 'text' column"):
        list(read_documents(SourceFile(parquet, "parquet")))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        list(read_documents(SourceFile(latin1, "text")))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        resolve_sources((str(tmp_path / "missing.txt"),), "train", 0.02)


def test_stdlib_splits_by_file_deterministically():
    train, validation = stdlib_files("train", 0.02), stdlib_files("validation", 0.02)
    all_files = {p for p in stdlib_root().rglob("*.py") if "site-packages" not in p.parts}

    assert {f.path for f in train}.isdisjoint(f.path for f in validation)
    assert {f.path for f in train} | {f.path for f in validation} == all_files
    assert 0.005 < len(validation) / len(all_files) < 0.05
    assert [f.path for f in train] == sorted(f.path for f in train)
    assert stdlib_files("validation", 0.02) == validation


def test_max_files_spreads_evenly_over_the_sorted_files():
    every = resolve_sources(("stdlib",), "train", 0.02)
    chosen = resolve_sources(("stdlib",), "train", 0.02, max_files=4)
    assert chosen == [every[i * len(every) // 4] for i in range(4)]


def test_data_config_reads_yaml_and_names_bad_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  sources: [a.jsonl, stdlib]\n  seq_len: 64\n  max_files: 10\n  split: validation\n")
    config = DataConfig.from_yaml(path)
    assert config.sources == ("a.jsonl", "stdlib") and config.seq_len == 64 and config.max_files == 10
    assert config.split_sources == ("stdlib",)

    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=0)
    with pytest.raises(ValueError, match="split"):
        DataConfig(split="test")
    with pytest.raises(ValueError, match="worker_start_method"):
        DataConfig(worker_start_method="vfork")
    path.write_text("data:\n  seq_lenn: 64\n")
    with pytest.raises(ValueError, match="seq_lenn"):
        DataConfig.from_yaml(path)


def test_token_stream_joins_documents_with_eos_and_is_cached(tmp_path, tokenizer, caplog):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"text": t}) for t in ("def f(x):", "return x + 1")])
    files = resolve_sources((str(jsonl),), "train", 0.02)

    stream = load_token_stream(files, default_tokenizer_path(), DataConfig.eos_token)

    expected = []
    for text in ("def f(x):", "return x + 1"):
        expected += tokenizer.encode(text, add_special_tokens=False).ids + [EOS_ID]
    assert stream.ids.tolist() == expected
    with caplog.at_level(logging.INFO, logger="compute.data.token_stream"):
        cached = load_token_stream(files, default_tokenizer_path(), DataConfig.eos_token)
    assert "loaded from" in caplog.text and cached.path == stream.path and cached.key == stream.key
    np.testing.assert_array_equal(cached.ids, stream.ids)

    stat = jsonl.stat()  # an edited file (new mtime) must not reuse the old tokens
    os.utime(jsonl, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_token_stream(files, default_tokenizer_path(), DataConfig.eos_token).key != stream.key


def test_a_bad_file_leaves_no_cache(tmp_path):
    jsonl = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "{oops"])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_token_stream(resolve_sources((str(jsonl),), "train", 0.02), default_tokenizer_path(), DataConfig.eos_token)
    assert not list((tmp_path / "cache").glob("tokens-*"))
