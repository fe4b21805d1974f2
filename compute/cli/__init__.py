"""The `engram` console script: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module registers its own subcommands through ``register(subparsers)``.
COMMAND_MODULES = (
    "compute.cli.hash",  # hash
    "compute.cli.model_demo",  # model-demo
    "compute.cli.train",  # train, eval, generate
    "compute.cli.demo",  # demo
    "compute.cli.memory",  # memory up|status|scale|rotate-tokens|checkpoint|restore|down
    "compute.cli.serve",  # serve, generate-batch
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Engram memory: sharded n-gram tables for MoE models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray's own logs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as exc:
        # An error raised inside a Ray actor arrives wrapped with the actor's traceback: show its message only.
        print(f"engram {args.command}: error: {getattr(exc, 'cause', None) or exc}", file=sys.stderr)
        return 2
