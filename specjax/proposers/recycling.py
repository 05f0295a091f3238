"""Token Recycling (Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language
Models with Token Recycling"): the target's own candidate tokens, discarded by every verification,
become the next drafts.

An adjacency matrix `succ[v, :]` holds the top-`top` next tokens the target predicted after token v,
the last time v was fed to it. Every verify forward refreshes the rows of all tokens it fed (accepted
or not: the "trash") from its logits' top-k, which the engine hands to `update`. Drafting expands a
static tree from the pending token breadth-first: a node at depth d with sibling rank r is
`succ[parent's token, r]`, so the whole tree is a few gathers, no model call. One matrix is shared by
the rows of a batch (it is knowledge about the model, not about a row) and carried across the rounds
of a session (the paper keeps it across queries).

The tree shape is `branching` (children per node at depths 1, 2, ...; deeper levels are chains) down
to depth `k`. The paper's tree has about 80 nodes, sized for a GPU where a wide verify is nearly free;
the default here is smaller because a CPU verifies 15 tokens at several times the cost of one.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int

from specjax.drafting import Context, Draft, pending_tokens
from specjax.proposers.base import BranchingTree, Proposer, bound, option, register


@struct.dataclass
class Adjacency:
    succ: Int[Array, "V C"]  # top-C successors per token, best first; -1: not seen yet


def refresh(adj: Adjacency, fed: Int[Array, "B T"], top: Int[Array, "B T C"], valid) -> Adjacency:
    """succ[fed[b, t]] = top[b, t] wherever valid: the newest forward's view of each fed token wins
    (rows or positions feeding the same token in one forward: an arbitrary one of them)."""
    chex.assert_equal_shape_prefix([fed, top], 2)
    vocab = adj.succ.shape[0]
    # static-size masked scatter for a dynamic count: invalid entries index past the end and are dropped
    idx = jnp.where(valid, fed, vocab).reshape(-1)
    return Adjacency(succ=adj.succ.at[idx].set(top.reshape(idx.shape[0], -1).astype(jnp.int32), mode="drop"))


@register("recycling")
@dataclasses.dataclass(frozen=True)
class TokenRecycling(BranchingTree, Proposer):
    paper: ClassVar[tuple[int, str] | None] = (7, "Token Recycling")
    k: int = option(4, min=1)  # tree depth: most tokens one step can accept
    branching: tuple[int, ...] = option((2, 2), min=1)  # children per node at depths 1, 2, ... (then chains)
    top: int = option(4, min=1)  # successors kept per token (>= max(branching))
    vocab: int = bound(0)  # the target's vocabulary

    def __post_init__(self):
        if self.k < 1 or any(b < 1 for b in self.branching) or self.top < max(self.branching, default=1):
            raise ValueError(f"recycling needs k >= 1, branching >= 1 and top >= max(branching), got k={self.k}, "
                             f"branching={self.branching}, top={self.top}")

    @property
    def logit_topk(self) -> int:
        return self.top

    def bind(self, model, sampling_cfg):
        return dataclasses.replace(self, vocab=model.config.vocab_size), None

    def init(self, ctx: Context) -> Adjacency:
        """An empty matrix, seeded with the prompt's own bigrams (each token's latest successor) so the
        first steps have drafts before any verify has run."""
        chex.assert_rank(ctx.tokens, 2)
        if self.vocab < 1:
            raise ValueError("recycling must be bound to a model (generate does this) before init")
        succ = jnp.full((self.vocab, self.top), -1, jnp.int32)
        s = ctx.tokens.shape[1]
        nxt = jnp.roll(ctx.tokens, -1, axis=1)
        valid = jnp.arange(s)[None] < (ctx.lengths - 1)[:, None]  # pairs inside each row's history
        first = jnp.concatenate([nxt[..., None], jnp.full(nxt.shape + (self.top - 1,), -1, jnp.int32)], axis=-1)
        return refresh(Adjacency(succ=succ), ctx.tokens, first, valid)

    def propose(self, state: Adjacency, ctx: Context, rng: jax.Array) -> tuple[Adjacency, Draft]:
        template = self.template
        rank = template.ranks
        batch = ctx.tokens.shape[0]
        chex.assert_shape(state.succ, (self.vocab, self.top))
        tokens = [pending_tokens(ctx)]
        for node in range(1, template.size):  # breadth-first: a parent's token is known before its children's
            parent = tokens[template.parents[node]]
            tokens.append(jnp.where(parent >= 0, state.succ[jnp.maximum(parent, 0), rank[node]], -1))
        nodes = jnp.stack(tokens[1:], axis=1)  # [B, T-1]
        valid = (nodes >= 0) & ctx.active[:, None]
        # a node whose ancestor is missing is missing too (its token came from a -1 parent above)
        draft = Draft(tokens=jnp.maximum(nodes, 0), num=valid.sum(axis=1).astype(jnp.int32), valid=valid,
                      confidence=valid[:, 0].astype(jnp.float32))
        chex.assert_shape(draft.tokens, (batch, template.size - 1))
        return state, draft

    def update(self, state: Adjacency, ctx: Context, prev_lengths: Int[Array, "B"]) -> Adjacency:
        return refresh(state, ctx.verified, ctx.verified_topk, ctx.verified_valid)

    def resume(self, state: Adjacency, ctx: Context, prev_state: Adjacency, prev: Context) -> Adjacency:
        """Next round: the earlier rounds' matrix, with this prompt's bigrams written over it."""
        seeded = state.succ[:, 0] >= 0
        return Adjacency(succ=jnp.where(seeded[:, None], state.succ, prev_state.succ))
