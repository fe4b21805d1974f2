"""What a serving replica and a batch-generation worker run: requests checked, grouped and generated in batches.

Requests are parsed and checked here (``parse_request``), before they reach a batch, so that a bad
body never fails the other requests of its batch. ``ServingEngine.generate`` takes the prompts of
several requests at once and makes one ``Generator.generate_ids`` call per group of prompts that may
share a batch (same sampling; a seeded request alone, so its result does not depend on its
neighbours): prompts of different lengths are right-padded by ``DecodeSession.prefill``, and a row
never sees another row, so each greedy row equals the prompt generated alone.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Hashable, Iterator, Sequence

import torch

from compute.generate import DecodeSession, Generator, SamplingParams, TokenChooser

DEFAULT_MAX_NEW_TOKENS = 32
REQUEST_FIELDS = ("prompt", "prompts", "text", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stream")


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400): its message names the field."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[str, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = SamplingParams()
    stream: bool = False


def _integer(body: dict, field: str, default: int | None) -> int | None:
    value = body.get(field, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{field}: must be an integer, got {json.dumps(value)}")
    return value


def _number(body: dict, field: str, default: float) -> float:
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field}: must be a number, got {json.dumps(value)}")
    return float(value)


def parse_request(body: bytes | str | dict[str, Any]) -> GenerationRequest:
    """A request from its JSON body: ``{"prompt": str}`` or ``{"prompts": [str, ...]}`` (``text``: same as
    ``prompt``), ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed`` (as `engram generate`
    takes them) and ``stream``. Raises ``BadRequest`` naming the field at fault."""
    if not isinstance(body, dict):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object such as {\"prompt\": \"def main(\", \"max_new_tokens\": 16}")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (known: {', '.join(REQUEST_FIELDS)})")
    given = [field for field in ("prompt", "prompts", "text") if field in body]
    if len(given) != 1:
        raise BadRequest("prompt: give exactly one of prompt, prompts or text")
    field = given[0]
    prompts = body[field]
    if field != "prompts":
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(f"{field}: must be a string" + (" list, not empty" if field == "prompts" else ""))
    if any(not prompt for prompt in prompts):
        raise BadRequest(f"{field}: a prompt must not be empty")
    max_new_tokens = _integer(body, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if max_new_tokens < 1:
        raise BadRequest(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: must be true or false, got {json.dumps(stream)}")
    try:
        sampling = SamplingParams(temperature=_number(body, "temperature", 0.0), top_k=_integer(body, "top_k", 0),
                                  top_p=_number(body, "top_p", 1.0), seed=_integer(body, "seed", None))
    except BadRequest:
        raise
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return GenerationRequest(tuple(prompts), max_new_tokens, sampling, stream)


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One prompt of a request, as it enters a batch."""

    token_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    group: Hashable  # prompts of one group may share a Generator call


def completion_record(generator: Generator, ids: Sequence[int]) -> dict[str, Any]:
    """What a client gets for one prompt: the new token ids (EOS excluded), their text and why it stopped."""
    ids = list(ids)
    if ids and ids[-1] == generator.eos_id:
        ids, finish_reason = ids[:-1], "eos"
    else:
        finish_reason = "length"
    return {"text": generator.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
            "finish_reason": finish_reason}


class ServingEngine:
    """A ``Generator`` behind the checks and the grouping a server needs."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.max_seq_len = generator.model.config.model.max_seq_len

    def items(self, request: GenerationRequest, request_key: Hashable) -> list[PromptItem]:
        """The request's prompts, tokenised and checked against the model's context (``BadRequest``)."""
        group = request.sampling if request.sampling.seed is None else (request.sampling, request_key)
        items = []
        for index, prompt in enumerate(request.prompts):
            ids = tuple(int(i) for i in self.generator.compressor.encode(prompt).tolist())
            if not ids:
                raise BadRequest(f"prompts[{index}]: encodes to no tokens")
            if len(ids) + request.max_new_tokens - 1 > self.max_seq_len:
                raise BadRequest(f"max_new_tokens: prompt {index} has {len(ids)} tokens; with {request.max_new_tokens} "
                                 f"new tokens it exceeds the model's max_seq_len {self.max_seq_len}")
            items.append(PromptItem(ids, request.max_new_tokens, request.sampling, group))
        return items

    def batches(self, items: Sequence[PromptItem]) -> list[list[int]]:
        """The positions of ``items`` that share a Generator call: those of one group, split where the
        group's longest prompt plus its most new tokens would not fit the model's context."""
        groups: dict[Hashable, list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault(item.group, []).append(position)
        return [batch for positions in groups.values() for batch in self._fitting_batches(items, positions)]

    def generate(self, items: Sequence[PromptItem]) -> list[list[int]]:
        """Each item's new token ids, in order: one ``generate_ids`` call per batch of ``batches``."""
        results: list[list[int] | None] = [None] * len(items)
        for batch in self.batches(items):
            max_new = max(items[p].max_new_tokens for p in batch)
            generated = self.generator.generate_ids([items[p].token_ids for p in batch], max_new,
                                                    items[batch[0]].sampling)
            for p, ids in zip(batch, generated):
                results[p] = ids[: items[p].max_new_tokens]  # a row never depends on its neighbours
        return results

    def _fitting_batches(self, items: Sequence[PromptItem], positions: list[int]) -> Iterator[list[int]]:
        batch: list[int] = []
        for p in sorted(positions, key=lambda p: len(items[p].token_ids)):
            candidate = batch + [p]
            longest = max(len(items[q].token_ids) for q in candidate)
            if batch and longest + max(items[q].max_new_tokens for q in candidate) - 1 > self.max_seq_len:
                yield batch
                candidate = [p]
            batch = candidate
        if batch:
            yield batch

    @torch.inference_mode()
    def stream(self, items: Sequence[PromptItem]) -> Iterator[list[int | None]]:
        """Generate ``items`` (one batch of ``batches``) token by token: per step, each row's new token
        (None once it stopped).

        The same loop as ``Generator.generate_ids``, so the tokens equal its result."""
        generator, sampling = self.generator, items[0].sampling
        prompts = [item.token_ids for item in items]
        limits = torch.tensor([item.max_new_tokens for item in items])
        max_new = int(limits.max())
        capacity = max(len(p) for p in prompts) + max_new - 1
        session, logits = DecodeSession.prefill(generator.model, generator.compressor, generator.hasher, prompts,
                                                capacity)
        rows = torch.arange(len(prompts), device=logits.device)
        logits = logits[rows, session.lengths - 1]
        choose = TokenChooser(sampling, logits.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        for step in range(max_new):
            tokens = choose(logits).cpu()
            yield [None if done else int(token) for done, token in zip(finished.tolist(), tokens.tolist())]
            finished |= (tokens == generator.eos_id) | (limits <= step + 1)
            if step == max_new - 1 or bool(finished.all()):
                break
            logits = session.step(tokens.to(logits.device))
