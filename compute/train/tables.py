"""The Engram tables a training run needs, as memory-service table specs (one per Engram layer)."""
from __future__ import annotations

from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor
from compute.train.config import TrainConfig, table_name
from memory_service.core.table_spec import OptimizerSpec, TableSpec


def engram_table_specs(config: TrainConfig, table_rows: dict[int, int] | None = None) -> list[TableSpec]:
    """One table per Engram layer; rows train with the shards' optimizer at ``engram_lr_mult`` x lr, on the
    shards' SSD tier where ``memory.tier`` sizes one.

    ``table_rows`` (layer -> rows) comes from the run's ``NgramHasher``; without it one is built.
    """
    if table_rows is None:
        compressor = TokenizerCompressor.from_file(config.data.tokenizer_path)
        hasher = NgramHasher.from_compressor(config.engram, compressor)
        table_rows = {layer: hasher.table_rows(layer) for layer in config.engram.layer_ids}
    optimizer = OptimizerSpec(kind=config.optim.engram_optimizer, lr=config.optim.lr * config.optim.engram_lr_mult,
                              beta1=config.optim.beta1, beta2=config.optim.beta2, weight_decay=0.0)
    return [
        TableSpec(name=table_name(layer), rows=rows, dim=config.engram.row_dim, optimizer=optimizer,
                  init_std=config.memory.init_std, seed=config.seed + layer, num_slots=config.memory.num_slots,
                  tier=config.memory.tier.spec())
        for layer, rows in sorted(table_rows.items())
    ]
