"""Generation over a KV cache equals re-running the full forward, and its lookups come before the layers."""
from __future__ import annotations

import argparse
import concurrent.futures

import numpy as np
import pytest
import torch

from compute.config import EngramConfig, EngramModelConfig, ModelConfig
from compute.generate import (
    Completion,
    DecodeSession,
    Generator,
    SamplingParams,
    TokenChooser,
    add_generation_arguments,
    print_completions,
    sampling_from_args,
)
from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor, default_tokenizer_path
from compute.memory.local_table import LocalRowTable
from compute.model.engram_moe import DecodeCache, EngramMoEModel

VOCAB = 211
ENGRAM = EngramConfig(engram_vocab_size=(101, 103), max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=(1, 2), kernel_size=3)
PROMPTS = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [120]]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tensors this small gain nothing from threads, and on a busy 2-core machine their spinning costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_parts(hc_mult: int = 4, vocab: int = VOCAB, compressor: TokenizerCompressor | None = None,
               table_class: type[LocalRowTable] = LocalRowTable):
    """A tiny EngramMoE (a block before the first Engram layer) with tables sized by its hasher."""
    # A compression table where several ids share a compressed id, as in the real one.
    compressor = compressor or TokenizerCompressor(np.arange(vocab) % 150, default_tokenizer_path())
    hasher = NgramHasher.from_compressor(ENGRAM, compressor)
    torch.manual_seed(0)
    config = EngramModelConfig(
        model=ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=3, num_attention_heads=4, hc_mult=hc_mult,
                          max_seq_len=32, num_routed_experts=5, num_experts_per_token=2, expert_hidden_size=24),
        engram=ENGRAM,
    )
    tables = {layer: table_class(hasher.table_rows(layer), ENGRAM.row_dim, seed=layer) for layer in ENGRAM.layer_ids}
    return EngramMoEModel(config, tables).eval(), compressor, hasher


