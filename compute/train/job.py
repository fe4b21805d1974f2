"""A training run on Ray: the memory service for its tables, then Ray Train workers running the loop."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Iterable, Mapping

import ray
import torch

from compute.config import dataclass_from_mapping
from compute.memory.calls import SHARD_LOST
from compute.train.checkpoints import memory_checkpoint, resolve_checkpoint
from compute.train.config import TrainConfig
from compute.train.loop import METRICS_FILE, SUMMARY_FILE, EngramTrainer, WorkerContext
from compute.train.progress import DriverProgress, ProgressFile
from compute.train.tables import engram_table_specs
from memory_service import deploy
from memory_service.deploy import NAMESPACE, SHARD_RESOURCE, MemoryHandle

log = logging.getLogger(__name__)

# What GPU/compute nodes advertise, one unit per training worker they take (cluster/local.yaml, aws.yaml);
# memory nodes advertise SHARD_RESOURCE instead, and the head neither.
COMPUTE_RESOURCE = "engram_compute"
# Times a run resumes from its last checkpoint after a memory shard died with no copy left.
MAX_MEMORY_RESUMES = 3


def connect_ray(address: str | None, shards: int, *, token: str | None = None, verbose: bool = False) -> None:
    """Join the cluster at ``address``, or start an embedded local one whose node hosts memory shards."""
    deploy.connect(address, token=token, namespace=NAMESPACE, resources={SHARD_RESOURCE: max(8, shards)},
                   worker_setup_hook=embedded_worker_setup, log_to_driver=verbose, verbose=verbose)


# Ray Train's placement-group cleaner asks the State API every few seconds whether the run's controller
# is alive. An embedded cluster has no dashboard, hence no State API, and the cleaner warned on every try.
_PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def embedded_worker_setup() -> None:
    """Run in each worker of the embedded cluster before it works.

    Ray's own helpers in a worker (the cleaner's State API client among them) find "their" cluster through
    $RAY_ADDRESS or else the newest Ray on the machine, which may be a stranger's: name ours. Keep the
    cleaner's errors, drop its warnings.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger(_PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


@dataclasses.dataclass
class RunMemory:
    """The run's memory service and whether the run deployed it (then it takes it down at the end)."""

    handle: MemoryHandle | None
    owned: bool = False

    def close(self) -> None:
        if self.owned:
            self.handle.stop()


def prepare_memory(config: TrainConfig, controller: str | None = None, resume: Path | None = None) -> RunMemory:
    """Deploy (or join) the tables a run needs; to ``resume``, deploy them from the checkpoint instead."""
    if config.memory.tables == "local":
        return RunMemory(None)
    # A service of the run's own keeps its checkpoints beside the run's: in the folder of runs.
    data_root = Path(config.output_dir).resolve().parent
    tier_dir = config.memory.tier.dir or None
    if resume is not None:
        tables = memory_checkpoint(resume)
        if tables is None:
            raise ValueError(f"resume: {resume} holds no checkpoint of the memory tables")
        data_root = Path(os.path.commonpath([data_root, tables.resolve().parent]))
        return RunMemory(deploy.deploy_from_checkpoint(tables, config.memory.shards, data_root=data_root,
                                                       replicas=config.memory.replicas, tier_dir=tier_dir),
                         owned=True)
    return RunMemory(*deploy.deploy_or_join(engram_table_specs(config), config.memory.shards, controller,
                                            data_root=data_root, replicas=config.memory.replicas, tier_dir=tier_dir))


