"""This rank's stream of `HashedBatch`es, built by DataLoader workers, resumable from a saved position."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from compute.config import EngramConfig
from compute.data.config import DataConfig
from compute.data.hashed_batches import BatchHasher, HashedBatch
from compute.data.packing import PackedSequences, StepSchedule
from compute.data.sources import resolve_sources
from compute.data.token_stream import load_token_stream
from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor, default_tokenizer_path

logger = logging.getLogger(__name__)


class StepDataset(Dataset):
    """Item `step` is rank `rank`'s share of global step `step`: a pure function of the step."""

    def __init__(self, packed: PackedSequences, schedule: StepSchedule, batch_hasher: BatchHasher,
                 rank: int = 0, world_size: int = 1):
        schedule.sequences(0, rank, world_size)  # rejects a bad (rank, world_size) here, not in a worker
        self.packed = packed
        self.schedule = schedule
        self.batch_hasher = batch_hasher
        self.rank = rank
        self.world_size = world_size

    def __getitem__(self, step: int) -> HashedBatch:
        windows, contexts = self.packed.windows(self.schedule.sequences(step, self.rank, self.world_size))
        return self.batch_hasher(step, windows, contexts)


class HashedBatchLoader:
    """Iterates this rank's batches from its position; `state_dict()` is the position to checkpoint.

    The position counts batches handed to the caller (not those workers prepared ahead), so a run
    restored from it sees exactly the batches the saved run had not yet consumed.
    """

    def __init__(self, dataset: StepDataset, corpus: str, position: Mapping[str, Any] | None = None,
                 num_steps: int | None = None, num_workers: int = 0, pin_memory: bool = False,
                 worker_start_method: str | None = None):
        """Starts at step 0, or where a saved `position` left off; runs `num_steps` (None: endlessly).

        `corpus` names the token stream, so that a position is never applied to other data.
        """
        self.dataset = dataset
        self.corpus = corpus
        self.next_step = 0
        if position is not None:
            self.next_step = self._checked_start(position)
        self.stop_step = None if num_steps is None else self.next_step + num_steps
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.worker_start_method = worker_start_method

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset.schedule.steps_per_epoch

    def __iter__(self) -> Iterator[HashedBatch]:
        steps = itertools.count(self.next_step) if self.stop_step is None else range(self.next_step, self.stop_step)
        loader = DataLoader(self.dataset, batch_size=None, sampler=steps, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, collate_fn=_as_is,
                            multiprocessing_context=self.worker_start_method if self.num_workers else None)
        for batch in loader:
            self.next_step = batch.step + 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The data position: the next step and what must match for it to mean the same batches."""
        schedule = self.dataset.schedule
        return {
            "next_step": self.next_step,
            "corpus": self.corpus,
            "seq_len": self.dataset.packed.seq_len,
            "batch_size": schedule.global_batch,
            "seed": schedule.seed,
            "shuffle": schedule.shuffle,
        }

    def _checked_start(self, position: Mapping[str, Any]) -> int:
        """The saved position's next step, after checking it was taken on the same data and order."""
        expected = self.state_dict()
        changed = sorted(key for key in expected if key != "next_step" and position.get(key) != expected[key])
        if changed:
            raise ValueError(f"position: saved with different {changed} than this loader's data; cannot resume")
        start = position.get("next_step")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"position: next_step must be an integer >= 0, got {start!r}")
        return start


def _as_is(batch: HashedBatch) -> HashedBatch:
    return batch


def hashed_batches(data: DataConfig, engram: EngramConfig, *, rank: int = 0, world_size: int = 1,
                   routing: Mapping[int, np.ndarray] | None = None, routing_epoch: int = 0,
                   position: Mapping[str, Any] | None = None, num_steps: int | None = None,
                   pin_memory: bool | None = None) -> HashedBatchLoader:
    """Rank `rank`'s batches of `data.split`, each carrying `data.batch_size // world_size` sequences.

    `routing` maps each Engram layer id to its table's slot owners array (as of `routing_epoch`), to
    split unique rows by shard in the loader's workers; `position` (a saved `state_dict()`) resumes where
    it left off without replaying the steps.
    """
    if data.batch_size % world_size:
        raise ValueError(f"batch_size: {data.batch_size} is not divisible by world_size {world_size}")
    tokenizer_path = Path(data.tokenizer_path) if data.tokenizer_path else default_tokenizer_path()
    compressor = TokenizerCompressor.from_file(tokenizer_path)
    files = resolve_sources(data.split_sources, data.split, data.validation_fraction, data.max_files)
    if not files:
        raise ValueError(f"{data.split} split: the sources {list(data.split_sources)} hold no files")
    stream = load_token_stream(files, tokenizer_path, data.eos_token)
    batch_hasher = BatchHasher(compressor, NgramHasher.from_compressor(engram, compressor), routing, routing_epoch)
    packed = PackedSequences(stream, data.seq_len, batch_hasher.context_len, engram.pad_id)
    dataset = StepDataset(packed, StepSchedule(len(packed), data.batch_size, data.seed, data.shuffle),
                          batch_hasher, rank, world_size)
    loader = HashedBatchLoader(dataset, stream.key, position, num_steps, data.num_workers,
                               pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                               worker_start_method=data.worker_start_method)
    logger.info("%s data: %d files, %d tokens, %d sequences of %d, %d steps per epoch, rank %d of %d, from step %d",
                data.split, len(files), len(stream), len(packed), data.seq_len, loader.steps_per_epoch,
                rank, world_size, loader.next_step)
    return loader
