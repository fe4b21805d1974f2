"""`engram serve` and `engram generate-batch` for real: Serve's HTTP proxy on loopback, concurrent HTTP clients,
one read-only memory service scaled while requests stream in, batch generation resumed after an interruption."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import ray
import torch

from compute.cli import main as engram_main
from compute.generate import Generator
from compute.runtime import load_runtime
from compute.serve.app import build_app, start_serving, stop_serving
from compute.serve.batch import generate_batch
from compute.serve.runtime import load_serving_runtime, open_serving_memory
from compute.train.checkpoints import memory_checkpoint
from compute.train.config import OptimConfig
from compute.train.loop import EngramTrainer, WorkerContext
from compute.train.tables import engram_table_specs
from memory_service.deploy import deploy, get_controller
from tests.integration.tiny_runs import tiny_run

PROMPTS = ["def main(", "import os", "class Foo:\n    def", "x = 1", "for i in range(", "return self."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body, timeout: float = 60) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def checkpoint(ray_cluster, tmp_path_factory):
    """A 2-step run on remote tables: a step folder with trainer.pt and the tables' memory/ checkpoint."""
    tmp_path = tmp_path_factory.mktemp("serve")
    # A small learning rate keeps the model's greedy choices varied (at 1e-2 two steps make it repeat one token).
    config = tiny_run(tmp_path, steps=2, optim=OptimConfig(lr=1e-4, warmup_steps=1))
    handle = deploy(engram_table_specs(config), 2, data_root=tmp_path)
    try:
        trainer = EngramTrainer(config, WorkerContext(memory=handle, device=torch.device("cpu")))
        try:
            trainer.train()
            path = trainer.last_checkpoint
        finally:
            trainer.close()
    finally:
        handle.stop()
    assert memory_checkpoint(path) is not None
    return path


@pytest.fixture(scope="module")
def memory(checkpoint):
    serving = open_serving_memory(checkpoint, shards=2)
    assert all(spec.read_only for spec in serving.specs)
    assert "bfloat16 rows without optimizer state" in serving.describe()
    yield serving
    serving.stop()


@pytest.fixture(scope="module")
def reference(checkpoint, memory):
    """Each prompt generated alone by a single-process Generator on the same serving tables."""
    runtime = load_serving_runtime(checkpoint, "cpu", memory.handle)
    generator = Generator(runtime.model, runtime.compressor, runtime.hasher)
    try:
        yield lambda prompt, n: generator.generate([prompt], n)[0]
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def server(checkpoint, memory):
    app = build_app(checkpoint, memory.handle, replicas=2, replica_cpus=0.5, max_batch_size=8, batch_wait_s=0.05)
    url = start_serving(app, "127.0.0.1", free_port(), timeout_s=120)
    yield url
    stop_serving()


def test_concurrent_greedy_requests_equal_single_process_generation(checkpoint, memory, reference, server):
    # `engram generate`'s way (the run's wire dtype, the tables as trained): same ids on the serving tables too.
    runtime = load_runtime(checkpoint, torch.device("cpu"), memory.handle)
    try:
        plain = Generator(runtime.model.eval(), runtime.compressor, runtime.hasher).generate(PROMPTS[:2], 6)
    finally:
        runtime.close()
    assert [c.token_ids for c in plain] == [reference(p, 6).token_ids for p in PROMPTS[:2]]
    assert len({tuple(reference(p, 6).token_ids) for p in PROMPTS}) > 2, "a degenerate model would prove little"

    bodies = [{"prompt": p, "max_new_tokens": 3 + i % 4} for i, p in enumerate(PROMPTS)]
    bodies.append({"prompts": PROMPTS[:3], "max_new_tokens": 5})
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: post(f"{server}/generate", body), bodies))
    for body, (status, payload) in zip(bodies, answers):
        assert status == 200, payload
        prompts = body.get("prompts") or [body["prompt"]]
        completions = json.loads(payload)["completions"]
        assert len(completions) == len(prompts)
        for prompt, completion in zip(prompts, completions):
            expected = reference(prompt, body["max_new_tokens"])
            assert completion == {"text": expected.text, "token_ids": expected.token_ids,
                                  "finish_reason": expected.finish_reason}
    # Prompts from several clients (and the 3 of one request) were generated together.
    batch_sizes = set()
    for _ in range(10):
        with urllib.request.urlopen(f"{server}/health", timeout=30) as response:
            batch_sizes.update(json.loads(response.read())["recent_batch_sizes"])
    assert max(batch_sizes) > 1


def test_streamed_tokens_arrive_one_a_line_and_equal_the_batch_result(reference, server):
    bodies = [{"prompts": PROMPTS[:2], "max_new_tokens": 5}, {"prompt": PROMPTS[2], "max_new_tokens": 3},
              {"prompt": PROMPTS[3], "max_new_tokens": 6}]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:  # concurrent streams share decoding steps
        answers = list(pool.map(lambda body: post(f"{server}/stream", body), bodies))
    for body, (status, payload) in zip(bodies, answers):
        assert status == 200, payload
        lines = [json.loads(line) for line in payload.decode().splitlines()]
        done = lines[-1]
        assert done["done"] is True and all("token_id" in line for line in lines[:-1])
        for index, prompt in enumerate(body.get("prompts") or [body["prompt"]]):
            expected = reference(prompt, body["max_new_tokens"])
            streamed = [line["token_id"] for line in lines[:-1] if line["index"] == index]
            assert streamed[: len(expected.token_ids)] == expected.token_ids
            assert done["completions"][index] == {"text": expected.text, "token_ids": expected.token_ids,
                                                  "finish_reason": expected.finish_reason}
    status, payload = post(f"{server}/generate?stream=true", {"prompt": PROMPTS[0], "max_new_tokens": 5})
    assert status == 200 and json.loads(payload.decode().splitlines()[-1])["done"]


