"""Token Recycling: the tree, the adjacency refresh from verify logits, drafting on crafted matrices,
and losslessness in the loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import specjax
from specjax.drafting import Context, branching_tree
from specjax.proposers.recycling import Adjacency, TokenRecycling, refresh


def _ctx(tokens, lengths):
    tokens = jnp.asarray(tokens, jnp.int32)
    b = tokens.shape[0]
    return Context(tokens=tokens, lengths=jnp.asarray(lengths, jnp.int32), group=jnp.arange(b),
                   active=jnp.ones((b,), bool))


def test_branching_tree_breadth_first():
    template = branching_tree((2, 2), depth=3)
    rank = template.ranks
    # root; depth 1: nodes 1, 2; depth 2: 3, 4 under 1 and 5, 6 under 2; depth 3: one child each
    assert template.parents == (-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6)
    assert rank.tolist() == [0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0]
    assert template.max_depth == 3


def test_refresh_writes_valid_positions_only():
    adj = Adjacency(succ=jnp.full((10, 2), -1, jnp.int32))
    fed = jnp.asarray([[3, 5, 7]])
    top = jnp.asarray([[[1, 2], [4, 6], [8, 9]]])
    out = refresh(adj, fed, top, jnp.asarray([[True, False, True]]))
    assert out.succ[3].tolist() == [1, 2] and out.succ[7].tolist() == [8, 9]
    assert out.succ[5].tolist() == [-1, -1]  # a padded / rejected-row position leaves its token alone


def test_init_seeds_prompt_bigrams_and_propose_expands_the_tree():
    p = TokenRecycling(k=2, branching=(2,), top=2, vocab=10)
    state = p.init(_ctx([[1, 2, 3, 2, 0]], [4]))
    succ = np.asarray(state.succ)
    assert succ[1, 0] == 2 and succ[2, 0] == 3 and succ[3, 0] == 2  # the pending token's pair is not seeded
    assert (succ[[0, 4, 5]] == -1).all()
    # pending token 2: children succ[2] = [3, -1] -> node 1 = 3 (valid), node 2 missing; depth 2 chains
    state = Adjacency(succ=state.succ.at[3].set(jnp.asarray([4, 5])))
    _, draft = p.propose(state, _ctx([[1, 2, 3, 2, 0]], [4]), None)
    assert p.template.parents == (-1, 0, 0, 1, 2)
    assert draft.tokens[0].tolist()[:1] == [3] and draft.valid[0].tolist() == [True, False, True, False]
    assert draft.tokens[0, 2] == 4 and draft.num.tolist() == [2]


def test_update_reads_the_verify_topk():
    p = TokenRecycling(k=1, branching=(2,), top=2, vocab=8)
    state = Adjacency(succ=jnp.full((8, 2), -1, jnp.int32))
    ctx = _ctx([[1, 2]], [2]).replace(verified=jnp.asarray([[2, 6]]), verified_topk=jnp.asarray([[[5, 3], [1, 0]]]),
                                     verified_valid=jnp.asarray([[True, True]]))
    state = p.update(state, ctx, jnp.asarray([1]))
    assert state.succ[2].tolist() == [5, 3] and state.succ[6].tolist() == [1, 0]


def test_greedy_equals_ar_and_drafts_get_accepted(tiny_model):
    loopy = [5, 6, 7, 8, 9, 10, 11, 12] * 4
    prompts = [loopy, [3, 9, 4, 4, 17, 2, 30], loopy[:13]]
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    out = specjax.generate(tiny_model, prompts, "recycling", max_new_tokens=40, eos_token_ids=(), k=4,
                           branching=(3, 2), top=3)
    assert out.tokens == ar.tokens
    # this random model's output barely repeats (suffix matching: 1.01 tokens per forward), but its own
    # top candidates after a token, recycled from earlier forwards, do get accepted (1.22 measured)
    copied = specjax.generate(tiny_model, prompts, "suffix", max_new_tokens=40, eos_token_ids=(), k=4)
    assert out.stats["mean_accepted_tokens"] > max(1.15, copied.stats["mean_accepted_tokens"] + 0.1)
    sampled = [specjax.generate(tiny_model, prompts[:1], m, max_new_tokens=12, eos_token_ids=(), temperature=1.0,
                                seed=s).tokens[0] for m in ("recycling",) for s in range(2)]
    assert sampled[0] != sampled[1]  # sampling runs through the tree verifier and is seeded
