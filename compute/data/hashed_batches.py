"""A step's batch with everything the Engram lookups need, computed ahead of the training thread."""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import torch

from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor
from memory_service.core.slots import ShardSplit, split_by_shard


@dataclasses.dataclass
class LayerRows:
    """One Engram layer's rows for a batch: per (token, head), and each distinct row once."""

    row_ids: torch.Tensor  # [B, T, heads] int64 rows of the layer's table
    unique: torch.Tensor  # [U] int64, sorted ascending
    inverse: torch.Tensor  # [B, T, heads] int64: unique[inverse] == row_ids
    # shard -> positions into `unique` of the rows that shard owns (ascending); None without routing.
    shard_positions: dict[int, torch.Tensor] | None = None
    routing_epoch: int | None = None  # the routing epoch `shard_positions` was split under

    def shard_split(self) -> ShardSplit | None:
        """`shard_positions` as the memory client takes them; None without routing."""
        if self.shard_positions is None:
            return None
        return ShardSplit(self.routing_epoch, {shard: p.numpy() for shard, p in self.shard_positions.items()})


@dataclasses.dataclass
class HashedBatch:
    """A step's sequences for one rank: ids, labels, compressed ids and every Engram layer's rows."""

    step: int  # the global step this batch belongs to
    input_ids: torch.Tensor  # [B, T] int64 tokenizer ids
    labels: torch.Tensor  # [B, T] int64: the next token of each input
    compressed_ids: torch.Tensor  # [B, T] int64
    layers: dict[int, LayerRows]  # by Engram layer id

    def pin_memory(self) -> "HashedBatch":
        """The same batch in page-locked memory (the DataLoader calls this when `pin_memory=True`)."""
        return _map_tensors(self, torch.Tensor.pin_memory)


def _map_tensors(value, fn):
    """`value` with `fn` applied to every tensor inside it (dataclasses and dicts walked)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(
            value, **{f.name: _map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value)}
        )
    return value


class BatchHasher:
    """Turns packed windows and their left contexts into a `HashedBatch` (pure numpy/torch, no I/O)."""

    def __init__(self, compressor: TokenizerCompressor, hasher: NgramHasher,
                 routing: Mapping[int, np.ndarray] | None = None, routing_epoch: int = 0):
        """`routing`, if given, maps each Engram layer id to its table's slot owners array [num_slots], as of
        the memory service's `routing_epoch`."""
        if routing is not None:
            missing = sorted(set(hasher.layer_ids) - set(routing))
            if missing:
                raise ValueError(f"routing: no owners array for Engram layer(s) {missing}")
            routing = {layer: self._checked_owners(layer, owners) for layer, owners in routing.items()}
        self.compressor = compressor
        self.hasher = hasher
        self.routing = routing
        self.routing_epoch = routing_epoch

    @property
    def context_len(self) -> int:
        """Tokens of left context an n-gram at a window's first position reads."""
        return self.hasher.config.max_ngram_size - 1

    def __call__(self, step: int, windows: np.ndarray, contexts: np.ndarray) -> HashedBatch:
        """The batch of `windows` [B, T + 1] whose tokens follow `contexts` [B, context_len] in the stream."""
        compressed = self.compressor.compress(windows[:, :-1])
        rows = self.hasher.row_ids(compressed, left_context=self.compressor.compress(contexts))
        return HashedBatch(
            step=step,
            input_ids=torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
            labels=torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
            compressed_ids=torch.from_numpy(compressed),
            layers={layer: self._layer_rows(layer, row_ids) for layer, row_ids in rows.items()},
        )

    def _layer_rows(self, layer: int, row_ids: np.ndarray) -> LayerRows:
        unique, inverse = np.unique(row_ids, return_inverse=True)
        shard_positions = None
        if self.routing is not None:
            split = split_by_shard(unique, self.routing[layer])
            shard_positions = {shard: torch.from_numpy(positions) for shard, positions in split.items()}
        return LayerRows(
            row_ids=torch.from_numpy(row_ids),
            unique=torch.from_numpy(unique),
            inverse=torch.from_numpy(inverse.reshape(row_ids.shape)),
            shard_positions=shard_positions,
            routing_epoch=None if shard_positions is None else self.routing_epoch,
        )

    @staticmethod
    def _checked_owners(layer: int, owners) -> np.ndarray:
        owners = np.asarray(owners)
        if owners.ndim != 1 or owners.size == 0 or not np.issubdtype(owners.dtype, np.integer):
            raise ValueError(f"routing[{layer}]: expected a non-empty 1-D integer owners array, got {owners.dtype} "
                             f"{owners.shape}")
        if int(owners.min()) < 0:
            raise ValueError(f"routing[{layer}]: shard indices must be >= 0, got {int(owners.min())}")
        return owners
