"""Verification: exact greedy outcomes, logits processing, and losslessness of speculative sampling.

The losslessness tests use a toy target whose distribution depends only on the position (not on the
prefix), so the exact law of the emitted tokens is a product of processed target distributions. Each
test also runs a deliberately wrong verifier (resampling from p instead of the residual) and checks the
same chi-square test rejects it, so a pass means something.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from specjax import verify
from specjax.config import SamplingConfig
from specjax.drafting import Draft, TreeTemplate, branching_tree
from specjax.sampling import argmax, categorical, probs, process_logits, sample
from specjax.verify import verify_chain, verify_tree

V, K, N = 5, 3, 40_000
CFGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=4, top_p=0.9)]
TARGET = np.random.default_rng(0).normal(size=(K + 2, V)).astype(np.float32) * 1.5  # per position
DRAFT_LOGITS = np.random.default_rng(1).normal(size=(K + 1, V)).astype(np.float32) * 1.5
ONEHOT_DRAFT = np.array([1, 3, 0, 2], np.int32)  # per position
PROBS = jax.jit(probs, static_argnums=1)  # jitted helpers: one compile beats op-by-op dispatch
PROCESS = jax.jit(process_logits, static_argnums=1)
SAMPLE = jax.jit(sample, static_argnums=2)
TREE_JIT = jax.jit(verify_tree, static_argnums=(3, 4))


def _pvalue(samples: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square p-value of samples against a distribution; 0 if any sample lies outside its support."""
    counts = np.bincount(np.asarray(samples), minlength=expected.size)
    support = expected > 0
    if counts[~support].any():
        return 0.0
    exp = expected[support] / expected[support].sum() * counts.sum()
    return chisquare(counts[support], exp).pvalue


def _skew_target_draws(monkeypatch) -> None:
    """A wrong verifier for the tests' power: the target's draws favour low token ids (u squared)."""
    honest = verify.inverse_cdf
    monkeypatch.setattr(verify, "inverse_cdf", lambda w, u: honest(w, u * u))


def _check(first, second, cfg, wrong: bool) -> None:
    p = np.asarray(PROBS(TARGET, cfg), np.float64)
    p_first = _pvalue(first, p[0])
    p_joint = _pvalue(np.asarray(first) * V + np.asarray(second), np.outer(p[0], p[1]).ravel())
    if wrong:
        assert min(p_first, p_joint) < 1e-6, (p_first, p_joint)
    else:
        assert min(p_first, p_joint) > 1e-3, (p_first, p_joint)


# ---------------------------------------------------------------- sampling


def test_temperature_scales_logits():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7))
    np.testing.assert_allclose(
        PROCESS(x, SamplingConfig(temperature=0.5)), jax.nn.log_softmax(x / 0.5), rtol=1e-5, atol=1e-6
    )


def test_processing_is_static_and_never_sorts():
    """Inactive processors add nothing to the program; none sorts V (slow on CPU at V ~ 49k)."""
    x = jnp.zeros((2, 11))
    jaxpr = lambda cfg: str(jax.make_jaxpr(lambda x: process_logits(x, cfg))(x))
    plain = jaxpr(SamplingConfig(0.7))
    assert not any(f" {op}[" in plain for op in ("sort", "top_k", "while", "cumsum"))
    for cfg in [SamplingConfig(0.7, top_k=3), SamplingConfig(0.7, top_p=0.9), SamplingConfig(0.7, 3, 0.9)]:
        assert " sort[" not in jaxpr(cfg)
    assert " top_k[" in jaxpr(SamplingConfig(0.7, top_k=3))  # the check above can see primitives


