"""Batched generation over a KV cache: prompts prefilled at once, then one token per row a step.

Prompts of different lengths are right-padded: a causal model never lets a pad position reach the
real ones before it, so the pad tokens and their Engram rows cannot change results; each row then
continues at its own position, overwriting its padding in the caches (see ``DecodeCache``).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor
from compute.model.engram_moe import DecodeCache, EngramMoEModel

EOS_TOKEN = "<｜end▁of▁sentence｜>"  # DeepSeek's end of sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen: greedily (``temperature`` 0) or sampled after a top-k/top-p cut."""

    temperature: float = 0.0
    top_k: int = 0  # keep the k likeliest tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of likeliest tokens holding this much probability
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must lie in (0, 1], got {self.top_p}")
        if self.greedy and (self.top_k or self.top_p < 1):
            raise ValueError("temperature: top_k and top_p need sampling, i.e. temperature > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Picks each row's next token from its logits ``[B, vocab]``, reproducibly for a given seed."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = torch.Generator(device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        params = self.params
        if params.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float() / params.temperature
        if params.top_k and params.top_k < scores.shape[-1]:
            kth_best = scores.topk(params.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth_best, float("-inf"))
        if params.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # Drop a token when the likelier ones already hold top_p: the likeliest always stays.
            dropped = probs.cumsum(dim=-1) - probs >= params.top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(dropped, float("-inf")))
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=self.generator)[:, 0]


