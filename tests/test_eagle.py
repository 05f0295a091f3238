"""The EAGLE head: static tree templates, the training-time-test mask, drafting that matches the
training unroll token for token, lossless greedy/sampled decoding, sessions, and the hybrid on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_random_eagle_head

import specjax
from specjax.config import SamplingConfig
from specjax.drafting import Context, eagle_tree
from specjax.heads.eagle import EagleHead, draft_vocab, feature_layers, head_config, init_head, params_dtype, unroll
from specjax.heads.io import load_head, save_head
from specjax.models import transformer
from specjax.proposers.eagle import Eagle


@pytest.fixture(scope="module")
def head_dir(tiny_model, tmp_path_factory):
    return save_random_eagle_head(tiny_model, tmp_path_factory.mktemp("eagle_tiny"))


def test_template_is_breadth_first_within_budget():
    t = eagle_tree(total=8, depth=4, topk=2)
    assert t.size == 9 and t.max_depth == 4
    assert list(t.depth) == sorted(t.depth)  # each depth one contiguous range
    assert all(len(c) <= 2 for c in t.children)
    assert t.children[0] == (1, 2)  # the root's top-2
    ranks = t.ranks
    assert [ranks[c] for c in t.children[0]] == [0, 1]
    chain = eagle_tree(total=3, depth=3, topk=1)
    assert chain.parents == (-1, 0, 1, 2)
    with pytest.raises(ValueError, match="depth"):
        eagle_tree(total=3, depth=5, topk=2)
    with pytest.raises(ValueError, match="raise total"):
        eagle_tree(total=6, depth=6, topk=4)  # rank-1 children take the budget before depth 6


def _ttt_mask(anchors: jax.Array, length: int, steps: int) -> jax.Array:
    """The unroll's attention as one mask [B, T, T] over the whole unrolled sequence, T = length +
    (steps - 1) * P: tokens 0..length-1 are step 1 (causal); per step s >= 2 one token per anchor, which
    sees step-1 tokens up to its anchor and its own anchor's tokens of steps 2..s."""
    b, p = anchors.shape
    i = jnp.arange(length)
    base = jnp.broadcast_to(i[None, :, None] >= i[None, None, :], (b, length, length))
    rows = [jnp.concatenate([base, jnp.zeros((b, length, (steps - 1) * p), bool)], axis=-1)]
    eye = jnp.eye(p, dtype=bool)
    for s in range(2, steps + 1):
        hist = i[None, None, :] <= anchors[:, :, None]  # [B, P, length]
        own = [jnp.broadcast_to(eye if t <= s else jnp.zeros_like(eye), (b, p, p)) for t in range(2, steps + 1)]
        rows.append(jnp.concatenate([hist] + own, axis=-1))
    return jnp.concatenate(rows, axis=1)


def _unroll_whole(module, params, target_params, features, tokens, anchors, steps, lm_draft):
    """A reference unroll: every step re-runs the whole sequence with all earlier steps' tokens under
    `_ttt_mask` (no keys or values carried between steps)."""
    cfg = module.cfg
    b, length = tokens.shape
    run = lambda *a, **kw: module.apply({"params": params}, *a, **kw)
    emb_of = lambda t: transformer.embed(target_params, cfg, t).astype(params_dtype(params))
    take = lambda x, i: jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 2)), axis=1)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    embs, us = [emb_of(nxt)], [run(features, method=EagleHead.fuse)]
    positions = [jnp.broadcast_to(jnp.arange(length), (b, length))]
    inv = transformer.rope_inv_freq(cfg)
    logits, prev = [], None
    for s in range(1, steps + 1):
        if s > 1:
            embs.append(emb_of(take(tokens, jnp.clip(anchors + s, 0, length - 1))))
            us.append(prev)
            positions.append(anchors + s - 1)
        rope = transformer.rope_tables(jnp.concatenate(positions, axis=1), inv)
        g, _ = run(jnp.concatenate(embs, axis=1), jnp.concatenate(us, axis=1), rope, _ttt_mask(anchors, length, s))
        prev = take(g, anchors) if s == 1 else g[:, -anchors.shape[1]:]
        logits.append(run(prev, lm_draft, method=EagleHead.logits))
    return jnp.stack(logits)


