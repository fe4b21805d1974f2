"""Where an Engram layer's rows come from: the one table protocol every caller uses."""
from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
from typing import Callable, Mapping

import torch

from compute.memory.futures import follow
from kernels import RowSegments
from memory_service.core.slots import ShardSplit


@dataclasses.dataclass
class EngramRows:
    """The rows a batch touches: each distinct row once, plus where every (token, head) finds its row."""

    unique_rows: torch.Tensor  # [U, dim]; after backward, its gradient is what apply_gradients applies
    inverse: torch.Tensor  # [B, T, heads] int64 indices into unique_rows
    # The entries grouped by row, built ahead for the GPU backward (``kernels.row_segments``).
    segments: RowSegments | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EngramRows":
        segments = self.segments and RowSegments(*(t.to(device, non_blocking=non_blocking) for t in self.segments))
        return EngramRows(
            self.unique_rows.to(device, non_blocking=non_blocking),
            self.inverse.to(device, non_blocking=non_blocking),
            segments,
        )


class RowTable(abc.ABC):
    """One Engram layer's table of ``num_rows`` rows of ``dim`` values, wherever the rows live.

    Trainer, runtime and generator hold tables only through these methods and never ask which kind
    they hold. The kinds today: ``LocalRowTable`` (``compute.memory.local_table``: rows in this
    process, stepped by the service's sparse optimizer), ``RemoteRowTable``
    (``compute.memory.remote_table``: rows on the memory service's shards) and ``CachedRowTable``
    (``compute.memory.cached_table``: a remote serving table with its hottest rows kept on the device).

    Row ids are deduplicated once: a training batch arrives deduplicated by the loader and goes to
    ``prefetch``; ``lookup``, for paths that start from raw ids (generation, evaluation), dedups them.
    """

    num_rows: int
    dim: int

    def lookup(self, row_ids: torch.Tensor) -> concurrent.futures.Future:
        """A future of the rows for raw ``row_ids [B, T, heads]`` (int64), as unique rows plus an inverse index."""
        check_row_ids(row_ids, self.num_rows)
        unique_ids, inverse = torch.unique(row_ids, return_inverse=True)
        return self.prefetch(unique_ids, inverse)

    @abc.abstractmethod
    def prefetch(self, unique_ids: torch.Tensor, inverse: torch.Tensor,
                 shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        """Start fetching the rows of sorted, distinct ``unique_ids [U]``; a future of their ``EngramRows``,
        ``inverse`` mapping each (token, head) to its row. Returns without waiting for the rows.
        ``shard_split``, the loader's split of ``unique_ids`` by shard, saves a remote table that work."""

    def prefetch_across_update(self, unique_ids: torch.Tensor, inverse: torch.Tensor, updated_ids: torch.Tensor,
                               shard_split: ShardSplit | None = None) -> "RowsAcrossUpdate":
        """Like ``prefetch``, for the next step's rows as they will be once this step's update of
        ``updated_ids`` is in: pass the result to that update's ``apply_gradients(..., next_rows=)``. By
        default the fetch starts once the update is in; a table may start the rows it leaves alone now."""
        return RowsAcrossUpdate(lambda _update: self.prefetch(unique_ids, inverse, shard_split))

    @abc.abstractmethod
    def apply_gradients(self, unique_ids: torch.Tensor, rows: EngramRows, step: int, rank: int = 0,
                        world_size: int = 1, next_rows: "RowsAcrossUpdate | None" = None) -> concurrent.futures.Future:
        """Apply the gradient that backward left for ``rows`` (prefetched for ``unique_ids``) as ``step``
        of this ``rank`` among ``world_size``; a future that settles once the update is in. ``next_rows``
        (from ``prefetch_across_update``) then settles with the next step's rows."""

    #: Whether the table keeps copies of rows that its own steps update (a training cache): it must then hear of
    #: each step's end through ``step_applied_everywhere``.
    keeps_row_copies: bool = False

    def step_applied_everywhere(self, updated_elsewhere: torch.Tensor) -> None:
        """At a step's end (with several workers, after the step's barrier, once every worker's updates are sent):
        ``updated_elsewhere`` are the rows the other workers updated, which copies kept here missed (none with one
        worker). Nothing to do by default."""

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The table's optimizer state kept in this process, by layer, for a checkpoint; none by default
        (a remote table's state lives on its shards, which checkpoint it themselves)."""
        return {}

    def load_optimizer_state(self, state: Mapping[str, dict[str, torch.Tensor]]) -> None:
        """Continue from a checkpoint's ``optimizer_state`` of every table (nothing to load by default)."""

    def close(self) -> None:
        """Release what the table holds beyond its rows (threads, streams); nothing by default."""


class RowsAcrossUpdate:
    """The next step's rows across this step's update: ``rows`` settles with them as they are once the
    update (``after``) is in; a failed update fails them."""

    def __init__(self, fetch: Callable[[concurrent.futures.Future], concurrent.futures.Future]):
        self.rows: concurrent.futures.Future = concurrent.futures.Future()
        self._fetch = fetch  # given the settled update, a future of the rows

    def after(self, update: concurrent.futures.Future) -> None:
        """Fetch the rows once ``update`` is in."""
        def start(done: concurrent.futures.Future) -> None:
            error = done.exception()
            self.rows.set_exception(error) if error is not None else follow(self.rows, self._fetch(done))

        update.add_done_callback(start)


def check_row_ids(row_ids: torch.Tensor, num_rows: int) -> None:
    """Reject ids a table cannot serve, naming the field."""
    if row_ids.dtype != torch.int64:
        raise ValueError(f"row_ids: expected int64, got {row_ids.dtype}")
    if row_ids.numel() and (int(row_ids.min()) < 0 or int(row_ids.max()) >= num_rows):
        raise ValueError(
            f"row_ids: values must lie in [0, {num_rows}), got [{int(row_ids.min())}, {int(row_ids.max())}]"
        )


