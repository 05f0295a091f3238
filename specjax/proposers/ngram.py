"""Model-free drafters that copy text the history already holds: prompt lookup, suffix match, pool.

All three look for an earlier place where the text ended the way the history ends now, and propose
the tokens that followed there. They differ in what they match (fixed n-grams, the longest suffix, a
hashed table kept up to date online) and where they look (the row itself, rows of its group, a store
of earlier rounds). Everything is fixed-size arrays and masks, so they run inside the jitted loop.

A match's continuation is read from the source row up to its length, so it may run into the source's
pending token (the last history token); it never reads padding.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Int

from specjax.drafting import (
    Context,
    Draft,
    TreeTemplate,
    branching_tree,
    chains_to_tree,
    check_context,
    check_draft,
    gather_rows,
)
from specjax.proposers.base import Proposer, option, register

# ---------------------------------------------------------------- suffix matching (pld, suffix)


def _match_lengths(
    query: Int[Array, "B S"], qlen: Int[Array, "B"], src: Int[Array, "B R W"], candidate: Bool[Array, "B R W"],
    max_match: int,
) -> Int[Array, "B R W"]:
    """m[b, r, i]: how many tokens right before src[b, r, i] equal the last tokens of query row b, for
    each candidate (0 elsewhere).

    Extends every candidate one token further back per pass and stops when none still matches, so
    the usual short matches cost a few passes over [B, R, W], never a [B, R, W, max_match] tensor.
    Only candidates start alive: the position right after a row's own end matches that row's suffix
    trivially, and would keep every step at max_match passes.
    """
    pos = jnp.arange(src.shape[-1])

    def still_matching(carry):
        d, alive, _ = carry
        return (d < max_match) & alive.any()

    def one_further_back(carry):
        d, alive, m = carry
        q_idx = qlen - 1 - d
        q_tok = gather_rows(query, q_idx[:, None])[:, 0]
        before = jnp.roll(src, d + 1, axis=-1)  # before[..., i] = src[..., i - 1 - d] where i > d
        alive = alive & (pos > d) & (q_idx >= 0)[:, None, None] & (before == q_tok[:, None, None])
        return d + 1, alive, m + alive

    init = (jnp.int32(0), candidate, jnp.zeros(src.shape, jnp.int32))
    return jax.lax.while_loop(still_matching, one_further_back, init)[2]


def _suffix_draft(
    ctx: Context,
    src: Int[Array, "B R W"],
    src_len: Int[Array, "B R"],
    ok: Bool[Array, "B R"],
    own: Bool[Array, "B R"],
    k: int,
    max_match: int,
    min_match: int,
    spec_factor: float = 0.0,
    branches: int = 1,
) -> Draft:
    """Drafts, per row b, the continuation of its longest suffix match among the sources src[b, r].

    A candidate i (the continuation's first token, src[b, r, i]) needs i < src_len[b, r] and
    ok[b, r]. Ties go to the row's own history (own), then to the latest position. With branches > 1
    the next best candidates whose first token differs from those already taken fill further chains
    of a tree (`branching_tree((branches,), K)`): tokens [B, branches * K] breadth-first
    (`chains_to_tree`), `valid` marks real nodes.
    """
    batch, _, width = src.shape
    tokens = ctx.tokens.astype(jnp.int32)
    pos = jnp.arange(width)
    candidate = ok[..., None] & (pos < src_len[..., None])
    m = _match_lengths(tokens, ctx.lengths, src, candidate, max_match)
    valid = candidate & (m >= min_match)
    score = m * (2 * width) + own[..., None] * width + pos  # lexicographic: length, own row, recency
    score = jnp.where(valid, score, -1).reshape(batch, -1)
    first_token = src.reshape(batch, -1)
    rows, steps = jnp.arange(batch), jnp.arange(k)
    chains, nums, lengths = [], [], []
    for _ in range(branches):
        best = jnp.max(score, axis=-1)
        flat = jnp.argmax(score, axis=-1)
        row, start = flat // width, flat % width
        found = (best >= 0) & ctx.active
        length = jnp.where(found, best // (2 * width), 0)
        cap = k if spec_factor <= 0 else jnp.ceil(spec_factor * length).astype(jnp.int32)
        num = jnp.where(found, jnp.clip(src_len[rows, row] - start, 0, jnp.minimum(cap, k)), 0).astype(jnp.int32)
        draft = src[rows[:, None], row[:, None], jnp.clip(start[:, None] + steps, 0, width - 1)]
        chains.append(jnp.where(steps < num[:, None], draft, 0).astype(jnp.int32))
        nums.append(num)
        lengths.append(length)
        taken = first_token[rows, flat]
        score = jnp.where(first_token == taken[:, None], -1, score)  # next chain starts differently
    confidence = lengths[0].astype(jnp.float32)
    if branches == 1:
        return check_draft(Draft(tokens=chains[0], num=nums[0], confidence=confidence), batch, k)
    valid_nodes = jnp.stack([steps[None] < n[:, None] for n in nums], axis=1)
    return Draft(tokens=chains_to_tree(jnp.stack(chains, axis=1)), num=sum(nums), confidence=confidence,
                 valid=chains_to_tree(valid_nodes))


@register("pld")
@dataclasses.dataclass(frozen=True)
class PromptLookup(Proposer):
    """Prompt lookup decoding: copy what followed the latest earlier occurrence of the last n tokens.

    Tries n = max_ngram down to min_ngram and keeps the largest n that occurs; this is a suffix match
    capped at max_ngram (latest position wins among equally long matches), computed that way.
    Stateless. `confidence` is the matched n.
    """

    paper: ClassVar[tuple[int, str] | None] = (3, "PLD")
    k: int = option(8, min=0)
    max_ngram: int = option(3, min=1)
    # a lone repeated token is a weak predictor; a wide verify costs 3-4x a step on CPU
    min_ngram: int = option(2, min=1)
    spec_factor: float = option(0.0, min=0)  # > 0: draft at most ceil(spec_factor * match length) tokens

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[tuple, Draft]:
        batch = check_context(ctx)
        src = ctx.tokens.astype(jnp.int32)[:, None]
        ok = jnp.ones((batch, 1), bool)
        draft = _suffix_draft(
            ctx, src, ctx.lengths[:, None], ok, ok, self.k, self.max_ngram, self.min_ngram, self.spec_factor
        )
        return state, draft


@struct.dataclass
class SuffixStore:
    """Extra text a SuffixMatch row may copy from, e.g. earlier rounds of multi-round thinking."""

    tokens: Int[Array, "B S2"]  # right-padded with zeros
    lengths: Int[Array, "B"]


def seed_store(store: SuffixStore, tokens: Int[Array, "B S"], lengths: Int[Array, "B"]) -> SuffixStore:
    """Appends each row's tokens[b, :lengths[b]] to its store, keeping the latest S2 tokens.

    Engine use, between rounds: `state = seed_store(proposer.init(ctx), prev_tokens, prev_lengths)`
    (appending to the empty store of a fresh `init` is replacing). Jit-safe.
    """
    chex.assert_rank([store.tokens, tokens], 2)
    chex.assert_shape([store.lengths, lengths], (tokens.shape[0],))
    size = store.tokens.shape[1]
    both = jnp.concatenate([store.tokens, tokens.astype(jnp.int32)], axis=1)
    total = store.lengths + lengths
    keep = jnp.maximum(total - size, 0)[:, None] + jnp.arange(size)  # positions in old ++ new
    idx = jnp.where(keep < store.lengths[:, None], keep, keep - store.lengths[:, None] + size)
    kept = jnp.where(keep < total[:, None], gather_rows(both, idx), 0)
    return SuffixStore(tokens=kept, lengths=jnp.minimum(total, size).astype(jnp.int32))


@register("suffix")
@dataclasses.dataclass(frozen=True)
class SuffixMatch(Proposer):
    """Longest-suffix match over the history (the role of SAM-Decoding's suffix automaton).

    Sources a row matches against: its own history; with `shared`, the histories of every row with
    the same `ctx.group` (Best-of-N branches draft from each other); with `store_size > 0`, the
    state's SuffixStore rows (own, or the group's when shared), filled by `seed_store`.
    Match length is capped at max_match; the longest wins, ties go to the own history, then to the
    latest position. `confidence` is the match length, for the hybrid's choice.
    State: `()` when store_size == 0, else a SuffixStore [B, store_size], empty after `init`.
    """

    paper: ClassVar[tuple[int, str] | None] = (8, "SAM-Decoding")
    k: int = option(16, min=0)
    max_match: int = option(32, min=1)
    # shorter matches rarely predict K tokens; a K+1-wide verify costs 3-4x a step on CPU
    min_match: int = option(3, min=1)
    shared: bool = True
    store_size: int = option(1024, min=0)
    # draft at most ceil(spec_factor * match length) tokens (SuffixDecoding's adaptive length): a short
    # match buys a narrow verify, a long one up to K. Measured on think-twice round 2 (k=16): 0 -> 1.7x
    # decode speedup, 1.0 -> 2.4x
    spec_factor: float = option(1.0, min=0)
    branches: int = option(1, min=1)  # > 1: a tree of that many chains, from the best matches with distinct next tokens

    def __post_init__(self):
        if not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {self.min_match}, {self.max_match}")
        if self.branches < 1:
            raise ValueError(f"branches must be >= 1, got {self.branches}")

    @property
    def template(self) -> TreeTemplate | None:
        return None if self.branches == 1 else branching_tree((self.branches,), self.k)

    def init(self, ctx: Context) -> SuffixStore | tuple:
        batch = check_context(ctx)
        if not self.store_size:
            return ()
        return SuffixStore(
            tokens=jnp.zeros((batch, self.store_size), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32)
        )

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[SuffixStore | tuple, Draft]:
        batch = check_context(ctx)
        rows, lens = [ctx.tokens.astype(jnp.int32)], [ctx.lengths]
        if self.store_size:
            chex.assert_shape(state.tokens, (batch, self.store_size))
            rows.append(state.tokens)
            lens.append(state.lengths)
        width = max(r.shape[1] for r in rows)
        src = jnp.stack([jnp.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows], axis=1)
        src_len = jnp.stack(lens, axis=1)  # [B, R]: R = 1 history (+ 1 store) per row
        per_row = src.shape[1]
        is_history = jnp.arange(per_row) == 0
        if self.shared:  # every query row sees all B * R sources, masked to its group
            owner = jnp.repeat(jnp.arange(batch), per_row)
            src = jnp.broadcast_to(src.reshape(1, -1, width), (batch, batch * per_row, width))
            src_len = jnp.broadcast_to(src_len.reshape(1, -1), (batch, batch * per_row))
            ok = ctx.group[:, None] == ctx.group[owner][None, :]
            own = (owner[None, :] == jnp.arange(batch)[:, None]) & jnp.tile(is_history, batch)[None]
        else:
            ok = jnp.ones((batch, per_row), bool)
            own = jnp.broadcast_to(is_history, (batch, per_row))
        draft = _suffix_draft(ctx, src, src_len, ok, own, self.k, self.max_match, self.min_match, self.spec_factor,
                              self.branches)
        return state, draft

    def resume(self, state, ctx: Context, prev_state, prev: Context):
        """Next round of a session: the store keeps every earlier round's history (latest wins room)."""
        if not self.store_size:
            return state
        return seed_store(prev_state, prev.tokens, prev.lengths)


# ---------------------------------------------------------------- hashed n-gram pool


@struct.dataclass
class PoolTable:
    """Per-row hash table: slot -> (key n-gram, the up to K tokens that followed it most recently)."""

    keys: Int[Array, "B T N"]
    conts: Int[Array, "B T K"]  # zero past cont_len
    cont_len: Int[Array, "B T"]  # 0 marks an empty slot


def ngram_slot(ngrams: Int[Array, "... N"], table_size: int) -> Int[Array, "..."]:
    """FNV-1a over the n tokens, xor-shift mixed, masked to a power-of-two table."""
    h = jnp.full(ngrams.shape[:-1], 2166136261, jnp.uint32)
    for j in range(ngrams.shape[-1]):
        h = (h ^ ngrams[..., j].astype(jnp.uint32)) * jnp.uint32(16777619)
    h = h ^ (h >> 15)
    return (h & jnp.uint32(table_size - 1)).astype(jnp.int32)


@register("pool")
@dataclasses.dataclass(frozen=True)
class NGramPool(Proposer):
    """Hashed n-gram -> continuation table, built at `init` and kept current in `update`.

    Position p of a row (n <= p < length) is keyed by tokens[p-n:p] and stores tokens[p:p+K] cut at
    the row's length: partial continuations are stored and refreshed while they grow. A slot holds
    the latest position hashing to it; a lookup whose stored key differs (a collision) drafts nothing.
    One table per row (not per group). `update` re-indexes a static window of the last 2K positions,
    enough for steps adding up to K+1 tokens; a row that grows more in one step skips the older ones
    (re-`init` after appending long text). `confidence` is n on a hit, else 0.
    """

    k: int = option(8, min=0)
    ngram: int = option(2, min=1)
    table_size: int = option(4096, min=1)

    def __post_init__(self):
        if self.ngram < 1 or self.table_size < 1 or self.table_size & (self.table_size - 1):
            raise ValueError(f"need ngram >= 1 and a power-of-two table_size, got {self}")

    def _entries(self, tokens, lengths, pos):
        """Key, continuation and its length for positions pos [B, P]."""
        keys = gather_rows(tokens, pos[..., None] - self.ngram + jnp.arange(self.ngram))
        cidx = pos[..., None] + jnp.arange(self.k)
        conts = jnp.where(cidx < lengths[:, None, None], gather_rows(tokens, cidx), 0)
        cont_len = jnp.clip(lengths[:, None] - pos, 0, self.k)
        return keys, conts, cont_len

    def _insert(self, table: PoolTable, tokens, lengths, pos, valid) -> PoolTable:
        """Writes positions pos [B, P] where valid; within one call the latest position per slot wins."""
        keys, conts, cont_len = self._entries(tokens, lengths, pos)
        slot = ngram_slot(keys, self.table_size)
        rows = jnp.arange(tokens.shape[0])[:, None]
        drop = self.table_size  # out-of-range index: the static-size scatter skips masked entries
        latest = jnp.full(table.cont_len.shape, -1, jnp.int32)
        latest = latest.at[rows, jnp.where(valid, slot, drop)].max(pos, mode="drop")
        idx = jnp.where(valid & (latest[rows, slot] == pos), slot, drop)
        return PoolTable(
            keys=table.keys.at[rows, idx].set(keys, mode="drop"),
            conts=table.conts.at[rows, idx].set(conts, mode="drop"),
            cont_len=table.cont_len.at[rows, idx].set(cont_len, mode="drop"),
        )

    def init(self, ctx: Context) -> PoolTable:
        batch = check_context(ctx)
        size, n = self.table_size, self.ngram
        table = PoolTable(
            keys=jnp.zeros((batch, size, n), jnp.int32),
            conts=jnp.zeros((batch, size, self.k), jnp.int32),
            cont_len=jnp.zeros((batch, size), jnp.int32),
        )
        pos = jnp.broadcast_to(jnp.arange(ctx.tokens.shape[1]), ctx.tokens.shape)
        valid = (pos >= n) & (pos < ctx.lengths[:, None])
        return self._insert(table, ctx.tokens.astype(jnp.int32), ctx.lengths, pos, valid)

    def update(self, state: PoolTable, ctx: Context, prev_lengths: Int[Array, "B"]) -> PoolTable:
        """Re-indexes every position whose continuation gained tokens: p in (prev - K, length)."""
        check_context(ctx)
        chex.assert_shape(prev_lengths, ctx.lengths.shape)
        window = 2 * self.k
        lengths = ctx.lengths
        pos = lengths[:, None] - window + jnp.arange(window)
        first = jnp.maximum(prev_lengths - self.k + 1, self.ngram)[:, None]
        valid = (pos >= first) & (pos < lengths[:, None]) & (lengths > prev_lengths)[:, None]
        return self._insert(state, ctx.tokens.astype(jnp.int32), lengths, pos, valid)

    def resume(self, state: PoolTable, ctx: Context, prev_state: PoolTable, prev: Context) -> PoolTable:
        """Next round of a session: slots the new history did not fill keep the earlier rounds' entries."""
        chex.assert_equal_shape([state.cont_len, prev_state.cont_len])
        keep_new = state.cont_len > 0
        pick = lambda new, old: jnp.where(keep_new.reshape(keep_new.shape + (1,) * (new.ndim - 2)), new, old)
        return jax.tree.map(pick, state, prev_state)

    def propose(self, state: PoolTable, ctx: Context, rng: jax.Array) -> tuple[PoolTable, Draft]:
        batch = check_context(ctx)
        chex.assert_shape(state.conts, (batch, self.table_size, self.k))
        last = ctx.lengths[:, None] - self.ngram + jnp.arange(self.ngram)
        query = gather_rows(ctx.tokens.astype(jnp.int32), last)
        slot = ngram_slot(query, self.table_size)
        rows = jnp.arange(batch)
        same_key = jnp.all(state.keys[rows, slot] == query, axis=-1)
        hit = ctx.active & (ctx.lengths >= self.ngram) & same_key & (state.cont_len[rows, slot] > 0)
        num = jnp.where(hit, state.cont_len[rows, slot], 0).astype(jnp.int32)
        tokens = jnp.where(jnp.arange(self.k) < num[:, None], state.conts[rows, slot], 0)
        confidence = jnp.where(hit, float(self.ngram), 0.0).astype(jnp.float32)
        return state, check_draft(Draft(tokens=tokens, num=num, confidence=confidence), batch, self.k)