def run_training(config: TrainConfig, *, resume: str | Path | None = None, memory: RunMemory | None = None) -> dict[str, Any]:
    """Train with ``config.num_workers`` Ray Train workers; return the last reported metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if config.memory.cache.enabled and config.num_workers > 1 and config.memory.staleness != 0:
        raise ValueError("memory.cache with several workers needs memory.staleness: 0: the caches learn of the other "
                         "workers' updates at each step's barrier, which staleness 1 does not wait for")
    resume_path = resolve_checkpoint(resume) if resume else None
    output_dir = Path(config.output_dir).resolve()
    config = config.replace(output_dir=str(output_dir))  # workers run in Ray Train's own folder
    owns_memory = memory is None
    memory = memory or prepare_memory(config, resume=resume_path)
    log.info("training %d steps on %d worker(s), %s Engram tables; output in %s", config.steps,
             config.num_workers, config.memory.tables, output_dir)
    resources = worker_resources([node["Resources"] for node in ray.nodes() if node["Alive"]], config.num_workers,
                                 config.use_gpu)
    _log_placement(resources, config.num_workers)
    try:
        resumes = 0
        while True:
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config={"config": config.to_dict(), "memory": memory.handle,
                                   "resume": str(resume_path) if resume_path else None},
                scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                             resources_per_worker=resources),
                run_config=RunConfig(name=output_dir.name, storage_path=str(output_dir.parent / "ray_train")),
            )
            try:
                with _sigint_handler_kept(), DriverProgress(output_dir, config.steps, METRICS_FILE):
                    result = trainer.fit()
                if result.error is not None:
                    raise result.error
            except Exception as error:  # a worker's failure (Ray Train raises it from fit)
                resume_path = _resume_after_memory_loss(error, output_dir, memory, resumes)
                resumes += 1
                continue
            return json.loads((output_dir / SUMMARY_FILE).read_text())
    finally:
        if owns_memory:
            memory.close()


def _resume_after_memory_loss(error: BaseException, output_dir: Path, memory: RunMemory, resumes: int) -> Path:
    """The checkpoint to resume from after a memory shard died with no copy left (its slots were re-made from
    the service's last checkpoint, so every table goes back to the run's last checkpoint); else ``error``."""
    checkpoints = output_dir / "checkpoints"
    if SHARD_LOST not in str(error) or memory.handle is None or resumes == MAX_MEMORY_RESUMES \
            or not checkpoints.exists():
        raise error
    checkpoint = resolve_checkpoint(checkpoints)
    log.warning("a memory shard died with no replica left: restoring every table and the run from %s "
                "(resume %d of %d)", checkpoint, resumes + 1, MAX_MEMORY_RESUMES)
    memory.handle.restore(memory_checkpoint(checkpoint))
    return checkpoint


@contextlib.contextmanager
def _sigint_handler_kept():
    """Put the caller's SIGINT handler back after ``fit()``, which replaces it for good.

    Ray Train's handler closes over the run's TrainController handle, so while it is installed the
    controller actor outlives the run until the driver disconnects; then its kill races the raylet's
    own shutdown and the controller can be left behind, orphaned. Dropping the handler frees the handle:
    Ray ends the controller with the run, while the cluster is still up to see it done.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is not previous:  # fit() installs one only on the main thread
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def worker_resources(nodes: Iterable[Mapping[str, float]], num_workers: int, use_gpu: bool) -> dict[str, float]:
    """What each training worker asks Ray for, given the resources of the cluster's (alive) nodes.

    A cluster whose nodes advertise ``engram_compute`` gets one unit per worker, so workers land on the
    GPU/compute nodes only (never on memory nodes or the head); each takes the cores its node has per
    compute slot (at least one). Without ``engram_compute`` (the embedded laptop Ray) nothing extra is
    asked: the workers share the cluster's cores (one core each when they use GPUs).
    """
    nodes = list(nodes)
    slots = [(node.get("CPU", 0), node[COMPUTE_RESOURCE]) for node in nodes if node.get(COMPUTE_RESOURCE, 0) > 0]
    if slots:
        return {"CPU": max(1, min(int(cpus // units) for cpus, units in slots)), COMPUTE_RESOURCE: 1}
    if use_gpu:
        return {"CPU": 1}
    cpus = sum(node.get("CPU", 0) for node in nodes) or 1
    return {"CPU": max(1, int(cpus) // num_workers)}


def _log_placement(resources: dict[str, float], num_workers: int) -> None:
    if COMPUTE_RESOURCE not in resources:
        log.info("the cluster advertises no %s: the %d worker(s) go wherever Ray has room (%s each)",
                 COMPUTE_RESOURCE, num_workers, resources)
        return
    slots = ray.cluster_resources().get(COMPUTE_RESOURCE, 0)
    log.info("placing the %d worker(s) on compute nodes: %s each (the cluster advertises %g %s)", num_workers,
             resources, slots, COMPUTE_RESOURCE)
    if slots < num_workers:
        log.warning("%d worker(s) but only %g %s in the cluster: the run waits for more compute nodes", num_workers,
                    slots, COMPUTE_RESOURCE)


def _train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry: the loop, a progress bar on rank 0, reports to Ray Train."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = dataclass_from_mapping(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    ctx = WorkerContext(rank=context.get_world_rank(), world_size=context.get_world_size(),
                        device=ray.train.torch.get_device(), memory=loop_config["memory"], report=ray.train.report)
    trainer = EngramTrainer(config, ctx)
    try:
        if loop_config["resume"]:
            trainer.load(Path(loop_config["resume"]))
        trainer.train(on_step=ProgressFile(config.output_dir, ctx.rank))
        summary = {**trainer.last_metrics, **trainer.evaluate(config.eval_batches),
                   "checkpoint": str(trainer.last_checkpoint)}
        ray.train.report(summary)
        if ctx.rank == 0:
            (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        trainer.close()