class DecodeSession:
    """A batch of token sequences in a KV cache, extended by one token per row a step.

    Each step hashes the newest token's n-grams from the last ``max_ngram_size`` compressed ids; the
    model looks their rows up before its first layer and awaits them only at the Engram layers.
    """

    def __init__(self, model: EngramMoEModel, compressor: TokenizerCompressor, hasher: NgramHasher, capacity: int,
                 batch: int):
        self.model, self.compressor, self.hasher = model, compressor, hasher
        self.cache = DecodeCache(model, batch, capacity)
        # Each row's last max_ngram_size compressed ids; the pad id stands before the start, as in hashing.
        self.recent_ids = np.full((batch, hasher.config.max_ngram_size), hasher.compressed_pad_id, dtype=np.int64)

    @classmethod
    def prefill(
        cls, model: EngramMoEModel, compressor: TokenizerCompressor, hasher: NgramHasher,
        prompts: Sequence[Sequence[int]], capacity: int,
    ) -> tuple["DecodeSession", torch.Tensor]:
        """A session holding ``prompts`` (token ids), and their logits ``[B, longest, vocab]``.

        A row's logits past its own length are padding's: meaningless, and cached over later.
        """
        lengths = [len(prompt) for prompt in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError("prompts: need at least one prompt, each with at least one token")
        padded = np.full((len(prompts), max(lengths)), model.config.engram.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = prompt
        vocab_size = model.config.model.vocab_size
        if padded.min() < 0 or padded.max() >= vocab_size:
            raise ValueError(f"prompts: token ids must lie in [0, {vocab_size})")
        session = cls(model, compressor, hasher, capacity, len(prompts))
        compressed = compressor.compress(padded)
        window = session.recent_ids.shape[1]
        for row, length in enumerate(lengths):
            tail = compressed[row, max(0, length - window) : length]
            session.recent_ids[row, window - len(tail) :] = tail
        row_ids = {layer: torch.from_numpy(ids) for layer, ids in hasher.row_ids(compressed).items()}
        logits = session._forward(padded, row_ids, torch.tensor(lengths))
        return session, logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[B]``); the logits ``[B, vocab]`` for the token after it."""
        token_ids = tokens.cpu().numpy().astype(np.int64).reshape(-1, 1)
        recent_ids = np.concatenate([self.recent_ids[:, 1:], self.compressor.compress(token_ids)], axis=1)
        newest_rows = self.hasher.row_ids_at_newest(recent_ids)
        row_ids = {layer: torch.from_numpy(ids[:, None]) for layer, ids in newest_rows.items()}
        logits = self._forward(token_ids, row_ids, real_tokens=None)[:, -1]
        self.recent_ids = recent_ids
        return logits

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per row."""
        return self.cache.lengths

    def _forward(
        self, token_ids: np.ndarray, row_ids: dict[int, torch.Tensor], real_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        # The model starts the tables' lookups before its first layer and awaits each at its Engram layer.
        device = self.cache.lengths.device
        output = self.model(torch.from_numpy(token_ids).to(device), engram_row_ids=row_ids, cache=self.cache,
                            real_tokens=real_tokens)
        return output.logits


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's continuation: its new token ids (EOS excluded), their text, and why it stopped."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" or "length"


class Generator:
    """Continues prompts with an EngramMoE model: ``Generator(model, compressor, hasher).generate([...])``."""

    def __init__(self, model: EngramMoEModel, compressor: TokenizerCompressor, hasher: NgramHasher,
                 eos_id: int | None = None):
        """``eos_id`` defaults to the tokenizer's end-of-sentence token."""
        if model.config.model.vocab_size > compressor.vocab_size:
            raise ValueError(
                f"vocab_size: the model's {model.config.model.vocab_size} ids exceed the tokenizer's "
                f"{compressor.vocab_size}, so some could not be hashed"
            )
        self.model, self.compressor, self.hasher = model, compressor, hasher
        self._eos_id = eos_id
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(str(self.compressor.tokenizer_path))
        return self._tokenizer

    @property
    def eos_id(self) -> int:
        if self._eos_id is None:
            self._eos_id = self.tokenizer.token_to_id(EOS_TOKEN)
        return self._eos_id

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32,
                 sampling: SamplingParams = SamplingParams()) -> list[Completion]:
        """Continue each text prompt by up to ``max_new_tokens`` tokens, stopping a row at EOS."""
        prompt_ids = [self.compressor.encode(prompt).tolist() for prompt in prompts]
        return [self._completion(ids) for ids in self.generate_ids(prompt_ids, max_new_tokens, sampling)]

    def _completion(self, ids: list[int]) -> Completion:
        if ids and ids[-1] == self.eos_id:
            ids, finish_reason = ids[:-1], "eos"
        else:
            finish_reason = "length"
        return Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), finish_reason)

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                     sampling: SamplingParams = SamplingParams(), stop_at_eos: bool = True) -> list[list[int]]:
        """Each prompt's new token ids: ``max_new_tokens`` of them, or fewer ending with EOS."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        # The last new token is never fed back, so it needs no cache position.
        capacity = max((len(prompt) for prompt in prompts), default=1) + max_new_tokens - 1
        max_seq_len = self.model.config.model.max_seq_len
        if capacity > max_seq_len:
            raise ValueError(
                f"max_new_tokens: the longest prompt plus {max_new_tokens} new tokens exceeds max_seq_len {max_seq_len}"
            )
        session, logits = DecodeSession.prefill(self.model, self.compressor, self.hasher, prompts, capacity)
        rows = torch.arange(len(prompts), device=logits.device)
        logits = logits[rows, session.lengths - 1]
        choose = TokenChooser(sampling, logits.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
        generated = []
        for step in range(max_new_tokens):
            tokens = choose(logits)
            generated.append(torch.where(finished, -1, tokens))  # -1: the row had already stopped
            if stop_at_eos:
                finished |= tokens == self.eos_id
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = session.step(tokens)
        per_row = torch.stack(generated, dim=1).tolist()
        return [[token for token in row if token >= 0] for row in per_row]


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompt and sampling options of a generate command (``sampling_from_args`` reads them)."""
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def print_completions(prompts: Sequence[str], completions: Sequence[Completion]) -> None:
    for prompt, completion in zip(prompts, completions):
        print(f"{prompt}{completion.text}\n  [{len(completion.token_ids)} tokens, {completion.finish_reason}]")
