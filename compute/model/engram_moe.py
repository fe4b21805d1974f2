"""EngramMoE: a decoder-only MoE transformer with hyper-connections and Engram memory layers."""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compute.config import EngramModelConfig, ModelConfig
from compute.memory.row_table import EngramRows, RowTable
from compute.model.attention import CachePlacement, CausalSelfAttention, KVCache
from compute.model.engram import ConvHistory, Engram
from compute.model.hyper_connections import HyperConnection
from compute.model.moe import MoEFeedForward


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    balance_loss: torch.Tensor  # mean over layers of the MoE load-balancing term
    lm_loss: torch.Tensor | None = None  # next-token cross entropy, when labels are given
    loss: torch.Tensor | None = None  # lm_loss + load_balance_coef * balance_loss


@dataclasses.dataclass
class LayerCache:
    """One block's generation state."""

    kv: KVCache
    conv_history: ConvHistory | None  # Engram layers only


class DecodeCache:
    """A batch's generation state: every block's caches and each row's cached length.

    Rows may differ in length: a forward appends right-padded tokens, and each row advances by its
    real ones, so the next forward overwrites the padding.
    """

    def __init__(self, model: "EngramMoEModel", batch: int, capacity: int):
        max_seq_len = model.config.model.max_seq_len
        if not 1 <= capacity <= max_seq_len:
            raise ValueError(f"capacity: must lie in [1, max_seq_len={max_seq_len}], got {capacity}")
        weight = model.embed.weight
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=weight.device)
        self.layers = [
            LayerCache(
                KVCache(batch, block.attn.num_heads, capacity, block.attn.head_dim, weight.dtype, weight.device),
                block.engram.new_history(batch, weight.dtype, weight.device) if block.engram else None,
            )
            for block in model.blocks
        ]

    def place(self, num_tokens: int, real_tokens: torch.Tensor | None) -> CachePlacement:
        """Where the next forward's ``num_tokens`` go; ``real_tokens [B]`` (default all) are not padding."""
        if real_tokens is None:
            real_tokens = torch.full_like(self.lengths, num_tokens)
        elif real_tokens.shape != self.lengths.shape or not ((real_tokens >= 0) & (real_tokens <= num_tokens)).all():
            raise ValueError(f"real_tokens: expected {len(self.lengths)} counts in [0, {num_tokens}]")
        if int(self.lengths.max()) + num_tokens > self.capacity:
            raise ValueError(
                f"input_ids: {num_tokens} more tokens overflow the cache of {self.capacity} positions "
                f"(longest row holds {int(self.lengths.max())})"
            )
        return CachePlacement.after(self.lengths, num_tokens, real_tokens.to(self.lengths.device))


