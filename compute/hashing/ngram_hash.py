"""N-gram hashing: which row of each Engram layer's table every token position reads.

For order n at position t, `mix = x[t]*m[0] ^ x[t-1]*m[1] ^ ... ^ x[t-n+1]*m[n-1]` on compressed ids
(positions before the start read the compressed pad id); head j of order n reads `mix mod prime[n][j]`.

numpy has no SIMD integer division, so `mix mod p` is computed exactly in float64 instead. Split
`mix = hi * 2^K + lo` and let `y = hi * (2^K mod p) + lo`: y is congruent to mix mod p and below 2^48.
Two small matrix products (tokens x [hi_n, lo_n, 1] times per-head weights) give, for all heads at
once, `y + offset + 2^52` exactly and `y/p` within a tiny known error that a positive bias makes
one-sided, so that its floor is exact (see `_split_bits`). Then `y + offset + 2^52 - p * floor(y/p)`
is the row as a float in [2^52, 2^53), whose bits minus those of 2^52 are the int64 row id.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from compute.config import EngramConfig

if TYPE_CHECKING:
    from compute.hashing.tokenizer_compression import TokenizerCompressor

INT64_MAX = int(np.iinfo(np.int64).max)
_LAYER_SEED_STRIDE = 10007  # the demo's per-layer seed offset
_FLOAT64_UNIT_ROUNDOFF = 2.0**-53
# For an integer v in [0, 2^52), the float64 v + 2^52 is exact and its bits are those of 2^52 plus v.
_TWO_52 = 2.0**52
_TWO_52_BITS = int(np.float64(_TWO_52).view(np.int64))
# Per-token work runs on blocks of up to _BLOCK_TOKENS (fewer numpy calls), per-head work on chunks of
# _CHUNK_TOKENS, small enough that a chunk's [layers, chunk, heads] float arrays stay in L2.
_BLOCK_TOKENS = 8192
_CHUNK_TOKENS = 1024


def is_prime(n: int) -> bool:
    """Deterministic primality by trial division (head primes are at most ~2^31)."""
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    return all(n % f and n % (f + 2) for f in range(5, math.isqrt(n) + 1, 6))


def head_primes(config: EngramConfig) -> dict[int, np.ndarray]:
    """Per layer, [orders, heads] moduli: each the next unused prime above the previous head's."""
    used: set[int] = set()
    primes = {}
    for layer_id in config.layer_ids:
        per_order = []
        for order_vocab_size in config.engram_vocab_size:
            candidate, heads = order_vocab_size - 1, []
            for _ in range(config.n_head_per_ngram):
                candidate += 1
                while candidate in used or not is_prime(candidate):
                    candidate += 1
                used.add(candidate)
                heads.append(candidate)
            per_order.append(heads)
        primes[layer_id] = np.array(per_order, dtype=np.int64)
    return primes


