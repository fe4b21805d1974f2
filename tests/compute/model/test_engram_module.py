"""The Engram module reproduces the official demo's forward (golden vectors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compute.config import EngramConfig
from compute.memory.row_table import EngramRows
from compute.model.engram import Engram

HEADS_PER_NGRAM = 2  # the golden file fixes the embedding width (K=32), not how it splits into heads


def load_golden(golden_dir):
    with np.load(golden_dir / "engram_forward.npz") as data:
        return {k: torch.from_numpy(v) for k, v in data.items()}


def golden_module(golden, dtype) -> tuple[Engram, EngramRows, torch.Tensor]:
    batch, seq, hc, dim = golden["hidden"].shape
    max_ngram, kernel = int(golden["max_ngram_size"]), int(golden["kernel_size"])
    width = golden["embeddings"].shape[-1]
    config = EngramConfig(
        engram_vocab_size=(1000,) * (max_ngram - 1), max_ngram_size=max_ngram,
        n_embed_per_ngram=width // (max_ngram - 1), n_head_per_ngram=HEADS_PER_NGRAM, layer_ids=(0,),
        kernel_size=kernel,
    )
    module = Engram(config, hidden_size=dim, hc_mult=hc).to(dtype)
    module.load_demo_weights(*(golden[k] for k in (
        "key_w", "key_b", "value_w", "value_b", "norm1_w", "norm2_w", "conv_norm_w", "conv_w")))
    heads = config.heads_per_layer
    # Every (token, head) has its own row: the rows are the golden embeddings cut into heads.
    unique_rows = golden["embeddings"].reshape(batch * seq * heads, config.row_dim)
    inverse = torch.arange(batch * seq * heads).reshape(batch, seq, heads)
    return module, EngramRows(unique_rows.to(dtype), inverse), golden["hidden"].to(dtype)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_forward_matches_demo_golden(golden_dir, dtype, tolerance):
    golden = load_golden(golden_dir)
    module, rows, hidden = golden_module(golden, dtype)
    with torch.no_grad():
        output = module(hidden, rows)
    assert output.dtype == dtype
    error = (output.double() - golden["output"]).abs().max().item()
    assert error < tolerance, f"max abs error {error:.3e} >= {tolerance:g}"


def test_zero_init_conv_makes_the_conv_a_pure_residual(golden_dir):
    golden = load_golden(golden_dir)
    module, rows, hidden = golden_module(golden, torch.float64)
    with torch.no_grad():
        module.conv_w.zero_()
        output = module(hidden, rows)
        module.conv_w.copy_(golden["conv_w"].reshape(module.conv_w.shape))
        gated_plus_conv = module(hidden, rows)
    # SiLU(0) = 0, so with a zero conv the output is exactly the gated value; the real conv changes it.
    assert not torch.allclose(output, gated_plus_conv)
    config = EngramConfig(engram_vocab_size=(7, 7), max_ngram_size=3, n_embed_per_ngram=16,
                          n_head_per_ngram=2, layer_ids=(0,), kernel_size=4)
    assert torch.count_nonzero(Engram(config, 32, 4, zero_init_conv=True).conv_w) == 0
