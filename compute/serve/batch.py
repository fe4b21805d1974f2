"""`engram generate-batch`: a JSONL file of prompts through several Ray actors, results in input order.

Each input line is a JSON object with ``prompt`` (or ``text``) and, optionally, ``id`` (copied into
the result). The driver cuts the prompts into chunks of ``batch_size``; ``workers`` actors (each
loading the model once, with its own client on the one read-only memory service) take chunks as they
finish the last, and the driver appends each chunk's records to the output as soon as every chunk
before it has been written (flushed and fsynced per chunk). So the output is always a prefix of the
final file, in input order, and a rerun resumes: it keeps the complete records already in the output
(dropping a torn last line), checks they are the first prompts', and generates only the rest.

An output record: ``{"index", "id"?, "prompt", "text", "token_ids", "finish_reason"}``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import ray
import torch
from ray.util import ActorPool

from compute.generate import SamplingParams
from compute.serve.engine import BadRequest, GenerationRequest, completion_record
from compute.serve.runtime import load_serving_runtime, placement_options, serving_engine
from compute.train.config import CacheConfig
from memory_service.deploy import MemoryHandle

log = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The input's records (blank lines skipped); each needs a string ``prompt`` or ``text``."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"input: line {number} is not JSON ({exc})") from None
        prompt = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"input: line {number} needs a non-empty string \"prompt\" (or \"text\")")
        records.append({"prompt": prompt, **({"id": record["id"]} if "id" in record else {})})
    return records


def completed_records(path: str | Path, prompts: list[dict[str, Any]]) -> int:
    """How many records the output already holds; a torn last line (an interrupted write) is cut off.

    Refuses an output whose records are not the first prompts' in order (another input's output)."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    done, good_bytes = 0, 0
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not line.endswith(b"\n"):
            break
        if not isinstance(record, dict) or record.get("index") != done or done >= len(prompts) \
                or record.get("prompt") != prompts[done]["prompt"]:
            raise ValueError(f"output: record {done + 1} of {path} is not the result of input prompt {done}: "
                             "is it another input's output? (remove it to start over)")
        done += 1
        good_bytes += len(line)
    if good_bytes < len(data):
        log.warning("output: dropping %d bytes of an interrupted record at the end of %s", len(data) - good_bytes,
                    path)
        with path.open("r+b") as file:
            file.truncate(good_bytes)
    return done


class BatchWorker:
    """One worker: the model loaded once, chunks of prompts generated as one batch each."""

    def __init__(self, checkpoint: str, device: str, memory: MemoryHandle | None, torch_threads: int = 1,
                 cache: CacheConfig = CacheConfig()):
        torch.set_num_threads(torch_threads)
        self.runtime = load_serving_runtime(checkpoint, device, memory, cache)
        self.engine = serving_engine(self.runtime)

    def generate(self, start: int, prompts: list[dict[str, Any]], max_new_tokens: int,
                 sampling: dict[str, Any]) -> list[dict[str, Any]]:
        params = SamplingParams(**sampling)
        if params.seed is not None:  # each chunk its own seed: a rerun with the same --batch-size repeats it
            params = dataclasses.replace(params, seed=params.seed + start)
        request = GenerationRequest(tuple(record["prompt"] for record in prompts), max_new_tokens, params)
        try:
            items = self.engine.items(request, start)
        except BadRequest as exc:
            raise ValueError(f"input: in the prompts from index {start}: {exc}") from None
        generated = self.engine.generate(items)
        return [{"index": start + i, **({"id": record["id"]} if "id" in record else {}), "prompt": record["prompt"],
                 **completion_record(self.engine.generator, ids)}
                for i, (record, ids) in enumerate(zip(prompts, generated))]

    def close(self) -> None:
        self.runtime.close()


def _chunks(prompts: list[dict[str, Any]], start: int, size: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    for first in range(start, len(prompts), size):
        yield first, prompts[first:first + size]


def generate_batch(checkpoint: str | Path, input_path: str | Path, output_path: str | Path, *,
                   memory: MemoryHandle | None, workers: int = 2, batch_size: int = 8, max_new_tokens: int = 32,
                   sampling: SamplingParams = SamplingParams(), device: str = "cpu", worker_cpus: float = 1.0,
                   cache: CacheConfig = CacheConfig(), on_chunk=None) -> dict[str, Any]:
    """Generate every prompt of ``input_path`` not yet in ``output_path``; a summary of what was done."""
    started = time.perf_counter()
    prompts = read_prompts(input_path)
    output_path = Path(output_path)
    skipped = completed_records(output_path, prompts)
    summary = {"prompts": len(prompts), "skipped": skipped, "generated": 0, "tokens": 0, "workers": workers}
    if skipped == len(prompts):
        summary["seconds"] = round(time.perf_counter() - started, 3)
        return summary
    if workers < 1 or batch_size < 1:
        raise ValueError("workers and batch_size: must be >= 1")
    actor_class = ray.remote(BatchWorker).options(**placement_options(device, worker_cpus))
    chunks = list(_chunks(prompts, skipped, batch_size))
    actors = [actor_class.remote(str(Path(checkpoint).resolve()), device, memory, max(1, int(worker_cpus)), cache)
              for _ in range(min(workers, len(chunks)))]
    sampling_fields = dataclasses.asdict(sampling)
    try:
        pool = ActorPool(actors)
        results = pool.map(lambda actor, chunk: actor.generate.remote(chunk[0], chunk[1], max_new_tokens,
                                                                       sampling_fields), chunks)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        with output_path.open("a") as output:
            for records in results:  # ActorPool.map yields in submission order: input order
                output.write("".join(json.dumps(record) + "\n" for record in records))
                output.flush()
                os.fsync(output.fileno())
                summary["generated"] += len(records)
                summary["tokens"] += sum(len(record["token_ids"]) for record in records)
                if on_chunk is not None:
                    on_chunk(summary)
    finally:
        for actor in actors:
            ray.kill(actor)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["tokens_per_s"] = round(summary["tokens"] / summary["seconds"], 1)
    return summary
