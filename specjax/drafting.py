"""What drafting and verification share: the step's `Context`, a `Draft`, static `TreeTemplate`s and
their builders, and the row gathers every drafter uses.

A leaf module: it imports nothing of specjax, so `verify`, the engine and every proposer can build on
it without an import running back up the layers. One builder per tree shape:

* `branching_tree(branching, depth)`: breadth-first, `branching[d]` children per node at depth d+1
  and chains below; a chain (`()`), the full top-k tree (`(w,) * depth`) and n chains from the root
  (`(n,)`, laid out by `chains_to_tree`) are special cases;
* `eagle_tree(total, depth, topk)`: the `total` nodes most likely reached under a fixed acceptance prior;
* `dynamic_tree_shape(total, depth)`: the shape of a tree whose drafts set their own parents;
* `lookahead_tree(k, window, guesses)`: verification chains, then a Jacobi window.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from collections.abc import Callable
from typing import Any, TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int


@struct.dataclass
class Context:
    """What every proposer may read at a step."""

    tokens: Int[Array, "B S"]  # history, right-padded with zeros
    lengths: Int[Array, "B"]  # valid tokens per row, the pending token included
    group: Int[Array, "B"]  # rows sharing a group may draft from each other (Best-of-N branches)
    active: Bool[Array, "B"]  # rows still generating
    hidden: Float[Array, "B D"] | None = None  # target hidden state that predicted the pending token
    weights: Any = None  # the proposer's own weights (from `bind`), e.g. a draft model's params
    cache: Any = None  # the target's KVCache (read-only), holding every history token but the pending one
    # target features (the `feature_layers` outputs, concatenated) of consecutive history positions
    # starting at `feature_start[b]`: the prefill's at init/resume, the accepted path's at update
    features: Float[Array, "B T F"] | None = None
    feature_start: Int[Array, "B"] | None = None
    # at update, for proposers with `logit_topk > 0`: the tokens the verify forward fed (pending token,
    # then the draft: chain positions or tree nodes), the top-k tokens of its logits at each, and
    # which of them were real (not padding, row active)
    verified: Int[Array, "B K1"] | None = None
    verified_topk: Int[Array, "B K1 C"] | None = None
    verified_valid: Bool[Array, "B K1"] | None = None
    # the call's traced `sampling.Sampling`: a drafter whose q must match the target's processing reads
    # temperature / top-k / top-p here (it is bound to the static `SamplingMode` only)
    sampling: Any = None
    # at update: whether the next step calls `propose` (False while an adaptive loop backs off or a wide
    # batch is gated; None: always). A proposer whose update only serves `propose` may put it off then
    proposes_next: Bool[Array, ""] | None = None
    # at propose, for proposers with a `cheap_part`: False while an adaptive loop backs off from the
    # costly part, which then must not run (None or True: the whole proposal)
    full_draft: Bool[Array, ""] | None = None
    # at init, when rows share a prompt (Best-of-N branches): each row's prompt (`prompt_of`, [B]) and each
    # prompt's first row (`prompt_rows`, [Q], Q < B). A proposer whose start reads the whole prompt may do
    # that once per prompt and copy it to the branches. None: every row has a prompt of its own
    prompt_of: Int[Array, "B"] | None = None
    prompt_rows: Int[Array, "Q"] | None = None


@struct.dataclass
class Draft:
    """K proposed tokens per row; entries at or past `num` are padding."""

    tokens: Int[Array, "B K"]
    num: Int[Array, "B"]
    probs: Float[Array, "B K V"] | None = None  # draft distribution q; None means deterministic (one-hot)
    confidence: Float[Array, "B"] | None = None  # proposer-specific, e.g. suffix match length
    source: Int[Array, "B"] | None = None  # which sub-proposer drafted (hybrid); 0 otherwise
    valid: Bool[Array, "B K"] | None = None  # tree drafts: which nodes are real (None: the first `num`)
    # a dynamic tree (EAGLE-2): each draft node's parent as a tree node (0: the pending token), per row; the
    # template fixes the node count and its narrower sub-trees (`TreeTemplate.subtrees`: root, first-ranked
    # chain), whose nodes keep their template parents and depths; the other nodes' depths follow from their
    # parents, at most the template's `max_depth`. None: the template's parents
    parents: Int[Array, "B K"] | None = None


# ---------------------------------------------------------------- row gathers and shape checks


def gather_rows(x: Array, idx: Int[Array, "B ..."]) -> Array:
    """x[b, idx[b, ...]] for every row (x: [B, S, *T] -> [B, *idx, *T]), idx clipped into range
    (callers mask what is out of range)."""
    flat = jnp.clip(idx, 0, x.shape[1] - 1).reshape((idx.shape[0], -1) + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, flat, axis=1).reshape(idx.shape + x.shape[2:])


def at(x: Array, i: Int[Array, "B"]) -> Array:
    """x[b, i[b]] for every row, keeping trailing axes."""
    return gather_rows(x, i[:, None])[:, 0]


T = TypeVar("T")


def run_if(pred: Bool[Array, ""], fn: Callable[[T], T], carry: T) -> T:
    """`fn(carry)` where `pred`, else `carry`: a while loop run once or not at all. Unlike a `lax.cond`,
    the loop carries its state in place: a conditional whose branch writes into a cache it was handed
    made XLA:CPU copy the whole buffer each time it ran."""
    return jax.lax.while_loop(lambda c: c[1], lambda c: (fn(c[0]), jnp.bool_(False)), (carry, pred))[0]


def pending_tokens(ctx: Context) -> Int[Array, "B"]:
    """Each row's pending token: the last of its history."""
    return at(ctx.tokens, ctx.lengths - 1).astype(jnp.int32)


