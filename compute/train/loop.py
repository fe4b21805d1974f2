"""One data-parallel worker's training loop: dense weights by (DDP) AdamW, Engram rows by their tables.

Step s: the rows of step s were requested earlier (``RowTable.prefetch``) and are awaited only at the
first Engram layer; backward yields each unique row's gradient, which each table applies
(``apply_gradients``: remote tables push it to the shards without waiting) as soon as backward has
passed its layer; the rest of backward and the dense optimizer step run meanwhile. With ``staleness=0``
the next step's rows are exact: on one rank, the rows this step does not touch are fetched once the
previous step's update is in, and the ones it updates come back with its push (push-and-pull); with
several ranks, the next prefetch is issued once this step's updates are applied everywhere. With
``staleness=1`` it is issued as soon as the previous step's updates are in, so it overlaps this step's
compute but may miss this step's update.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from compute.data import HashedBatch, hashed_batches
from compute.memory.cached_table import CacheStats
from compute.memory.futures import follow
from compute.runtime import build_runtime
from compute.train.checkpoints import TrainerState, load_trainer_state, save_checkpoint
from compute.train.config import TrainConfig
from memory_service.deploy import MemoryHandle

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class WorkerContext:
    """Where this worker stands in the run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    memory: MemoryHandle | None = None  # None with local tables
    report: Callable[[dict], None] | None = None  # Ray Train's report on workers


class _WaitClock(concurrent.futures.Future):
    """A future of rows that adds the time its ``result()`` blocks to ``clock['wait_s']``."""

    def __init__(self, clock: dict):
        super().__init__()
        self._clock = clock

    def result(self, timeout=None):
        start = time.perf_counter()
        try:
            return super().result(timeout)
        finally:
            self._clock["wait_s"] += time.perf_counter() - start


