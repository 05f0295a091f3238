"""Verification of drafts against one target forward: greedy, and lossless speculative sampling.

Deterministic drafts (every drafter but a sampling draft model; chains and trees): a draft token is
accepted when it equals the target's own draw for its position, keyed by row and position
(`position_keys`), so a sampled run emits plain sampling's tokens whatever was drafted; the acceptance
probabilities are those of rejection sampling with a one-hot q and, for trees, of recursive rejection
over siblings (SpecInfer). A draft model's real q: Leviathan et al. / Chen et al. rejection sampling.
Everything has static shapes:
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
from specjax.drafting import Draft, TreeTemplate, ancestor_mask, at, tree_depths
from specjax.sampling import argmax, process_logits


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


def position_keys(rng: jax.Array, starts: Int[Array, "B"], width: int) -> jax.Array:
    """One key per row and position: keys[b, j] holds the draws that decide row b's token at absolute
    position starts[b] + j, whichever step reaches that position and however wide its verify is.

    A row's randomness then depends on where its tokens land, not on how the loop got there: the
    target's draw for a position is the one plain decoding (`ar`) makes there with the same seed, so
    deterministic drafts, judged against it (`_target_draws`), give `ar`'s tokens, and sampled runs of
    different methods (Best-of-N) are paired comparisons. Still lossless: a position's draws decide
    its token once, and no draft or width decision reads them (a later step reusing the draws of a
    position that an earlier step computed but did not reach is no exception: nothing observed
    depended on them)."""
    per_row = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(starts.shape[0]))
    return jax.vmap(lambda key, s: jax.vmap(jax.random.fold_in, (None, 0))(key, s + jnp.arange(width)))(
        per_row, starts.astype(jnp.int32))


def _keys(rng: jax.Array, b: int, width: int) -> jax.Array:
    """`rng` as [B, width] position keys; a single key stands for positions 0, 1, ... of every row."""
    if rng.ndim <= 1:
        return position_keys(rng, jnp.zeros((b,), jnp.int32), width)
    chex.assert_shape(rng, (b, None) + rng.shape[2:])
    if rng.shape[1] < width:
        raise ValueError(f"{rng.shape[1]} position keys per row for a verify of {width} positions")
    return rng[:, :width]


def _uniforms(keys: jax.Array) -> Float[Array, "B W"]:
    """One uniform per position key: what the target's draw there, or the acceptance test, uses."""
    return jax.vmap(jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0))))(keys)


BLOCK = 256  # the inverse CDF sums the vocabulary in blocks: two short prefix sums instead of one long one


def inverse_cdf(weights: Float[Array, "... V"], u: Float[Array, "..."]) -> Int[Array, "..."]:
    """The token whose cumulative weight first exceeds u * total (weights >= 0, unnormalised; u in [0, 1)):
    a draw from `weights` with one uniform. Never a zero-weight token, whatever the rounding."""
    v = weights.shape[-1]
    nb = -(-v // BLOCK)
    w = jnp.pad(weights, [(0, 0)] * (weights.ndim - 1) + [(0, nb * BLOCK - v)]).reshape(*weights.shape[:-1], nb, BLOCK)
    sums = jnp.sum(w, axis=-1)  # [..., nb]
    csum = jnp.cumsum(sums, axis=-1)
    target = u * csum[..., -1]
    last_block = jnp.max(jnp.where(sums > 0, jnp.arange(nb), 0), axis=-1)
    blk = jnp.minimum(jnp.sum(csum <= target[..., None], axis=-1), last_block)
    before = jnp.take_along_axis(csum - sums, blk[..., None], axis=-1)[..., 0]
    inner = jnp.take_along_axis(w, blk[..., None, None], axis=-2)[..., 0, :]  # [..., BLOCK]
    last_in = jnp.max(jnp.where(inner > 0, jnp.arange(BLOCK), 0), axis=-1)
    j = jnp.minimum(jnp.sum(before[..., None] + jnp.cumsum(inner, axis=-1) <= target[..., None], axis=-1), last_in)
    return (blk * BLOCK + j).astype(jnp.int32)


def _draw(keys: jax.Array, weights: Float[Array, "B V"], fallback: Float[Array, "B V"]) -> Int[Array, "B"]:
    """A draw proportional to `weights` with each row's key (`keys[b]`, its new token's position; the
    uniform its acceptance test did not use), or to `fallback` where rounding left all weights at zero."""
    empty = jnp.sum(weights, axis=-1, keepdims=True) <= 0
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1)))(keys)
    return inverse_cdf(jnp.where(empty, fallback, weights), u)


