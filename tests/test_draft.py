"""Model drafters: the draft model (independent or self:L layer-skip) and the hybrid.

Greedy outputs must equal `ar`; under sampling, the emitted tokens must follow the target's law with
a real (non-one-hot) draft q: a chi-square test that a deliberately wrong verifier (one that treats q
as one-hot) fails.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import save_tiny
from scipy.stats import chisquare

import specjax
from specjax import engine, verify
from specjax.config import ModelConfig
from specjax.model import Model
from specjax.models.transformer import init_params

LOOPY = [5, 6, 7, 8, 9, 10, 11, 12] * 4


def _prompts():
    rng = np.random.default_rng(0)
    return [LOOPY, rng.integers(3, 64, size=11).tolist() + LOOPY[:9], rng.integers(3, 64, size=5).tolist()]


@pytest.mark.parametrize("method, opts", [
    ("draft", {"draft": "self:1", "k": 3}),
    ("hybrid", {"draft": "self:1", "head_k": 3, "k": 5, "threshold": 3}),
])
def test_greedy_model_drafts_equal_ar_tiny(tiny_model, method, opts):
    prompts = _prompts()
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    out = specjax.generate(tiny_model, prompts, method, max_new_tokens=40, eos_token_ids=(), **opts)
    assert out.tokens == ar.tokens
    assert out.stats["mean_accepted_tokens"] > 1.0
    for i, p in enumerate(prompts):  # mixed lengths: a row gets in a batch what it gets alone
        assert specjax.generate(tiny_model, [p], method, max_new_tokens=40, eos_token_ids=(), **opts).tokens[0] \
            == ar.tokens[i]


def test_hybrid_uses_suffix_on_repeats_and_the_head_elsewhere(tiny_model):
    out = specjax.generate(tiny_model, _prompts(), "hybrid", max_new_tokens=40, eos_token_ids=(), draft="self:1",
                           head_k=3, k=5, threshold=3)
    none, suffix, head = out.stats["proposer_steps"]
    assert suffix > 0 and head > 0 and none == 0


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny target checkpoint and an independent tiny draft checkpoint with the same vocabulary."""
    root = tmp_path_factory.mktemp("pair")
    save_tiny("llama", root / "target", seed=0)
    save_tiny("qwen2", root / "draft", seed=1)
    save_tiny("qwen3", root / "other_vocab", seed=2, vocab=80)
    return root


def test_independent_draft_model_equals_ar(tiny_pair):
    target = specjax.load(str(tiny_pair / "target"), tokenizer=False)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 90, size=n).tolist() for n in (7, 19)]
    ar = specjax.generate(target, prompts, "ar", max_new_tokens=30, eos_token_ids=())
    out = specjax.generate(target, prompts, "draft", max_new_tokens=30, eos_token_ids=(),
                           draft=str(tiny_pair / "draft"), k=3)
    assert out.tokens == ar.tokens
    # its cache is caught up every step: the same draft drafting alone gives the same output
    alone = specjax.generate(target, prompts[1:], "draft", max_new_tokens=30, eos_token_ids=(),
                             draft=str(tiny_pair / "draft"), k=3)
    assert alone.tokens[0] == ar.tokens[1]


def test_self_draft_shares_the_targets_weights(tiny_model):
    """self:L is the target's first L layers (the same buffers, no copy) and reads its cache."""
    from specjax.proposers import draft_model

    cfg, params, shares = draft_model.resolve_draft(tiny_model, "self:1")
    assert shares and cfg.num_layers == 1 and params["layers"][0] is tiny_model.params["layers"][0]


def test_draft_errors_name_the_fix(tiny_model, tiny_pair):
    with pytest.raises(ValueError, match="self:L needs|needs 1 <= L"):
        specjax.generate(tiny_model, [[3, 4]], "draft", max_new_tokens=4, draft="self:2")
    with pytest.raises(ValueError, match="write self:L"):
        specjax.generate(tiny_model, [[3, 4]], "draft", max_new_tokens=4, draft="self:x")
    target = specjax.load(str(tiny_pair / "target"), tokenizer=False)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        specjax.generate(target, [[3, 4]], "draft", max_new_tokens=4, draft=str(tiny_pair / "other_vocab"))
    with pytest.raises(Exception, match="not found|does not exist|unknown model"):
        specjax.generate(tiny_model, [[3, 4]], "draft", max_new_tokens=4, draft="/nonexistent/draft")
    with pytest.raises(ValueError, match="hybrid head 'medusa2'"):
        specjax.generate(tiny_model, [[3, 4]], "hybrid", max_new_tokens=4, head="medusa2")


# ---------------------------------------------------------------- losslessness with a real q

SMALL_V = 8


@pytest.fixture(scope="module")
def small_vocab_model():
    cfg = ModelConfig(family="llama", vocab_size=SMALL_V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=10000.0, max_position_embeddings=64,
                      eos_token_ids=())
    return Model(config=cfg, params=init_params(cfg, jax.random.PRNGKey(7), scale=0.5), tokenizer=None, name="v8")


def _exact_pair_law(model, prompt):
    """p(t1, t2 | prompt) at temperature 1, from full forwards."""
    first = jax.nn.softmax(model.logits([prompt])[0, -1])
    nxt = model.logits([prompt + [t] for t in range(SMALL_V)])[:, -1]
    second = jax.nn.softmax(nxt, axis=-1)
    return np.asarray(first, np.float64)[:, None] * np.asarray(second, np.float64)


def _pvalue(rows, law):
    counts = np.bincount(rows[:, 1] * SMALL_V + rows[:, 2], minlength=SMALL_V**2)
    return chisquare(counts, law / law.sum() * counts.sum()).pvalue


def _pair_samples(model, prompt, n):
    out = specjax.generate(model, [prompt], "draft", max_new_tokens=3, temperature=1.0, num_samples=n,
                           eos_token_ids=(), draft="self:1", k=2, seed=11)
    # token 1 is sampled at prefill; tokens 2 and 3 go through draft + verification: test (t2, t3) given t1 = x
    toks = np.asarray(out.tokens)
    assert out.stats["decode_steps"] >= 1
    return toks


def test_draft_sampling_is_lossless_and_a_wrong_verifier_is_caught(small_vocab_model, monkeypatch):
    prompt = [1, 5, 3]
    n = 16_000
    toks = _pair_samples(small_vocab_model, prompt, n)
    t1 = np.bincount(toks[:, 0], minlength=SMALL_V).argmax()  # condition on the commonest first token
    rows = toks[toks[:, 0] == t1]
    law = _exact_pair_law(small_vocab_model, prompt + [int(t1)]).ravel()
    good = _pvalue(rows, law)
    assert good > 1e-3, good

    # wrong: after a rejection, resample from p instead of the residual max(0, p - q)
    monkeypatch.setattr(verify, "_residual", lambda p, q: p)
    monkeypatch.setenv("SPECJAX_CACHE_DIR", "none")  # the program store would serve the honest decode loop
    engine.decode.clear_cache()
    try:
        wrong = _pair_samples(small_vocab_model, prompt, n)
    finally:
        engine.decode.clear_cache()
    rows = wrong[wrong[:, 0] == t1]
    bad = _pvalue(rows, law)
    assert bad < 1e-6, bad
