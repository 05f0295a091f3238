"""Verification of drafts against one target forward: greedy, and lossless speculative sampling.

Chains: Leviathan et al. / Chen et al. rejection sampling. Trees (deterministic drafts): recursive
rejection over siblings (SpecInfer; "multi-round speculative sampling"). Everything has static shapes:
a row's acceptance is a count, never a shape, so these run inside the jitted decode loop with no host
sync. Pure functions; jit them with `cfg` (and `template`) static.

Conventions, per row b, for a step that accepted n = num_accepted[b] draft tokens:
  tokens[b, :n]  the accepted draft tokens,
  tokens[b, n]   the target's own token (correction after a rejection, or bonus after full acceptance),
  tokens[b, n+1:] zero padding;
so every step emits n + 1 tokens, and the last of them is the next pending token.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from specjax.config import SamplingConfig
from specjax.drafting import Draft, TreeTemplate, at
from specjax.sampling import argmax, categorical, process_logits


@struct.dataclass
class VerifyResult:
    tokens: Int[Array, "B K+1"]  # accepted drafts, then the target's token, then padding
    num_accepted: Int[Array, "B"]  # in [0, draft.num[b]]


@struct.dataclass
class TreeVerifyResult:
    tokens: Int[Array, "B D+1"]  # accepted path tokens, then the target's token, then padding
    num_accepted: Int[Array, "B"]  # depth of the deepest accepted node
    path: Int[Array, "B D"]  # accepted node indices root-first (root excluded), 0 past num_accepted
    last_node: Int[Array, "B"]  # deepest accepted node (0: the root); its logits gave tokens[b, n]


def _residual(p: Float[Array, "B V"], q: Float[Array, "B V"]) -> Float[Array, "B V"]:
    """max(0, p - q), unnormalised: what is left of p once q's proposal has been rejected."""
    return jnp.maximum(p - q, 0.0)


def _draw(rng: jax.Array, weights: Float[Array, "B V"], fallback: Float[Array, "B V"]) -> Int[Array, "B"]:
    """A draw proportional to `weights`, or to `fallback` where rounding left all weights at zero."""
    empty = jnp.sum(weights, axis=-1, keepdims=True) <= 0
    return categorical(rng, jnp.log(jnp.where(empty, fallback, weights))).astype(jnp.int32)


def _emit(accepted: Int[Array, "B K"], n: Int[Array, "B"], new: Int[Array, "B"]) -> Int[Array, "B K+1"]:
    """Row b: accepted[b, :n[b]], then new[b], then zeros (a static-width masked write of a dynamic count)."""
    pos = jnp.arange(accepted.shape[1] + 1)[None]
    padded = jnp.pad(accepted, ((0, 0), (0, 1)))
    return jnp.where(pos < n[:, None], padded, jnp.where(pos == n[:, None], new[:, None], 0)).astype(jnp.int32)


def verify_chain(
    target_logits: Float[Array, "B K+1 V"], draft: Draft, cfg: SamplingConfig, rng: jax.Array
) -> VerifyResult:
    """Accepts a prefix of each row's draft and appends one target token.

    `target_logits[:, i]` is the target's prediction after draft token i-1 (i = 0: after the pending
    token), so index i judges draft token i and index `num` gives the bonus. Greedy accepts while the
    draft equals the argmax. Sampling accepts x_i with probability min(1, p_i(x_i) / q_i(x_i)), then draws
    from max(0, p - q) normalised at the first rejection, or from p after full acceptance: the emitted
    tokens are distributed exactly as sampling the target with `cfg`. `draft.probs` must be the
    drafter's processed probabilities (`sampling.probs` with the same cfg); None means one-hot q.
    """
    b, k = draft.tokens.shape
    chex.assert_shape(target_logits, (b, k + 1, None))
    chex.assert_shape(draft.num, (b,))
    if draft.probs is not None:
        chex.assert_shape(draft.probs, (b, k, target_logits.shape[-1]))
    live = jnp.arange(k)[None] < draft.num[:, None]  # real draft positions

    if cfg.greedy:
        best = argmax(target_logits).astype(jnp.int32)
        ok = (draft.tokens == best[:, :k]) & live
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        return VerifyResult(_emit(draft.tokens, n, at(best, n)), n.astype(jnp.int32))

    u_key, s_key = jax.random.split(rng)
    p = jnp.exp(process_logits(target_logits, cfg))
    p_x = jnp.take_along_axis(p[:, :k], draft.tokens[..., None], axis=-1)[..., 0]
    if draft.probs is None:
        q_x = 1.0
    else:
        q_x = jnp.take_along_axis(draft.probs.astype(jnp.float32), draft.tokens[..., None], axis=-1)[..., 0]
    ok = (jax.random.uniform(u_key, (b, k)) * q_x < p_x) & live  # u < p/q without a division; p_x = 0 rejects
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)

    # The new token is drawn at position n: from the residual after a rejection, from p after a full accept.
    p_n = at(p, n)
    rejected = (n < draft.num)[:, None]
    j = jnp.minimum(n, k - 1)  # in range; where nothing was rejected q_n is masked out anyway
    if k == 0:
        q_n = jnp.zeros_like(p_n)
    elif draft.probs is None:
        q_n = jax.nn.one_hot(at(draft.tokens, j), p.shape[-1])
    else:
        q_n = at(draft.probs.astype(jnp.float32), j)
    q_n = jnp.where(rejected, q_n, 0.0)
    new = _draw(s_key, _residual(p_n, q_n), p_n)
    return VerifyResult(_emit(draft.tokens, n, new), n.astype(jnp.int32))