def _once_settled(futures: list[concurrent.futures.Future], then: Callable[[BaseException | None], None]) -> None:
    """Call ``then`` with the first failure among ``futures`` (None if none failed) once all have settled:
    from the thread that settles the last, or at once if there are none."""
    if not futures:
        then(None)
        return
    left, lock = [len(futures)], threading.Lock()

    def on_done(_future: concurrent.futures.Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        then(next((future.exception() for future in futures if future.exception() is not None), None))

    for future in futures:
        future.add_done_callback(on_done)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    optim = config.optim
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, config.steps - optim.warmup_steps)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class EngramTrainer:
    """Builds the model, its tables and optimisers for one worker, and runs steps."""

    def __init__(self, config: TrainConfig, ctx: WorkerContext):
        self.config, self.ctx = config, ctx
        self.runtime = build_runtime(config, ctx.device, ctx.memory)
        self.model, self.tables = self.runtime.model, self.runtime.tables
        # DDP averages the dense gradients across ranks; experts no token picked this step get none.
        self.forward_model = self.model if ctx.world_size == 1 else DistributedDataParallel(
            self.model, find_unused_parameters=True)
        table_params = {id(p) for p in self.model.local_tables.parameters()}
        self.dense_params = [p for p in self.model.parameters() if id(p) not in table_params]
        self.dense_optimizer = torch.optim.AdamW(
            self.dense_params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
            weight_decay=config.optim.weight_decay)
        self.step = 0
        self.data_position = None
        self.last_metrics: dict = {}
        self.last_checkpoint: Path | None = None
        self.totals = {"tokens": 0, "wait_s": 0.0, "push_wait_s": 0.0, "rows": 0, "bytes": 0, "compute_s": 0.0}

    # ---- state ----------------------------------------------------------------------------------

    def load(self, checkpoint: Path) -> None:
        """Continue from a checkpoint of this run (the memory tables are restored by the driver)."""
        state = load_trainer_state(checkpoint, map_location=self.ctx.device)
        self.model.load_state_dict(state.model)
        self.dense_optimizer.load_state_dict(state.dense_optimizer)
        self.runtime.load_table_optimizer_state(state.table_optimizer)
        self.step, self.data_position = state.step, state.data_position
        torch.set_rng_state(state.rng.cpu())

    def save(self, directory: Path, loader) -> Path:
        """Every rank calls this after a step's updates are applied; rank 0 writes model and tables."""
        self._barrier()
        path = None
        if self.ctx.rank == 0:
            state = TrainerState(
                step=self.step, config=self.config.to_dict(), model=self.model.state_dict(),
                dense_optimizer=self.dense_optimizer.state_dict(),
                table_optimizer=self.runtime.table_optimizer_state(),
                # The loader has handed out the prefetched next batch too; training resumes at this step.
                data_position={**loader.state_dict(), "next_step": self.step}, rng=torch.get_rng_state())
            path = save_checkpoint(directory, state, self.ctx.memory)
            log.info("checkpoint of step %d written to %s", self.step, path)
        self._barrier()
        return path

    # ---- steps ----------------------------------------------------------------------------------

    def batches(self, split: str = "train", num_steps: int | None = None, position=None):
        data = dataclasses.replace(self.config.data, split=split)
        epoch, owners = self.runtime.loader_routing() or (0, None)
        return hashed_batches(data, self.config.engram, rank=self.ctx.rank, world_size=self.ctx.world_size,
                              routing=owners, routing_epoch=epoch, position=position, num_steps=num_steps)

    def _row_bytes(self, dim: int) -> int:
        """Bytes one row of ``dim`` moves: float32 in process, else its wire dtype's (FP8's scale included)."""
        return 4 * dim if self.config.memory.tables == "local" else self.config.memory.wire_row_bytes(dim)

    def prefetch(self, batch: HashedBatch, after: list = ()) -> dict[int, concurrent.futures.Future]:
        """Start every Engram layer's prefetch of ``batch``'s (loader-deduplicated) rows, once the
        updates in ``after`` are in.

        Waiting for ``after`` happens off this thread (the prefetches start from the last update's
        callback), so the step that runs meanwhile is not held up; a failed update fails the rows.
        """
        rows = self._row_futures(batch)

        def start(failed: BaseException | None) -> None:
            for layer, layer_rows in batch.layers.items():
                if failed is not None:
                    rows[layer].set_exception(failed)
                else:
                    follow(rows[layer], self.tables[layer].prefetch(layer_rows.unique, layer_rows.inverse,
                                                                    layer_rows.shard_split()))

        _once_settled(after, start)
        return rows

    def prefetch_across(self, batch: HashedBatch, this_batch: HashedBatch, after: list = ()) -> tuple[dict, dict]:
        """Start every Engram layer's exact prefetch of the next ``batch`` across the update that ``this_batch``'s
        step is about to push, once the updates in ``after`` are in: the rows' futures, and futures of what
        ``apply_gradients`` takes to bring them up to date."""
        rows = self._row_futures(batch)
        across = {layer: concurrent.futures.Future() for layer in batch.layers}

        def start(failed: BaseException | None) -> None:
            for layer, layer_rows in batch.layers.items():
                if failed is not None:
                    rows[layer].set_exception(failed)
                    across[layer].set_exception(failed)
                    continue
                pending = self.tables[layer].prefetch_across_update(
                    layer_rows.unique, layer_rows.inverse, this_batch.layers[layer].unique, layer_rows.shard_split())
                across[layer].set_result(pending)
                follow(rows[layer], pending.rows)

        _once_settled(after, start)
        return rows, across

    def _row_futures(self, batch: HashedBatch) -> dict[int, concurrent.futures.Future]:
        """A future for each Engram layer's rows of ``batch``, counting the rows and bytes it moves."""
        for layer, layer_rows in batch.layers.items():
            self.totals["rows"] += len(layer_rows.unique)
            self.totals["bytes"] += len(layer_rows.unique) * self._row_bytes(self.tables[layer].dim)
        return {layer: _WaitClock(self.totals) for layer in batch.layers}

    def train(self, on_step: Callable[[dict], None] | None = None) -> list[float]:
        """Run to ``config.steps``; return this rank's loss per step."""
        config, losses = self.config, []
        loader = self.batches("train", num_steps=config.steps - self.step, position=self.data_position)
        batches = iter(loader)
        pending_updates: list[concurrent.futures.Future] = []
        next_batch = next(batches, None)
        next_rows = self.prefetch(next_batch) if next_batch is not None and config.memory.prefetch else None
        checkpoint_dir = Path(config.output_dir) / "checkpoints"
        while next_batch is not None:
            started = time.perf_counter()
            batch, rows = next_batch, next_rows if next_rows is not None else self.prefetch(next_batch)
            next_batch = next(batches, None)
            next_rows = across = None
            if next_batch is not None and config.memory.prefetch and config.memory.staleness == 1:
                # Once the previous step's updates are in, so the rows miss at most this step's update.
                next_rows = self.prefetch(next_batch, after=pending_updates[:])
                pending_updates.clear()
            elif next_batch is not None and config.memory.prefetch and self.ctx.world_size == 1:
                # Exact, and early: the rows this step leaves alone once the previous step's updates are in, the
                # ones it changes with its own update; the step goes on meanwhile and waits only for rows.
                # (With several ranks, a row this rank leaves alone may be another's: fetched after the barrier.)
                next_rows, across = self.prefetch_across(next_batch, batch, after=pending_updates[:])
                pending_updates.clear()
            loss = self._mean_over_ranks(self._train_step(batch, rows, pending_updates, across))
            losses.append(loss)
            if (config.memory.staleness == 0 and across is None) or next_batch is None:
                self._settle(pending_updates, barrier=config.memory.staleness == 0)
            self._tell_tables_the_step_is_applied(batch)
            if next_batch is not None and config.memory.prefetch and next_rows is None:
                next_rows = self.prefetch(next_batch)
            self.step += 1
            self.totals["compute_s"] += time.perf_counter() - started
            self.totals["tokens"] += batch.input_ids.numel() * self.ctx.world_size
            metrics = self.last_metrics = self._metrics(loss)
            if on_step:
                on_step(metrics)
            if self.step % config.log_every == 0 or self.step == 1 or next_batch is None:
                self._log(metrics)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and next_batch is not None:
                self._settle(pending_updates, barrier=True)
                self.save(checkpoint_dir, loader)
        self._settle(pending_updates, barrier=True)
        if config.final_checkpoint:
            self.last_checkpoint = self.save(checkpoint_dir, loader)
        return losses

    def _train_step(self, batch: HashedBatch, rows: dict, pending_updates: list, across: dict | None) -> float:
        device = self.ctx.device
        for group in self.dense_optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step)
        output = self.forward_model(batch.input_ids.to(device), engram_rows=rows, labels=batch.labels.to(device))
        pushes: dict[int, concurrent.futures.Future] = {}

        def apply(layer: int) -> None:
            pushes[layer] = self.tables[layer].apply_gradients(
                batch.layers[layer].unique, rows[layer].result(), self.step, self.ctx.rank, self.ctx.world_size,
                next_rows=across[layer].result() if across else None)

        # A layer's rows that are a leaf of the graph have their whole gradient once backward has passed that
        # layer: their update starts then, while backward goes on through the layers below it and the dense
        # optimizer steps, so an exact next step waits less for its pulled rows. (An in-process table's
        # gradient lands in its weight instead, and is applied after backward.)
        leaves = {layer: rows[layer].result().unique_rows for layer in rows}
        hooks = [leaf.register_post_accumulate_grad_hook(lambda _leaf, layer=layer: apply(layer))
                 for layer, leaf in leaves.items() if leaf.is_leaf and leaf.requires_grad]
        try:
            output.loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        torch.nn.utils.clip_grad_norm_(self.dense_params, self.config.optim.grad_clip)
        for layer in rows:
            if layer not in pushes:
                apply(layer)
            pending_updates.append(pushes[layer])
        self.dense_optimizer.step()
        self.dense_optimizer.zero_grad(set_to_none=True)
        return output.lm_loss.item()

    def _settle(self, pending_updates: list, barrier: bool) -> None:
        """Wait for this rank's updates; with ``barrier`` for every rank's too, so the step is applied everywhere."""
        start = time.perf_counter()
        for future in pending_updates:
            future.result()
        pending_updates.clear()
        self.totals["push_wait_s"] += time.perf_counter() - start
        if barrier:
            self._barrier()

    def _log(self, metrics: dict) -> None:
        """Report to Ray Train; rank 0 also appends to ``<output_dir>/metrics.jsonl``."""
        if self.ctx.report:
            self.ctx.report(metrics)
        if self.ctx.rank == 0:
            path = Path(self.config.output_dir) / METRICS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def _mean_over_ranks(self, value: float) -> float:
        if self.ctx.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(total)
        return total.item() / self.ctx.world_size

    def _collective_device(self) -> torch.device:
        """Where this rank's tensors for collectives live: NCCL (Ray Train's backend on GPUs) takes CUDA tensors
        only, gloo CPU ones."""
        return self.ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _tell_tables_the_step_is_applied(self, batch: HashedBatch) -> None:
        """At the step's end (with several ranks after its barrier): tell each table that keeps copies of rows which
        rows the other ranks updated (``RowTable.step_applied_everywhere``; none with one rank)."""
        for layer, table in self.tables.items():
            if table.keeps_row_copies:
                table.step_applied_everywhere(self._ids_of_other_ranks(batch.layers[layer].unique)
                                              if self.ctx.world_size > 1 else torch.empty(0, dtype=torch.int64))

    def _ids_of_other_ranks(self, ids: torch.Tensor) -> torch.Tensor:
        """Every other rank's ``ids`` (int64, one dimension), gathered from all ranks."""
        device = self._collective_device()
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.ctx.world_size)]
        dist.all_gather(sizes, torch.tensor([len(ids)], dtype=torch.int64, device=device))
        longest = max(int(size) for size in sizes)
        padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
        padded[:len(ids)] = ids.to(device)
        gathered = [torch.empty(longest, dtype=torch.int64, device=device) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([rank_ids[:int(size)] for rank, (rank_ids, size) in enumerate(zip(gathered, sizes))
                          if rank != self.ctx.rank]).cpu()

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()

    def _metrics(self, loss: float) -> dict:
        totals = self.totals
        return {"step": self.step, "loss": loss, "lr": learning_rate(self.config, self.step - 1),
                "tokens_per_s": totals["tokens"] / max(totals["compute_s"], 1e-9),
                "lookup_wait_share": totals["wait_s"] / max(totals["compute_s"], 1e-9),
                "push_wait_share": totals["push_wait_s"] / max(totals["compute_s"], 1e-9),
                "rows_looked_up": totals["rows"], "bytes_moved": totals["bytes"], **self._cache_metrics()}

    def _cache_metrics(self) -> dict:
        """The hot-row caches' rows served from the device and looked up, over every cached table (if any)."""
        stats = CacheStats.of_tables(self.tables.values())
        return {"cache_hits": stats.hits, "cache_rows": stats.rows} if stats else {}

    # ---- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, num_batches: int) -> dict:
        """Mean validation loss and perplexity over ``num_batches`` batches (no updates)."""
        self.model.eval()
        losses = []
        for batch in self.batches("validation", num_steps=num_batches):
            rows = self.prefetch(batch)
            output = self.model(batch.input_ids.to(self.ctx.device), engram_rows=rows,
                                 labels=batch.labels.to(self.ctx.device))
            losses.append(output.lm_loss.item())
        self.model.train()
        loss = self._mean_over_ranks(sum(losses) / len(losses))
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_batches": len(losses)}

    def close(self) -> None:
        self.runtime.close()