def test_ttt_mask_worked_example():
    m = np.asarray(_ttt_mask(jnp.asarray([[1]]), 3, 2))[0]
    assert m.astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    m3 = np.asarray(_ttt_mask(jnp.asarray([[0, 2]]), 3, 3))[0]  # T = 3 + 2 * 2
    # step 3, anchor 2 (row 6): step-1 tokens 0..2, its step-2 token (col 4), itself (col 6)
    assert m3[6].astype(int).tolist() == [1, 1, 1, 0, 1, 0, 1]
    assert m3[5].astype(int).tolist() == [1, 0, 0, 0, 1, 0, 1][:3] + [1, 0, 1, 0]  # step 3, anchor 0


def test_the_unroll_over_step_one_keys_equals_the_whole_sequence_rerun(tiny_model):
    """Training's unroll runs only each step's nodes over step 1's keys and values; the logits and their
    gradients equal a reference that re-runs the whole sequence with every step under one mask."""
    cfg = tiny_model.config
    module = EagleHead(head_config(cfg))
    params = init_head(tiny_model, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    b, length, p, steps = 2, 24, 5, 4
    features = jnp.asarray(rng.standard_normal((b, length, len(feature_layers(cfg.num_layers)) * cfg.hidden_size)),
                           jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, length)), jnp.int32)
    anchors = jnp.asarray(np.sort(rng.choice(length - 2, (b, p)), axis=1), jnp.int32)
    target = {k: tiny_model.params[k] for k in ("lm_head", "embed") if k in tiny_model.params}
    lm_draft = tiny_model.params["lm_head"][:, :40]
    run = lambda fn, q: fn(module, q, target, features, tokens, anchors, steps, lm_draft)
    ours, ref = run(unroll, params), run(_unroll_whole, params)
    assert ours.shape == (steps, b, p, 40)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-4)
    loss = lambda fn: lambda q: jnp.mean(jax.nn.log_softmax(run(fn, q))[..., 3])
    grads = [jax.tree.leaves(jax.grad(loss(fn))(params)) for fn in (unroll, _unroll_whole)]
    for x, y in zip(*grads):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(y))))


def test_draft_vocab_takes_the_most_frequent_tokens():
    tokens = np.asarray([[5, 5, 5, 7, 7, 9, 0]])
    mask = np.asarray([[1, 1, 1, 1, 1, 1, 0]], bool)
    counts = np.bincount(tokens[mask], minlength=16)
    assert draft_vocab(counts, 2).tolist() == [5, 7]
    assert draft_vocab(counts, 5).tolist() == [0, 1, 5, 7, 9]  # topped up with the lowest unused ids


def _context(model, weights, prop, history, size=32):
    tokens = jnp.zeros((1, size), jnp.int32).at[0, : len(history)].set(jnp.asarray(history))
    out = transformer.forward(model.params, model.config, tokens, hidden_layers=prop.layers)
    return Context(tokens=tokens, lengths=jnp.asarray([len(history)]), group=jnp.zeros(1, jnp.int32),
                   active=jnp.ones(1, bool), weights=weights, features=jnp.concatenate(out.layer_hidden, -1),
                   feature_start=jnp.zeros(1, jnp.int32))


