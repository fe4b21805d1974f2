"""Consistent training checkpoints: model, optimisers, data position and the Engram tables, at one step.

``<dir>/step_000120/trainer.pt`` holds the worker state; ``<dir>/step_000120/memory/`` the memory
service's checkpoint of every table, written by the shards after that step's updates were applied
and before any later update. ``<dir>/latest`` names the newest complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from compute.config import dataclass_from_mapping
from compute.train.config import TrainConfig

TRAINER_FILE = "trainer.pt"
MEMORY_DIR = "memory"
LATEST = "latest"


@dataclasses.dataclass
class TrainerState:
    step: int
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    dense_optimizer: dict[str, Any]
    table_optimizer: dict[str, Any] | None  # in-process tables' optimizer state; None for remote tables
    data_position: dict[str, Any]
    rng: torch.Tensor

    def train_config(self) -> TrainConfig:
        """The run config the checkpoint was trained with."""
        return dataclass_from_mapping(TrainConfig, self.config)


def save_checkpoint(directory: str | Path, state: TrainerState, memory) -> Path:
    """Write ``state`` (and, through ``memory``, the remote tables) to a new step folder; return it."""
    path = Path(directory).resolve() / f"step_{state.step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    if memory is not None:
        memory.checkpoint(str(path / MEMORY_DIR))
    partial = path / f"{TRAINER_FILE}.partial"
    torch.save(dataclasses.asdict(state), partial)
    os.replace(partial, path / TRAINER_FILE)
    latest = path.parent / f"{LATEST}.partial"
    latest.write_text(path.name + "\n")
    os.replace(latest, path.parent / LATEST)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder, given it, a checkpoints folder (whose ``latest`` names one), a run, or a folder of runs.

    A folder of runs (``runs/demo``, where each `engram demo` writes a run of its own) means its newest run.
    """
    path = Path(path).resolve()
    runs = sorted(path.glob(f"*/checkpoints/{LATEST}"), key=lambda latest: latest.stat().st_mtime)
    if runs and not (path / TRAINER_FILE).exists():
        path = runs[-1].parent.parent
    if (path / LATEST).exists():
        path = path / (path / LATEST).read_text().strip()
    elif (path / "checkpoints" / LATEST).exists():
        path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    if not (path / TRAINER_FILE).exists():
        raise FileNotFoundError(f"checkpoint: no {TRAINER_FILE} in {path}")
    return path


def load_trainer_state(path: str | Path, map_location: Any = "cpu") -> TrainerState:
    values = torch.load(resolve_checkpoint(path) / TRAINER_FILE, map_location=map_location, weights_only=False)
    return TrainerState(**values)


def memory_checkpoint(path: str | Path) -> Path | None:
    """The tables' checkpoint inside a step folder, if the run kept its tables remote."""
    memory = resolve_checkpoint(path) / MEMORY_DIR
    return memory if memory.exists() else None
