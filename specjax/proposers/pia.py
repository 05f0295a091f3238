"""PIA (Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language Model with
Lossless Generation Accuracy", Ant Group): a frequency trie of the n-grams seen so far, drafted as a
multi-branch token tree.

Each row keeps a trie of the `branch_len`-grams ("branches") starting at every position of its
history: the prompt's at `init` (weight `prompt_weight`), the output's as it is committed (weight 1),
so a node's `freq` is the weighted count of history positions whose text starts with the node's path.
Drafting matches the history's last m tokens (pending token last; the longest m <= `max_match` whose
walk from the root succeeds and whose end node has children) and hangs the static tree
`drafting.branching_tree(branching, k)` below the matched node: template node (parent p, sibling rank
r) is the r-th most frequent child of p's trie node. The trie persists across a session's rounds, as
PIA keeps it across queries.

Everything is static-size arrays per row: `capacity` nodes (node 0 is the root) with up to `fanout`
children each, except the root, whose children (one per distinct history token) sit in a table
indexed by token. Memory per row is capacity * (fanout + 3) * 4 bytes + capacity bools + vocab * 4
bytes: at the defaults (4096 nodes, fanout 4) 116 KiB for the nodes, `children` [B, M, F] int32 the
largest at 64 KiB, plus 192 KiB of root table for SmolLM2's 49152 tokens: about 0.3 MiB a row, 19 MiB
for a batch of 64. Full tries are pruned by frequency (decay, then free the rare nodes and their subtrees),
see `prune`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from specjax.drafting import Context, Draft, check_context, gather_rows
from specjax.proposers.base import BranchingTree, Proposer, bound, option, register


@struct.dataclass
class Trie:
    """One n-gram trie per row. Unused nodes hold token -1, parent -1, freq 0 and no children."""

    token: Int[Array, "B M"]  # the token a node adds to its parent's path; -1 for the root and free nodes
    parent: Int[Array, "B M"]  # -1 for the root and free nodes
    freq: Float[Array, "B M"]  # weighted count of history positions whose text starts with the node's path
    children: Int[Array, "B M F"]  # child node ids in insertion order, -1 for an empty slot
    used: Bool[Array, "B M"]  # the root is always used
    # the root's children, indexed by token (-1: none): the root has a child for every distinct token of
    # the history, far beyond any fanout (PIA's root is a dict), so it gets a direct table [B, vocab]
    first: Int[Array, "B V"]


def empty_trie(batch: int, capacity: int, fanout: int, vocab: int) -> Trie:
    """A trie holding only its root (node 0) in every row."""
    return Trie(
        first=jnp.full((batch, vocab), -1, jnp.int32),
        token=jnp.full((batch, capacity), -1, jnp.int32),
        parent=jnp.full((batch, capacity), -1, jnp.int32),
        freq=jnp.zeros((batch, capacity), jnp.float32),
        children=jnp.full((batch, capacity, fanout), -1, jnp.int32),
        used=jnp.zeros((batch, capacity), bool).at[:, 0].set(True),
    )


def _child_tokens(trie: Trie, kids: Int[Array, "B F"]) -> Int[Array, "B F"]:
    """Tokens of child slots; -1 where a slot is empty."""
    rows = jnp.arange(kids.shape[0])[:, None]
    return jnp.where(kids >= 0, trie.token[rows, jnp.maximum(kids, 0)], -1)


def insert(
    trie: Trie,
    gram: Int[Array, "B N"],
    start: Int[Array, "B"],
    end: Int[Array, "B"],
    weight: Float[Array, "B"],
) -> Trie:
    """Walks gram[b, :end[b]] down from the root, adding `weight` to the nodes at depths >= start[b].

    Depths are 0-based (gram[b, d] is a node at depth d + 1). `start > 0` extends an n-gram inserted
    earlier cut shorter (its first `start` nodes were counted then, so they are not counted again); a
    node the walk has to create gets `weight` whatever its depth. A missing child is created in the
    parent's first empty slot at the first unused node id. When all `fanout` slots are taken, the new
    token replaces the least frequent child (its id is reused; its old subtree is unlinked, and freed by
    the next `prune`) only if that child's freq is strictly below `weight`: rarer branches make room for
    an n-gram as heavy as one occurrence, but an equally frequent one is not evicted (no thrashing
    between siblings). Otherwise, or with no free node left, the walk stops there.
    """
    batch, n = gram.shape
    capacity, fanout = trie.children.shape[1:]
    vocab = trie.first.shape[1]
    chex.assert_shape([start, end, weight], (batch,))
    chex.assert_shape(trie.token, (batch, capacity))
    rows = jnp.arange(batch)
    drop = capacity  # out-of-range index: masked scatters skip it

    def step(d, carry, at_root: bool = False):
        """One depth: find the child holding gram[:, d] below `cur`, or create it; count it."""
        token, parent, freq, children, used, first, cur, alive = carry
        go = alive & (d < end)
        tok = jnp.clip(gram[:, d].astype(jnp.int32), 0, vocab - 1)
        free_id = jnp.argmax(~used, axis=1).astype(jnp.int32)  # the first unused id
        has_free = ~used[rows, free_id]
        if at_root:  # the root's table has room for every token: find or allocate
            kid = first[rows, tok]
            found = kid >= 0
            create = go & ~found & has_free
            node = jnp.where(create, free_id, kid)
            first = first.at[rows, jnp.where(create, tok, vocab)].set(node, mode="drop")
        else:
            kids = children[rows, cur]  # [B, F]
            kid_tok = jnp.where(kids >= 0, token[rows[:, None], jnp.maximum(kids, 0)], -1)
            match = (kids >= 0) & (kid_tok == tok[:, None])
            found = match.any(axis=1)
            empty = kids < 0
            has_empty = empty.any(axis=1)
            kid_freq = jnp.where(kids >= 0, freq[rows[:, None], jnp.maximum(kids, 0)], jnp.inf)
            weakest = jnp.argmin(kid_freq, axis=1)
            alloc = go & ~found & has_empty & has_free
            replace = go & ~found & ~has_empty & (kid_freq[rows, weakest] < weight)
            create = alloc | replace
            slot = jnp.where(found, jnp.argmax(match, axis=1),
                             jnp.where(has_empty, jnp.argmax(empty, axis=1), weakest))
            node = jnp.where(alloc, free_id, kids[rows, slot])
            children = children.at[rows, jnp.where(create, cur, drop), slot].set(node, mode="drop")
        ok = go & (found | create)
        new = jnp.where(create, node, drop)
        token = token.at[rows, new].set(tok, mode="drop")
        parent = parent.at[rows, new].set(cur, mode="drop")
        freq = freq.at[rows, new].set(0.0, mode="drop")
        children = children.at[rows, new].set(-1, mode="drop")
        used = used.at[rows, new].set(True, mode="drop")
        counted = ok & (create | (d >= start))
        freq = freq.at[rows, jnp.where(counted, node, drop)].add(weight, mode="drop")
        return token, parent, freq, children, used, first, jnp.where(ok, node, cur), ok

    carry = (trie.token, trie.parent, trie.freq, trie.children, trie.used, trie.first,
             jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool))
    carry = step(0, carry, at_root=True)
    carry = jax.lax.fori_loop(1, n, step, carry)  # the deeper levels share one compiled body
    token, parent, freq, children, used, first = carry[:6]
    return Trie(token=token, parent=parent, freq=freq, children=children, used=used, first=first)


def prune(trie: Trie, rows_to_prune: Bool[Array, "B"], decay: float, min_freq: float, levels: int) -> Trie:
    """PIA's frequency pruning, on the rows asked for: every freq is multiplied by `decay`, then every
    node below `min_freq`, or unlinked from its parent (an evicted subtree, see `insert`), is freed
    together with its descendants (`levels` = the trie's depth) and unlinked from its parent. The root
    stays. Decaying first ages the counts, so text seen long ago gives way to recent text."""
    batch, capacity, fanout = trie.children.shape
    vocab = trie.first.shape[1]
    chex.assert_shape(rows_to_prune, (batch,))
    rows = jnp.arange(batch)[:, None]
    ids = jnp.arange(capacity)
    freq = jnp.where(rows_to_prune[:, None], trie.freq * decay, trie.freq)
    par = jnp.maximum(trie.parent, 0)
    listed = jnp.where(trie.parent == 0, trie.first[rows, jnp.clip(trie.token, 0, vocab - 1)] == ids,
                       jnp.any(trie.children[rows, par] == ids[None, :, None], axis=-1))
    linked = listed & trie.used[rows, par]
    free = trie.used & (ids > 0) & rows_to_prune[:, None] & ((freq < min_freq) | ~linked)
    for _ in range(levels):  # a freed node's subtree goes with it
        free = free | (trie.used & (trie.parent >= 0) & free[rows, par])
    gone = lambda ids_: (ids_ >= 0) & free[rows.reshape((batch,) + (1,) * (ids_.ndim - 1)), jnp.maximum(ids_, 0)]
    kids = jnp.where(gone(trie.children), -1, trie.children)
    return Trie(
        token=jnp.where(free, -1, trie.token),
        parent=jnp.where(free, -1, trie.parent),
        freq=jnp.where(free, 0.0, freq),
        children=jnp.where(free[..., None], -1, kids),
        used=trie.used & ~free,
        first=jnp.where(gone(trie.first), -1, trie.first),
    )


def walk(trie: Trie, path: Int[Array, "B m"]) -> tuple[Int[Array, "B"], Bool[Array, "B"]]:
    """The node reached from the root along path[b] and whether every step found its child."""
    batch = path.shape[0]
    rows = jnp.arange(batch)
    vocab = trie.first.shape[1]
    cur = trie.first[rows, jnp.clip(path[:, 0], 0, vocab - 1)]
    ok = (cur >= 0) & (path[:, 0] < vocab)
    cur = jnp.maximum(cur, 0)
    for j in range(1, path.shape[1]):
        kids = trie.children[rows, cur]
        match = (kids >= 0) & (_child_tokens(trie, kids) == path[:, j:j + 1])
        ok = ok & match.any(axis=1)
        cur = jnp.where(ok, kids[rows, jnp.argmax(match, axis=1)], 0)
    return jnp.where(ok, cur, 0), ok


@register("pia")
@dataclasses.dataclass(frozen=True)
class Pia(BranchingTree, Proposer):
    """PIA's trie drafter; see the module docstring. `confidence` is the matched m (0: no draft)."""

    paper: ClassVar[tuple[int, str] | None] = (5, "PIA")
    k: int = option(4, min=1)  # tree depth: most tokens one step can accept
    branching: tuple[int, ...] = option((2, 2), min=1)  # children per node at depths 1, 2, ... (then chains)
    # n-gram length stored: a match of m tokens drafts at most branch_len - m levels deep, so the default
    # is max_match + k (a longest match can fill the whole tree). SmolLM2-135M, the re-check prompt of
    # the real-model test: 1.81 tokens per forward with 6, 1.90 with 7
    branch_len: int = option(7, min=2)
    max_match: int = option(3, min=1)  # longest history suffix matched in the trie
    capacity: int = option(4096, min=1)  # trie nodes per row, the root included
    fanout: int = option(4, min=1)  # children kept per node (>= max(branching))
    # a prompt n-gram counts this much, an output one 1 (PIA weighs output more)
    prompt_weight: float = option(0.5, gt=0)
    decay: float = option(0.5, gt=0, lt=1)  # pruning multiplies every freq by this ...
    min_freq: float = option(0.5, gt=0)  # ... and frees the nodes left below this, with their subtrees
    vocab: int = bound(0)  # the target's vocabulary (the root's table)

    def __post_init__(self):
        if self.k < 1 or not self.branching or any(b < 1 for b in self.branching):
            raise ValueError(f"pia needs k >= 1 and branching entries >= 1, got k={self.k}, branching={self.branching}")
        if self.fanout < max(self.branching):
            raise ValueError(f"fanout={self.fanout} must be >= max(branching)={max(self.branching)}: a node cannot "
                             "offer more children than it keeps")
        if self.max_match < 1:
            raise ValueError(f"max_match must be >= 1, got {self.max_match}")
        if self.branch_len <= max(self.k, self.max_match):
            raise ValueError(f"branch_len={self.branch_len} must exceed k={self.k} and max_match={self.max_match}: "
                             "a one-token match must reach the full draft depth, and the longest match must draft "
                             "something; raise branch_len")
        if self.capacity <= self.branch_len:
            raise ValueError(f"capacity={self.capacity} must exceed branch_len={self.branch_len} (one n-gram and "
                             "the root); raise capacity")
        if self.prompt_weight <= 0 or not 0 < self.decay < 1 or self.min_freq <= 0:
            raise ValueError(f"need prompt_weight > 0, 0 < decay < 1 and min_freq > 0 (pruning must free nodes "
                             f"eventually), got {self.prompt_weight}, {self.decay}, {self.min_freq}")

    def bind(self, model, sampling_cfg):
        return dataclasses.replace(self, vocab=model.config.vocab_size), None

    # ------------------------------------------------------------ trie maintenance

    def _grow(self, trie: Trie, tokens: Int[Array, "B S"], pos: Int[Array, "B"], start: Int[Array, "B"],
              end: Int[Array, "B"], weight: float) -> Trie:
        """Inserts tokens[b, pos[b] : pos[b] + end[b]] (counted from depth start), pruning first the rows
        with fewer free nodes than it may create (end[b]; under `lax.cond`: costs nothing when none)."""
        need = ((~trie.used).sum(axis=1) < end) & (end > start)
        trie = jax.lax.cond(need.any(), lambda t: prune(t, need, self.decay, self.min_freq, self.branch_len),
                            lambda t: t, trie)
        gram = gather_rows(tokens, pos[:, None] + jnp.arange(self.branch_len))
        return insert(trie, gram, start, end, jnp.full(pos.shape, weight, jnp.float32))

    def _insert_history(self, trie: Trie, ctx: Context) -> Trie:
        """Every position p of the history: tokens[p : p + branch_len] cut at the row's length."""
        tokens, lengths = ctx.tokens.astype(jnp.int32), ctx.lengths
        zeros = jnp.zeros_like(lengths)

        def one_position(p, t):
            end = jnp.clip(lengths - p, 0, self.branch_len)
            return self._grow(t, tokens, jnp.full_like(lengths, p), zeros, end, self.prompt_weight)

        return jax.lax.fori_loop(0, jnp.max(lengths), one_position, trie)

    def init(self, ctx: Context) -> Trie:
        """The prompt's n-grams (the whole history: prompt and the first sampled token) at prompt_weight.

        The n-grams of the last branch_len - 1 positions are inserted cut at the history's end; `update`
        extends them as tokens arrive, so every position is counted once at every depth."""
        batch = check_context(ctx)
        if self.vocab < 1:
            raise ValueError("pia must be bound to a model (generate does this) or given vocab= before init")
        return self._insert_history(empty_trie(batch, self.capacity, self.fanout, self.vocab), ctx)

    def update(self, state: Trie, ctx: Context, prev_lengths: Int[Array, "B"]) -> Trie:
        """Extends the n-grams that gained tokens this step, at weight 1.

        Position p's n-gram was inserted up to depth min(branch_len, prev - p) and now reaches
        min(branch_len, length - p): those are p in [prev - branch_len + 1, length - 1]. Only the new
        depths are counted (the prefix was counted when it was committed), so after any sequence of
        steps the trie equals `init` on the whole history (weights aside), partial tail n-grams
        included: the newest tokens are matchable at once, not branch_len tokens later. The positions
        are a static window of branch_len + depth (the most one step commits is depth + 1), masked.
        """
        batch = check_context(ctx)
        chex.assert_shape(prev_lengths, (batch,))
        chex.assert_shape(state.children, (batch, self.capacity, self.fanout))
        tokens, lengths = ctx.tokens.astype(jnp.int32), ctx.lengths
        window = self.branch_len + self.depth

        def one_position(j, t):
            pos = lengths - window + j
            start = jnp.clip(prev_lengths - pos, 0, self.branch_len)
            end = jnp.clip(lengths - pos, 0, self.branch_len)
            end = jnp.where((pos >= 0) & (end > start), end, 0)
            return self._grow(t, tokens, pos, start, end, 1.0)

        return jax.lax.fori_loop(0, window, one_position, state)

    def resume(self, state: Trie, ctx: Context, prev_state: Trie, prev: Context) -> Trie:
        """Next round: the earlier rounds' trie with this prompt's n-grams inserted on top (PIA keeps one
        trie across queries; text the new prompt repeats from the last history counts again)."""
        chex.assert_equal_shape([state.children, prev_state.children])
        return self._insert_history(prev_state, ctx)

    # ------------------------------------------------------------ drafting

    def match(self, trie: Trie, ctx: Context) -> tuple[Int[Array, "B"], Int[Array, "B"]]:
        """(matched node, m): the longest history suffix (m <= max_match tokens, pending token last)
        whose trie node has children; m = 0 and the root where none has."""
        rows = jnp.arange(ctx.tokens.shape[0])
        node, matched = jnp.zeros_like(ctx.lengths), jnp.zeros_like(ctx.lengths)
        for m in range(1, self.max_match + 1):  # longer matches overwrite shorter ones
            path = gather_rows(ctx.tokens.astype(jnp.int32), ctx.lengths[:, None] - m + jnp.arange(m))
            end, ok = walk(trie, path)
            ok = ok & (ctx.lengths >= m) & (trie.children[rows, end] >= 0).any(axis=1)
            node, matched = jnp.where(ok, end, node), jnp.where(ok, m, matched)
        return node, matched

    def propose(self, state: Trie, ctx: Context, rng: jax.Array) -> tuple[Trie, Draft]:
        batch = check_context(ctx)
        chex.assert_shape(state.children, (batch, self.capacity, self.fanout))
        template = self.template
        rank = template.ranks
        rows = jnp.arange(batch)
        root, matched = self.match(state, ctx)
        nodes, valid = [root], [(matched > 0) & ctx.active]
        ranked: list[tuple[Array, Array] | None] = [None] * template.size  # per template node: its trie kids, ranked
        for i in range(1, template.size):  # breadth-first: a parent's trie node is known before its children's
            p = template.parents[i]
            if ranked[p] is None:
                kids = state.children[rows, nodes[p]]  # [B, F]
                kid_freq = jnp.where(kids >= 0, state.freq[rows[:, None], jnp.maximum(kids, 0)], -jnp.inf)
                top_freq, top_slot = jax.lax.top_k(kid_freq, len(template.children[p]))  # ties: older slot
                ranked[p] = (jnp.take_along_axis(kids, top_slot, axis=1), top_freq > -jnp.inf)
            kid, exists = ranked[p][0][:, rank[i]], ranked[p][1][:, rank[i]]
            ok = valid[p] & exists
            nodes.append(jnp.where(ok, kid, 0))
            valid.append(ok)
        node_ids = jnp.stack(nodes[1:], axis=1)
        is_real = jnp.stack(valid[1:], axis=1)
        tokens = jnp.where(is_real, state.token[rows[:, None], node_ids], 0).astype(jnp.int32)
        draft = Draft(tokens=tokens, num=is_real.sum(axis=1).astype(jnp.int32), valid=is_real,
                      confidence=jnp.where(valid[0], matched, 0).astype(jnp.float32))
        chex.assert_shape([draft.tokens, draft.valid], (batch, template.size - 1))
        return state, draft
