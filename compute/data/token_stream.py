"""The token stream of a corpus: every document's ids then the end-of-document id, cached on disk."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from compute.data.sources import SourceFile, read_documents
from compute.hashing.tokenizer_compression import _save_atomically, cache_dir

logger = logging.getLogger(__name__)

# Bump when the stream's layout changes, so that stale caches are never reused.
_CACHE_VERSION = 1
# Characters handed to one encode_batch call: large enough to keep its threads busy, small enough to show progress.
_ENCODE_CHUNK_CHARS = 2_000_000


class TokenStream:
    """A corpus's token ids (int32) as one array; pickles as its cache path, so workers map it, not copy it."""

    def __init__(self, ids: np.ndarray, key: str, path: Path | None = None):
        """`key` names the corpus (see `corpus_key`); `path` is the cache file holding `ids`, if any."""
        self.ids = ids
        self.key = key
        self.path = path

    @classmethod
    def from_cache(cls, path: Path, key: str) -> "TokenStream":
        return cls(np.load(path, mmap_mode="r"), key, path)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> np.ndarray:
        return self.ids[index]

    def __reduce__(self):
        if self.path is None:  # the cache could not be written: ship the array itself
            return TokenStream, (np.asarray(self.ids), self.key)
        return TokenStream.from_cache, (self.path, self.key)


def tokenizer_sha256(tokenizer_path: Path) -> str:
    return hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()


def end_of_document_id(tokenizer: Tokenizer, eos_token: str) -> int:
    """The id of the token that separates documents in the stream."""
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
        raise ValueError(f"eos_token: {eos_token!r} is not a token of this tokenizer")
    return token_id


def corpus_key(files: list[SourceFile], tokenizer_path: Path, eos_token: str) -> str:
    """Names a stream by what determines it: the tokenizer's content, the separator and each file's identity."""
    stats = [f.path.stat() for f in files]
    identity = {
        "version": _CACHE_VERSION,
        "tokenizer": tokenizer_sha256(tokenizer_path),
        "eos_token": eos_token,
        "files": [
            [str(f.path.resolve()), f.kind, f.lenient_decoding, stat.st_mtime_ns, stat.st_size]
            for f, stat in zip(files, stats)
        ],
    }
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def load_token_stream(files: list[SourceFile], tokenizer_path: Path, eos_token: str) -> TokenStream:
    """The stream of `files`, from the disk cache when present, else tokenized (with a progress bar) and cached."""
    key = corpus_key(files, tokenizer_path, eos_token)
    path = cache_dir() / f"tokens-v{_CACHE_VERSION}-{key}.npy"
    if path.is_file():
        logger.info("token stream of %d files loaded from %s", len(files), path)
        return TokenStream.from_cache(path, key)
    ids = tokenize_files(files, Tokenizer.from_file(str(tokenizer_path)), eos_token)
    _save_atomically(path, ids)
    return TokenStream.from_cache(path, key) if path.is_file() else TokenStream(ids, key)


def tokenize_files(files: list[SourceFile], tokenizer: Tokenizer, eos_token: str) -> np.ndarray:
    """Every document of `files`, in order, each followed by the end-of-document id (int32)."""
    eos = end_of_document_id(tokenizer, eos_token)
    pieces = []
    with tqdm(total=len(files), desc="tokenizing", unit="file", disable=None) as progress:
        for documents, files_done in _document_chunks(files):
            for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
                pieces.append(np.asarray(encoding.ids, dtype=np.int32))
                pieces.append(np.array([eos], dtype=np.int32))
            progress.update(files_done)
    ids = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
    logger.info("tokenized %d files into %d tokens", len(files), len(ids))
    return ids


def _document_chunks(files: list[SourceFile]) -> Iterator[tuple[list[str], int]]:
    """Documents in chunks of about _ENCODE_CHUNK_CHARS, each with the number of files it completed."""
    chunk: list[str] = []
    chars = files_done = 0
    for source in files:
        for document in read_documents(source):
            chunk.append(document)
            chars += len(document)
            if chars >= _ENCODE_CHUNK_CHARS:
                yield chunk, files_done
                chunk, chars, files_done = [], 0, 0
        files_done += 1
    if chunk or files_done:
        yield chunk, files_done