def tree_depths(mask: Bool[Array, "B T T"]) -> Int[Array, "B T"]:
    """Each node's depth (0: the root) from a per-row ancestor mask (`ancestor_mask`)."""
    return (jnp.sum(mask, axis=-1) - 1).astype(jnp.int32)


def ancestor_mask(parents: Int[Array, "B T"], max_depth: int) -> Bool[Array, "B T T"]:
    """Per-row tree attention: node i sees its ancestors and itself, from each node's parent (tree-node
    indices, the root's -1 or 0), closed over `max_depth` levels. `TreeTemplate.attention_mask` per row,
    for trees whose parents differ between rows (a dynamic draft tree)."""
    b, t = parents.shape
    par = jnp.clip(parents, 0, t - 1)
    has_parent = (jnp.arange(t) > 0)[None, :, None]
    mask = jnp.broadcast_to(jnp.eye(t, dtype=bool)[None], (b, t, t))
    for _ in range(max_depth):
        mask = mask | (jnp.take_along_axis(mask, par[:, :, None], axis=1) & has_parent)
    return mask


def check_context(ctx: Context) -> int:
    """Shape-checks the fields every drafter reads; returns the batch size."""
    chex.assert_rank(ctx.tokens, 2)
    batch = ctx.tokens.shape[0]
    chex.assert_shape([ctx.lengths, ctx.group, ctx.active], (batch,))
    return batch


def check_draft(draft: Draft, batch: int, width: int) -> Draft:
    """Shape-checks a draft of `width` tokens (chain positions or tree nodes) per row."""
    chex.assert_shape(draft.tokens, (batch, width))
    chex.assert_shape(draft.num, (batch,))
    if draft.confidence is not None:
        chex.assert_shape(draft.confidence, (batch,))
    if draft.valid is not None:
        chex.assert_shape(draft.valid, (batch, width))
    if draft.parents is not None:
        chex.assert_shape(draft.parents, (batch, width))
    return draft


def chains_to_tree(chains: Array) -> Array:
    """[B, n, K] chains (chain j's token i) -> [B, n*K] nodes of `branching_tree((n,), K)` (breadth-first:
    every chain's token i before any chain's token i+1)."""
    return jnp.swapaxes(chains, 1, 2).reshape(chains.shape[0], -1)


# ---------------------------------------------------------------- static trees


@dataclasses.dataclass(frozen=True)
class TreeTemplate:
    """A static token tree. Node 0 is the root (the pending token, parent -1); `parents[i] < i`.

    The target forward feeds all T nodes at once with `attention_mask` at positions
    `pending_position + depth`; its logits at node j predict j's children. Siblings are listed in
    priority order: sampling verification tries them in that order.
    """

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.parents or self.parents[0] != -1:
            raise ValueError("node 0 must be the root, with parent -1")
        bad = [i for i, p in enumerate(self.parents) if i and not 0 <= p < i]
        if bad:
            raise ValueError(f"every node's parent must come before it; nodes {bad} do not")

    @property
    def size(self) -> int:
        return len(self.parents)

    @functools.cached_property
    def depth(self) -> tuple[int, ...]:
        d = [0]
        for p in self.parents[1:]:
            d.append(d[p] + 1)
        return tuple(d)

    @functools.cached_property
    def max_depth(self) -> int:
        return max(self.depth)

    @functools.cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(c for c in range(self.size) if self.parents[c] == i) for i in range(self.size))

    @functools.cached_property
    def ranks(self) -> np.ndarray:
        """[T] int32: each node's rank among its siblings (root: 0), e.g. the successor column it reads."""
        out = np.zeros(self.size, np.int32)
        for kids in self.children:
            out[list(kids)] = np.arange(len(kids))
        return out

    @functools.cached_property
    def attention_mask(self) -> np.ndarray:
        """[T, T] bool: node i attends to its ancestors and itself."""
        mask = np.eye(self.size, dtype=bool)
        for i in range(1, self.size):
            mask[i] |= mask[self.parents[i]]
        return mask

    def subtree(self, nodes: tuple[int, ...]) -> "TreeTemplate":
        """The tree of `nodes` (ascending, the root and every listed node's parent included), renumbered
        0..len-1 in that order: its node i is this tree's node nodes[i]."""
        index = {n: i for i, n in enumerate(nodes)}
        if nodes[:1] != (0,) or any(self.parents[n] not in index for n in nodes[1:]) or list(nodes) != sorted(nodes):
            raise ValueError(f"nodes {nodes} are not a sub-tree: ascending, from the root, each with its parent")
        return TreeTemplate((-1,) + tuple(index[self.parents[n]] for n in nodes[1:]))

    @functools.cached_property
    def subtrees(self) -> tuple[tuple[int, ...], ...]:
        """The static sub-trees an adaptive loop chooses among, narrowest first: the root alone, the chain
        of first-ranked children (each node's most likely child) down to the deepest level, and the whole
        tree. A dear verify at batch 8 may pay for a chain of 4 nodes and not for 14."""
        chain = [0]
        while self.children[chain[-1]]:
            chain.append(self.children[chain[-1]][0])
        found = {(0,), tuple(chain), tuple(range(self.size))}
        return tuple(sorted(found, key=len))

    @functools.cached_property
    def paths(self) -> np.ndarray:
        """[T, max_depth] int32 retrieve paths: row i lists i's ancestors below the root then i, 0-padded."""
        out = np.zeros((self.size, self.max_depth), np.int32)
        for i in range(1, self.size):
            out[i] = out[self.parents[i]]
            out[i, self.depth[i] - 1] = i
        return out


