"""EngramMoE: a decoder-only MoE transformer with hyper-connections and Engram memory layers."""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compute.attention import CausalSelfAttention
from compute.config import EngramModelConfig, ModelConfig
from compute.engram import Engram
from compute.hyper_connections import HyperConnection
from compute.moe import MoEFeedForward
from compute.row_table import EngramRows, LocalRowTable, RowTable


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    balance_loss: torch.Tensor  # mean over layers of the MoE load-balancing term
    lm_loss: torch.Tensor | None = None  # next-token cross entropy, when labels are given
    loss: torch.Tensor | None = None  # lm_loss + load_balance_coef * balance_loss


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

    def forward(self, branches: torch.Tensor, rows: EngramRows | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.engram is not None:
            branches = branches + self.engram(branches, rows)
        attended = self.attn(self.attn_norm(self.attn_hc.read_input(branches)))
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

    def lookup_rows(self, engram_row_ids: Mapping[int, torch.Tensor]) -> dict[int, EngramRows]:
        """Look every Engram layer's row ids up in its table."""
        return {layer: self.row_tables[layer].lookup(engram_row_ids[layer]) for layer in self.config.engram.layer_ids}

    def forward(
        self,
        input_ids: torch.Tensor,
        engram_row_ids: Mapping[int, torch.Tensor] | None = None,
        engram_rows: Mapping[int, EngramRows | concurrent.futures.Future] | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Rows given as futures (``RowTable.lookup_async``) are awaited only when their layer runs, so
        a remote fetch overlaps the layers before it."""
        if engram_rows is None:
            if engram_row_ids is None:
                raise ValueError("forward needs engram_row_ids or prefetched engram_rows")
            engram_rows = self.lookup_rows(engram_row_ids)
        hc = self.config.model.hc_mult
        tokens = self.embed(input_ids)
        branches = tokens.unsqueeze(2).expand(-1, -1, hc, -1).contiguous()
        balance_losses = []
        for layer, block in enumerate(self.blocks):
            rows = engram_rows[layer] if block.engram else None
            if isinstance(rows, concurrent.futures.Future):
                rows = rows.result()
            branches, balance_loss = block(branches, rows)
            balance_losses.append(balance_loss)
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


def build_local_tables(table_rows: Mapping[int, int], row_dim: int, seed: int = 0) -> dict[int, LocalRowTable]:
    """One in-process table per Engram layer, ``table_rows[layer]`` rows each."""
    return {layer: LocalRowTable(rows, row_dim, seed=seed + layer) for layer, rows in table_rows.items()}