def test_rows_sharing_a_prompt_start_as_rows_that_absorb_it_each(tiny_model, head_dir):
    """Best-of-N: each prompt's pairs are absorbed once and copied to its rows (`Context.prompt_rows`),
    then each row its last pair with its own first token; the head's start equals every row absorbing
    its whole prompt, for prompts of two lengths and rows whose first tokens differ."""
    prop, w = Eagle(head=head_dir, topk=1, depth=3).bind(tiny_model, SamplingConfig())
    prompts, rows, first = [[5, 6, 7, 8, 9, 10, 5, 6], [11, 12, 13]], [0, 0, 0, 1, 1], [21, 22, 23, 24, 21]
    ctxs = [_context(tiny_model, w, prop, prompts[q] + [t]) for q, t in zip(rows, first)]
    pad = lambda xs: jnp.concatenate(xs, axis=0)
    ctx = ctxs[0].replace(tokens=pad([c.tokens for c in ctxs]), lengths=pad([c.lengths for c in ctxs]),
                          group=jnp.asarray(rows, jnp.int32), active=jnp.ones(len(rows), bool),
                          features=pad([c.features for c in ctxs]), feature_start=jnp.zeros(len(rows), jnp.int32))
    shared = ctx.replace(prompt_of=jnp.asarray(rows, jnp.int32), prompt_rows=jnp.asarray([0, 3], jnp.int32))
    each, once = jax.jit(prop.init)(ctx), jax.jit(prop.init)(shared)
    np.testing.assert_array_equal(once.cache.lengths, each.cache.lengths)
    np.testing.assert_array_equal(once.cache.lengths, [8, 8, 8, 3, 3])
    for b, n in enumerate(np.asarray(each.cache.lengths)):
        for mine, theirs in ((once.cache.k[0], each.cache.k[0]), (once.cache.v[0], each.cache.v[0])):
            np.testing.assert_allclose(np.asarray(mine)[b, :, :n], np.asarray(theirs)[b, :, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(once.last, each.last, rtol=1e-4, atol=1e-4)  # (one pass, or two: float order)
    assert not np.allclose(each.last[0], each.last[1])  # the rows' own first tokens reach the head
    drafts = [prop.propose(x, ctx, jax.random.PRNGKey(0))[1] for x in (once, each)]
    np.testing.assert_array_equal(drafts[0].tokens, drafts[1].tokens)


def test_hybrid_rows_carry_their_sources_confidence(tiny_model, head_dir):
    """For the adaptive loop's buckets a hybrid's head row carries the head's first-guess probability and
    its suffix row the match length (`confidence_kind` per source): with the match length alone every head
    row fell in one bucket, and the loop could not cut a head draft it was unsure of."""
    from specjax.proposers.hybrid import SOURCE_HEAD, SOURCE_SUFFIX, Hybrid

    hybrid, w = Hybrid(head_path=head_dir, head_min_prob=0.0, threshold=3).bind(tiny_model, SamplingConfig())
    eagle = hybrid.head_proposer
    assert hybrid.confidence_kind == ("count", "count", eagle.confidence_kind) == ("count", "count", "probability")
    fresh, repeat = [5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 10, 5, 6, 7, 8]
    ctx = _context(tiny_model, w, eagle, fresh)
    _, head_draft = eagle.propose(eagle.init(ctx), ctx, jax.random.PRNGKey(0))
    _, draft = hybrid.propose(hybrid.init(ctx), ctx, jax.random.PRNGKey(0))
    assert int(draft.source[0]) == SOURCE_HEAD
    np.testing.assert_allclose(draft.confidence, head_draft.confidence)
    assert 0.0 < float(draft.confidence[0]) <= 1.0
    ctx = _context(tiny_model, w, eagle, repeat)
    _, draft = hybrid.propose(hybrid.init(ctx), ctx, jax.random.PRNGKey(0))
    assert int(draft.source[0]) == SOURCE_SUFFIX and float(draft.confidence[0]) == 4.0  # 5 6 7 8 matched


@pytest.mark.parametrize("method", ["eagle", "hybrid"])
def test_best_of_n_branches_draft_as_prompts_of_their_own(tiny_model, head_dir, method):
    """End to end through `generate`: branches that share a prompt's start (`Context.prompt_rows`) emit
    and accept what the same prompts given once per row do, and sampled, plain sampling's tokens. (The
    tiny random head accepts alike even with a wrong start; the start itself is checked exactly by
    `test_rows_sharing_a_prompt_start_as_rows_that_absorb_it_each`.)"""
    head = {"head": head_dir} if method == "eagle" else {"head_path": head_dir, "head_min_prob": 0.0}
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 13]]
    kw = dict(max_new_tokens=24, eos_token_ids=(), adaptive=False, **head)
    shared = specjax.generate(tiny_model, prompts, method, num_samples=3, **kw)
    each = specjax.generate(tiny_model, [p for p in prompts for _ in range(3)], method, **kw)
    assert shared.tokens == each.tokens
    assert shared.stats["accepted_hist"] == each.stats["accepted_hist"]
    assert shared.stats["mean_accepted_tokens"] > 1.0
    sampled = dict(num_samples=3, max_new_tokens=16, eos_token_ids=(), temperature=0.8, seed=5)
    assert (specjax.generate(tiny_model, prompts, method, **head, **sampled).tokens
            == specjax.generate(tiny_model, prompts, "ar", **sampled).tokens)