class TransformerBlock(nn.Module):
    """Engram branch (in Engram layers), then attention, then MoE, each around the hc branches."""

    def __init__(self, config: ModelConfig, engram: Engram | None):
        super().__init__()
        d = config.hidden_size
        self.engram = engram
        self.attn_norm = nn.RMSNorm(d)
        self.attn = CausalSelfAttention(d, config.num_attention_heads, config.max_seq_len, config.rope_theta)
        self.attn_hc = HyperConnection(config.hc_mult)
        self.ffn_norm = nn.RMSNorm(d)
        self.moe = MoEFeedForward(
            d, config.expert_hidden_size, config.num_routed_experts, config.num_experts_per_token,
            config.num_shared_experts,
        )
        self.ffn_hc = HyperConnection(config.hc_mult)

    def forward(
        self,
        branches: torch.Tensor,
        rows: EngramRows | None,
        cache: LayerCache | None = None,
        placement: CachePlacement | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With a ``cache``, ``branches`` hold new tokens at ``placement`` rather than whole sequences."""
        if self.engram is not None:
            history = cache.conv_history if cache else None
            real_tokens = placement.real_tokens if placement else None
            branches = branches + self.engram(branches, rows, history, real_tokens)
        attended = self.attn(self.attn_norm(self.attn_hc.read_input(branches)), cache.kv if cache else None, placement)
        branches = self.attn_hc.write_output(branches, attended)
        moe_out, balance_loss = self.moe(self.ffn_norm(self.ffn_hc.read_input(branches)))
        return self.ffn_hc.write_output(branches, moe_out), balance_loss


class EngramMoEModel(nn.Module):
    """``forward(input_ids [B, T], engram_rows or engram_row_ids per Engram layer) -> ModelOutput``.

    The Engram rows come from ``row_tables`` (one per Engram layer: in-process tables register as
    submodules, remote ones stay outside the module) or, prefetched, from the caller as ``engram_rows``.
    """

    def __init__(self, config: EngramModelConfig, row_tables: Mapping[int, RowTable]):
        super().__init__()
        self.config = config
        model, engram = config.model, config.engram
        missing = sorted(set(engram.layer_ids) - set(row_tables))
        if missing:
            raise ValueError(f"row_tables: no table for Engram layer(s) {missing}")
        self.row_tables = dict(row_tables)
        self.local_tables = nn.ModuleDict(
            {str(layer): table for layer, table in row_tables.items() if isinstance(table, nn.Module)}
        )
        self.embed = nn.Embedding(model.vocab_size, model.hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)  # small, so a tied LM head starts near uniform
        self.blocks = nn.ModuleList(
            TransformerBlock(
                model,
                Engram(engram, model.hidden_size, model.hc_mult, model.zero_init_engram_conv)
                if layer in engram.layer_ids else None,
            )
            for layer in range(model.num_layers)
        )
        self.final_norm = nn.RMSNorm(model.hidden_size)
        self.lm_head = nn.Linear(model.hidden_size, model.vocab_size, bias=False)
        if model.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def lookup_rows(self, engram_row_ids: Mapping[int, torch.Tensor]) -> dict[int, concurrent.futures.Future]:
        """Start every Engram layer's lookup of its raw row ids; futures of their ``EngramRows``."""
        return {layer: self.row_tables[layer].lookup(engram_row_ids[layer]) for layer in self.config.engram.layer_ids}

    def forward(
        self,
        input_ids: torch.Tensor,
        engram_row_ids: Mapping[int, torch.Tensor] | None = None,
        engram_rows: Mapping[int, EngramRows | concurrent.futures.Future] | None = None,
        labels: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        real_tokens: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Rows given as futures (``RowTable.prefetch``/``lookup``) are awaited only when their layer runs,
        so a remote fetch overlaps the layers before it; ``engram_row_ids`` are looked up before the first
        layer runs, so the same holds for them.

        With a ``cache``, ``input_ids`` continue the cached rows (right-padded beyond each row's
        ``real_tokens``, default all) and the cache advances by the real tokens.
        """
        if engram_rows is None:
            if engram_row_ids is None:
                raise ValueError("forward needs engram_row_ids or prefetched engram_rows")
            engram_rows = self.lookup_rows(engram_row_ids)
        hc = self.config.model.hc_mult
        tokens = self.embed(input_ids)
        branches = tokens.unsqueeze(2).expand(-1, -1, hc, -1).contiguous()
        placement = cache.place(input_ids.shape[1], real_tokens) if cache is not None else None
        balance_losses = []
        for layer, block in enumerate(self.blocks):
            rows = engram_rows[layer] if block.engram else None
            if isinstance(rows, concurrent.futures.Future):
                rows = rows.result()
            branches, balance_loss = block(branches, rows, cache.layers[layer] if cache else None, placement)
            balance_losses.append(balance_loss)
        if cache is not None:
            cache.lengths += placement.real_tokens
        logits = self.lm_head(self.final_norm(branches.mean(dim=2)))
        output = ModelOutput(logits=logits, balance_loss=torch.stack(balance_losses).mean())
        if labels is not None:
            output.lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            output.loss = output.lm_loss + self.config.model.load_balance_coef * output.balance_loss
        return output

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by kind: the dense backbone, the Engram modules' projections, the Engram table rows."""
        table_params = sum(t.num_rows * t.dim for t in self.row_tables.values())
        engram_module = sum(p.numel() for b in self.blocks if b.engram for p in b.engram.parameters())
        seen_tables = {id(p) for p in self.local_tables.parameters()}
        everything = sum(p.numel() for p in self.parameters() if id(p) not in seen_tables)
        return {"dense": everything - engram_module, "engram_module": engram_module, "engram_tables": table_params}