def _target_draws(target_logits: Float[Array, "B T V"], cfg: SamplingConfig, keys: jax.Array,
                  depth: Int[Array, "T"] | Int[Array, "B T"]) -> Int[Array, "B T"]:
    """At every node, the token the target samples there: an inverse-CDF draw from the processed target
    with the uniform of the node's position (`keys[:, depth]`). A deterministic draft's token is accepted
    when it equals this draw, which accepts x with probability p(x), as rejection sampling with a
    one-hot q does, and a tree's first matching child with the probability recursive rejection over
    siblings gives it; and every emitted token is the target's own draw for its position, so with the
    same seed the output is plain sampling's token for token, whatever was drafted."""
    p = jnp.exp(process_logits(target_logits, cfg))
    u = _uniforms(keys)  # [B, D + 1]
    return inverse_cdf(p, jnp.take(u, depth, axis=1) if depth.ndim == 1 else jnp.take_along_axis(u, depth, axis=1))


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
    draft equals the argmax. Sampling a deterministic draft (`draft.probs` None) accepts while it equals
    the target's draw for each position (`_target_draws`): plain sampling's tokens, whatever was drafted.
    With a drafter's real q (`draft.probs`: `sampling.probs` with the same cfg), it accepts x_i with
    probability min(1, p_i(x_i) / q_i(x_i)), then draws from max(0, p - q) normalised at the first
    rejection, or from p after full acceptance: the emitted tokens are distributed exactly as sampling
    the target with `cfg`. `rng`: one key, or [B, >= K+1] position keys (`position_keys`).
    """
    b, k = draft.tokens.shape
    chex.assert_shape(target_logits, (b, k + 1, None))
    chex.assert_shape(draft.num, (b,))
    if draft.probs is not None:
        chex.assert_shape(draft.probs, (b, k, target_logits.shape[-1]))
    live = jnp.arange(k)[None] < draft.num[:, None]  # real draft positions

    keys = None if cfg.greedy else _keys(rng, b, k + 1)
    if cfg.greedy or draft.probs is None:  # the target's pick at each position: its argmax, or its draw
        if cfg.greedy:
            best = argmax(target_logits).astype(jnp.int32)
        else:
            best = _target_draws(target_logits, cfg, keys, jnp.arange(k + 1))
        ok = (draft.tokens == best[:, :k]) & live
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        return VerifyResult(_emit(draft.tokens, n, at(best, n)), n.astype(jnp.int32))

    # a drafter's real q (a sampling draft model): rejection sampling
    p = jnp.exp(process_logits(target_logits, cfg))
    p_x = jnp.take_along_axis(p[:, :k], draft.tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(draft.probs.astype(jnp.float32), draft.tokens[..., None], axis=-1)[..., 0]
    ok = (_uniforms(keys[:, :k]) * q_x < p_x) & live  # u < p/q without a division; p_x = 0 rejects
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)

    # The new token is drawn at position n: from the residual after a rejection, from p after a full accept.
    p_n = at(p, n)
    rejected = (n < draft.num)[:, None]
    j = jnp.minimum(n, k - 1)  # in range; where nothing was rejected q_n is masked out anyway
    q_n = jnp.zeros_like(p_n) if k == 0 else at(draft.probs.astype(jnp.float32), j)
    q_n = jnp.where(rejected, q_n, 0.0)
    new = _draw(at(keys, n), _residual(p_n, q_n), p_n)
    return VerifyResult(_emit(draft.tokens, n, new), n.astype(jnp.int32))


def verify_tree(
    target_logits: Float[Array, "B T V"],
    tree_tokens: Int[Array, "B T"],
    valid: Bool[Array, "B T"],
    template: TreeTemplate,
    cfg: SamplingConfig,
    rng: jax.Array,
    parents: Int[Array, "B T"] | None = None,
) -> TreeVerifyResult:
    """Accepts one root-to-node path of a deterministic draft tree and appends one target token.

    `tree_tokens[:, 0]` is the pending token; invalid nodes (and their subtrees) are never accepted.
    A node is accepted when its parent is and its token is the target's pick at its parent: the argmax
    (greedy) or the target's draw for that position (`_target_draws`; lossless: a child is entered with
    the probability SpecInfer's recursive rejection over siblings gives it, and where no child matches,
    the draw is p conditioned on matching none of them, which is what that rejection leaves). The
    deepest accepted node wins (ties: the lowest index; duplicate siblings emit the same tokens), and
    the bonus is the target's pick there. `parents` (a dynamic tree, `Draft.parents`): each node's
    parent per row (the root's -1), node depths following from them (at most the template's max_depth);
    None: the template's parents.
    """
    b, t = tree_tokens.shape
    chex.assert_shape(target_logits, (b, t, None))
    chex.assert_shape(valid, (b, t))
    if t != template.size:
        raise ValueError(f"tree of {t} nodes does not match a template of {template.size}")
    d = template.max_depth
    if parents is None:  # the template's, for every row
        depth_of = jnp.asarray(template.depth, jnp.int32)
        parent = np.maximum(np.asarray(template.parents), 0)
        of_parent = lambda x: x[:, parent]
        depth_at = lambda node: depth_of[node]
    else:  # each row's own, depths following from them
        chex.assert_shape(parents, (b, t))
        depth_of = tree_depths(ancestor_mask(parents, d))  # [B, T]
        parent = jnp.clip(parents, 0, t - 1)
        of_parent = lambda x: jnp.take_along_axis(x, parent, axis=1)
        depth_at = lambda node: at(depth_of, node)

    if cfg.greedy:
        best = argmax(target_logits).astype(jnp.int32)
    else:  # node i's draw is for position depth(i) after the pending token
        best = _target_draws(target_logits, cfg, _keys(rng, b, d + 1), depth_of)
    match = (valid & (tree_tokens == of_parent(best))).at[:, 0].set(True)
    accepted = match
    for _ in range(d):  # acceptance flows one level down per pass
        accepted = match & of_parent(accepted)
    last = jnp.argmax(jnp.where(accepted, depth_of, -1), axis=1).astype(jnp.int32)  # first maximum
    new = at(best, last)

    n = depth_at(last)
    if parents is None:
        path = jnp.asarray(template.paths)[last]
    else:  # walk up from the deepest accepted node, each ancestor at its depth's column
        path, node = jnp.zeros((b, d), jnp.int32), last
        for _ in range(d):
            path = jnp.where(jnp.arange(d)[None] == (depth_at(node) - 1)[:, None], node[:, None], path)
            node = at(parent, node)
    return TreeVerifyResult(
        tokens=_emit(jnp.take_along_axis(tree_tokens, path, axis=1), n, new),
        num_accepted=n,
        path=path,
        last_node=last,
    )