def test_drafts_equal_the_training_unroll(tiny_model, head_dir):
    """What the head drafts through its cache at inference is exactly what training's unrolled
    training-time test predicts at that anchor: training and inference read the same pairs."""
    prop, w = Eagle(head=head_dir, topk=1, depth=3).bind(tiny_model, SamplingConfig())
    history = [5, 6, 7, 8, 9, 10, 5, 6, 7, 11]
    ctx = _context(tiny_model, w, prop, history)
    _, draft = prop.propose(prop.init(ctx), ctx, jax.random.PRNGKey(0))
    full = ctx.tokens.at[:, len(history) : len(history) + 3].set(draft.tokens)
    logits = unroll(EagleHead(head_config(tiny_model.config)), w["head"], w["target"], ctx.features, full,
                    jnp.asarray([[len(history) - 2]]), 3, w["lm_draft"])
    assert np.asarray(w["ids"][jnp.argmax(logits[:, 0, 0], -1)]).tolist() == np.asarray(draft.tokens[0]).tolist()
    # the tree's rank-0 path is the chain
    tree, wt = Eagle(head=head_dir, total=7, depth=3, topk=2).bind(tiny_model, SamplingConfig())
    _, tdraft = tree.propose(tree.init(ctx), ctx, jax.random.PRNGKey(0))
    t = tree.template
    node, path = 0, []
    for _ in range(3):
        node = t.children[node][0]
        path.append(int(tdraft.tokens[0, node - 1]))
    assert path == np.asarray(draft.tokens[0]).tolist()
    assert tdraft.valid.shape == (1, 7) and int(tdraft.num[0]) == 7


def test_a_dynamic_tree_keeps_the_likeliest_paths_the_expansion_scores(tiny_model, head_dir):
    """EAGLE-2's tree, against a reference built path by path from the head's distributions: each depth's
    `topk` likeliest nodes (the first-ranked chain always among them) are expanded by their `topk`
    likeliest children, and the draft keeps the first-ranked chain (nodes 1..depth) and then the likeliest
    of all scored paths, each under its own parent; on contexts where it differs from the static tree."""
    k, depth, total = 3, 4, 10
    dynamic, w = Eagle(head=head_dir, total=total, depth=depth, topk=k).bind(tiny_model, SamplingConfig())
    static, _ = Eagle(head=head_dir, total=total, depth=depth, topk=k, dynamic=False).bind(tiny_model,
                                                                                          SamplingConfig())
    chain, _ = Eagle(head=head_dir, depth=depth).bind(tiny_model, SamplingConfig())
    ids = np.asarray(w["ids"])
    differs = 0
    for history in ([5, 6, 7, 8, 9, 10, 5, 6, 7, 11], [3, 4], [30, 31, 32, 33, 34, 40, 41, 42, 43, 44, 45]):
        ctx = _context(tiny_model, w, dynamic, history)
        _, d = dynamic.propose(dynamic.init(ctx), ctx, jax.random.PRNGKey(0))
        _, c = chain.propose(chain.init(ctx), ctx, jax.random.PRNGKey(0))
        paths = _node_paths(np.asarray(d.parents[0]), np.asarray(d.tokens[0]))
        assert paths[:depth] == [tuple(np.asarray(c.tokens[0, :i + 1]).tolist()) for i in range(depth)]
        assert all(len(p) <= depth for p in paths) and len(set(paths)) == total
        # the reference expansion: path -> probability, depth by depth
        scored, beam = {}, [()]
        for level in range(1, depth + 1):
            found = {}
            for par in beam:
                nxt = _next_probs(dynamic, w, ctx, par)
                for i in np.argsort(-nxt, kind="stable")[:k]:
                    found[par + (int(ids[i]),)] = (scored[par] if par else 1.0) * float(nxt[i])
            scored.update(found)
            first = paths[level - 1]  # the chain's node at this depth, then the likeliest
            beam = [first] + sorted((p for p in found if p != first), key=lambda p: -found[p])[:k - 1]
        rest = paths[depth:]
        assert all(p in scored for p in rest)
        left = [scored[p] for p in scored if p not in paths]
        assert min(scored[p] for p in rest) >= max(left) - 1e-6, history
        _, st = static.propose(static.init(ctx), ctx, jax.random.PRNGKey(0))
        differs += int(paths != _node_paths(np.asarray(static.template.parents[1:]), np.asarray(st.tokens[0])))
    assert differs > 0  # the contexts exercise trees other than the static one


def _node_paths(parents: np.ndarray, tokens: np.ndarray) -> list[tuple[int, ...]]:
    """Each draft node's tokens from the root down (parents: tree nodes, 0 the pending token)."""
    paths = {0: ()}
    for node in range(1, len(tokens) + 1):  # a parent comes before its children in every tree here
        paths[node] = paths[int(parents[node - 1])] + (int(tokens[node - 1]),)
    return [paths[n] for n in range(1, len(tokens) + 1)]