def _nucleus_reference(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Keep-mask by sorting, in float64."""
    keep = np.zeros(x.shape, bool)
    for row, r in enumerate(x):
        order = np.argsort(-r)[: top_k or None]
        p = np.exp(r[order] - r[order].max())
        p /= p.sum()
        keep[row, order[: np.sum(np.cumsum(p) - p < top_p)]] = True
    return keep


@pytest.mark.parametrize("top_k", [0, 40])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_matches_sorting_reference(top_k, top_p):
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(3), (6, 1000))  # mixed signs: exercises the uint32 keys
    out = PROCESS(x, SamplingConfig(1.0, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), _nucleus_reference(np.asarray(x), top_k, top_p))


def test_top_k_keeps_exactly_k():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 10))
    out = np.asarray(PROCESS(x, SamplingConfig(temperature=1.0, top_k=3)))
    kept = np.isfinite(out)
    assert (kept.sum(-1) == 3).all()
    top3 = np.argsort(-np.asarray(x), axis=-1)[:, :3]
    assert all(set(np.flatnonzero(kept[b])) == set(top3[b]) for b in range(4))
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [(0, 0.4, 1), (0, 0.7, 2), (0, 0.83, 3), (0, 0.99, 4), (3, 0.83, 2)],  # last: top-p after top-k
)
def test_top_p_keeps_minimal_nucleus(top_k, top_p, kept):
    p = np.array([0.15, 0.5, 0.05, 0.3])
    out = np.exp(np.asarray(PROCESS(jnp.log(jnp.asarray(p)), SamplingConfig(1.0, top_k, top_p))))
    order = np.argsort(-p)
    np.testing.assert_array_equal(out[order[kept:]], 0.0)
    np.testing.assert_allclose(out[order[:kept]], p[order[:kept]] / p[order[:kept]].sum(), rtol=1e-5)


def test_sample_greedy_and_top1_are_argmax():
    x = jax.random.normal(jax.random.PRNGKey(2), (6, 9))
    best = np.argmax(np.asarray(x), -1)
    np.testing.assert_array_equal(SAMPLE(jax.random.PRNGKey(0), x, SamplingConfig()), best)
    np.testing.assert_array_equal(SAMPLE(jax.random.PRNGKey(0), x, SamplingConfig(1.0, top_k=1)), best)


# ---------------------------------------------------------------- greedy chain


def test_argmax_and_categorical_match_jax():
    """The two-reduction argmax keeps jnp.argmax's ties (first index) and all -inf rows (index 0), and
    `categorical` makes exactly jax.random.categorical's draws from the same key."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 300))
    x = x.at[0, 0, 7].set(9.0).at[0, 0, 200].set(9.0).at[1, 1].set(-jnp.inf)
    np.testing.assert_array_equal(argmax(x), jnp.argmax(x, axis=-1))
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(categorical(key, x[2]), jax.random.categorical(key, x[2]))


@pytest.mark.parametrize("vocab", [5, 300, 1000])  # one block, a ragged last block, several
def test_inverse_cdf_draws_from_the_weights_and_never_a_zero_one(vocab):
    rng = np.random.default_rng(vocab)
    w = rng.random(vocab) * (rng.random(vocab) < 0.5)  # half the tokens weightless
    w[-1] = 0.0  # the last one too: rounding at u ~ 1 must not land on it
    u = jnp.asarray(np.concatenate([rng.random(20_000), [0.0, 1.0 - 2 ** -24]]), jnp.float32)
    draws = np.asarray(verify.inverse_cdf(jnp.broadcast_to(jnp.asarray(w, jnp.float32), (u.size, vocab)), u))
    assert (w[draws] > 0).all()
    assert _pvalue(draws[:-2], w / w.sum()) > 1e-3
    np.testing.assert_array_equal(draws[-2], np.flatnonzero(w)[0])  # u = 0: the first token with weight


def test_a_positions_draws_do_not_depend_on_the_step_that_reaches_it():
    """With position keys, the token drawn at position s + 2 after two accepted drafts is the token a
    1-token step starting at s + 2 draws from the same logits (and a chain's and a tree's agree)."""
    b = 5
    logits = jax.random.normal(jax.random.PRNGKey(1), (b, 3, 6))
    drafts = jnp.tile(jnp.asarray([[1, 4]]), (b, 1))
    sure = logits.at[:, 0, 1].set(60.0).at[:, 1, 4].set(60.0)  # p(draft) ~ 1: both accepted
    starts = jnp.arange(b, dtype=jnp.int32) * 7
    base, cfg = jax.random.PRNGKey(3), SamplingConfig(temperature=1.0)
    res = verify_chain(sure, Draft(drafts, jnp.full((b,), 2)), cfg, verify.position_keys(base, starts, 3))
    np.testing.assert_array_equal(res.num_accepted, 2)
    alone = verify_chain(sure[:, 2:], Draft(jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32)), cfg,
                         verify.position_keys(base, starts + 2, 1))
    np.testing.assert_array_equal(res.tokens[:, 2], alone.tokens[:, 0])
    tree = verify_tree(sure, jnp.pad(drafts, ((0, 0), (1, 0))), jnp.ones((b, 3), bool), branching_tree((), 2), cfg,
                       verify.position_keys(base, starts, 3))
    np.testing.assert_array_equal(tree.tokens, res.tokens)
    other = verify_chain(sure[:, 2:], Draft(jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32)), cfg,
                         verify.position_keys(base, starts + 3, 1))
    assert (other.tokens[:, 0] != alone.tokens[:, 0]).any()  # another position: other draws


