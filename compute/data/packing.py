"""Packing a token stream into fixed-length windows and ordering them into steps and ranks."""
from __future__ import annotations

import numpy as np


class PackedSequences:
    """Window i of a stream is its tokens [i*L, i*L + L + 1): L inputs and the L labels one further on.

    Consecutive windows share one token, so every token of the stream is a label exactly once.
    """

    def __init__(self, tokens, seq_len: int, context_len: int, pad_id: int):
        """`tokens`: an id array or a `TokenStream`; `context_len` tokens before a window are its left context."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.context_len = context_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def windows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The windows [n, L + 1] and left contexts [n, context_len] of sequences `indices` (int64)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and not 0 <= int(indices.min()) <= int(indices.max()) < len(self):
            raise IndexError(f"indices: sequences must lie in [0, {len(self)})")
        positions = indices[:, None] * self.seq_len + np.arange(-self.context_len, self.seq_len + 1)
        rows = self.tokens[np.maximum(positions, 0)].astype(np.int64)
        # Positions before the stream's start read the pad id, as the hasher does for a fresh sequence.
        rows[positions < 0] = self.pad_id
        return rows[:, self.context_len :], rows[:, : self.context_len]


class StepSchedule:
    """Which sequences every step takes: a fresh seeded permutation per epoch, cut into global batches.

    Rank r of w takes rows [r*B/w, (r+1)*B/w) of a step's global batch of B sequences, so any number
    of ranks together cover exactly the sequences one rank with the whole batch would.
    """

    def __init__(self, num_sequences: int, global_batch: int, seed: int, shuffle: bool = True):
        if num_sequences < global_batch:
            raise ValueError(
                f"batch_size: {global_batch} sequences per step, but the corpus packs into only {num_sequences}"
            )
        self.num_sequences = num_sequences
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self._order_epoch: int | None = None
        self._order = np.arange(num_sequences)

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches in one pass; the remainder of a pass is left out."""
        return self.num_sequences // self.global_batch

    def sequences(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Indices of the sequences rank `rank` of `world_size` takes at global step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world_size < 1 or self.global_batch % world_size:
            raise ValueError(f"world_size: {world_size} must divide batch_size {self.global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} outside [0, {world_size})")
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        per_rank = self.global_batch // world_size
        start = step_in_epoch * self.global_batch + rank * per_rank
        return self._epoch_order(epoch)[start : start + per_rank]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.shuffle and epoch != self._order_epoch:  # consecutive steps mostly share an epoch: keep it
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._order_epoch = epoch
        return self._order
