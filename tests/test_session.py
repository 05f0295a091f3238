"""Continuing a Session: the next round reuses the shared prefix's cache and the drafter's store."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.drafting import Context
from specjax.proposers.ngram import NGramPool, SuffixMatch

LOOPY = [5, 6, 7, 8, 9, 10, 11, 12] * 3


def _round2(prompt, first_tokens):
    """A next-round prompt: the previous prompt, then its answer, then new text."""
    return prompt + first_tokens + [40, 41, 42]


@pytest.mark.parametrize("method", ["ar", "suffix", "pool", "pld"])
def test_continued_round_equals_fresh_call(tiny_model, method):
    rng = np.random.default_rng(1)
    prompts = [LOOPY, rng.integers(3, 64, size=13).tolist()]
    kw = dict(max_new_tokens=24, eos_token_ids=(), max_len=192)
    opts = {} if method == "ar" else {"k": 4}
    r1 = specjax.generate(tiny_model, prompts, method, keep_session=True, **kw, **opts)
    assert r1.session is not None and r1.session.batch == 2
    nxt = [_round2(p, t) for p, t in zip(prompts, r1.tokens)]
    fresh = specjax.generate(tiny_model, nxt, "ar", **kw)
    cont = specjax.generate(tiny_model, nxt, method, session=r1.session, **kw, **opts)
    assert cont.tokens == fresh.tokens
    # only what is new was prefilled: each row's whole round-1 history (its last token excepted) is cached
    assert cont.stats["reused_prefix_tokens"] == sum(len(p) + len(t) - 1 for p, t in zip(prompts, r1.tokens))


def test_session_prefix_is_only_the_shared_part(tiny_model):
    kw = dict(max_new_tokens=8, eos_token_ids=(), max_len=128)
    r1 = specjax.generate(tiny_model, [[3, 4, 5, 6, 7, 8]], "ar", keep_session=True, **kw)
    other = [3, 4, 5, 60, 61, 62, 63]  # shares 3 tokens with the history
    cont = specjax.generate(tiny_model, [other], "ar", session=r1.session, **kw)
    assert cont.stats["reused_prefix_tokens"] == 3
    assert cont.tokens == specjax.generate(tiny_model, [other], "ar", **kw).tokens


def test_session_misuse_is_rejected(tiny_model):
    r1 = specjax.generate(tiny_model, [[3, 4, 5]], "ar", max_new_tokens=4, keep_session=True, max_len=64)
    with pytest.raises(ValueError, match="one per row"):
        specjax.generate(tiny_model, [[3, 4], [5, 6]], "ar", max_new_tokens=4, session=r1.session)
    with pytest.raises(ValueError, match="num_samples=1"):
        specjax.generate(tiny_model, [[3, 4]], "ar", max_new_tokens=4, session=r1.session, num_samples=2)
    with pytest.raises(ValueError, match="max_len=128 differs"):
        specjax.generate(tiny_model, [[3, 4]], "ar", max_new_tokens=4, session=r1.session, max_len=128)


def _ctx(rows):
    width = max(len(r) for r in rows) + 4
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    n = len(rows)
    return Context(tokens=jnp.asarray(tokens), lengths=jnp.asarray([len(r) for r in rows], jnp.int32),
                   group=jnp.arange(n, dtype=jnp.int32), active=jnp.ones((n,), bool))


def test_suffix_store_persists_across_rounds():
    prop = SuffixMatch(k=4, min_match=2, store_size=32, spec_factor=0.0)
    round1 = _ctx([[20, 21, 22, 23, 24, 25, 26]])
    round2 = _ctx([[30, 31, 20, 21]])  # the history alone has no earlier "20 21"
    fresh = prop.init(round2)
    assert int(prop.propose(fresh, round2, None)[1].num[0]) == 0
    state = prop.resume(fresh, round2, prop.init(round1), round1)
    draft = prop.propose(state, round2, None)[1]
    assert draft.tokens[0, : int(draft.num[0])].tolist() == [22, 23, 24, 25]
    # a third round still sees round 1 through the store, which holds the rounds one after another
    round3 = _ctx([[50, 24, 25]])
    state3 = prop.resume(prop.init(round3), round3, state, round2)
    draft3 = prop.propose(state3, round3, None)[1]
    assert draft3.tokens[0, : int(draft3.num[0])].tolist() == [26, 30, 31, 20]


def test_pool_keeps_earlier_rounds_entries_new_ones_win():
    prop = NGramPool(k=3, ngram=2, table_size=64)
    round1 = _ctx([[20, 21, 22, 23, 24, 30, 31, 9]])
    round2 = _ctx([[30, 31, 7, 8, 20, 21]])
    state = prop.resume(prop.init(round2), round2, prop.init(round1), round1)
    draft = prop.propose(state, round2, None)[1]
    assert draft.tokens[0, : int(draft.num[0])].tolist() == [22, 23, 24]  # only round 1 knows "20 21"
    query = _ctx([[30, 31]])
    entry = prop.propose(state, query, None)[1]
    assert entry.tokens[0, : int(entry.num[0])].tolist() == [7, 8, 20]  # round 2's own entry wins over round 1's