def layer_multipliers(config: EngramConfig, compressed_vocab_size: int) -> dict[int, np.ndarray]:
    """Per layer, odd multipliers (one per n-gram position) small enough that id * m never overflows."""
    half_bound = max(1, (INT64_MAX // compressed_vocab_size) // 2)
    multipliers = {}
    for layer_id in config.layer_ids:
        rng = np.random.default_rng(config.seed + _LAYER_SEED_STRIDE * layer_id)
        multipliers[layer_id] = rng.integers(0, half_bound, size=config.max_ngram_size, dtype=np.int64) * 2 + 1
    return multipliers


def _split_bits(primes: np.ndarray) -> tuple[int, np.ndarray]:
    """The split K of mix = hi*2^K + lo, and per prime p a bound on the estimate of y/p (module docstring).

    The estimate's error is below e = 8u*bound (u = 2^-53, a few roundings); a bias of 2e puts it in
    [y/p + e, y/p + 3e], whose floor is floor(y/p) while 3e < 1/p (y/p is a multiple of 1/p). We ask
    p*e < 1/4, which also keeps y < 2^48: true for every prime below ~2^30.
    """
    split = min(53, max(1, math.ceil((63 + math.log2(int(primes.max()))) / 2)))
    bounds = 2.0 ** (63 - split) + 2.0**split / primes
    worst = int(np.argmax(primes * bounds))
    if primes.flat[worst] * 8 * _FLOAT64_UNIT_ROUNDOFF * bounds.flat[worst] >= 0.25:
        raise ValueError(
            f"engram_vocab_size: head prime {primes.flat[worst]} is too large for exact hashing (limit ~2^30)"
        )
    return split, bounds


@dataclasses.dataclass(frozen=True)
class _HashPlan:
    """Everything hashing needs, stacked over layers so one numpy call serves all layers of a chunk."""

    split: int  # K of mix = hi * 2^K + lo
    multipliers: np.ndarray  # [layers, max_ngram_size] int64
    offsets: np.ndarray  # [layers, heads] int64, cumulative sum of the earlier heads' primes
    # [layers, 2 * orders + 1, heads] float64 weights of the features hi_n, lo_n (per order n) and 1:
    quotient_weights: np.ndarray  # give y/p plus a small bias
    row_weights: np.ndarray  # give y + offset + 2^52
    hash_weights: np.ndarray  # give y + 2^52
    # [layers, _CHUNK_TOKENS, heads] float64: a contiguous operand is ~2x faster than a broadcast one.
    tiled_primes: np.ndarray

    @classmethod
    def build(cls, multipliers: list[np.ndarray], primes_by_order: list[np.ndarray]) -> "_HashPlan":
        stacked = np.stack(primes_by_order)  # [layers, orders, heads per order]
        layers, orders, heads_per_order = stacked.shape
        split, bounds = _split_bits(stacked)
        quotient_weights = np.zeros((layers, 2 * orders + 1, orders * heads_per_order))
        hash_weights = np.zeros_like(quotient_weights)
        for order in range(orders):
            cols = slice(order * heads_per_order, (order + 1) * heads_per_order)
            p = stacked[:, order]
            quotient_weights[:, 2 * order, cols] = (2**split % p) / p
            quotient_weights[:, 2 * order + 1, cols] = 1.0 / p
            hash_weights[:, 2 * order, cols] = 2**split % p
            hash_weights[:, 2 * order + 1, cols] = 1.0
        quotient_weights[:, -1] = 16 * _FLOAT64_UNIT_ROUNDOFF * bounds.reshape(layers, -1)
        hash_weights[:, -1] = _TWO_52
        primes = stacked.reshape(layers, -1)
        offsets = np.cumsum(primes, axis=1) - primes
        row_weights = hash_weights.copy()
        row_weights[:, -1] += offsets
        return cls(
            split=split,
            multipliers=np.stack(multipliers),
            offsets=offsets,
            quotient_weights=quotient_weights,
            row_weights=row_weights,
            hash_weights=hash_weights,
            tiled_primes=np.tile(primes[:, None, :].astype(np.float64), (1, _CHUNK_TOKENS, 1)),
        )


def _blocks(batch: int, length: int):
    """(rows, cols) slices covering [batch, length] in about _BLOCK_TOKENS tokens, each contiguous."""
    if batch == 0 or length == 0:
        return
    if length >= _BLOCK_TOKENS:
        for row in range(batch):
            for start in range(0, length, _BLOCK_TOKENS):
                yield slice(row, row + 1), slice(start, min(length, start + _BLOCK_TOKENS))
    else:
        rows = _BLOCK_TOKENS // length
        for start in range(0, batch, rows):
            yield slice(start, min(batch, start + rows)), slice(0, length)


class NgramHasher:
    """Hash ids and table rows of every Engram layer for compressed token ids, bit-exact with the demo."""

    def __init__(self, config: EngramConfig, compressed_vocab_size: int, compressed_pad_id: int):
        if compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
        if not 0 <= compressed_pad_id < compressed_vocab_size:
            raise ValueError(f"compressed_pad_id {compressed_pad_id} outside [0, {compressed_vocab_size})")
        self.config = config
        self.compressed_vocab_size = compressed_vocab_size
        self.compressed_pad_id = compressed_pad_id
        self.head_primes = head_primes(config)
        self.multipliers = layer_multipliers(config, compressed_vocab_size)
        self._plan = _HashPlan.build(
            [self.multipliers[layer_id] for layer_id in self.layer_ids],
            [self.head_primes[layer_id] for layer_id in self.layer_ids],
        )

    @classmethod
    def from_compressor(cls, config: EngramConfig, compressor: "TokenizerCompressor") -> "NgramHasher":
        """A hasher for ids compressed by `compressor`, its pad id being config.pad_id compressed."""
        pad = int(compressor.compress(np.array([config.pad_id]))[0])
        return cls(config, compressor.compressed_vocab_size, pad)

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(self.config.layer_ids)

    @property
    def head_offsets(self) -> dict[int, np.ndarray]:
        """Per layer, [heads] offset of each head's rows inside the layer's table."""
        return dict(zip(self.layer_ids, self._plan.offsets))

    def table_rows(self, layer_id: int) -> int:
        """Rows of a layer's table: the sum of its heads' primes."""
        return int(self.head_primes[layer_id].sum())

    def hash(
        self, compressed_ids: np.ndarray, left_context: np.ndarray | None = None, out: np.ndarray | None = None
    ) -> dict[int, np.ndarray]:
        """Per layer, [B, T, heads] hash ids (`mix mod prime`) of compressed ids [B, T] (see `row_ids`)."""
        return self._compute(compressed_ids, left_context, out, add_offsets=False)

    def row_ids(
        self, compressed_ids: np.ndarray, left_context: np.ndarray | None = None, out: np.ndarray | None = None
    ) -> dict[int, np.ndarray]:
        """Per layer, [B, T, heads] table rows (hash id + head offset) of compressed ids [B, T].

        `left_context` [B, <= max_ngram_size - 1] holds the ids just before each row when a sequence
        continues from an earlier chunk; without it, positions before the start read the pad id.
        `out`, a C-contiguous int64 [layers, B, T, heads] array (say, a reused pinned buffer), receives
        the result (the returned arrays are its views) and spares the page faults of fresh memory.
        """
        return self._compute(compressed_ids, left_context, out, add_offsets=True)

    def hash_at_newest(self, recent_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Per layer, [B, heads] hash ids of each sequence's newest position, from its last ids [B, k]."""
        return self._at_newest(recent_ids, add_offsets=False)

    def row_ids_at_newest(self, recent_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Per layer, [B, heads] rows of each sequence's newest position (generation, one token a step).

        `recent_ids` [B, k] ends with the newest id; only the last max_ngram_size matter, and with fewer
        the sequence is taken to start there.
        """
        return self._at_newest(recent_ids, add_offsets=True)

    def _at_newest(self, recent_ids: np.ndarray, add_offsets: bool) -> dict[int, np.ndarray]:
        recent = self._validated(recent_ids, "recent_ids")
        if recent.shape[1] == 0:
            raise ValueError("recent_ids: needs at least the newest id of each sequence")
        window = recent[:, -self.config.max_ngram_size :]
        return {layer_id: ids[:, -1] for layer_id, ids in self._compute(window, None, None, add_offsets).items()}

    def _validated(self, ids: np.ndarray, name: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"{name}: expected a [batch, length] array, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name}: expected integer ids, got dtype {ids.dtype}")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.compressed_vocab_size:
                raise ValueError(
                    f"{name}: compressed ids must lie in [0, {self.compressed_vocab_size}), got [{low}, {high}]"
                )
        return ids.astype(np.int64, copy=False)

    def _extended(self, ids: np.ndarray, left_context: np.ndarray | None) -> np.ndarray:
        """[B, max_ngram_size - 1 + T]: each row's left context (pad where unknown), then its ids."""
        context_len = self.config.max_ngram_size - 1
        extended = np.full((ids.shape[0], context_len + ids.shape[1]), self.compressed_pad_id, dtype=np.int64)
        extended[:, context_len:] = ids
        if left_context is not None:
            context = self._validated(left_context, "left_context")
            if context.shape[0] != ids.shape[0]:
                raise ValueError(f"left_context: has {context.shape[0]} rows, compressed_ids has {ids.shape[0]}")
            context = context[:, max(0, context.shape[1] - context_len) :]
            extended[:, context_len - context.shape[1] : context_len] = context
        return extended

    def _output(self, out: np.ndarray | None, batch: int, length: int) -> np.ndarray:
        shape = (len(self.layer_ids), batch, length, self.config.heads_per_layer)
        if out is None:
            return np.empty(shape, dtype=np.int64)
        if out.shape != shape or out.dtype != np.int64 or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous int64 array of shape {shape}, got {out.dtype} {out.shape}")
        return out

    def _compute(self, compressed_ids, left_context, out, add_offsets: bool) -> dict[int, np.ndarray]:
        ids = self._validated(compressed_ids, "compressed_ids")
        batch, length = ids.shape
        extended = self._extended(ids, left_context)
        output = self._output(out, batch, length)
        scratch = _Scratch(self._plan, capacity=min(_BLOCK_TOKENS, batch * length))
        context_len = self.config.max_ngram_size - 1
        for rows, cols in _blocks(batch, length):
            # shifted[k][b, t] = x[t - k]: the id k positions back, read from the extended rows.
            shifted = [
                extended[rows, cols.start + context_len - k : cols.stop + context_len - k]
                for k in range(context_len + 1)
            ]
            # [layers, tokens, heads] without a copy: a block is whole rows, or a window of one row.
            target = output[:, rows, cols].reshape(len(output), -1, output.shape[-1])
            scratch.hash_block(shifted, target, add_offsets)
        return dict(zip(self.layer_ids, output))


class _Scratch:
    """Work arrays for one block of tokens, reused across blocks."""

    def __init__(self, plan: _HashPlan, capacity: int):
        """Arrays for blocks of up to `capacity` tokens (small calls, as in generation, stay small)."""
        self.plan = plan
        layers, features, heads = plan.quotient_weights.shape
        self.mix = np.empty((layers, capacity), dtype=np.int64)
        self.term = np.empty((layers, capacity), dtype=np.int64)
        self.features = np.empty((layers, features, capacity))  # hi_n, lo_n per order; then ones
        self.features[:, -1] = 1.0
        self.quotient = np.empty((layers, min(capacity, _CHUNK_TOKENS), heads))

    def hash_block(self, shifted: list[np.ndarray], target: np.ndarray, add_offsets: bool) -> None:
        """Write every layer's hash ids (plus offsets if asked) of one block of tokens into `target`.

        `shifted[k]` is the block's ids k positions back ([rows, cols]); `target` is [layers, tokens, heads].
        """
        n = shifted[0].size
        features = self._features(shifted).transpose(0, 2, 1)  # [layers, n, features]
        for start in range(0, n, _CHUNK_TOKENS):
            chunk = slice(start, min(n, start + _CHUNK_TOKENS))
            self._hash_chunk(features[:, chunk], target[:, chunk], add_offsets)

    def _features(self, shifted: list[np.ndarray]) -> np.ndarray:
        """[layers, features, n]: hi and lo of every order's mix, then ones."""
        plan = self.plan
        n = shifted[0].size
        mix, term, features = self.mix[:, :n], self.term[:, :n], self.features[:, :, :n]
        low_mask = (1 << plan.split) - 1
        np.multiply(shifted[0].reshape(1, n), plan.multipliers[:, :1], out=mix)
        for k in range(1, len(shifted)):  # order k + 1 extends order k's mix by one more id
            np.multiply(shifted[k].reshape(1, n), plan.multipliers[:, k : k + 1], out=term)
            np.bitwise_xor(mix, term, out=mix)
            np.right_shift(mix, plan.split, out=features[:, 2 * k - 2], casting="unsafe")
            np.bitwise_and(mix, low_mask, out=features[:, 2 * k - 1], casting="unsafe")
        return features

    def _hash_chunk(self, features: np.ndarray, target: np.ndarray, add_offsets: bool) -> None:
        """Rows (or hash ids) of one chunk; the output doubles as a work array, saving a pass."""
        plan = self.plan
        n = features.shape[1]
        quotient = self.quotient[:, :n]
        np.matmul(features, plan.quotient_weights, out=quotient)
        np.floor(quotient, out=quotient)
        np.multiply(quotient, plan.tiled_primes[:, :n], out=quotient)
        value = target.view(np.float64)
        np.matmul(features, plan.row_weights if add_offsets else plan.hash_weights, out=value)
        np.subtract(value, quotient, out=value)  # (mix mod p) + offset + 2^52, exactly
        np.subtract(target, _TWO_52_BITS, out=target)
