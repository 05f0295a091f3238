"""PIA's n-gram trie: exact arrays after crafted inserts, the fan-out replacement rule, pruning,
drafting on crafted histories, update/resume against init, and losslessness in the loop."""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.drafting import Context
from specjax.proposers import make_proposer
from specjax.proposers.pia import Pia, Trie, empty_trie, insert, prune

RNG = jax.random.PRNGKey(0)
_insert = jax.jit(insert)
_prune = jax.jit(prune, static_argnames=("decay", "min_freq", "levels"))
_init = jax.jit(lambda p, ctx: p.init(ctx), static_argnums=0)
_propose = jax.jit(lambda p, state, ctx: p.propose(state, ctx, RNG), static_argnums=0)
_update = jax.jit(lambda p, state, ctx, prev: p.update(state, ctx, prev), static_argnums=0)
_resume = jax.jit(lambda p, state, ctx, prev_state, prev: p.resume(state, ctx, prev_state, prev), static_argnums=0)

WIDTH = 24  # crafted histories are padded to this width: the jitted functions compile once per config


def make_ctx(rows, active=None, width=WIDTH):
    tokens = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    active = np.ones(len(rows), bool) if active is None else np.asarray(active)
    return Context(tokens=jnp.asarray(tokens), lengths=jnp.asarray([len(r) for r in rows], jnp.int32),
                   group=jnp.arange(len(rows)), active=jnp.asarray(active))


def grow(trie, grams, weight, start=None, end=None):
    """Inserts one n-gram per row (padded with zeros; end defaults to the gram's length)."""
    n = max(len(g) for g in grams)
    padded = np.zeros((len(grams), n), np.int32)
    for b, g in enumerate(grams):
        padded[b, : len(g)] = g
    end = [len(g) for g in grams] if end is None else end
    start = [0] * len(grams) if start is None else start
    return _insert(trie, jnp.asarray(padded), jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32),
                   jnp.asarray(weight, jnp.float32))


def paths(trie: Trie, row: int = 0) -> dict[tuple[int, ...], float]:
    """The row's trie as {token path: freq}, walked from the root's table; checks every used node is
    reached exactly once and every link agrees with `parent`."""
    t = jax.tree.map(lambda x: np.asarray(x)[row], trie)
    out, seen = {}, set()
    stack = [((int(tok),), int(n)) for tok, n in enumerate(t.first) if n >= 0]
    while stack:
        path, node = stack.pop()
        assert node not in seen and t.used[node] and t.token[node] == path[-1]
        seen.add(node)
        out[path] = float(t.freq[node])
        for kid in t.children[node]:
            if kid >= 0:
                assert t.parent[kid] == node
                stack.append((path + (int(t.token[kid]),), int(kid)))
    assert seen == set(np.flatnonzero(t.used)) - {0}, "a used node is unreachable"
    return out


def reference(history, n, weight=1.0):
    """{path: weighted count of positions whose text starts with it}, paths up to n tokens."""
    counts = collections.defaultdict(float)
    for p in range(len(history)):
        for d in range(1, min(n, len(history) - p) + 1):
            counts[tuple(history[p : p + d])] += weight
    return dict(counts)


# ---------------------------------------------------------------- the trie's arrays