@functools.cache
def branching_tree(branching: tuple[int, ...], depth: int) -> TreeTemplate:
    """Breadth-first tree down to `depth`: `branching[d]` children per node at depth d + 1, 1 (chains)
    past the end of `branching`. `branching_tree((), k)` is a chain of k tokens."""
    parents, frontier = [-1], [0]
    for d in range(depth):
        children = branching[d] if d < len(branching) else 1
        nxt = []
        for p in frontier:
            for _ in range(children):
                parents.append(p)
                nxt.append(len(parents) - 1)
        frontier = nxt
    return TreeTemplate(tuple(parents))


# eagle_tree's prior: a node's top-ranked child is accepted ACCEPT_PRIOR of the time, its rank r+1
# child RANK_PRIOR times as often as its rank r child (roughly what a trained head shows)
ACCEPT_PRIOR, RANK_PRIOR = 0.8, 0.35


@functools.cache
def eagle_tree(total: int, depth: int, topk: int) -> TreeTemplate:
    """A static draft tree of `total` nodes (root excluded), at most `depth` deep and `topk` children per
    node: the nodes most likely reached under the ACCEPT_PRIOR / RANK_PRIOR model (EAGLE-2's expected
    acceptance, with a fixed prior standing in for the per-step confidences). Breadth-first order, so
    each depth's nodes are one contiguous range and siblings run by rank."""
    if not 1 <= depth <= total or topk < 1:
        raise ValueError(f"a draft tree needs 1 <= depth <= total and topk >= 1, got total={total}, depth={depth}, "
                         f"topk={topk}")
    chosen: list[tuple[int, ...]] = []
    frontier = [(-ACCEPT_PRIOR, (0,))]
    while frontier and len(chosen) < total:
        neg, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < depth:
            heapq.heappush(frontier, (neg * ACCEPT_PRIOR, (*path, 0)))
        if path[-1] + 1 < topk:
            heapq.heappush(frontier, (neg * RANK_PRIOR, (*path[:-1], path[-1] + 1)))
    if max(map(len, chosen)) < depth:
        raise ValueError(f"total={total} nodes do not reach depth {depth} with topk={topk}: raise total or lower depth")
    chosen.sort(key=lambda p: (len(p), p))
    index = {p: i + 1 for i, p in enumerate(chosen)}
    return TreeTemplate((-1, *(index.get(p[:-1], 0) for p in chosen)))


@functools.cache
def dynamic_tree_shape(total: int, depth: int) -> TreeTemplate:
    """The static shape of a dynamic draft tree (`Draft.parents`, EAGLE-2): `total` nodes, nodes 1..depth a
    chain (each drafter's first-ranked path: the sub-tree an adaptive loop verifies alone), the others
    hung from the root here and placed by each draft's own parents."""
    if not 1 <= depth <= total:
        raise ValueError(f"a dynamic tree needs 1 <= depth <= total, got total={total}, depth={depth}")
    return TreeTemplate((-1, *range(depth), *(0,) * (total - depth)))


@functools.cache
def lookahead_tree(k: int, window: int, guesses: int) -> TreeTemplate:
    """Root; `guesses` chains of k nodes (verification); then the window, level by level.

    In/Out, k=2, window=3, guesses=1 (node ids):
        root 0; verify chain 1 -> 2; window level 0: 3 -> 4 -> 5 (3's parent the root); level 1: 6, 7, 8
        over 3, 4, 5. Node 7 = y[1][1] attends to 0, 3, 4, 7: the pending token, y[0][0..1], itself,
        at depth 3 = position i + 1 + l.
    """
    parents = [-1]
    for _ in range(guesses):
        parents.extend([0, *range(len(parents), len(parents) + k - 1)])
    base = len(parents)
    for level in range(k):
        for i in range(window):
            if level == 0:
                parents.append(0 if i == 0 else base + i - 1)
            else:
                parents.append(base + (level - 1) * window + i)
    return TreeTemplate(tuple(parents))
