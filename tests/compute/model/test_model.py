"""The EngramMoE model: shapes, gradients everywhere (table rows included), routing, hyper-connections."""
from __future__ import annotations

import torch

from compute.config import EngramConfig, EngramModelConfig, ModelConfig
from compute.memory.local_table import build_local_tables
from compute.model.engram_moe import EngramMoEModel
from compute.model.hyper_connections import HyperConnection
from compute.model.moe import MoEFeedForward

TABLE_ROWS = 997


def tiny_model(hc_mult: int = 4, seed: int = 0) -> EngramMoEModel:
    torch.manual_seed(seed)
    config = EngramModelConfig(
        model=ModelConfig(vocab_size=211, hidden_size=32, num_layers=3, num_attention_heads=4, hc_mult=hc_mult,
                          max_seq_len=64, num_routed_experts=5, num_experts_per_token=2, expert_hidden_size=24),
        engram=EngramConfig(engram_vocab_size=(101, 103), max_ngram_size=3, n_embed_per_ngram=16,
                            n_head_per_ngram=2, layer_ids=(0, 2), kernel_size=3),
    )
    tables = build_local_tables({layer: TABLE_ROWS for layer in config.engram.layer_ids}, config.engram.row_dim)
    return EngramMoEModel(config, tables)


def random_batch(model: EngramMoEModel, batch: int = 2, seq: int = 11):
    input_ids = torch.randint(0, model.config.model.vocab_size, (batch, seq))
    heads = model.config.engram.heads_per_layer
    row_ids = {layer: torch.randint(0, TABLE_ROWS, (batch, seq, heads)) for layer in model.config.engram.layer_ids}
    return input_ids, row_ids


def test_forward_backward_gives_finite_gradients_everywhere():
    model = tiny_model()
    input_ids, row_ids = random_batch(model)
    output = model(input_ids, engram_row_ids=row_ids, labels=input_ids)
    assert output.logits.shape == (2, 11, 211)
    assert torch.isfinite(output.loss) and torch.isfinite(output.balance_loss)
    output.loss.backward()
    for name, param in model.named_parameters():
        if param.grad is None:  # only a routed expert that no token picked may go without
            assert ".moe.experts." in name, f"{name} got no gradient"
            continue
        grad = param.grad.coalesce().values() if param.grad.is_sparse else param.grad
        assert torch.isfinite(grad).all(), f"{name} has a non-finite gradient"
    for block in model.blocks:
        picked = sum(expert.down.weight.grad is not None for expert in block.moe.experts)
        assert picked >= model.config.model.num_experts_per_token
    for layer in model.config.engram.layer_ids:
        table_grad = model.local_tables[str(layer)].weight.grad.coalesce()
        touched = set(table_grad.indices()[0].tolist())
        assert touched == set(row_ids[layer].flatten().tolist()), "row gradients must land on the looked-up rows"
        assert table_grad.values().abs().sum() > 0


def test_routing_picks_exactly_top_k_distinct_experts_and_a_finite_balance_term():
    torch.manual_seed(1)
    moe = MoEFeedForward(hidden_size=16, expert_hidden_size=8, num_routed=6, top_k=3, num_shared=1)
    tokens = torch.randn(5, 10, 16)
    expert_ids, weights, balance = moe.route(tokens)
    assert expert_ids.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in expert_ids.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    probs = moe.router(tokens).softmax(-1).flatten(0, 1)
    assert torch.equal(expert_ids.sort(-1).values, probs.topk(3, -1).indices.sort(-1).values)
    assert torch.isfinite(balance) and balance > 0
    out, _ = moe(tokens)
    assert out.shape == (5, 10, 16)


def test_balance_term_is_a_mean_over_sequences_so_it_splits_across_ranks():
    torch.manual_seed(3)
    moe = MoEFeedForward(hidden_size=16, expert_hidden_size=8, num_routed=6, top_k=2, num_shared=0)
    batch = torch.randn(4, 9, 16)
    whole = moe.route(batch)[2]
    halves = (moe.route(batch[:2])[2] + moe.route(batch[2:])[2]) / 2
    torch.testing.assert_close(whole, halves)
    # One sequence routed evenly over all experts scores the minimum, 1.0.
    even = MoEFeedForward(hidden_size=6, expert_hidden_size=4, num_routed=6, top_k=1, num_shared=0)
    with torch.no_grad():
        even.router.weight.copy_(torch.eye(6) * 50)
    assert abs(even.route(torch.eye(6).unsqueeze(0))[2].item() - 1.0) < 1e-4


