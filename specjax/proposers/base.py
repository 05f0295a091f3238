"""The one drafting interface: pure functions over a state pytree, static shapes, jit-safe.

Every proposer is a frozen (hashable) dataclass holding only its configuration, so it can be a static
argument of the jitted decode loop. Its runtime state is a pytree returned by `init` and threaded
through the loop by the engine:

    state = proposer.init(ctx)                      # once, after prefill
    state, draft = proposer.propose(state, ctx, rng) # every step, before the target forward
    state = proposer.update(state, ctx, prev_lengths) # every step, after acceptance

`ctx.tokens[b, :ctx.lengths[b]]` is row b's whole history (prompt + generated). Its last token is the
*pending* token: sampled, but not yet fed to the target (it is the first token of the next verify
forward). A draft is K tokens meant to follow the pending token; `draft.num[b] <= K` of them are
real, the rest is padding that verification ignores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

State = Any


@struct.dataclass
class Context:
    """What every proposer may read at a step."""

    tokens: Int[Array, "B S"]  # history, right-padded with zeros
    lengths: Int[Array, "B"]  # valid tokens per row, the pending token included
    group: Int[Array, "B"]  # rows sharing a group may draft from each other (Best-of-N branches)
    active: Bool[Array, "B"]  # rows still generating
    hidden: Float[Array, "B D"] | None = None  # target hidden state that predicted the pending token


@struct.dataclass
class Draft:
    """K proposed tokens per row; entries at or past `num` are padding."""

    tokens: Int[Array, "B K"]
    num: Int[Array, "B"]
    probs: Float[Array, "B K V"] | None = None  # draft distribution q; None means deterministic (one-hot)
    confidence: Float[Array, "B"] | None = None  # proposer-specific, e.g. suffix match length
    source: Int[Array, "B"] | None = None  # which sub-proposer drafted (hybrid); 0 otherwise


@dataclasses.dataclass(frozen=True)
class Proposer:
    """Base of all drafters; subclasses override the three pure functions."""

    name: ClassVar[str] = "none"
    k: int = 0

    def init(self, ctx: Context) -> State:
        return ()

    def propose(self, state: State, ctx: Context, rng: jax.Array) -> tuple[State, Draft]:
        batch = ctx.tokens.shape[0]
        return state, Draft(
            tokens=jnp.zeros((batch, self.k), jnp.int32), num=jnp.zeros((batch,), jnp.int32)
        )

    def update(self, state: State, ctx: Context, prev_lengths: Int[Array, "B"]) -> State:
        """Called after acceptance: `ctx` holds the new history; `prev_lengths` the lengths before."""
        return state


@dataclasses.dataclass(frozen=True)
class NoDraft(Proposer):
    """Plain autoregressive decoding: the verify forward is one token and accepts nothing extra."""

    name: ClassVar[str] = "ar"
    k: int = 0