def test_insert_into_empty_trie_exact_arrays_and_counts():
    trie = empty_trie(2, capacity=8, fanout=2, vocab=10)
    trie = grow(trie, [[3, 4, 5], [3, 4, 5]], [1.0, 1.0], end=[3, 0])  # row 1: nothing (end 0)
    t = jax.tree.map(np.asarray, trie)
    assert t.token[0].tolist() == [-1, 3, 4, 5, -1, -1, -1, -1]
    assert t.parent[0].tolist() == [-1, 0, 1, 2, -1, -1, -1, -1]
    assert t.freq[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert t.children[0].tolist() == [[-1, -1], [2, -1], [3, -1], [-1, -1]] + [[-1, -1]] * 4
    assert t.used[0].tolist() == [True] * 4 + [False] * 4
    assert np.flatnonzero(t.first[0] >= 0).tolist() == [3] and t.first[0, 3] == 1
    assert t.used[1].tolist() == [True] + [False] * 7 and (t.first[1] < 0).all()

    trie = grow(trie, [[3, 6, 0], [3]], [0.5, 1.0], end=[2, 1])  # a cut n-gram: 3 6 at prompt weight
    trie = grow(trie, [[3, 4, 5], [3]], [1.0, 1.0])  # the same n-gram again counts its whole path again
    t = jax.tree.map(np.asarray, trie)
    assert t.token[0, :5].tolist() == [-1, 3, 4, 5, 6] and t.parent[0, 4] == 1
    assert t.children[0, 1].tolist() == [2, 4]  # insertion order
    assert t.freq[0, :5].tolist() == [0, 2.5, 2, 2, 0.5]
    assert paths(trie, 1) == {(3,): 2.0}
    # extending the cut n-gram 3 6 by one token (start=2): only the new depth is counted
    trie = grow(trie, [[3, 6, 7], [3]], [1.0, 1.0], start=[2, 1], end=[3, 1])
    assert paths(trie) == {(3,): 2.5, (3, 4): 2, (3, 4, 5): 2, (3, 6): 0.5, (3, 6, 7): 1}
    assert paths(trie, 1) == {(3,): 2.0}


def test_full_fanout_replaces_the_rarest_child_only_when_lighter():
    trie = empty_trie(1, capacity=8, fanout=2, vocab=10)
    trie = grow(trie, [[1, 2]], [1.0])  # nodes 1 (1), 2 (2)
    trie = grow(trie, [[1, 3, 9]], [0.5])  # nodes 3 (3), 4 (9); node 1's slots are now full
    trie = grow(trie, [[1, 4]], [0.5])  # the rarest child (3: 0.5) is not below 0.5: 4 is dropped
    assert paths(trie) == {(1,): 2.0, (1, 2): 1.0, (1, 3): 0.5, (1, 3, 9): 0.5}
    trie = grow(trie, [[1, 4, 5]], [1.0])  # 0.5 < 1: 4 takes node 3's id and slot, 5 the first free id
    t = jax.tree.map(np.asarray, trie)
    assert t.children[0, 1].tolist() == [2, 3]
    assert (t.token[0, 3], t.freq[0, 3], t.children[0, 3].tolist()) == (4, 1.0, [5, -1])
    assert (t.token[0, 5], t.parent[0, 5], t.freq[0, 5]) == (5, 3, 1.0)
    assert t.used[0, 4] and t.parent[0, 4] == 3  # 3's old child 9: unlinked, freed by the next prune
    pruned = _prune(trie, jnp.asarray([True]), decay=0.99, min_freq=0.1, levels=3)
    assert not np.asarray(pruned.used)[0, 4]
    assert paths(pruned) == pytest.approx({(1,): 2.97, (1, 2): 0.99, (1, 4): 0.99, (1, 4, 5): 0.99})


def test_prune_frees_rare_nodes_with_their_subtrees_and_the_ids_are_reused():
    rows = [[[1, 2, 3], 4.0], [[1, 5, 6], 1.0], [[7, 8], 1.0], [[7, 9], 0.5]]
    trie = empty_trie(2, capacity=12, fanout=2, vocab=10)
    for gram, w in rows:
        trie = grow(trie, [gram, gram], [w, w])
    # nodes: 1:1 2:2 3:3 4:5 5:6 6:7 7:8 8:9. Node 4 (5) turns rare while its child (6) stays frequent
    trie = trie.replace(freq=trie.freq.at[:, 4].set(0.2).at[:, 5].set(5.0))
    before = paths(trie, 1)
    pruned = _prune(trie, jnp.asarray([True, False]), decay=0.5, min_freq=0.5, levels=3)
    t = jax.tree.map(np.asarray, pruned)
    assert np.flatnonzero(~t.used[0]).tolist() == [4, 5, 8, 9, 10, 11]  # 5 (0.1), its child 6, and 9 (0.25)
    assert t.children[0, 1].tolist() == [2, -1] and t.children[0, 6].tolist() == [7, -1]
    assert (t.token[0, [4, 5, 8]] == -1).all() and (t.freq[0, [4, 5, 8]] == 0).all()
    assert paths(pruned) == {(1,): 2.5, (1, 2): 2.0, (1, 2, 3): 2.0, (7,): 0.75, (7, 8): 0.5}
    assert paths(pruned, 1) == before  # a row not asked to prune is untouched
    again = jax.tree.map(np.asarray, grow(pruned, [[1, 4, 4], [1]], [1.0, 1.0]))
    assert again.token[0, [4, 5]].tolist() == [4, 4] and again.parent[0, [4, 5]].tolist() == [1, 4]
    assert again.children[0, 1].tolist() == [2, 4]


def test_a_full_trie_prunes_itself_and_keeps_the_recent_text():
    p = Pia(vocab=32, k=2, branching=(2,), branch_len=3, max_match=2, capacity=16, fanout=2)
    history = list(range(1, 23))  # 22 distinct tokens: 60+ nodes' worth of n-grams, 15 fit
    state = _init(p, make_ctx([history]))
    got = paths(state)
    assert len(got) <= 15
    assert set(got) <= set(reference(history, 3))  # every stored path is real text
    assert (1,) not in got and {(21, 22), (22,)} <= set(got)  # old text was pruned, the newest kept


# ---------------------------------------------------------------- drafting


P = Pia(vocab=16, k=2, branching=(2,), branch_len=4, max_match=3, capacity=64, fanout=2, prompt_weight=1.0)


def test_propose_drafts_the_most_frequent_children_below_the_longest_match():
    assert P.template.parents == (-1, 0, 0, 1, 2)
    rows = [
        # after "1 2": 4 (once, first) and 3 (twice); after "1 2 3": 5 and 6 once each (older first);
        # the 3-token suffix "6 1 2" occurs only at the end, with no continuation: m = 2 wins
        [1, 2, 4, 7, 1, 2, 3, 5, 1, 2, 3, 6, 1, 2],
        [1, 2, 4, 7, 1, 2, 3, 5, 1, 2, 3, 6, 1, 2, 4],  # "1 2 4" -> 7 only, and 1 2 4 7 is a whole branch
        [9, 8],  # no earlier 8
        [1, 2, 4, 7, 1, 2, 3, 5, 1, 2, 3, 6, 1, 2],  # inactive
    ]
    ctx = make_ctx(rows, active=[1, 1, 1, 0])
    _, draft = _propose(P, _init(P, ctx), ctx)
    valid = np.asarray(draft.valid)
    tokens = np.where(valid, np.asarray(draft.tokens), -1)
    assert tokens.tolist() == [[3, 4, 5, 7], [7, -1, -1, -1], [-1] * 4, [-1] * 4]
    assert valid.sum(1).tolist() == np.asarray(draft.num).tolist() == [4, 1, 0, 0]
    assert np.asarray(draft.confidence).tolist() == [2, 3, 0, 0]
    assert (np.asarray(draft.tokens)[~valid] == 0).all() and draft.probs is None


def test_update_adds_exactly_the_new_ngrams():
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 5, 20).tolist() for _ in range(3)]  # 4 tokens: fan-out 4 never overflows
    p = dataclasses.replace(P, vocab=8, fanout=4, capacity=256, max_match=2)
    lengths = np.asarray([5, 3, 9])
    state = _init(p, make_ctx([r[:n] for r, n in zip(rows, lengths)]))
    for _ in range(8):
        grown = np.minimum(lengths + rng.integers(0, p.depth + 2, 3), len(rows[0]))  # 0 .. depth + 1 tokens
        state = _update(p, state, make_ctx([r[:n] for r, n in zip(rows, grown)]), jnp.asarray(lengths, jnp.int32))
        lengths = grown
    whole = _init(p, make_ctx([r[:n] for r, n in zip(rows, lengths)]))
    for b in range(3):
        assert paths(state, b) == paths(whole, b) == reference(rows[b][: lengths[b]], p.branch_len), b