def _next_probs(prop: Eagle, w, ctx: Context, path: tuple[int, ...]) -> np.ndarray:
    """The head's next-token distribution over the draft vocabulary after drafting `path` from ctx (fed
    as a chain: each token paired with the head's output at the token before)."""
    from specjax.heads.eagle import EagleHead

    state = prop.init(ctx)
    out = state.last[:, None]
    if path:
        cache = state.cache.with_lengths(ctx.lengths - 1)
        u = state.last[:, None]
        for i in range(len(path)):
            g, _ = prop._step(w, cache, jnp.asarray([path[: i + 1]]), u, jnp.arange(i + 1), None, state.skipped,
                              write=False)
            u = jnp.concatenate([state.last[:, None], g], axis=1)
        out = g[:, -1:]
    return np.asarray(jax.nn.softmax(prop._run(w, EagleHead.logits, out, w["lm_draft"])[0, 0]))


@pytest.mark.parametrize("opts", [{}, {"topk": 1, "depth": 4}, {"topk": 1, "depth": 3, "min_prob": 0.2},
                                  {"total": 10, "depth": 3, "topk": 3},
                                  {"total": 10, "depth": 3, "topk": 3, "dynamic": False},
                                  {"total": 10, "depth": 3, "topk": 3, "adaptive": True},
                                  {"total": 3, "depth": 1, "topk": 4}, {"total": 4, "depth": 4, "topk": 2}])
def test_greedy_eagle_equals_ar_mixed_batch(tiny_model, head_dir, opts):
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 20, 21]]
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=40)
    out = specjax.generate(tiny_model, prompts, "eagle", head=head_dir, max_new_tokens=40, **opts)
    assert out.tokens == ar.tokens
    assert out.stats["target_forwards"] <= ar.stats["target_forwards"]
    sampled = specjax.generate(tiny_model, prompts, "eagle", head=head_dir, max_new_tokens=20, temperature=0.8,
                               seed=3, **opts)
    again = specjax.generate(tiny_model, prompts, "eagle", head=head_dir, max_new_tokens=20, temperature=0.8,
                             seed=3, **opts)
    assert sampled.tokens == again.tokens and all(len(t) > 0 for t in sampled.tokens)
    # drafts are judged by the target's own draw at each position: plain sampling's tokens, exactly
    assert sampled.tokens == specjax.generate(tiny_model, prompts, "ar", max_new_tokens=20, temperature=0.8,
                                              seed=3).tokens


def test_start_proposer_donates_only_what_the_loop_state_reuses(tiny_model, head_dir, monkeypatch):
    """Every buffer `start_proposer` donates has an output of its shape to live on in. The prefill's
    features, which only `init` reads, are not donated: on the default model XLA warned on every first
    EAGLE call that it could not reuse them."""
    from collections import Counter

    from specjax import engine, programs

    seen = []
    real_call = programs.call

    def spy(fn, args, static):
        if fn is engine.start_proposer:
            seen.append(fn.lower(*args, **static))
        return real_call(fn, args, static)

    monkeypatch.setattr(programs, "call", spy)
    out = specjax.generate(tiny_model, [[5, 6, 7, 8, 9]], "eagle", head=head_dir, max_new_tokens=7)
    assert len(out.tokens[0]) > 0 and len(seen) == 1
    donated = Counter((a.shape, a.dtype) for a in jax.tree.leaves(seen[0].args_info) if a.donated)
    outputs = Counter((o.shape, o.dtype) for o in jax.tree.leaves(seen[0].out_info))
    assert donated and not donated - outputs


def test_eagle_session_continues_like_a_fresh_call(tiny_model, head_dir):
    """Round 2 through a Session (head cache reused for the shared prefix) equals a fresh call."""
    first = specjax.generate(tiny_model, [[5, 6, 7, 8], [9, 10]], "eagle", head=head_dir, max_new_tokens=12,
                             keep_session=True, eos_token_ids=())
    follow = [[5, 6, 7, 8] + first.tokens[0] + [30, 31], [9, 10] + first.tokens[1] + [32]]
    cont = specjax.generate(tiny_model, follow, "eagle", head=head_dir, max_new_tokens=16, session=first.session,
                            eos_token_ids=())
    fresh = specjax.generate(tiny_model, follow, "eagle", head=head_dir, max_new_tokens=16, eos_token_ids=(),
                             max_len=first.session.cache.max_len)
    assert cont.tokens == fresh.tokens
    assert cont.stats["reused_prefix_tokens"] > 0
    assert cont.stats["mean_accepted_tokens"] == pytest.approx(fresh.stats["mean_accepted_tokens"])