def verify_tree(
    target_logits: Float[Array, "B T V"],
    tree_tokens: Int[Array, "B T"],
    valid: Bool[Array, "B T"],
    template: TreeTemplate,
    cfg: SamplingConfig,
    rng: jax.Array,
) -> TreeVerifyResult:
    """Accepts one root-to-node path of a deterministic draft tree and appends one target token.

    `tree_tokens[:, 0]` is the pending token; invalid nodes (and their subtrees) are never accepted.
    Greedy: a node is accepted when its parent is and its token is the argmax at its parent; the
    deepest accepted node wins (ties: the lowest index), and the bonus is the argmax there. Sampling:
    from the root down, try the valid children in order, accepting child token x with probability
    r(x) / sum(r), where r starts as the processed target p at the node and loses x's mass after each
    rejection; move into the first accepted child, and when all are rejected draw from r. Lossless.
    """
    b, t = tree_tokens.shape
    chex.assert_shape(target_logits, (b, t, None))
    chex.assert_shape(valid, (b, t))
    if t != template.size:
        raise ValueError(f"tree of {t} nodes does not match a template of {template.size}")
    depth_of = jnp.asarray(template.depth, jnp.int32)
    d = template.max_depth

    if cfg.greedy:
        best = argmax(target_logits).astype(jnp.int32)
        parent = np.maximum(np.asarray(template.parents), 0)
        match = (valid & (tree_tokens == best[:, parent])).at[:, 0].set(True)
        accepted = match
        for _ in range(d):  # acceptance flows one level down per pass
            accepted = match & accepted[:, parent]
        last = jnp.argmax(jnp.where(accepted, depth_of, -1), axis=1).astype(jnp.int32)  # first maximum
        new = at(best, last)
    else:
        p_all = jnp.exp(process_logits(target_logits, cfg))
        vocab = p_all.shape[-1]
        width = max(1, max(len(c) for c in template.children))
        kids = np.full((t, width), -1, np.int32)
        for i, c in enumerate(template.children):
            kids[i, : len(c)] = c
        kids = jnp.asarray(kids)
        u_key, s_key = jax.random.split(rng)
        u = jax.random.uniform(u_key, (d, b, width))
        last = jnp.zeros((b,), jnp.int32)
        r = p_all[:, 0]
        done = jnp.zeros((b,), bool)
        for level in range(d):  # rows sit at depth `level` or have stopped
            nxt, moved = last, jnp.zeros((b,), bool)
            for w in range(width):
                child = kids[last, w]
                c = jnp.maximum(child, 0)
                tried = (child >= 0) & at(valid, c) & ~done & ~moved
                x = at(tree_tokens, c)
                take = tried & (u[level, :, w] * jnp.sum(r, -1) < at(r, x))  # u < r(x) / sum(r)
                nxt, moved = jnp.where(take, child, nxt), moved | take
                r = jnp.where((tried & ~take)[:, None], _residual(r, jax.nn.one_hot(x, vocab)), r)
            done = done | ~moved
            last = nxt
            r = jnp.where(moved[:, None], at(p_all, last), r)
        new = _draw(s_key, r, at(p_all, last))  # r: what is left at the stopping node

    n = depth_of[last]
    path = jnp.asarray(template.paths)[last]
    return TreeVerifyResult(
        tokens=_emit(jnp.take_along_axis(tree_tokens, path, axis=1), n, new),
        num_accepted=n,
        path=path,
        last_node=last,
    )