def full_logits(model, compressor, hasher, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of one unpadded sequence from the plain full forward."""
    batch = np.array([ids])
    row_ids = {layer: torch.from_numpy(r) for layer, r in hasher.row_ids(compressor.compress(batch)).items()}
    with torch.no_grad():
        return model(torch.from_numpy(batch), engram_row_ids=row_ids).logits[0]


def naive_greedy(model, compressor, hasher, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding that re-runs the full forward on the whole sequence for every new token."""
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        token = int(full_logits(model, compressor, hasher, sequence)[-1].argmax())
        sequence.append(token)
        if token == eos_id:
            break
    return sequence[len(prompt):]


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_prefill_and_decode_logits_equal_the_full_forward_at_every_position(hc_mult):
    model, compressor, hasher = tiny_parts(hc_mult)
    continuation = torch.randint(0, VOCAB, (len(PROMPTS), 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        session, prompt_logits = DecodeSession.prefill(model, compressor, hasher, PROMPTS, capacity=16)
        step_logits = [session.step(tokens) for tokens in continuation.T]
    assert session.lengths.tolist() == [len(p) + 6 for p in PROMPTS]
    for row, prompt in enumerate(PROMPTS):
        expected = full_logits(model, compressor, hasher, prompt + continuation[row].tolist())
        torch.testing.assert_close(prompt_logits[row, : len(prompt)], expected[: len(prompt)], rtol=1e-5, atol=1e-5)
        decoded = torch.stack([logits[row] for logits in step_logits])
        torch.testing.assert_close(decoded, expected[len(prompt):], rtol=1e-5, atol=1e-5)


def test_the_conv_history_matters_so_the_equality_above_tests_it():
    model, compressor, hasher = tiny_parts(hc_mult=1)
    prompt, token = PROMPTS[0], torch.tensor([33])
    with torch.no_grad():
        session, _ = DecodeSession.prefill(model, compressor, hasher, [prompt], capacity=8)
        for layer in session.cache.layers:
            if layer.conv_history is not None:
                layer.conv_history.values.zero_()
        forgetful = session.step(token)[0]
    expected = full_logits(model, compressor, hasher, prompt + [33])[-1]
    assert not torch.allclose(forgetful, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_greedy_generation_equals_a_naive_full_forward_loop(hc_mult):
    model, compressor, hasher = tiny_parts(hc_mult)
    free_running = Generator(model, compressor, hasher, eos_id=-1).generate_ids(PROMPTS, 7)
    assert [len(ids) for ids in free_running] == [7] * 3
    # Row 0 stops at the first token that did not come before it; the others may stop too, or not.
    first_new = next(i for i, token in enumerate(free_running[0]) if i > 0 and token not in free_running[0][:i])
    eos_id = free_running[0][first_new]
    generated = Generator(model, compressor, hasher, eos_id=eos_id).generate_ids(PROMPTS, 7)
    assert generated[0] == free_running[0][:first_new + 1]
    assert generated == [naive_greedy(model, compressor, hasher, prompt, 7, eos_id) for prompt in PROMPTS]


def test_sampling_is_reproducible_with_a_seed():
    model, compressor, hasher = tiny_parts()
    generator = Generator(model, compressor, hasher, eos_id=-1)
    hot = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = generator.generate_ids(PROMPTS, 8, hot)
    assert generator.generate_ids(PROMPTS, 8, hot) == first
    assert generator.generate_ids(PROMPTS, 8, SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=8)) != first
    one_choice = SamplingParams(temperature=1.0, top_k=1, seed=3)
    assert generator.generate_ids(PROMPTS, 8, one_choice) == generator.generate_ids(PROMPTS, 8)


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(2000, -1)
    top_k = TokenChooser(SamplingParams(temperature=1.0, top_k=3, seed=0), torch.device("cpu"))(logits)
    assert set(top_k.tolist()) == {0, 1, 2}
    # 0.5 alone is below 0.7; with 0.3 the mass reaches 0.8, so tokens 0 and 1 stay.
    top_p = TokenChooser(SamplingParams(temperature=1.0, top_p=0.7, seed=0), torch.device("cpu"))(logits)
    assert set(top_p.tolist()) == {0, 1}
    share_of_first = (top_p == 0).float().mean().item()
    assert abs(share_of_first - 0.5 / 0.8) < 0.05


class RecordingTable(LocalRowTable):
    """The in-process table, logging the row ids it is asked for and when its futures are awaited."""

    log: list = []

    def lookup(self, row_ids: torch.Tensor) -> concurrent.futures.Future:
        self.log.append(("lookup", self, row_ids.clone()))
        future = AwaitLoggingFuture(self.log, self)
        future.set_result(super().lookup(row_ids).result())
        return future


class AwaitLoggingFuture(concurrent.futures.Future):
    def __init__(self, log: list, table: RecordingTable):
        super().__init__()
        self.log, self.table = log, table

    def result(self, timeout=None):
        self.log.append(("await", self.table, None))
        return super().result(timeout)


def test_decode_lookups_are_issued_before_the_first_block_and_awaited_at_their_layer():
    model, compressor, hasher = tiny_parts(table_class=RecordingTable)
    log = RecordingTable.log = []
    names = {model.row_tables[layer]: f"engram{layer}" for layer in ENGRAM.layer_ids}
    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: log.append((f"block{index}", None, None)))
    with torch.no_grad():
        session, _ = DecodeSession.prefill(model, compressor, hasher, PROMPTS, capacity=12)
        del log[:]
        session.step(torch.tensor([1, 2, 3]))
    events = [(kind, names.get(who, "")) for kind, who, _ in log]
    assert events == [
        ("lookup", "engram1"), ("lookup", "engram2"),
        ("block0", ""), ("await", "engram1"), ("block1", ""), ("await", "engram2"), ("block2", ""),
    ]


def test_incremental_row_ids_equal_the_row_ids_of_the_whole_sequence():
    model, compressor, hasher = tiny_parts(table_class=RecordingTable)
    log = RecordingTable.log = []
    generated = Generator(model, compressor, hasher, eos_id=-1).generate_ids(PROMPTS, 6)
    table = model.row_tables[ENGRAM.layer_ids[0]]
    asked = [row_ids for kind, who, row_ids in log if kind == "lookup" and who is table]
    assert len(asked) == 6  # the prefill, then 5 steps: the last new token is never fed back
    for row, (prompt, new) in enumerate(zip(PROMPTS, generated)):
        whole = hasher.row_ids(compressor.compress(np.array([prompt + new])))[ENGRAM.layer_ids[0]][0]
        assert np.array_equal(asked[0][row, : len(prompt)].numpy(), whole[: len(prompt)])
        for step, row_ids in enumerate(asked[1:]):
            assert np.array_equal(row_ids[row, 0].numpy(), whole[len(prompt) + step])


def test_text_prompts_round_trip_through_the_deepseek_tokenizer():
    compressor = TokenizerCompressor.from_file()
    model, compressor, hasher = tiny_parts(vocab=compressor.vocab_size, compressor=compressor)
    generator = Generator(model, compressor, hasher)
    assert generator.eos_id == generator.tokenizer.token_to_id("<｜end▁of▁sentence｜>")
    prompts = ["Only Alexander the Great", "could tame the horse"]
    completions = generator.generate(prompts, max_new_tokens=4)
    prompt_ids = [compressor.encode(p).tolist() for p in prompts]
    for completion, ids in zip(completions, generator.generate_ids(prompt_ids, 4)):
        assert completion.token_ids == [t for t in ids if t != generator.eos_id]
        assert completion.finish_reason == ("eos" if ids[-1] == generator.eos_id else "length")
        assert completion.text == generator.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_bad_input_is_rejected_naming_the_field():
    model, compressor, hasher = tiny_parts()
    generator = Generator(model, compressor, hasher, eos_id=0)
    cases = [
        (lambda: generator.generate_ids([[1, 2], []], 4), "prompts"),
        (lambda: generator.generate_ids([], 4), "prompts"),
        (lambda: generator.generate_ids([[1, VOCAB]], 4), "prompts"),
        (lambda: generator.generate_ids([[1, 2]], 0), "max_new_tokens"),
        (lambda: generator.generate_ids([[1] * 20], 20), "max_new_tokens"),
        (lambda: SamplingParams(temperature=-1), "temperature"),
        (lambda: SamplingParams(temperature=1, top_p=0), "top_p"),
        (lambda: SamplingParams(temperature=1, top_k=-2), "top_k"),
        (lambda: SamplingParams(top_k=5), "temperature"),
        (lambda: DecodeCache(model, 1, capacity=33), "capacity"),
        (lambda: Generator(tiny_parts(vocab=300)[0], compressor, hasher), "vocab_size"),
    ]
    for call, field in cases:
        with pytest.raises(ValueError, match=field):
            call()


def test_a_full_cache_refuses_more_tokens_and_stays_as_it_was():
    model, compressor, hasher = tiny_parts()
    with torch.no_grad():
        session, _ = DecodeSession.prefill(model, compressor, hasher, [[1, 2, 3]], capacity=4)
        session.step(torch.tensor([4]))
        recent_ids = session.recent_ids.copy()
        with pytest.raises(ValueError, match="overflow"):
            session.step(torch.tensor([5]))
    assert session.lengths.tolist() == [4]
    assert np.array_equal(session.recent_ids, recent_ids)


def test_command_line_options_become_sampling_params(capsys):
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    args = parser.parse_args(["--prompt", "a", "--prompt", "b", "--temperature", "0.8", "--top-k", "40",
                              "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "5"])
    assert args.prompt == ["a", "b"] and args.max_new_tokens == 5
    assert sampling_from_args(args) == SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=3)
    print_completions(["Once upon"], [Completion([11, 12], " a time", "eos")])
    assert capsys.readouterr().out == "Once upon a time\n  [2 tokens, eos]\n"
