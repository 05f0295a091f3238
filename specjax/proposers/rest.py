"""REST (He et al., "REST: Retrieval-Based Speculative Decoding"): drafts retrieved from a datastore.

The history's last n tokens (the pending token included, so the draft follows it) are looked up in a
corpus built offline (`specjax.datastore`, `python -m eval.build_datastore`); the tokens that followed
them there become a draft tree, most frequent continuations first. No model runs to draft.

Static shapes, so it all runs inside the jitted loop:
- the datastore is the weights pytree (`ctx.weights`: tokens [T], suffix_array [N]); its sizes are
  static, so one compile per datastore size;
- lookup is a `lax.fori_loop` binary search of N.bit_length() steps per bound (lower, upper), for each
  n = max_key..min_key in a static Python loop, all rows at once; the longest n whose range
  [lo, hi) is non-empty wins (REST's rule);
- a fixed `candidates` = C matches are read from the range: all of it when hi - lo <= C, else C
  positions spread evenly over it (lo + floor(j (hi - lo) / C)). Spread, not the first C: the range
  is sorted by continuation, so the first C would all share the lexicographically smallest
  continuations, while an even spread keeps each continuation's share of the range, i.e. its
  frequency, which is what the tree ranks by;
- each candidate's next `k` tokens are read, cut at the first -1 (document end): [B, C, k];
- the tree is the static `drafting.branching_tree(branching, k)`; a node (parent p, sibling rank r)
  gets the r-th most frequent distinct next token among the candidates whose continuation so far
  equals p's path: masked [B, C, C] counting per parent in a static loop over template nodes. Ties
  go to the earlier candidate in suffix-array order (the smaller token, within the sort window).
  A rank with no such token is invalid, and so is everything below it (its candidate set is empty).

Worked example of the tree fill (branching (2, 2), k = 2; nodes 1, 2 under the root, 3, 4 under 1,
5, 6 under 2). In: the history ends "5 6", and the datastore holds "5 6 7 8" three times, "5 6 7 9"
once, "5 6 4 4" twice, so the C = 6 continuations are [4 4] [4 4] [7 8] [7 8] [7 8] [7 9]
(suffix-array order). Root: next tokens 7 (x4), 4 (x2) -> node 1 = 7, node 2 = 4. Under 7: 8 (x3),
9 (x1) -> node 3 = 8, node 4 = 9. Under 4: 4 (x2) -> node 5 = 4, node 6 has no token.
Out: tokens [7, 4, 8, 9, 4, 0], valid [T, T, T, T, T, F], num 5, confidence 2 (the matched n).
State: `()`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Int

from specjax.datastore import BUILD_HINT, SEPARATOR, load_datastore
from specjax.drafting import Context, Draft, TreeTemplate, check_context, gather_rows
from specjax.proposers.base import BranchingTree, Proposer, option, register


@struct.dataclass
class RestStore:
    """The datastore on device: `ctx.weights` of a bound Rest."""

    tokens: Int[Array, "T"]  # documents, each followed by -1
    suffix_array: Int[Array, "N"]  # positions sorted by their next `window` tokens


def read_tokens(tokens: Int[Array, "T"], start: Int[Array, "..."], width: int) -> Int[Array, "... W"]:
    """tokens[start : start + width], -1 from the first separator on (so nothing crosses a document end)."""
    idx = start[..., None] + jnp.arange(width)
    w = jnp.where(idx < tokens.shape[0], tokens[jnp.clip(idx, 0, tokens.shape[0] - 1)], SEPARATOR)
    alive = jnp.cumprod((w != SEPARATOR).astype(jnp.int32), axis=-1).astype(bool)
    return jnp.where(alive, w, SEPARATOR)


def _compare(w: Int[Array, "B n"], q: Int[Array, "B n"]) -> Int[Array, "B"]:
    """Lexicographic sign of w - q per row: -1, 0 or 1 (at the first differing position)."""
    diff = w != q
    first = jnp.argmax(diff, axis=-1)[:, None]
    wf = jnp.take_along_axis(w, first, axis=-1)[:, 0]
    qf = jnp.take_along_axis(q, first, axis=-1)[:, 0]
    return jnp.where(diff.any(axis=-1), jnp.sign(wf - qf), 0).astype(jnp.int32)


def match_range(store: RestStore, query: Int[Array, "B n"]) -> tuple[Int[Array, "B"], Int[Array, "B"]]:
    """[lo, hi): the suffix-array entries whose first n tokens equal query's n, per row (binary search).

    `lo` is the first entry not below the query, `hi` the first above it; each bound takes
    N.bit_length() halvings, run together in one fori_loop.
    """
    chex.assert_rank(query, 2)
    batch, n = query.shape
    size = store.suffix_array.shape[0]

    def order(mid: Int[Array, "B"]) -> Int[Array, "B"]:
        start = store.suffix_array[jnp.clip(mid, 0, size - 1)]
        return _compare(read_tokens(store.tokens, start, n), query)

    def halve(_, carry):
        lo_l, hi_l, lo_u, hi_u = carry
        mid_l, mid_u = (lo_l + hi_l) // 2, (lo_u + hi_u) // 2
        below = order(mid_l) < 0  # lower bound: move right past entries < query
        not_above = order(mid_u) <= 0  # upper bound: move right past entries <= query
        act_l, act_u = lo_l < hi_l, lo_u < hi_u
        return (jnp.where(act_l & below, mid_l + 1, lo_l), jnp.where(act_l & ~below, mid_l, hi_l),
                jnp.where(act_u & not_above, mid_u + 1, lo_u), jnp.where(act_u & ~not_above, mid_u, hi_u))

    zero, full = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), size, jnp.int32)
    lo, _, hi, _ = jax.lax.fori_loop(0, max(size, 1).bit_length(), halve, (zero, full, zero, full))
    return lo, hi


def spread(lo: Int[Array, "B"], hi: Int[Array, "B"], c: int) -> tuple[Int[Array, "B C"], Bool[Array, "B C"]]:
    """C suffix-array indices from [lo, hi): all of it if it fits, else evenly spread; and which are real."""
    count = hi - lo
    j = jnp.arange(c)[None]
    per, rest = (count // c)[:, None], (count % c)[:, None]
    even = lo[:, None] + j * per + (j * rest) // c  # = lo + floor(j * count / c), without int32 overflow
    idx = jnp.where(count[:, None] > c, even, lo[:, None] + j)
    return idx.astype(jnp.int32), j < count[:, None]


def fill_tree(conts: Int[Array, "B C K"], template: TreeTemplate, rank: np.ndarray
              ) -> tuple[Int[Array, "B T1"], Bool[Array, "B T1"]]:
    """Template nodes 1..T-1 from the retrieved continuations (-1: none), by frequency (see module doc)."""
    batch, c, _ = conts.shape
    cand = jnp.arange(c)
    earlier = cand[None, :] < cand[:, None]  # [C, C]: c' comes before c
    match = {0: conts[:, :, 0] >= 0}  # node -> candidates whose continuation follows the node's path
    picks: dict[int, tuple[Array, Array, Array, Array]] = {}  # parent -> (score, who, next tokens, eligible)
    tokens, valid = [], []
    for node in range(1, template.size):
        parent, depth = template.parents[node], template.depth[node]
        if parent not in picks:
            nxt = conts[:, :, depth - 1]
            elig = match[parent] & (nxt >= 0)
            same = elig[:, :, None] & elig[:, None, :] & (nxt[:, :, None] == nxt[:, None, :])  # [B, C, C]
            count = same.sum(axis=-1)
            first = elig & ~(same & earlier[None]).any(axis=-1)  # one representative per distinct token
            score = jnp.where(first, count * c + (c - 1 - cand)[None], -1)
            best, who = jax.lax.top_k(score, len(template.children[parent]))
            picks[parent] = (best, who, nxt, elig)
        best, who, nxt, elig = picks[parent]
        r = int(rank[node])
        ok = best[:, r] >= 0
        tok = jnp.take_along_axis(nxt, who[:, r : r + 1], axis=1)[:, 0]
        match[node] = elig & (nxt == tok[:, None]) & ok[:, None]
        tokens.append(jnp.where(ok, tok, 0))
        valid.append(ok)
    return jnp.stack(tokens, axis=1).astype(jnp.int32), jnp.stack(valid, axis=1)


@functools.lru_cache(maxsize=4)
def _device_store(path: str, stamp: tuple, vocab_size: int) -> tuple[RestStore, int]:
    """The datastore on device and its sort window, loaded once per file version (`stamp`)."""
    store = load_datastore(path, vocab_size)
    return RestStore(tokens=jnp.asarray(store.tokens), suffix_array=jnp.asarray(store.suffix_array)), store.window


@register("rest")
@dataclasses.dataclass(frozen=True)
class Rest(BranchingTree, Proposer):
    needs: ClassVar[str | None] = "datastore"
    paper: ClassVar[tuple[int, str] | None] = (6, "REST")
    datastore: str = ""  # path of a datastore built by eval.build_datastore
    max_key: int = option(8, min=1)  # longest history suffix looked up
    min_key: int = option(2, min=1)
    candidates: int = option(32, min=1)  # continuations retrieved per step, at most
    k: int = option(4, min=1)  # tree depth
    branching: tuple[int, ...] = option((2, 2), min=1)  # children per node at depths 1, 2, ... (then chains)

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(self.branching))  # e.g. a list from --option: must hash
        if not 1 <= self.min_key <= self.max_key:
            raise ValueError(f"rest needs 1 <= min_key <= max_key, got min_key={self.min_key}, max_key={self.max_key}")
        if self.k < 1 or any(b < 1 for b in self.branching) or self.candidates < max(self.branching, default=1):
            raise ValueError(f"rest needs k >= 1, branching >= 1 and candidates >= max(branching), got k={self.k}, "
                             f"branching={self.branching}, candidates={self.candidates}")

    def bind(self, model, sampling_cfg) -> tuple["Rest", RestStore]:
        """Loads the datastore (checked against the model's vocabulary) as the weights pytree."""
        if not self.datastore:
            raise ValueError(f"rest needs datastore=PATH; build one with {BUILD_HINT}")
        from specjax.datastore import datastore_paths

        files = datastore_paths(self.datastore)
        stamp = tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) if p.is_file() else None for p in files)
        store, window = _device_store(str(files[0]), stamp, int(model.config.vocab_size))
        if window < self.max_key:
            raise ValueError(f"datastore {files[0]} is sorted by {window} tokens, fewer than max_key={self.max_key}: "
                             f"pass max_key<={window} or rebuild with --window {self.max_key}")
        return self, store

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[tuple, Draft]:
        batch = check_context(ctx)
        store: RestStore = ctx.weights
        chex.assert_rank([store.tokens, store.suffix_array], 1)
        template = self.template
        rank = template.ranks
        history = ctx.tokens.astype(jnp.int32)
        key = jnp.zeros((batch,), jnp.int32)
        lo = hi = jnp.zeros((batch,), jnp.int32)
        for n in range(self.min_key, self.max_key + 1):  # longer keys overwrite: the longest match wins
            query = gather_rows(history, ctx.lengths[:, None] - n + jnp.arange(n))
            lo_n, hi_n = match_range(store, query)
            found = (ctx.lengths >= n) & (hi_n > lo_n)
            key, lo, hi = jnp.where(found, n, key), jnp.where(found, lo_n, lo), jnp.where(found, hi_n, hi)
        hi = jnp.where((key > 0) & ctx.active, hi, lo)
        idx, real = spread(lo, hi, self.candidates)
        start = store.suffix_array[jnp.clip(idx, 0, store.suffix_array.shape[0] - 1)] + key[:, None]
        conts = jnp.where(real[..., None], read_tokens(store.tokens, start, self.k), SEPARATOR)
        tokens, valid = fill_tree(conts, template, rank)
        valid = valid & ctx.active[:, None]
        draft = Draft(tokens=jnp.where(valid, tokens, 0), num=valid.sum(axis=1).astype(jnp.int32), valid=valid,
                      confidence=key.astype(jnp.float32))
        chex.assert_shape([draft.tokens, draft.valid], (batch, template.size - 1))
        return state, draft
