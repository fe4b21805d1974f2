"""`engram train`, `engram eval` and `engram generate`: the jobs users run on remote Engram memory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from compute.generate import Generator, add_generation_arguments, print_completions, sampling_from_args
from compute.runtime import load_runtime
from compute.train.checkpoints import load_trainer_state, resolve_checkpoint
from compute.train.config import TrainConfig
from compute.train.job import RunMemory, connect_ray, prepare_memory, run_training
from compute.train.loop import EngramTrainer, WorkerContext
from compute.train.tables import engram_table_specs


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="data-parallel training with Engram rows on the memory service")
    train.add_argument("--config", required=True, help="run YAML (model, engram, data, optim, memory, ...)")
    train.add_argument("--resume", help="continue from a checkpoint (a step folder or the checkpoints folder)")
    train.add_argument("--steps", type=int, help="override the config's steps")
    train.add_argument("--workers", type=int, help="override the config's num_workers")
    train.add_argument("--output-dir", help="override the config's output_dir")
    train.add_argument("--controller", help="use the tables of this running memory controller (`engram memory up`)")
    add_cluster_arguments(train)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--batches", type=int, help="validation batches (default: the run's eval_batches)")
    add_cluster_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)

    tables = subparsers.add_parser("tables", help="print the tables.yaml a run needs (for `engram memory up`)")
    tables.add_argument("--config", required=True, help="run YAML")
    tables.set_defaults(func=run_tables)

    generate = subparsers.add_parser("generate", help="generate text from a checkpoint")
    generate.add_argument("--checkpoint", required=True)
    add_generation_arguments(generate)
    add_cluster_arguments(generate)
    generate.set_defaults(func=run_generate)


def add_cluster_arguments(parser: argparse.ArgumentParser,
                          device_help: str = "where eval/generate run the model (default: cuda if available)") -> None:
    """--address, --ray-token and --device: what every command that runs a model on Ray takes."""
    parser.add_argument("--address", help="Ray cluster address; `auto` in a job submitted with `ray job submit` "
                        "(default: start an embedded local Ray)")
    parser.add_argument("--ray-token", help="the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
                        "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=device_help)


def run_train(args: argparse.Namespace) -> int:
    config = TrainConfig.from_yaml(args.config)
    overrides = {k: v for k, v in (("steps", args.steps), ("num_workers", args.workers),
                                   ("output_dir", args.output_dir)) if v is not None}
    config = config.replace(**overrides)
    print(f"config: {json.dumps(config.to_dict())}")
    connect_ray(args.address, config.memory.shards, token=args.ray_token, verbose=args.verbose)
    resume = resolve_checkpoint(args.resume) if args.resume else None
    memory = prepare_memory(config, args.controller, resume)
    try:
        summary = run_training(config, resume=resume, memory=memory)
    finally:
        memory.close()
    print(json.dumps(summary, indent=2))
    return 0


def run_tables(args: argparse.Namespace) -> int:
    specs = engram_table_specs(TrainConfig.from_yaml(args.config))
    print(yaml.safe_dump({"tables": [spec.to_dict() for spec in specs]}, sort_keys=False), end="")
    return 0


def open_checkpoint_memory(checkpoint: Path, config: TrainConfig, args: argparse.Namespace) -> RunMemory:
    """A memory service holding a checkpoint's tables (none for a run on in-process tables)."""
    if config.memory.tables == "remote":
        connect_ray(args.address, config.memory.shards, token=args.ray_token, verbose=args.verbose)
    return prepare_memory(config, resume=checkpoint)


def run_eval(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(args.checkpoint)
    config = load_trainer_state(checkpoint).train_config()
    memory = open_checkpoint_memory(checkpoint, config, args)
    try:
        trainer = EngramTrainer(config, WorkerContext(device=torch.device(args.device), memory=memory.handle))
        try:
            trainer.load(checkpoint)
            result = {"checkpoint": str(checkpoint), "step": trainer.step,
                      **trainer.evaluate(args.batches or config.eval_batches)}
        finally:
            trainer.close()
    finally:
        memory.close()
    print(json.dumps(result, indent=2))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(args.checkpoint)
    memory = open_checkpoint_memory(checkpoint, load_trainer_state(checkpoint).train_config(), args)
    try:
        runtime = load_runtime(checkpoint, torch.device(args.device), memory.handle)
        try:
            generator = Generator(runtime.model.eval(), runtime.compressor, runtime.hasher)
            completions = generator.generate(args.prompt, args.max_new_tokens, sampling_from_args(args))
        finally:
            runtime.close()
    finally:
        memory.close()
    print_completions(args.prompt, completions)
    return 0