def test_greedy_chain_exact():
    best = jnp.asarray([[2, 4, 1, 5], [2, 4, 1, 5], [0, 1, 2, 3], [3, 3, 3, 3]])
    drafts = jnp.asarray([[2, 4, 1], [2, 3, 1], [0, 1, 5], [3, 3, 3]])
    num = jnp.asarray([3, 3, 2, 0])
    noise = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (4, K + 1, 6))
    logits = 5.0 * jax.nn.one_hot(best, 6) + noise
    chain = jax.jit(verify_chain, static_argnums=2)
    res = chain(logits, Draft(drafts, num), SamplingConfig(), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(res.num_accepted, [3, 1, 2, 0])
    np.testing.assert_array_equal(res.tokens, [[2, 4, 1, 5], [2, 4, 0, 0], [0, 1, 2, 0], [3, 0, 0, 0]])

    # the same chain as a tree gives the same answer
    tree_tokens = jnp.pad(drafts, ((0, 0), (1, 0)), constant_values=7)
    valid = jnp.arange(K + 1)[None] <= num[:, None]
    tres = TREE_JIT(logits, tree_tokens, valid, branching_tree((), K), SamplingConfig(), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(tres.num_accepted, res.num_accepted)
    np.testing.assert_array_equal(tres.tokens, res.tokens)


# ---------------------------------------------------------------- lossless chain sampling


def _pairs(a: np.ndarray, width: int) -> np.ndarray:
    """Rows 2i and 2i+1 hold windows a[:width] and a[1:width+1]: a step and the next, for N trials."""
    return np.tile(np.stack([a[:width], a[1 : width + 1]]), (N,) + (1,) * a.ndim)


def _first_two(tokens, num_accepted):
    """Each trial's first two emitted tokens; the second comes from the next step after a rejection."""
    tokens, n = tokens.reshape(N, 2, -1), num_accepted.reshape(N, 2)
    return tokens[:, 0, 0], jnp.where(n[:, 0] >= 1, tokens[:, 0, 1], tokens[:, 1, 0])


def _chain_trials(cfg: SamplingConfig, kind: str):
    """N trials as one batch of 2N rows, inputs drawn in numpy: one small program to compile."""
    rng = np.random.default_rng(5)
    num = rng.integers(0, K + 1, 2 * N)  # independent of the tokens: 0..K all covered
    if kind == "onehot":
        tokens, q = _pairs(ONEHOT_DRAFT, K), None
    else:
        q = _pairs(np.asarray(PROBS(DRAFT_LOGITS, cfg)), K)
        tokens = np.minimum((rng.random(q.shape[:-1] + (1,)) > np.cumsum(q, -1)).sum(-1), V - 1)  # inverse cdf

    @jax.jit  # traced afresh on every call: sees a monkeypatched verifier
    def run(target, tokens, num, q, key):
        res = verify_chain(target, Draft(tokens, num, q), cfg, key)
        return _first_two(res.tokens, res.num_accepted)

    return run(_pairs(TARGET, K + 1), tokens.astype(np.int32), num.astype(np.int32), q, jax.random.PRNGKey(42))


@pytest.mark.parametrize(
    "cfg, kind, wrong",  # the wrong verifier on two of the four cases keeps the test under a minute
    [(c, k, False) for c in CFGS for k in ("onehot", "random_q")]
    + [(CFGS[0], "random_q", True), (CFGS[1], "onehot", True)],
    ids=["plain-onehot", "plain-random_q", "topk_topp-onehot", "topk_topp-random_q"]
    + ["WRONG_resample_p-plain-random_q", "WRONG_skewed_draw-topk_topp-onehot"],
)
def test_chain_sampling_is_lossless(cfg, kind, wrong, monkeypatch):
    if wrong and kind == "random_q":
        monkeypatch.setattr(verify, "_residual", lambda p, q: p)
    elif wrong:  # a deterministic draft is judged by the target's draw: skew that draw
        _skew_target_draws(monkeypatch)
    _check(*_chain_trials(cfg, kind), cfg, wrong)


# ---------------------------------------------------------------- trees


def test_template_structure():
    t = branching_tree((2, 2), 2)
    assert t.parents == (-1, 0, 0, 1, 1, 2, 2)
    assert t.depth == (0, 1, 1, 2, 2, 2, 2) and t.max_depth == 2
    assert t.children[0] == (1, 2) and t.children[2] == (5, 6) and t.children[6] == ()
    np.testing.assert_array_equal(t.attention_mask[6], [1, 0, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(t.paths[[0, 2, 6]], [[0, 0], [2, 0], [2, 6]])
    with pytest.raises(ValueError):
        TreeTemplate((-1, 2, 0))


def test_greedy_tree_exact():
    template = branching_tree((2, 2), 2)  # 0 -> (1, 2); 1 -> (3, 4); 2 -> (5, 6)
    tokens = jnp.asarray([[9, 1, 2, 3, 4, 3, 5]] * 3 + [[9, 2, 2, 3, 4, 3, 5]])
    # argmax at each node, per row; the best path is the root's 2nd child, then that node's 2nd child
    best = jnp.asarray([[2, 3, 5, 0, 0, 0, 7]] * 2 + [[8, 3, 5, 0, 0, 0, 7], [2, 3, 5, 6, 0, 0, 7]])
    valid = jnp.ones((4, 7), bool).at[1, 6].set(False)
    logits = 4.0 * jax.nn.one_hot(best, 10)
    res = TREE_JIT(logits, tokens, valid, template, SamplingConfig(), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(res.num_accepted, [2, 1, 0, 2])
    np.testing.assert_array_equal(res.path, [[2, 6], [2, 0], [0, 0], [1, 3]])  # row 3: tie, lowest index
    np.testing.assert_array_equal(res.last_node, [6, 2, 0, 3])
    np.testing.assert_array_equal(res.tokens, [[2, 5, 7], [2, 5, 0], [8, 0, 0], [2, 3, 6]])


TREE = TreeTemplate((-1, 0, 0, 1, 2, 2))  # 2-child root; node 2's children share a token
TREE_TOKENS = np.array([0, 1, 3, 2, 1, 1], np.int32)


def _tree_trials(cfg: SamplingConfig):
    """As `_chain_trials`; in the toy target the next step is one level deeper."""
    target = np.tile(np.stack([TARGET[np.asarray(TREE.depth) + i] for i in (0, 1)]), (N, 1, 1))
    tokens = np.tile(TREE_TOKENS, (2 * N, 1))
    valid = np.random.default_rng(6).random((2 * N, TREE.size)) < 0.8  # random masking of non-root nodes
    valid[:, 0] = True

    @jax.jit
    def run(target, tokens, valid, key):
        res = verify_tree(target, tokens, valid, TREE, cfg, key)
        return _first_two(res.tokens, res.num_accepted)

    return run(target, tokens, valid, jax.random.PRNGKey(7))


@pytest.mark.parametrize(
    "cfg, wrong",
    [(CFGS[0], False), (CFGS[1], False), (CFGS[1], True)],
    ids=["plain", "topk_topp", "WRONG_skewed_draw-topk_topp"],
)
def test_tree_sampling_is_lossless(cfg, wrong, monkeypatch):
    if wrong:
        _skew_target_draws(monkeypatch)
    _check(*_tree_trials(cfg), cfg, wrong)


def test_a_dynamic_tree_verifies_each_row_as_its_own_template():
    """Per-row parents (`Draft.parents`, a dynamic draft tree): each row is verified, greedy or sampled,
    exactly as a static template of that shape would verify it (node depths following from the
    parents), and `ancestor_mask` is each shape's attention mask."""
    from specjax.drafting import ancestor_mask

    shapes = [TreeTemplate((-1, 0, 0, 1, 1, 3)), TreeTemplate((-1, 0, 1, 2, 0, 4))]  # node depths differ too
    assert shapes[0].depth != shapes[1].depth and shapes[0].max_depth == shapes[1].max_depth
    parents = jnp.asarray([t.parents for t in shapes], jnp.int32)
    np.testing.assert_array_equal(ancestor_mask(parents, 3), [t.attention_mask for t in shapes])
    rng = np.random.default_rng(0)
    accepted = set()
    for trial in range(40):
        logits = jnp.asarray(rng.normal(size=(2, 6, 3)) * 3, jnp.float32)  # 3 tokens: drafts often match
        tokens = jnp.asarray(rng.integers(0, 3, size=(2, 6)), jnp.int32)
        valid = jnp.asarray(rng.random((2, 6)) < 0.9).at[:, 0].set(True)
        key = jax.random.PRNGKey(trial)
        for cfg in (SamplingConfig(), SamplingConfig(temperature=1.0)):
            mixed = verify_tree(logits, tokens, valid, shapes[0], cfg, key, parents)
            for row, t in enumerate(shapes):
                if cfg.greedy:  # a row's greedy result does not depend on the other rows
                    own = verify_tree(logits[row:row + 1], tokens[row:row + 1], valid[row:row + 1], t, cfg, key)
                    for field in ("tokens", "num_accepted", "path", "last_node"):
                        np.testing.assert_array_equal(getattr(mixed, field)[row], getattr(own, field)[0])
                    accepted.add(int(mixed.num_accepted[row]))
                both = jnp.broadcast_to(parents[row], (2, 6))  # sampled: the same keys for the batch
                dyn = verify_tree(logits, tokens, valid, shapes[0], cfg, key, both)
                ref = verify_tree(logits, tokens, valid, t, cfg, key)
                for field in ("tokens", "num_accepted", "path", "last_node"):
                    np.testing.assert_array_equal(getattr(dyn, field), getattr(ref, field))
    assert accepted == {0, 1, 2, 3}  # every depth was reached