def _price_proposals_at_a_step(monkeypatch, cheap_s: float = 0.0, wake_s: float = 0.0) -> None:
    """Calibrated costs where proposing costs a whole 1-token step: drafts rarely pay, the loop backs off.
    `cheap_s`: the seconds of a proposer's cheap part (the hybrid's suffix match) alone; `wake_s`: of the
    catch-up a proposal after a wait runs first."""
    from specjax import adaptive, engine

    def costs(model, plan, proposer, *rest):
        widths = adaptive.loop_widths(proposer)
        return (np.asarray([1.0 + 0.125 * (w - 1) for w in widths], np.float32) * 1e-3, np.float32(1e-3),
                np.float32(cheap_s), np.float32(wake_s), 0.0)

    monkeypatch.setattr(engine, "step_costs", costs)


def test_probes_and_waits_are_priced_with_the_catch_up_after_a_wait(tiny_model, head_dir, monkeypatch, tmp_path):
    """A lazy head's proposal after a wait first absorbs its lag (`Proposer.waking`): the calibration times
    that (an n-gram lookup has none), and a dearer catch-up spaces probes and waits further apart."""
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    kw = dict(max_new_tokens=8, adaptive=True, max_len=384)
    assert specjax.generate(tiny_model, [[5, 6, 7]], "eagle", head=head_dir, **kw).stats["wake_s"] > 0
    assert ":wake" in (tmp_path / "step_costs.json").read_text()
    assert specjax.generate(tiny_model, [[5, 6, 7]], "pld", **kw).stats["wake_s"] == 0
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 13]]
    kw = dict(max_new_tokens=200, eos_token_ids=(), adaptive=True, head=head_dir)
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=200, eos_token_ids=())
    shares = []
    for wake_s in (0.0, 1e-2):
        _price_proposals_at_a_step(monkeypatch, wake_s=wake_s)
        monkeypatch.setenv("SPECJAX_ADAPTIVE_MEMORY", "0")
        out = specjax.generate(tiny_model, prompts, "eagle", **kw)
        assert out.tokens == ar.tokens
        shares.append(out.stats["drafted_share"])
    assert 0 < shares[1] < 0.7 * shares[0], shares


