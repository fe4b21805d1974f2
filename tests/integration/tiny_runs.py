"""The tiny training run the integration tests share: a model and data small enough for a few CPU steps a second."""
from __future__ import annotations

from pathlib import Path

from compute.config import dataclass_from_mapping
from compute.train.config import TrainConfig

# As a run YAML holds it (what `engram train --config` reads); float32 rows on the wire, so remote runs match
# in-process ones exactly.
TINY_RUN_YAML = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 2, "hc_mult": 2, "max_seq_len": 32,
              "num_routed_experts": 4, "num_experts_per_token": 2, "expert_hidden_size": 32, "tie_embeddings": True},
    "engram": {"engram_vocab_size": [211, 223], "n_embed_per_ngram": 16, "n_head_per_ngram": 2, "layer_ids": [0, 1]},
    "data": {"max_files": 3, "seq_len": 16, "batch_size": 4, "num_workers": 0},
    "optim": {"lr": 1e-2, "warmup_steps": 1},
    "memory": {"shards": 2, "num_slots": 16, "wire_dtype": "float32"},
    "steps": 4, "log_every": 1, "eval_batches": 1,
}


def tiny_run(tmp_path: Path, **overrides) -> TrainConfig:
    """The tiny run with its output in ``tmp_path/run``; ``overrides`` as ``TrainConfig.replace`` takes them."""
    config = dataclass_from_mapping(TrainConfig, {**TINY_RUN_YAML, "output_dir": str(tmp_path / "run")})
    return config.replace(**overrides)