def test_resume_keeps_the_earlier_rounds_trie():
    first, second = [[1, 2, 3, 1, 2], [5, 6]], [[2, 3, 4], [6, 7, 5, 6]]
    p = dataclasses.replace(P, prompt_weight=0.5)
    prev = make_ctx(first)
    old = _init(p, prev)
    ctx = make_ctx(second)
    state = _resume(p, _init(p, ctx), ctx, old, prev)
    for b in range(2):
        want = collections.Counter(reference(first[b], p.branch_len, 0.5))
        want.update(reference(second[b], p.branch_len, 0.5))
        assert paths(state, b) == dict(want)
    _, draft = _propose(p, state, make_ctx([[9, 1, 2], [9, 5]]))
    assert np.asarray(draft.tokens)[:, 0].tolist() == [3, 6]  # row 0's: only the first round saw "1 2 3"


def test_bad_options_raise_naming_the_fix():
    for bad, fix in [({"branch_len": 4}, "branch_len"), ({"fanout": 1}, "fanout"), ({"decay": 1.0}, "decay"),
                     ({"max_match": 0}, "max_match"), ({"capacity": 6}, "capacity"), ({"branching": ()}, "branching")]:
        with pytest.raises(ValueError, match=fix):
            make_proposer("pia", **bad)
    with pytest.raises(ValueError, match="bound"):
        Pia().init(make_ctx([[1, 2]]))


