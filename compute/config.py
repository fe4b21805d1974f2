"""Frozen configuration dataclasses for the model side, loadable from YAML."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

T = TypeVar("T")


def dataclass_from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build a (possibly nested) frozen dataclass, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping):
            value = dataclass_from_mapping(hints[name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a bare name like ``engram_demo`` resolves to the shipped configs."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"config {str(path)!r}: no such file, nor a shipped config of that name ({shipped})")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return data


@dataclasses.dataclass(frozen=True)
class EngramConfig:
    """The Engram hashing and module parameters, with the official demo's field names."""

    engram_vocab_size: tuple[int, ...] = (129280 * 5, 129280 * 5)
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: tuple[int, ...] = (1, 15)
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4

    def __post_init__(self):
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs one entry per n-gram order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1}), got {len(self.engram_vocab_size)}"
            )
        if self.n_head_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be a positive multiple of "
                f"n_head_per_ngram ({self.n_head_per_ngram})"
            )
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must be distinct, got {list(self.layer_ids)}")

    @property
    def heads_per_layer(self) -> int:
        """Hash heads of one layer: every head of every n-gram order 2..max_ngram_size."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def row_dim(self) -> int:
        """Values in one table row (one head's embedding)."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def embedding_dim(self) -> int:
        """Width K of a token's concatenated Engram embedding."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngramConfig":
        data = load_yaml(path)
        return dataclass_from_mapping(cls, data.get("engram", data))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The EngramMoE backbone: transformer sizes, MoE routing and hyper-connections."""

    vocab_size: int = 129280
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    hc_mult: int = 4
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    num_routed_experts: int = 8
    num_experts_per_token: int = 2
    num_shared_experts: int = 1
    expert_hidden_size: int = 256
    load_balance_coef: float = 0.01
    zero_init_engram_conv: bool = False
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not 1 <= self.num_experts_per_token <= self.num_routed_experts:
            raise ValueError(
                f"num_experts_per_token ({self.num_experts_per_token}) must be in "
                f"1..num_routed_experts ({self.num_routed_experts})"
            )
        if self.hc_mult < 1:
            raise ValueError(f"hc_mult must be >= 1, got {self.hc_mult}")


@dataclasses.dataclass(frozen=True)
class EngramModelConfig:
    """A whole model: the backbone plus its Engram layers."""

    model: ModelConfig = ModelConfig()
    engram: EngramConfig = EngramConfig()

    def __post_init__(self):
        bad = [i for i in self.engram.layer_ids if not 0 <= i < self.model.num_layers]
        if bad:
            raise ValueError(f"engram.layer_ids {bad} outside 0..{self.model.num_layers - 1}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngramModelConfig":
        data = load_yaml(path)
        return dataclass_from_mapping(cls, {k: data[k] for k in ("model", "engram") if k in data})
