"""N-gram proposers against crafted histories and brute-force references; everything runs jitted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.drafting import Context
from specjax.proposers.ngram import (
    NGramPool,
    PromptLookup,
    SuffixMatch,
    ngram_slot,
    seed_store,
)

RNG = jax.random.PRNGKey(0)
_init = jax.jit(lambda p, ctx: p.init(ctx), static_argnums=0)
_propose = jax.jit(lambda p, state, ctx: p.propose(state, ctx, RNG), static_argnums=0)
_update = jax.jit(lambda p, state, ctx, prev: p.update(state, ctx, prev), static_argnums=0)
_seed = jax.jit(seed_store)

WIDTH = 16  # every crafted batch is padded to this width so the jitted functions compile once per config


def make_ctx(rows, group=None, active=None, width=WIDTH, garbage=None):
    """Right-pads rows to width with zeros, or with `garbage` to prove padding is never read."""
    fill = 0 if garbage is None else garbage
    tokens = np.full((len(rows), width), fill, np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    group = np.arange(len(rows)) if group is None else np.asarray(group)
    active = np.ones(len(rows), bool) if active is None else np.asarray(active)
    return Context(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([len(r) for r in rows], jnp.int32),
        group=jnp.asarray(group, jnp.int32),
        active=jnp.asarray(active),
    )


def draft(proposer, rows, state=None, **kw):
    """Runs init + propose; returns (list of drafted token lists, confidence array)."""
    ctx = make_ctx(rows, **kw)
    state = _init(proposer, ctx) if state is None else state
    _, d = _propose(proposer, state, ctx)
    tokens, num = np.asarray(d.tokens), np.asarray(d.num)
    assert tokens.shape == (len(rows), proposer.k) and tokens.dtype == np.int32 and num.dtype == np.int32
    assert ((num >= 0) & (num <= proposer.k)).all()
    assert (tokens[np.arange(proposer.k)[None] >= num[:, None]] == 0).all()  # padding is zeros
    return [tokens[b, : num[b]].tolist() for b in range(len(rows))], np.asarray(d.confidence)


# ---------------------------------------------------------------- brute-force references


def ref_pld(hist, k, max_n, min_n):
    """Prompt lookup exactly as specified: largest n first, then the latest earlier occurrence."""
    for n in range(max_n, min_n - 1, -1):
        for i in range(len(hist) - 1, n - 1, -1):
            if len(hist) >= n and hist[i - n : i] == hist[len(hist) - n :]:
                return hist[i : i + k], n
    return [], 0


def ref_suffix(query, sources, k, max_match, min_match):
    """Longest suffix match over sources [(tokens, is_own)]; ties: own, latest, first source."""
    best = None
    for src, own in sources:
        for i in range(len(src)):
            m = 0
            while m < min(max_match, i, len(query)) and src[i - 1 - m] == query[-1 - m]:
                m += 1
            if m >= min_match and (best is None or (m, own, i) > best[0]):
                best = ((m, own, i), src[i : i + k])
    return ([], 0) if best is None else (best[1], best[0][0])


def random_rows(seed, batch, vocab=3, width=WIDTH):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab + 1, rng.integers(0, width + 1)).tolist() for _ in range(batch)]


# ---------------------------------------------------------------- prompt lookup


PLD = PromptLookup(k=4, max_ngram=3, min_ngram=1)
# the unit tests exercise single-token matches; the method default (min_match=3) only filters them
Suffix1 = functools.partial(SuffixMatch, min_match=1, spec_factor=0.0, store_size=0)  # full-K drafts, no store


def test_pld_finds_match_prefers_longer_n_and_most_recent():
    rows = [
        [1, 2, 3, 4, 9, 9, 2, 3],  # "2 3" at 1: continuation 4 9 9 2
        [5, 1, 7, 8, 2, 1, 6, 0, 5, 1],  # "5 1" (n=2) beats the more recent "1" (n=1)
        [1, 2, 3, 1, 2, 4, 8, 1, 2],  # "1 2" twice: the latest, at 3
    ]
    got, conf = draft(PLD, rows)
    assert got == [[4, 9, 9, 2], [7, 8, 2, 1], [4, 8, 1, 2]]
    assert conf.tolist() == [2, 2, 2]


def test_pld_no_match_truncation_inactive_and_padding():
    rows = [
        [1, 2, 3, 4],  # nothing earlier ends in 4
        [1, 2, 3, 1, 2, 4, 1, 2],  # latest "1 2" leaves only 3 tokens: truncated at the history's end
        [1, 2, 1],  # inactive
        [6, 7],  # the garbage padding holds 7s: must not match
        [],
    ]
    got, _ = draft(PLD, rows, active=[1, 1, 0, 1, 1], garbage=7)
    assert got == [[], [4, 1, 2], [], [], []]


def test_pld_min_ngram():
    got, _ = draft(PromptLookup(k=4, max_ngram=3, min_ngram=2), [[5, 1, 6, 2, 1], [5, 1, 6, 5, 1]])
    assert got == [[], [6, 5, 1]]


def test_pld_matches_reference_on_random_mixed_lengths():
    rows = random_rows(0, 48)
    got, conf = draft(PLD, rows, garbage=1)
    for b, row in enumerate(rows):
        want, n = ref_pld(row, PLD.k, PLD.max_ngram, PLD.min_ngram)
        assert (got[b], conf[b]) == (want, n), row


# ---------------------------------------------------------------- suffix match


def test_suffix_longest_match_and_its_length():
    # suffix "2 3 4": length 3 after "1" at i=4 (continues 5 9 3 4), length 2 at i=8 (continues 6 9 2 3)
    row = [1, 2, 3, 4, 5, 9, 3, 4, 6, 9, 2, 3, 4]
    got, conf = draft(Suffix1(k=4, shared=False), [row])
    assert (got, conf.tolist()) == ([[5, 9, 3, 4]], [3.0])
    got, conf = draft(Suffix1(k=4, max_match=2, shared=False), [row])  # capped: tie -> latest
    assert (got, conf.tolist()) == ([[6, 9, 2, 3]], [2.0])
    got, conf = draft(Suffix1(k=4, min_match=4, shared=False), [row, [1, 2, 1, 2]])
    assert (got, conf.tolist()) == ([[], []], [0.0, 0.0])


def test_suffix_shared_within_group_only():
    rows = [
        [1, 2, 3, 7],  # group 0: no 7 of its own; row 1 has "7" followed by 8 9 6
        [5, 7, 8, 9, 6],  # group 0
        [4, 4, 7],  # group 1: must not see row 1
        [9, 3],  # group 2: row 4 has "3" only as its last token, whose continuation is past its length
        [3],  # group 2
    ]
    group = [0, 0, 1, 2, 2]
    got, conf = draft(Suffix1(k=4), rows, group=group, garbage=5)
    assert got[0] == [8, 9, 6] and conf[0] == 1
    assert got[2] == [] and got[3] == []
    got, _ = draft(Suffix1(k=4, shared=False), rows, group=group)
    assert got[0] == []


def test_suffix_shared_prefers_longer_foreign_match_and_own_on_ties():
    rows = [[7, 1, 2, 7], [7, 3], [4, 7, 3, 5, 4, 7]]
    got, _ = draft(Suffix1(k=4), rows, group=[0, 0, 0])
    assert got[0] == [1, 2, 7]  # "7": own row at i=1 ties row 1 at i=1 and row 2 at i=2 ... own wins
    assert got[1] == [5, 4, 7]  # "7 3" (length 2) exists only in row 2
    assert got[2] == [3, 5, 4, 7]  # "4 7": own row at i=2


def test_suffix_matches_reference_on_random_groups():
    rows = random_rows(1, 12)
    group = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    proposer = Suffix1(k=5, max_match=4, min_match=1)
    got, conf = draft(proposer, rows, group=group, garbage=2)
    for b, row in enumerate(rows):
        sources = [(rows[r], r == b) for r in range(len(rows)) if group[r] == group[b]]
        want, m = ref_suffix(row, sources, proposer.k, proposer.max_match, proposer.min_match)
        assert (got[b], conf[b]) == (want, m), (b, row)
    got, _ = draft(Suffix1(k=5, max_match=4, shared=False), rows, group=group)
    assert got == [ref_suffix(row, [(row, True)], 5, 4, 1)[0] for row in rows]


def test_suffix_store_seeded_from_earlier_round():
    proposer = Suffix1(k=4, store_size=6, shared=False)
    rows = [[1, 2, 3, 7], [2, 8]]
    ctx = make_ctx(rows)
    state = _init(proposer, ctx)
    assert draft(proposer, rows, state=state)[0] == [[], []]
    earlier = make_ctx([[1, 7, 8, 9], [2, 8, 4]])
    state = _seed(state, earlier.tokens, earlier.lengths)
    assert draft(proposer, rows, state=state)[0] == [[8, 9], [4]]


def test_seed_store_appends_and_keeps_latest():
    store = Suffix1(k=4, store_size=6).init(make_ctx([[1], [1]]))
    first = make_ctx([[1, 2, 3, 4], [1]])
    second = make_ctx([[5, 6, 7], []])
    store = _seed(_seed(store, first.tokens, first.lengths), second.tokens, second.lengths)
    assert np.asarray(store.tokens).tolist() == [[2, 3, 4, 5, 6, 7], [1, 0, 0, 0, 0, 0]]
    assert np.asarray(store.lengths).tolist() == [6, 1]


# ---------------------------------------------------------------- n-gram pool


POOL = NGramPool(k=4, ngram=2, table_size=256)


def test_pool_insert_lookup_and_latest_wins():
    rows = [
        [1, 2, 3, 4, 1, 2],
        [1, 2, 3, 1, 2, 4, 8, 1, 2],  # later continuation of "1 2" replaces the older one
        [1, 2, 3],  # "2 3" never followed by anything
        [5],  # shorter than the n-gram
    ]
    got, conf = draft(POOL, rows, garbage=3)
    assert got == [[3, 4, 1, 2], [4, 8, 1, 2], [], []]
    assert conf.tolist() == [2, 2, 0, 0]
    assert draft(POOL, rows, active=[0, 1, 1, 1])[0][0] == []


def test_pool_update_from_accepted_tokens():
    before = make_ctx([[5, 6, 7], [1, 2, 3]])
    state = _init(POOL, before)
    after = make_ctx([[5, 6, 7, 8, 9, 5, 6], [1, 2, 3, 4, 9, 2, 3]])
    stale = _propose(POOL, state, after)[1]
    assert np.asarray(stale.num).tolist() == [1, 0]  # old table: "5 6" -> [7]; "2 3" unknown
    state = _update(POOL, state, after, before.lengths)
    assert draft(POOL, [[5, 6, 7, 8, 9, 5, 6], [1, 2, 3, 4, 9, 2, 3]], state=state)[0] == [
        [7, 8, 9, 5],  # the partial continuation grew
        [4, 9, 2, 3],  # a new key
    ]


def test_pool_incremental_updates_equal_one_init():
    """Feeding a history in steps of 1..K+1 tokens builds exactly the table `init` builds at once."""
    rng = np.random.default_rng(2)
    rows = random_rows(3, 6, vocab=4)
    full = make_ctx(rows)
    lengths = np.zeros(len(rows), np.int32)
    state = _init(POOL, make_ctx([r[:0] for r in rows]))
    while (lengths < full.lengths).any():
        new = np.minimum(lengths + rng.integers(1, POOL.k + 2, len(rows)), np.asarray(full.lengths))
        grown = make_ctx([r[:n] for r, n in zip(rows, new)], garbage=7)  # padding differs from `full`'s
        state = _update(POOL, state, grown, jnp.asarray(lengths))
        lengths = new
    once = _init(POOL, full)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(once)):
        np.testing.assert_array_equal(a, b)


def test_pool_latest_position_wins_whatever_the_scatter_order():
    """Scatter order on duplicate slots is unspecified in XLA: the newest position must win anyway."""
    ctx = make_ctx([[1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2]])
    empty = _init(POOL, make_ctx([[]]))
    pos = jnp.arange(WIDTH)[None]
    valid = (pos >= POOL.ngram) & (pos < ctx.lengths[:, None])
    insert = jax.jit(POOL._insert)
    forward = insert(empty, ctx.tokens, ctx.lengths, pos, valid)
    backward = insert(empty, ctx.tokens, ctx.lengths, pos[:, ::-1], valid[:, ::-1])
    for a, b in zip(jax.tree.leaves(forward), jax.tree.leaves(backward)):
        np.testing.assert_array_equal(a, b)


def test_pool_matches_pld_with_fixed_n_when_no_collisions():
    keys = jnp.asarray([[a, b] for a in range(1, 5) for b in range(1, 5)])
    assert len(set(np.asarray(ngram_slot(keys, POOL.table_size)).tolist())) == 16
    rows = random_rows(4, 48, vocab=4)
    got, _ = draft(POOL, rows, garbage=1)
    assert got == [ref_pld(row, POOL.k, 2, 2)[0] for row in rows]


def test_pool_collision_never_drafts_a_foreign_continuation():
    tiny = NGramPool(k=4, ngram=1, table_size=2)
    slots = np.asarray(ngram_slot(jnp.arange(1, 9)[:, None], 2))
    a = 1
    b = 1 + next(i for i in range(1, 8) if slots[i] == slots[0])  # a != b, same slot
    row = [a, 9, b, 9, a]  # later entries overwrite a's slot: querying "a" finds another key
    assert draft(tiny, [row])[0] == [[]]
    assert draft(NGramPool(k=4, ngram=1), [row])[0] == [[9, b, 9, a]]
    rows = random_rows(5, 48, vocab=6)
    got, _ = draft(tiny, rows)
    for g, row in zip(got, rows):
        assert g == [] or g == ref_pld(row, 4, 1, 1)[0], row


# ---------------------------------------------------------------- all proposers


@pytest.mark.parametrize("name", ["pld", "pool", "suffix"])
def test_registry_jit_loop(name):
    """init -> (propose -> update) under one jit with the proposer static; hashable configs."""
    from specjax.proposers import registry

    cls = registry()[name]
    assert cls.name == name and hash(cls(k=4)) == hash(cls(k=4))
    short = {"pld": {"min_ngram": 1}, "suffix": {"min_match": 1}}.get(name, {})  # rows match 1-2 tokens
    proposer = cls(k=4, **short)
    rows = [[1, 2, 3, 1, 2], [4, 5, 4], [1, 2, 3, 1]]

    @jax.jit
    def loop(ctx):
        state = proposer.init(ctx)
        state, first = proposer.propose(state, ctx, RNG)
        grown = ctx.replace(tokens=ctx.tokens.at[:, 5].set(3), lengths=jnp.full_like(ctx.lengths, 6))
        state = proposer.update(state, grown, ctx.lengths)
        _, second = proposer.propose(state, grown, RNG)
        return first, second

    ctx = make_ctx([r[:5] for r in rows], group=[0, 0, 0], active=[1, 1, 0])
    first, second = loop(ctx)
    assert np.asarray(first.num).tolist()[2] == 0 and np.asarray(second.num).tolist()[2] == 0
    assert np.asarray(first.tokens)[0, :2].tolist() == [3, 1]  # "1 2" / "2" -> 3 1 2
    assert first.confidence.dtype == jnp.float32


def test_bad_configs_rejected():
    with pytest.raises(ValueError):
        PromptLookup(min_ngram=0)
    with pytest.raises(ValueError):
        SuffixMatch(min_match=3, max_match=2)
    with pytest.raises(ValueError):
        NGramPool(table_size=100)


def test_branch_tree_and_distinct_tree_chains():
    from specjax.drafting import branching_tree
    from specjax.proposers.ngram import SuffixMatch

    t = branching_tree((2,), 3)  # two chains of 3 from the root, breadth-first
    assert t.parents == (-1, 0, 0, 1, 2, 3, 4) and t.max_depth == 3
    # "5 6" was followed by 7, then by 9, then by 7 again: chains start with 7 (latest) and 9
    history = [5, 6, 7, 1, 5, 6, 9, 2, 5, 6, 7, 3, 5, 6]
    ctx = Context(tokens=jnp.asarray([history + [0] * 4]), lengths=jnp.asarray([len(history)]),
                  group=jnp.zeros((1,), jnp.int32), active=jnp.ones((1,), bool))
    prop = SuffixMatch(k=3, min_match=2, branches=2, shared=False, spec_factor=0.0)
    assert prop.template == t and prop.width == 6 and prop.depth == 3
    draft = prop.propose(prop.init(ctx), ctx, None)[1]
    assert draft.tokens[0].tolist() == [7, 9, 3, 2, 5, 5]  # chains 7 3 5 and 9 2 5, depth by depth
    assert draft.valid[0].tolist() == [True] * 6 and int(draft.num[0]) == 6


def test_spec_factor_caps_the_draft_at_a_multiple_of_the_match_length():
    row = [1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 40, 1, 2]  # "1 2" matched (length 2), 7 tokens follow it
    for factor, expect in [(0.0, 6), (1.0, 2), (1.5, 3), (10.0, 6)]:
        got, conf = draft(Suffix1(k=6, shared=False, spec_factor=factor), [row])
        assert got == [[3, 4, 5, 6, 7, 8][:expect]] and conf.tolist() == [2.0], factor