def test_moe_output_is_shared_plus_weighted_top_k_experts():
    torch.manual_seed(2)
    moe = MoEFeedForward(hidden_size=8, expert_hidden_size=4, num_routed=4, top_k=2, num_shared=1)
    tokens = torch.randn(7, 8)
    expert_ids, weights, _ = moe.route(tokens.view(1, 7, 8))
    expected = torch.stack([
        moe.shared(t) + sum(w * moe.experts[e](t) for e, w in zip(ids.tolist(), ws))
        for t, ids, ws in zip(tokens, expert_ids, weights)
    ])
    out, _ = moe(tokens.view(1, 7, 8))
    torch.testing.assert_close(out.view(7, 8), expected)


def test_moe_forward_and_gradients_match_a_per_token_reference_in_float64():
    torch.manual_seed(5)
    moe = MoEFeedForward(hidden_size=6, expert_hidden_size=5, num_routed=5, top_k=2, num_shared=1).double()
    with torch.no_grad():
        moe.router.weight[2] = -10.0  # on positive inputs only expert 2 gets no token
    x = torch.randn(2, 7, 6, dtype=torch.float64).abs().requires_grad_()
    upstream = torch.randn(2, 7, 6, dtype=torch.float64)

    def reference(x):
        rows = []
        for t in x.reshape(-1, 6):
            weights, ids = moe.router(t).float().softmax(-1).topk(2)  # the router softmaxes in float32
            weights = weights / weights.sum()
            rows.append(moe.shared(t) + sum(w * moe.experts[e](t) for e, w in zip(ids.tolist(), weights)))
        return torch.stack(rows).view_as(x)

    params = [x, *moe.parameters()]
    out = moe(x)[0]
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grads = torch.autograd.grad((out * upstream).sum(), params, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params, allow_unused=True)
    names = ["x", *(name for name, _ in moe.named_parameters())]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert (grad is None) == name.startswith("experts.2."), name  # an expert no token picked is never called
        if grad is not None:
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_moe_forward_and_backward_are_bitwise_reproducible():
    torch.manual_seed(5)
    moe = MoEFeedForward(hidden_size=32, expert_hidden_size=16, num_routed=8, top_k=2, num_shared=1)
    x = torch.randn(4, 128, 32)

    def run():
        moe.zero_grad()
        inputs = x.clone().requires_grad_()
        out, balance = moe(inputs)
        (out.square().mean() + balance).backward()
        return [out, inputs.grad, *(p.grad for p in moe.parameters() if p.grad is not None)]

    first, second = run(), run()
    assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


def test_single_branch_hyper_connection_is_a_plain_residual():
    hc = HyperConnection(1)
    branches = torch.randn(2, 3, 1, 4)
    output = torch.randn(2, 3, 4)
    assert list(hc.parameters()) == []
    torch.testing.assert_close(hc.read_input(branches), branches[:, :, 0])
    torch.testing.assert_close(hc.write_output(branches, output), branches + output.unsqueeze(2))


def test_multi_branch_hyper_connection_starts_as_a_residual_on_every_branch():
    hc = HyperConnection(4)
    stream = torch.randn(2, 3, 4)
    branches = stream.unsqueeze(2).expand(-1, -1, 4, -1)
    output = torch.randn(2, 3, 4)
    torch.testing.assert_close(hc.read_input(branches), stream)
    torch.testing.assert_close(hc.write_output(branches, output), (stream + output).unsqueeze(2).expand(-1, -1, 4, -1))


def test_model_is_causal():
    model = tiny_model(hc_mult=2).eval()
    input_ids, row_ids = random_batch(model, batch=1, seq=9)
    changed_ids = input_ids.clone()
    changed_ids[0, -1] = (changed_ids[0, -1] + 1) % 211
    changed_rows = {k: v.clone() for k, v in row_ids.items()}
    for rows in changed_rows.values():
        rows[0, -1] = (rows[0, -1] + 1) % TABLE_ROWS
    with torch.no_grad():
        before = model(input_ids, engram_row_ids=row_ids).logits
        after = model(changed_ids, engram_row_ids=changed_rows).logits
    torch.testing.assert_close(before[:, :-1], after[:, :-1])
    assert not torch.allclose(before[:, -1], after[:, -1])


def test_parameter_counts_split_dense_from_engram():
    model = tiny_model()
    counts = model.parameter_counts()
    assert counts["engram_tables"] == 2 * TABLE_ROWS * model.config.engram.row_dim
    total = sum(p.numel() for p in model.parameters())
    assert counts["dense"] + counts["engram_module"] + counts["engram_tables"] == total


def test_rows_given_as_futures_equal_rows_looked_up_in_place():
    model = tiny_model(hc_mult=2).eval()
    input_ids, row_ids = random_batch(model)
    futures = {layer: model.row_tables[layer].lookup(ids) for layer, ids in row_ids.items()}
    with torch.no_grad():
        direct = model(input_ids, engram_row_ids=row_ids).logits
        prefetched = model(input_ids, engram_rows=futures).logits
    torch.testing.assert_close(direct, prefetched, rtol=0, atol=0)