@pytest.mark.parametrize("method", ["eagle", "hybrid"])
def test_a_lazy_head_drafts_as_one_that_absorbs_every_step(tiny_model, head_dir, monkeypatch, method):
    """While an adaptive loop backs off, the head puts off absorbing accepted tokens (lag buffer, one
    forward before the next proposal or, with `forget=False`, when the buffer is full): it must draft
    exactly as a head that absorbed every step (same widths, acceptance, tokens), and its cache, caught
    up, must equal that one's.
    The hybrid's steps carry 17 positions of features into a 20-position buffer, and its suffix match
    drafts on steps that skip the head: a step whose features do not fit behind the lag absorbs it first."""
    _price_proposals_at_a_step(monkeypatch)
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 13]]
    # the hybrid at threshold 1: its suffix match drafts on most steps, also those that skip the head
    head = {"head": head_dir} if method == "eagle" else {"head_path": head_dir, "head_min_prob": 0.0, "threshold": 1}
    lazy, eager = (specjax.generate(tiny_model, prompts, method, **head, max_new_tokens=60, eos_token_ids=(),
                                    adaptive=True, keep_session=True, lazy=flag, forget=False)
                   for flag in (True, False))
    assert lazy.tokens == eager.tokens
    for key in ("width_hist", "accepted_hist", "drafted_share", "predicted_tokens"):
        assert lazy.stats[key] == eager.stats[key], key
    assert 0 < lazy.stats["drafted_share"] < 0.3  # it backed off for long stretches, and proposed in between
    proposer, ctx = lazy.session.proposer, lazy.session.context
    mine, other = lazy.session.proposer_state, eager.session.proposer_state
    if method == "hybrid":  # (suffix state, head state)
        proposer, mine, other = proposer.head_proposer, mine[1], other[1]
    caught_up = proposer.catch_up(mine, ctx)
    np.testing.assert_array_equal(caught_up.cache.lengths, other.cache.lengths)
    for b, n in enumerate(np.asarray(other.cache.lengths)):
        for mine, theirs in ((caught_up.cache.k[0], other.cache.k[0]), (caught_up.cache.v[0], other.cache.v[0])):
            np.testing.assert_allclose(np.asarray(mine)[b, :, :n], np.asarray(theirs)[b, :, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(caught_up.last, other.last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["eagle", "hybrid"])
def test_a_long_wait_is_skipped_and_masked_not_absorbed(tiny_model, head_dir, monkeypatch, method):
    """A wait longer than the lag buffer skips its oldest positions (`forget`, the default) instead of
    absorbing them: greedy output stays `ar`'s, the head's cache marks those slots, and its drafts do not
    depend on what they hold, where a slot it did absorb changes them."""
    _price_proposals_at_a_step(monkeypatch)
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 13]]
    head = {"head": head_dir} if method == "eagle" else {"head_path": head_dir, "head_min_prob": 0.0, "threshold": 1}
    kw = dict(max_new_tokens=60, eos_token_ids=())
    ar = specjax.generate(tiny_model, prompts, "ar", **kw)
    out = specjax.generate(tiny_model, prompts, method, **head, **kw, adaptive=True, keep_session=True)
    assert out.tokens == ar.tokens
    assert 0 < out.stats["drafted_share"] < 0.3  # long waits, and proposals in between
    proposer, ctx, state = out.session.proposer, out.session.context, out.session.proposer_state
    if method == "hybrid":
        proposer, state = proposer.head_proposer, state[1]
    state = proposer.catch_up(state, ctx)
    skipped = np.asarray(state.skipped)
    assert skipped.any()
    lengths = np.asarray(state.cache.lengths)
    assert not skipped[np.arange(skipped.shape[1])[None] >= lengths[:, None]].any()  # only absorbed-past slots
    rng = jax.random.PRNGKey(0)
    pending = jnp.take_along_axis(jnp.asarray(ctx.tokens), jnp.asarray(lengths)[:, None], axis=1)

    def drafted(cache_k):  # the drafts, and the head's output for one more pair at the cache's end
        cache = state.cache.replace(k=(jnp.asarray(cache_k),))
        draft = proposer.propose(state.replace(cache=cache), ctx, rng)[1]
        out, _ = proposer._step(ctx.weights, cache, pending, state.last[:, None], jnp.arange(1), skipped=state.skipped)
        return draft, np.asarray(out)

    k = np.asarray(state.cache.k[0])
    base, base_out = drafted(k)
    noise = np.random.default_rng(0).normal(0, 30, k.shape).astype(k.dtype)
    b = int(np.argwhere(skipped)[0][0])
    garbage = k.copy()
    garbage[b, :, skipped[b]] = noise[b, :, skipped[b]]
    same, same_out = drafted(garbage)
    np.testing.assert_array_equal(same.tokens, base.tokens)
    np.testing.assert_allclose(same.confidence, base.confidence, rtol=1e-6)
    np.testing.assert_allclose(same_out, base_out, rtol=1e-5, atol=1e-6)
    seen = np.flatnonzero(~skipped[b, : lengths[b]])[0]  # an absorbed slot: the head attends to it
    changed = k.copy()
    changed[b, :, seen] = noise[b, :, seen]
    assert not np.allclose(drafted(changed)[1][b], base_out[b], rtol=1e-3, atol=1e-4)


def test_a_hybrid_backing_off_from_its_head_still_copies_every_step(tiny_model, head_dir, monkeypatch):
    """The hybrid's suffix match costs next to nothing (`cheap_part`): while the adaptive loop backs off
    from its head (priced here at a whole step), the suffix match still drafts on the steps in between,
    through the same width decision, and the head drafts only on steps that run the whole proposal.
    Greedy output stays `ar`'s."""
    _price_proposals_at_a_step(monkeypatch)
    prompts = [[5, 6, 7, 8, 9, 10] * 3, [11, 12, 13, 14] * 2]
    kw = dict(max_new_tokens=60, eos_token_ids=())
    ar = specjax.generate(tiny_model, prompts, "ar", **kw)
    out = specjax.generate(tiny_model, prompts, "hybrid", head_path=head_dir, head_min_prob=0.0, threshold=1,
                           adaptive=True, **kw)  # threshold 1: the random model's text matches often
    assert out.tokens == ar.tokens
    steps = out.stats["decode_steps"]
    whole = round(out.stats["drafted_share"] * steps)  # steps that ran the head too
    none, suffix, head = out.stats["proposer_steps"][:3]
    assert whole < 0.3 * steps
    assert suffix > 2 * whole  # 2 rows: the suffix match drafted on steps that did not run the whole proposal
    assert head <= 2 * whole


