"""`engram serve`: the model as a Ray Serve deployment behind Serve's HTTP proxy.

Routes (any path prefix the app is mounted under):

- ``POST /generate`` (or ``/``): JSON in (``engram.serve.engine.parse_request``), JSON out:
  ``{"completions": [{"text", "token_ids", "finish_reason"}, ...]}``, one per prompt.
- ``POST /stream`` (or ``/generate?stream=true``, or ``"stream": true`` in the body): newline-delimited
  JSON, one ``{"index", "token_id", "text"}`` line per new token of each prompt as it is chosen, then
  ``{"done": true, "completions": [...]}``.
- ``GET /health``: ``{"status": "ok", ...}``, with each table's hot-row cache in figures when there is one.

A bad body gets 400 and ``{"error": "<field>: <what is wrong>"}``. Non-streamed prompts from all
clients go through ``@serve.batch``: those that arrive within ``batch_wait_s`` of each other are
generated together, one ``Generator`` call per sampling group (``ServingEngine.generate``); streamed
prompts likewise through a batching async generator that yields every decoding step's tokens.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from compute.memory.cached_table import CachedRowTable
from compute.serve.engine import BadRequest, PromptItem, completion_record, parse_request
from compute.serve.runtime import load_serving_runtime, placement_options, serving_engine
from compute.train.config import CacheConfig
from memory_service.deploy import MemoryHandle

log = logging.getLogger(__name__)

APP_NAME = "engram"
DEPLOYMENT_NAME = "EngramGenerator"


class EngramGenerator:
    """One model replica: its own client on the shared memory service, requests batched across clients."""

    def __init__(self, checkpoint: str, device: str, memory: MemoryHandle | None, max_batch_size: int = 16,
                 batch_wait_s: float = 0.01, torch_threads: int | None = None, cache: CacheConfig = CacheConfig()):
        torch.set_num_threads(torch_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.checkpoint = checkpoint
        self.runtime = load_serving_runtime(checkpoint, device, memory, cache)
        self.engine = serving_engine(self.runtime)
        self.generator = self.engine.generator
        self._keys = itertools.count()
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_s)
        self._stream_batch.set_max_batch_size(max_batch_size)
        self._stream_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.batches: list[int] = []  # the size of each batch generated, newest last (the last 1000)

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/")
        if request.method == "GET":
            if path.endswith("/health") or path == "":
                caches = {table.table: table.describe() for table in self.runtime.tables.values()
                          if isinstance(table, CachedRowTable)}
                return JSONResponse({"status": "ok", "checkpoint": self.checkpoint,
                                     "remote_tables": self.runtime.client is not None,
                                     "recent_batch_sizes": self.batches[-20:], **({"cache": caches} if caches else {})})
            return JSONResponse({"error": f"GET {request.url.path}: not found (GET /health, POST /generate, "
                                          f"POST /stream)"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method}: use POST"}, status_code=405)
        last = path.rsplit("/", 1)[-1]
        if last not in ("", "generate", "stream"):
            return JSONResponse({"error": f"POST {request.url.path}: not found (POST /generate, POST /stream)"},
                                status_code=404)
        try:
            parsed = parse_request(await request.body())
            stream = parsed.stream or last == "stream" or request.query_params.get("stream", "").lower() in (
                "1", "true", "yes")
            items = self.engine.items(parsed, next(self._keys))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if stream:
            return StreamingResponse(self._stream_lines(items), media_type="application/x-ndjson")
        try:
            generated = await asyncio.gather(*(self._generate_batch(item) for item in items))
        except Exception as exc:  # noqa: BLE001 - a failed generation is the server's error, said in one line
            log.exception("generation failed")
            return JSONResponse({"error": f"generation failed: {exc}"}, status_code=500)
        return JSONResponse({"completions": [completion_record(self.generator, ids) for ids in generated]})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[PromptItem]) -> list[list[int]]:
        self.batches = (self.batches + [len(items)])[-1000:]
        return await asyncio.to_thread(self.engine.generate, items)

    # A stream that arrives while others decode starts a batch of its own beside them (up to 4 at once)
    # rather than waiting for them to end.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=4)
    async def _stream_batch(self, items: list[PromptItem]) -> AsyncIterator[list]:
        """Streamed prompts, batched as the others: per decoding step, each prompt's new token
        (``StopIteration`` ends a prompt's stream)."""
        self.batches = (self.batches + [len(items)])[-1000:]
        streams = [(positions, self.engine.stream([items[p] for p in positions]))
                   for positions in self.engine.batches(items)]
        while streams:
            step: list = [StopIteration] * len(items)
            for entry in list(streams):
                positions, steps = entry
                tokens = await asyncio.to_thread(next, steps, None)
                if tokens is None:
                    streams.remove(entry)
                    continue
                for position, token in zip(positions, tokens):
                    if token is not None:
                        step[position] = token
            if streams:
                yield step

    async def _stream_lines(self, items: list[PromptItem]) -> AsyncIterator[bytes]:
        """NDJSON lines as tokens come, then the completions."""
        generated: list[list[int]] = [[] for _ in items]
        tokenizer = self.generator.tokenizer
        active = [(index, self._stream_batch(item)) for index, item in enumerate(items)]
        try:
            while active:
                for entry in list(active):
                    index, tokens = entry
                    try:
                        token = await tokens.__anext__()
                    except StopAsyncIteration:
                        active.remove(entry)
                        continue
                    generated[index].append(token)
                    text = "" if token == self.generator.eos_id else tokenizer.decode([token])
                    yield (json.dumps({"index": index, "token_id": token, "text": text}) + "\n").encode()
        except Exception as exc:  # noqa: BLE001 - the status line is sent already: the error goes in the stream
            log.exception("streamed generation failed")
            yield (json.dumps({"error": f"generation failed: {exc}"}) + "\n").encode()
            return
        completions = [completion_record(self.generator, ids) for ids in generated]
        yield (json.dumps({"done": True, "completions": completions}) + "\n").encode()


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas for Serve's autoscaler."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"autoscale: expected MIN:MAX such as 1:4, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def build_app(checkpoint: str | Path, memory: MemoryHandle | None, *, device: str = "cpu", replicas: int = 1,
              autoscale: tuple[int, int] | None = None, replica_cpus: float = 1.0, max_batch_size: int = 16,
              batch_wait_s: float = 0.01, target_ongoing_requests: float = 4.0, gpus_per_replica: float = 1.0,
              cache: CacheConfig = CacheConfig()):
    """The Serve application: ``replicas`` fixed replicas, or between ``autoscale``'s MIN and MAX replicas
    as Serve's policy decides from the requests each replica has in flight (``target_ongoing_requests``)."""
    if replicas < 1:
        raise ValueError(f"replicas: must be >= 1, got {replicas}")
    options: dict[str, Any] = {"name": DEPLOYMENT_NAME, "max_ongoing_requests": max(2 * max_batch_size, 8),
                               "ray_actor_options": placement_options(device, replica_cpus, gpus=gpus_per_replica)}
    if autoscale is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "initial_replicas": max(autoscale[0], 1),
                                         "target_ongoing_requests": target_ongoing_requests}
    threads = max(1, int(replica_cpus))
    return serve.deployment(EngramGenerator, **options).bind(
        str(Path(checkpoint).resolve()), device, memory, max_batch_size, batch_wait_s, threads, cache)


def start_serving(app, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 300.0) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and run ``app``; the base URL once it answers."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                if response.status == 200:
                    return url
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Serve app did not answer at {url}/health within {timeout_s:.0f} s")
            time.sleep(0.5)


def stop_serving() -> None:
    serve.shutdown()
