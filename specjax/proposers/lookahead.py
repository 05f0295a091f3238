"""Lookahead decoding (Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead
Decoding"): Jacobi iterations run beside verification, in the same target forward, and leave n-grams
behind in a pool that later steps draft from.

The lookahead branch is a 2-D window of `levels = k` rows (the last k Jacobi iterations) by `window`
columns. Column i's tokens y[0][i], y[1][i], ..., y[k-1][i] sit at positions i+1, i+2, ..., i+k after
the pending token, and token y[l][i] sees the pending token, the base row y[0][0..i] and its own
column below it, y[1..l-1][i]. That is exactly a tree: y[0][i]'s parent is y[0][i-1] (the root for
i = 0) and y[l][i]'s is y[l-1][i], so the window is one static `TreeTemplate` of the engine's, next
to the verification branch (`guesses` chains of k tokens from the pool). The engine runs both in one
forward with the template's ancestor mask (built once per configuration) and depths as positions;
the window's nodes are marked invalid, so verification never accepts them.

Each step (`update`), the target's argmax at the top level's nodes is the next Jacobi guess: the
window drops its oldest level and gains that one, and each column leaves the n-gram
(y[0][i], ..., y[k-1][i], new[i]) in the pool, keyed by its first token. The verification branch of
the next step is the pool's latest `guesses` n-grams keyed by the pending token. N = k + 1 is the
paper's n-gram size, `window` its W and `guesses` its G.

The pool is one static table [vocab, guesses, k] shared by the rows of a batch (LADE runs one row;
Best-of-N branches share what they found), with a ring pointer per key; an n-gram already in its key's
slots is not written twice. It carries across the rounds of a session, and its first `k - 1` steps'
n-grams are skipped, while the window still holds its random initial tokens (LADE's warm-up).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int

from specjax.drafting import Context, Draft, TreeTemplate, gather_rows, lookahead_tree, pending_tokens
from specjax.proposers.base import Proposer, bound, option, register


@struct.dataclass
class LookaheadState:
    window: Int[Array, "B L W"]  # window[:, l, i] = y[l][i]: level 0 is the oldest Jacobi iteration
    pool: Int[Array, "V G L"]  # pool[v, g]: an n-gram's k tokens after its first token v; -1: empty slot
    next_slot: Int[Array, "V"]  # ring pointer: the slot key v writes next (its latest is next_slot - 1)
    steps: Int[Array, ""]  # Jacobi iterations since the window was filled with random history tokens


def insert_ngrams(state: LookaheadState, ngrams: Int[Array, "M N"], valid) -> LookaheadState:
    """Writes each valid n-gram's tail under its first token, skipping n-grams its key already holds
    (in the pool, or earlier in this batch); several new n-grams of one key take consecutive slots."""
    chex.assert_rank(ngrams, 2)
    vocab, guesses, k = state.pool.shape
    chex.assert_shape(ngrams, (None, k + 1))
    key, tail = ngrams[:, 0], ngrams[:, 1:]
    held = jnp.any(jnp.all(state.pool[key] == tail[:, None], axis=-1), axis=-1)
    m = ngrams.shape[0]
    same = jnp.all(ngrams[:, None] == ngrams[None], axis=-1)
    earlier = jnp.arange(m)[None] < jnp.arange(m)[:, None]  # earlier[j, i]: i comes before j
    repeat = jnp.any(same & earlier & valid[None], axis=1)
    keep = valid & ~held & ~repeat
    same_key = (key[:, None] == key[None]) & earlier & keep[None]
    rank = jnp.sum(same_key, axis=1)
    slot = (state.next_slot[key] + rank) % guesses
    # static-size masked scatter for a dynamic count: dropped n-grams index past the end of the pool
    row = jnp.where(keep, key, vocab)
    pool = state.pool.at[row, slot].set(tail, mode="drop")
    next_slot = state.next_slot.at[row].add(1, mode="drop")
    return state.replace(pool=pool, next_slot=next_slot)


@register("lookahead")
@dataclasses.dataclass(frozen=True)
class Lookahead(Proposer):
    adaptive_widths: ClassVar[bool] = False  # the window rides in every verify forward
    paper: ClassVar[tuple[int, str] | None] = (4, "Lookahead")
    k: int = option(2, min=1)  # levels of the window = tokens per drafted n-gram (N - 1)
    window: int = option(4, min=1)  # W: Jacobi columns run per step
    guesses: int = option(2, min=1)  # G: pool n-grams verified per step (and kept per key)
    vocab: int = bound(0)  # the target's vocabulary

    def __post_init__(self):
        if self.k < 1 or self.window < 1 or self.guesses < 1:
            raise ValueError(f"lookahead needs k (n-gram size - 1) >= 1, window >= 1 and guesses >= 1, got "
                             f"k={self.k}, window={self.window}, guesses={self.guesses}")

    @functools.cached_property
    def _template(self) -> TreeTemplate:
        return lookahead_tree(self.k, self.window, self.guesses)

    @property
    def template(self) -> TreeTemplate:
        return self._template

    @property
    def logit_topk(self) -> int:
        return 1  # update reads the target's argmax at every window node

    @property
    def _window_start(self) -> int:
        return 1 + self.guesses * self.k  # first window node of the template

    def bind(self, model, sampling_cfg):
        return dataclasses.replace(self, vocab=model.config.vocab_size), None

    def _fill_window(self, ctx: Context) -> Int[Array, "B L W"]:
        """Random tokens of each row's history (LADE starts its window from prompt tokens)."""
        batch = ctx.tokens.shape[0]
        u = jax.random.uniform(jax.random.PRNGKey(0), (batch, self.k, self.window))
        pos = jnp.floor(u * ctx.lengths[:, None, None]).astype(jnp.int32)
        return gather_rows(ctx.tokens.astype(jnp.int32), pos)

    def init(self, ctx: Context) -> LookaheadState:
        chex.assert_rank(ctx.tokens, 2)
        if self.vocab < 1:
            raise ValueError("lookahead must be bound to a model (generate does this) before init")
        return LookaheadState(window=self._fill_window(ctx),
                              pool=jnp.full((self.vocab, self.guesses, self.k), -1, jnp.int32),
                              next_slot=jnp.zeros((self.vocab,), jnp.int32), steps=jnp.zeros((), jnp.int32))

    def propose(self, state: LookaheadState, ctx: Context, rng: jax.Array) -> tuple[LookaheadState, Draft]:
        batch = ctx.tokens.shape[0]
        chex.assert_shape(state.window, (batch, self.k, self.window))
        pending = pending_tokens(ctx)
        latest_first = (state.next_slot[pending][:, None] - 1 - jnp.arange(self.guesses)) % self.guesses
        guesses = jnp.take_along_axis(state.pool[pending], latest_first[:, :, None], axis=1)  # [B, G, k]
        found = (guesses[:, :, 0] >= 0) & ctx.active[:, None]
        verify_valid = jnp.repeat(found, self.k, axis=1)
        nodes = jnp.concatenate([jnp.maximum(guesses, 0).reshape(batch, -1), state.window.reshape(batch, -1)], axis=1)
        valid = jnp.concatenate([verify_valid, jnp.zeros((batch, self.k * self.window), bool)], axis=1)
        # num counts every node the forward must run: the window's too, so the full tree runs each step
        num = jnp.where(ctx.active, verify_valid.sum(axis=1) + self.k * self.window, 0).astype(jnp.int32)
        draft = Draft(tokens=nodes, num=num, valid=valid, confidence=found.sum(axis=1).astype(jnp.float32))
        chex.assert_shape(draft.tokens, (batch, self.template.size - 1))
        return state, draft

    def update(self, state: LookaheadState, ctx: Context, prev_lengths: Int[Array, "B"]) -> LookaheadState:
        batch = ctx.tokens.shape[0]
        chex.assert_shape(ctx.verified_topk, (batch, self.template.size, self.logit_topk))
        top = self._window_start + (self.k - 1) * self.window
        new = ctx.verified_topk[:, top: top + self.window, 0].astype(jnp.int32)  # the next Jacobi iteration
        ran = ctx.verified_valid[:, 0]  # the row was in this forward
        ngrams = jnp.concatenate([jnp.swapaxes(state.window, 1, 2), new[:, :, None]], axis=2)  # [B, W, k + 1]
        warm = state.steps >= self.k - 1
        valid = jnp.broadcast_to((ran & warm)[:, None], (batch, self.window)).reshape(-1)
        state = insert_ngrams(state, ngrams.reshape(batch * self.window, self.k + 1), valid)
        window = jnp.concatenate([state.window[:, 1:], new[:, None]], axis=1)
        return state.replace(window=jnp.where(ran[:, None, None], window, state.window), steps=state.steps + 1)

    def resume(self, state: LookaheadState, ctx: Context, prev_state: LookaheadState, prev: Context):
        """Next round: the earlier rounds' pool, a fresh window from the new history."""
        return state.replace(pool=prev_state.pool, next_slot=prev_state.next_slot)