@pytest.mark.parametrize("body, field", [
    (b"{not json", "body"),
    ({"prompt": "x", "max_tokens": 3}, "max_tokens"),
    ({"prompts": []}, "prompts"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 1000}, "max_new_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_k": 5}, "temperature"),
    ({"prompt": "x", "seed": "one"}, "seed"),
])
def test_a_bad_body_gets_a_400_naming_the_field_and_the_server_keeps_serving(server, reference, body, field):
    status, payload = post(f"{server}/generate", body)
    assert status == 400
    assert json.loads(payload)["error"].startswith(f"{field}:")
    status, payload = post(f"{server}/generate", {"prompt": PROMPTS[0], "max_new_tokens": 2})
    assert status == 200 and json.loads(payload)["completions"][0]["token_ids"] == reference(PROMPTS[0], 2).token_ids


def test_scaling_the_memory_shards_under_a_request_stream_fails_no_request(memory, reference, server):
    controller = get_controller(memory.handle.controller, memory.handle.namespace)
    expected = {p: reference(p, 4).token_ids for p in PROMPTS}
    stop_at = time.monotonic() + 600

    def client(index: int) -> list[tuple[int, list[int] | bytes]]:
        answers = []
        while time.monotonic() < stop_at or len(answers) < 3:
            prompt = PROMPTS[(index + len(answers)) % len(PROMPTS)]
            status, payload = post(f"{server}/generate", {"prompt": prompt, "max_new_tokens": 4})
            answers.append((prompt, status, json.loads(payload)["completions"][0]["token_ids"] if status == 200
                            else payload))
        return answers

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(client, i) for i in range(3)]
        time.sleep(1.0)
        ray.get(controller.scale.remote(3))
        ray.get(controller.scale.remote(2))
        stop_at = time.monotonic() + 1.0
        answers = [answer for future in clients for answer in future.result()]
    assert answers
    for prompt, status, token_ids in answers:
        assert status == 200, token_ids
        assert token_ids == expected[prompt]


def test_batch_generation_keeps_input_order_and_resumes_after_an_interruption(ray_cluster, checkpoint, memory,
                                                                              reference, tmp_path):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(9)]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    full = tmp_path / "full.jsonl"
    summary = generate_batch(checkpoint, source, full, memory=memory.handle, workers=2, batch_size=2,
                             max_new_tokens=4, worker_cpus=0.5)
    assert summary["generated"] == 9 and summary["skipped"] == 0
    records = [json.loads(line) for line in full.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(9)) and [r["id"] for r in records] == [f"p{i}" for i in range(9)]
    for record, prompt in zip(records, prompts):
        assert record["prompt"] == prompt and record["token_ids"] == reference(prompt, 4).token_ids

    # Interrupted after 4 records, halfway through the 5th: the CLI keeps the 4, drops the torn line, does the rest
    # (its workers behind a hot-row cache, which changes no token).
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:4]) + lines[4][:10])
    assert engram_main(["generate-batch", "--checkpoint", str(checkpoint), "--input", str(source), "--output",
                        str(partial), "--workers", "2", "--batch-size", "2", "--max-new-tokens", "4",
                        "--worker-cpus", "0.5", "--cache-rows", "64", "--address", ray_cluster, "--device", "cpu"]) == 0
    assert partial.read_text() == full.read_text()


def test_the_engram_serve_command_serves_until_interrupted_and_then_stops_its_memory(ray_cluster, checkpoint,
                                                                                     reference):
    stop_serving()  # the module's server: one Serve per Ray cluster, and the command starts its own
    port = free_port()
    command = [sys.executable, "-m", "compute.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
               "--replica-cpus", "0.5", "--cache-rows", "64", "--address", ray_cluster, "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = []
        for line in process.stdout:
            output.append(line)
            if line.startswith("serving "):
                break
        assert f"at http://127.0.0.1:{port}" in output[-1], "".join(output)
        assert any("bfloat16 rows without optimizer state" in line for line in output)
        controller = next(line.split()[2] for line in output if line.startswith("memory: controller"))
        status, payload = post(f"http://127.0.0.1:{port}/generate", {"prompt": PROMPTS[1], "max_new_tokens": 4})
        assert status == 200
        assert json.loads(payload)["completions"][0]["token_ids"] == reference(PROMPTS[1], 4).token_ids
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            caches = json.loads(response.read())["cache"]
        assert sorted(caches) == ["engram_layer_0", "engram_layer_1"]
        assert all(cache["capacity"] == 64 and cache["cached_rows"] <= 64 for cache in caches.values())
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and rest.rstrip().endswith("stopped"), rest
    alive = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
    assert controller not in alive