# ---------------------------------------------------------------- in the decode loop


def test_greedy_equals_ar_drafts_get_accepted_and_sampling_runs(tiny_model):
    loopy = [5, 6, 7, 8, 9, 10, 11, 12] * 4
    prompts = [loopy, [3, 9, 4, 4, 17, 2, 30], loopy[:13]]
    gen = functools.partial(specjax.generate, tiny_model, max_new_tokens=40, eos_token_ids=())
    ar = gen(prompts, "ar")
    out = gen(prompts, "pia")
    assert out.tokens == ar.tokens
    alone = gen(prompts[:1], "pia")
    assert alone.tokens == ar.tokens[:1]
    # this random model barely repeats its prompt, but its own loops (e.g. 44 44 44 44 44) are drafted
    # from the output's n-grams: 1.08 tokens per forward measured alone, 1.035 on the batch
    assert alone.stats["mean_accepted_tokens"] > 1.05
    assert out.stats["mean_accepted_tokens"] > 1.0
    sampled = [gen(prompts[:1], "pia", max_new_tokens=12, temperature=1.0, seed=s).tokens[0] for s in range(2)]
    assert [len(s) for s in sampled] == [12, 12] and sampled[0] != sampled[1]


@pytest.mark.real
def test_real_model_greedy_equals_ar(real_model):
    q = "Compute 12 * 13. Then compute 12 * 13 again and check that both answers agree."
    first = specjax.generate(real_model, [q], "ar", max_new_tokens=40).texts[0]
    prompts = [f"{q}\nA previous answer was:\n{first}\nCheck it and answer again.", "What is 2 + 2?"]
    ar = specjax.generate(real_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    out = specjax.generate(real_model, prompts, "pia", max_new_tokens=40, eos_token_ids=())
    assert out.tokens == ar.tokens
    assert out.stats["mean_accepted_tokens"] > 1.6  # 1.90 measured (recycling: 1.50)
