"""Lookahead decoding: the window-as-tree template, the n-gram pool, the Jacobi window update, and
losslessness in the loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.drafting import Context, lookahead_tree
from specjax.proposers.lookahead import Lookahead, LookaheadState, insert_ngrams

_insert = jax.jit(insert_ngrams)


def _ctx(tokens, lengths):
    tokens = jnp.asarray(tokens, jnp.int32)
    b = tokens.shape[0]
    return Context(tokens=tokens, lengths=jnp.asarray(lengths, jnp.int32), group=jnp.arange(b),
                   active=jnp.ones((b,), bool))


def _empty(vocab=10, guesses=2, k=2, window=3, batch=1):
    return LookaheadState(window=jnp.zeros((batch, k, window), jnp.int32),
                          pool=jnp.full((vocab, guesses, k), -1, jnp.int32),
                          next_slot=jnp.zeros((vocab,), jnp.int32), steps=jnp.zeros((), jnp.int32))


def test_template_is_the_2d_window_with_its_attention_rule():
    t = lookahead_tree(k=2, window=3, guesses=1)
    assert t.parents == (-1, 0, 1, 0, 3, 4, 3, 4, 5)
    # y[l][i] sits at position i + 1 + l after the pending token
    assert t.depth == (0, 1, 2, 1, 2, 3, 2, 3, 4)
    # y[1][1] (node 7) sees the pending token, the base row up to its column, and itself
    assert np.flatnonzero(t.attention_mask[7]).tolist() == [0, 3, 4, 7]
    # the verification chain sees only the root: the branches never see each other
    assert np.flatnonzero(t.attention_mask[2]).tolist() == [0, 1, 2]
    assert not t.attention_mask[3:, 1:3].any()


def test_pool_insert_skips_duplicates_and_rings():
    state = _empty()
    grams = jnp.asarray([[1, 2, 3], [1, 2, 3], [1, 4, 5], [2, 6, 7], [3, 0, 0]])
    state = _insert(state, grams, jnp.asarray([True, True, True, True, False]))
    assert state.pool[1].tolist() == [[2, 3], [4, 5]] and state.next_slot[1] == 2  # the repeat is skipped
    assert state.pool[2, 0].tolist() == [6, 7] and state.next_slot[2] == 1
    assert (state.pool[3] == -1).all() and state.next_slot[3] == 0  # invalid entries write nothing
    state = _insert(state, jnp.asarray([[1, 4, 5]]), jnp.asarray([True]))  # already held: no slot used
    assert state.next_slot[1] == 2
    state = _insert(state, jnp.asarray([[1, 8, 9]]), jnp.asarray([True]))  # full: the oldest slot goes
    assert state.pool[1].tolist() == [[8, 9], [4, 5]] and state.next_slot[1] == 3


def test_propose_verifies_latest_pool_ngrams_and_runs_the_window():
    p = Lookahead(k=2, window=3, guesses=2, vocab=10)
    state = _empty()
    state = _insert(state, jnp.asarray([[7, 1, 2], [7, 3, 4]]), jnp.asarray([True, True]))
    state = state.replace(window=jnp.asarray([[[5, 6, 7], [8, 9, 1]]]))
    _, draft = p.propose(state, _ctx([[4, 4, 7, 0]], [3]), None)  # pending token 7
    # latest n-gram first: 3 4, then 1 2; then the window level by level
    assert draft.tokens[0].tolist() == [3, 4, 1, 2, 5, 6, 7, 8, 9, 1]
    assert draft.valid[0].tolist() == [True] * 4 + [False] * 6  # the window is never accepted
    assert draft.num.tolist() == [4 + 6]
    _, draft = p.propose(state, _ctx([[4, 4, 5, 0]], [3]), None)  # key 5 holds nothing
    assert draft.valid[0].tolist() == [False] * 10 and draft.num.tolist() == [6]  # the window still runs


def test_update_shifts_the_window_and_collects_ngrams_after_warmup():
    p = Lookahead(k=2, window=3, guesses=1, vocab=10)
    state = _empty(guesses=1).replace(window=jnp.asarray([[[1, 2, 3], [4, 5, 6]]]))
    top = np.zeros((1, p.template.size, 1), np.int32)
    top[0, 1 + 2 + 3: 1 + 2 + 6, 0] = [7, 8, 9]  # argmax at the top level's three nodes
    ctx = _ctx([[1, 2]], [2]).replace(verified=jnp.zeros((1, p.template.size), jnp.int32),
                                     verified_topk=jnp.asarray(top),
                                     verified_valid=jnp.ones((1, p.template.size), bool))
    new = p.update(state, ctx, jnp.asarray([1]))
    assert new.window[0].tolist() == [[4, 5, 6], [7, 8, 9]]
    # the window still held its random start (steps 0 < k - 1): no n-gram is kept yet
    assert (new.pool == -1).all() and new.steps == 1
    again = p.update(new, ctx, jnp.asarray([1]))  # columns (4, 7, new), (5, 8, new), (6, 9, new)
    assert again.pool[4, 0].tolist() == [7, 7] and again.pool[5, 0].tolist() == [8, 8]
    assert again.pool[6, 0].tolist() == [9, 9]
    idle = p.update(new, ctx.replace(verified_valid=jnp.zeros((1, p.template.size), bool)), jnp.asarray([1]))
    assert idle.window.tolist() == new.window.tolist() and (idle.pool == -1).all()  # a finished row stands still


LOOPY = [5, 6, 7, 8, 9, 10, 11, 12] * 4


def test_greedy_equals_ar_and_jacobi_ngrams_get_accepted(tiny_model):
    prompts = [LOOPY, [3, 9, 4, 4, 17, 2, 30], LOOPY[:13]]
    kw = dict(max_new_tokens=40, eos_token_ids=())
    ar = specjax.generate(tiny_model, prompts, "ar", **kw)
    opts = dict(k=2, window=6, guesses=3)
    out = specjax.generate(tiny_model, prompts, "lookahead", **opts, **kw)
    assert out.tokens == ar.tokens
    alone = specjax.generate(tiny_model, prompts[1:2], "lookahead", **opts, **kw)
    assert alone.tokens[0] == ar.tokens[1]
    assert out.stats["draft_k"] == 3 * 2 + 2 * 6
    # this random model's output barely repeats (suffix: 1.00 tokens per forward over 80 tokens), but
    # the Jacobi window guesses n-grams before the row reaches them (measured 1.25 at 80 tokens)
    copied = specjax.generate(tiny_model, prompts, "suffix", **kw)
    assert out.stats["mean_accepted_tokens"] > max(1.1, copied.stats["mean_accepted_tokens"] + 0.08)
    sampled = [specjax.generate(tiny_model, prompts[:1], "lookahead", max_new_tokens=12, eos_token_ids=(),
                                temperature=1.0, seed=s).tokens[0] for s in range(2)]
    assert sampled[0] != sampled[1] and all(len(s) == 12 for s in sampled)


def test_pool_carries_across_session_rounds(tiny_model):
    kw = dict(max_new_tokens=24, eos_token_ids=())
    first = specjax.generate(tiny_model, [LOOPY[:10]], "lookahead", keep_session=True, max_len=256, **kw)
    pool = np.asarray(first.session.proposer_state.pool)
    assert (pool >= 0).any()
    prompt = LOOPY[:10] + first.tokens[0] + [3, 4]
    second = specjax.generate(tiny_model, [prompt], "lookahead", session=first.session, **kw)
    assert second.tokens == specjax.generate(tiny_model, [prompt], "ar", **kw).tokens


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="window >= 1"):
        Lookahead(window=0)


@pytest.mark.real
def test_real_model_lookahead_equals_ar(real_model):
    prompts = ["List the numbers from 1 to 30, separated by commas.", "What is 2 + 2?"]
    ar = specjax.generate(real_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    out = specjax.generate(real_model, prompts, "lookahead", max_new_tokens=40, eos_token_ids=())
    assert out.tokens == ar.tokens
    assert out.stats["mean_accepted_tokens"] > 1.1
