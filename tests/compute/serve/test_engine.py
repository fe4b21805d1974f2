"""The serving engine without Ray: request checks, batches equal prompts generated alone, streaming equals batching."""
from __future__ import annotations

import json

import pytest
import torch

from compute.generate import Generator, SamplingParams
from compute.serve.app import parse_autoscale
from compute.serve.batch import completed_records, read_prompts
from compute.serve.engine import BadRequest, GenerationRequest, PromptItem, ServingEngine, parse_request
from compute.serve.runtime import COMPUTE_RESOURCE, placement_options
from tests.compute.test_generation import PROMPTS, tiny_parts

EOS = 7


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, compressor, hasher = tiny_parts()
    yield ServingEngine(Generator(model, compressor, hasher, eos_id=EOS))
    torch.set_num_threads(threads)


def alone(engine: ServingEngine, prompt, max_new: int, sampling=SamplingParams()) -> list[int]:
    return engine.generator.generate_ids([prompt], max_new, sampling)[0]


def test_a_batch_of_prompts_of_different_lengths_and_limits_equals_each_prompt_alone(engine):
    items = [PromptItem(tuple(p), 3 + i, SamplingParams(), SamplingParams()) for i, p in enumerate(PROMPTS)]
    assert engine.generate(items) == [alone(engine, p, 3 + i) for i, p in enumerate(PROMPTS)]


def test_a_seeded_request_is_generated_apart_and_repeats_its_own_result(engine):
    seeded = SamplingParams(temperature=1.0, seed=3)
    own = engine.generator.generate_ids(PROMPTS[:2], 5, seeded)
    items = ([PromptItem(tuple(p), 5, seeded, (seeded, "a")) for p in PROMPTS[:2]]
             + [PromptItem(tuple(PROMPTS[2]), 4, SamplingParams(), SamplingParams())])
    result = engine.generate(items)
    assert result[:2] == own and result[2] == alone(engine, PROMPTS[2], 4)


def test_a_group_too_long_for_the_context_together_is_split_into_batches_that_fit(engine):
    long_prompt = tuple(range(1, 25))  # 24 tokens + 8 new - 1 fits 32; with a 20-token limit beside it, not
    items = [PromptItem(long_prompt, 8, SamplingParams(), None), PromptItem((5, 6), 20, SamplingParams(), None)]
    assert engine.generate(items) == [alone(engine, long_prompt, 8), alone(engine, (5, 6), 20)]


def test_batches_keep_groups_apart():
    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0)
    items = [PromptItem((1,), 2, greedy, greedy), PromptItem((2,), 2, sampled, sampled),
             PromptItem((3, 4), 2, greedy, greedy), PromptItem((5,), 2, sampled, (sampled, 1))]
    engine = ServingEngine.__new__(ServingEngine)
    engine.max_seq_len = 32
    assert sorted(engine.batches(items)) == [[0, 2], [1], [3]]


def test_streamed_steps_equal_the_batched_result(engine):
    items = [PromptItem(tuple(p), 2 + 2 * i, SamplingParams(), None) for i, p in enumerate(PROMPTS)]
    streamed = [[] for _ in items]
    for step in engine.stream(items):
        for row, token in enumerate(step):
            if token is not None:
                streamed[row].append(token)
    assert streamed == engine.generate(items)


def test_eos_stops_a_row_in_batches_and_streams(engine):
    generator = Generator(engine.generator.model, engine.generator.compressor, engine.generator.hasher)
    first = alone(engine, PROMPTS[0], 1)[0]
    stopping = ServingEngine(Generator(generator.model, generator.compressor, generator.hasher, eos_id=first))
    items = [PromptItem(tuple(PROMPTS[0]), 6, SamplingParams(), None)]
    assert stopping.generate(items) == [[first]]
    assert list(stopping.stream(items)) == [[first]]


def test_request_parsing_accepts_the_generate_options_and_names_the_bad_field():
    request = parse_request(json.dumps({"prompts": ["a", "b"], "max_new_tokens": 4, "temperature": 0.7,
                                        "top_p": 0.9, "seed": 1}))
    assert request == GenerationRequest(("a", "b"), 4, SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    assert parse_request({"text": "a", "stream": True}).stream
    for body, field in [(b"[1]", "body"), (b"\xff", "body"), ({"prompt": "a", "prompts": ["b"]}, "prompt"),
                        ({"prompt": 3}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "a", "top_p": 0},
                                                                                 "top_p"),
                        ({"prompt": "a", "max_new_tokens": True}, "max_new_tokens"),
                        ({"prompt": "a", "stream": "yes"}, "stream"), ({"prompt": "a", "n": 2}, "n")]:
        with pytest.raises(BadRequest, match=f"^{field}:"):
            parse_request(body)


def test_a_prompt_too_long_for_the_context_is_refused_before_it_reaches_a_batch(engine):
    with pytest.raises(BadRequest, match="^max_new_tokens:.*max_seq_len 32"):
        engine.items(GenerationRequest(("a b c",), 40), 0)


def test_replicas_ask_for_a_compute_node_only_where_the_cluster_has_them():
    assert placement_options("cpu", 1, {"CPU": 8, "engram_memory": 16}) == {"num_cpus": 1}
    assert placement_options("cuda", 2, {"CPU": 8, COMPUTE_RESOURCE: 4}) == {
        "num_cpus": 2, "resources": {COMPUTE_RESOURCE: 1}, "num_gpus": 1}


def test_autoscale_bounds():
    assert parse_autoscale("1:4") == (1, 4)
    for bad in ("4", "4:1", "a:b", "0:0"):
        with pytest.raises(ValueError, match="^autoscale:"):
            parse_autoscale(bad)


def test_batch_input_and_resume_point(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a", "id": 1}\n\n{"text": "b"}\n')
    prompts = read_prompts(source)
    assert prompts == [{"prompt": "a", "id": 1}, {"prompt": "b"}]
    output = tmp_path / "out.jsonl"
    assert completed_records(output, prompts) == 0
    output.write_text('{"index": 0, "prompt": "a"}\n{"index": 1, "pro')
    assert completed_records(output, prompts) == 1
    assert output.read_text() == '{"index": 0, "prompt": "a"}\n'
    output.write_text('{"index": 0, "prompt": "zzz"}\n')
    with pytest.raises(ValueError, match="^output: record 1"):
        completed_records(output, prompts)
    source.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="^input: line 1"):
        read_prompts(source)


def test_a_checkpoint_on_in_process_tables_serves_without_a_memory_service(tmp_path):
    from compute.serve.runtime import load_serving_runtime, open_serving_memory
    from compute.train.checkpoints import load_trainer_state
    from compute.train.loop import EngramTrainer, WorkerContext
    from tests.integration.tiny_runs import tiny_run

    trainer = EngramTrainer(tiny_run(tmp_path, steps=1, memory__tables="local"), WorkerContext())
    try:
        trainer.train()
        checkpoint = trainer.last_checkpoint
    finally:
        trainer.close()
    memory = open_serving_memory(checkpoint)  # needs no Ray: nothing to deploy
    assert memory.handle is None and "in-process" in memory.describe()
    runtime = load_serving_runtime(checkpoint, "cpu", memory.handle)
    try:
        assert runtime.client is None and not runtime.model.training
        saved = load_trainer_state(checkpoint).model
        for name, value in runtime.model.state_dict().items():
            torch.testing.assert_close(value, saved[name])
    finally:
        runtime.close()