def test_a_hybrid_whose_suffix_match_costs_over_2pct_of_a_step_backs_off_from_it_too(tiny_model, head_dir,
                                                                                    monkeypatch):
    """The cheap part proposes on every step only while its calibrated seconds stay under 2% of a step;
    a dearer one backs off with the head: its drafts come only on the steps that run the whole
    proposal. Greedy output stays `ar`'s."""
    prompts = [[5, 6, 7, 8, 9, 10] * 3, [11, 12, 13, 14] * 2]
    kw = dict(max_new_tokens=60, eos_token_ids=())
    ar = specjax.generate(tiny_model, prompts, "ar", **kw)
    counts = {}
    for cheap_s in (1e-5, 1e-4):  # 1% and 10% of a 1-token step
        _price_proposals_at_a_step(monkeypatch, cheap_s)
        out = specjax.generate(tiny_model, prompts, "hybrid", head_path=head_dir, head_min_prob=0.0, threshold=1,
                               adaptive=True, **kw)
        assert out.tokens == ar.tokens
        assert out.stats["cheap_part_s"] == pytest.approx(cheap_s)
        whole = round(out.stats["drafted_share"] * out.stats["decode_steps"])  # steps that ran the head too
        counts[cheap_s] = (whole, out.stats["proposer_steps"][1])  # (whole proposals, suffix-drafted row-steps)
    (whole_cheap, suffix_cheap), (whole_dear, suffix_dear) = counts[1e-5], counts[1e-4]
    assert suffix_cheap > 2 * whole_cheap  # under 2%: the suffix match drafts between the head's proposals
    assert suffix_dear <= 2 * whole_dear < suffix_cheap  # over 2%: only when the whole proposal runs


def test_hybrid_on_an_eagle_head(tiny_model, head_dir):
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6], [11, 12, 13]]
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=40)
    out = specjax.generate(tiny_model, prompts, "hybrid", head_path=head_dir, head_min_prob=0.0, max_new_tokens=40)
    assert out.tokens == ar.tokens
    assert out.stats["proposer_steps"][2] > 0  # the eagle half drafted
    sampled = specjax.generate(tiny_model, prompts, "hybrid", head="eagle", head_path=head_dir, max_new_tokens=16,
                               temperature=0.7)
    assert all(len(t) > 0 for t in sampled.tokens)


def test_eagle_errors_name_the_fix(tiny_model, head_dir, tmp_path):
    with pytest.raises(ValueError, match="train one with"):
        specjax.generate(tiny_model, [[1, 2]], "eagle", head=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a 'eagle' one"):
        medusa_dir = tmp_path / "m"
        save_head(medusa_dir, {"kind": "medusa", "num_heads": 1, "hidden_size": 64, "vocab_size": 64}, {})
        specjax.generate(tiny_model, [[1, 2]], "eagle", head=str(medusa_dir))
    with pytest.raises(ValueError, match="depth"):
        specjax.generate(tiny_model, [[1, 2]], "eagle", head=head_dir, total=2, depth=4, topk=2)


def test_a_head_saved_again_at_the_same_path_is_read_again(tiny_model, tmp_path):
    """generate() binds a proposer once per (model, options); a head re-saved in the same folder (a
    training run's periodic evaluations, a user retraining) must be read again, not served stale."""
    from specjax.plan import bind_proposer

    folder = save_random_eagle_head(tiny_model, tmp_path / "head")
    _, first = bind_proposer(tiny_model, "eagle", SamplingConfig(), head=folder)
    _, again = bind_proposer(tiny_model, "eagle", SamplingConfig(), head=folder)
    assert again is first  # unchanged files: the bound weights are reused
    config, params = load_head(folder, kind="eagle")
    params = jax.tree.map(lambda x: x if x.dtype.kind == "i" else x * 0.5, params)
    save_head(folder, config, params, dtype="float32")
    _, fresh = bind_proposer(tiny_model, "eagle", SamplingConfig(), head=folder)
    old, new = jax.tree.leaves(first["head"]), jax.tree.leaves(fresh["head"])
    assert any(not np.allclose(a, b) for a, b in zip(old, new))
    np.testing.assert_allclose(new[0], np.asarray(old[0]) * 0.5, rtol=1e-6)
