"""The jitted decode loop: greedy losslessness of every method, stopping, statistics, compile reuse."""

from __future__ import annotations

import numpy as np
import pytest

import specjax
from specjax import engine

NGRAM_METHODS = ("pld", "suffix", "pool", "recycling")  # the model-free drafters
# a prompt that repeats itself, so n-gram drafts get accepted on the tiny random model too
LOOPY = [5, 6, 7, 8, 9, 10, 11, 12] * 4


def _prompts():
    rng = np.random.default_rng(0)
    return [LOOPY, rng.integers(3, 64, size=11).tolist() + LOOPY[:9], rng.integers(3, 64, size=5).tolist()]


@pytest.mark.parametrize("method", NGRAM_METHODS)
def test_greedy_speculative_equals_ar_tiny(tiny_model, method):
    prompts = _prompts()
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    spec = specjax.generate(tiny_model, prompts, method, max_new_tokens=40, eos_token_ids=(), k=5)
    assert spec.tokens == ar.tokens
    assert all(len(t) == 40 for t in spec.tokens)
    assert spec.stats["mean_accepted_tokens"] > 1.0  # some drafts really were accepted
    # batch rows get what they get alone
    for i, p in enumerate(prompts):
        alone = specjax.generate(tiny_model, [p], method, max_new_tokens=40, eos_token_ids=(), k=5)
        assert alone.tokens[0] == ar.tokens[i]


def test_stats_are_consistent(tiny_model):
    out = specjax.generate(tiny_model, _prompts(), "suffix", max_new_tokens=30, eos_token_ids=(), k=4)
    s = out.stats
    hist = np.asarray(s["accepted_hist"])
    assert len(hist) == 4 + 2 and hist[0] == 0  # every active step emits at least one token
    # every emitted token but the first of each row (sampled at prefill) comes from a decode step
    assert (hist * np.arange(len(hist))).sum() == s["emitted_tokens"] - s["batch"]
    assert s["target_forwards"] == s["decode_steps"] + 1
    assert s["wall_s"] == pytest.approx(s["prefill_s"] + s["decode_s"])
    assert s["tokens_per_s"] > 0 and sum(s["proposer_steps"]) == hist.sum()


def test_eos_stops_each_row(tiny_model):
    prompts = _prompts()
    free = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=30, eos_token_ids=())
    stop = free.tokens[0][4]
    first = free.tokens[0].index(stop)
    for method in ("ar", "suffix"):
        out = specjax.generate(tiny_model, prompts, method, max_new_tokens=30, eos_token_ids=(stop,))
        assert out.tokens[0] == free.tokens[0][:first]
        for row, ref in zip(out.tokens, free.tokens):
            cut = ref.index(stop) if stop in ref else len(ref)
            assert row == ref[:cut]


def test_sampling_is_seeded_and_runs_with_drafts(tiny_model):
    prompts = _prompts()
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, eos_token_ids=())
    a = specjax.generate(tiny_model, prompts, "ar", seed=1, **kw)
    b = specjax.generate(tiny_model, prompts, "ar", seed=1, **kw)
    c = specjax.generate(tiny_model, prompts, "ar", seed=2, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    d = specjax.generate(tiny_model, prompts, "pld", seed=1, k=4, **kw)
    assert all(len(t) == 24 for t in d.tokens)


@pytest.mark.parametrize("method", ["pld", "recycling", "suffix", "lookahead"])
def test_sampled_drafting_methods_emit_ars_samples_token_for_token(tiny_model, method):
    """A deterministic draft is accepted when it equals the target's draw for its position (keyed by row
    and position, not by step), so with the same seed every such method samples `ar`'s tokens exactly,
    in a batch of Best-of-N groups, at fixed and adaptive widths, whether drafts are accepted or not."""
    kw = dict(max_new_tokens=32, temperature=0.3, top_k=20, eos_token_ids=(), seed=3, num_samples=3)
    prompts = _prompts()[:2]
    ar = specjax.generate(tiny_model, prompts, "ar", **kw)
    fixed = specjax.generate(tiny_model, prompts, method, adaptive=False, **kw)
    assert fixed.tokens == ar.tokens
    assert fixed.stats["mean_accepted_tokens"] > 1.0  # drafts were accepted (1.01-1.17 per forward)
    assert specjax.generate(tiny_model, prompts, method, adaptive=True, **kw).tokens == ar.tokens
    other = specjax.generate(tiny_model, prompts, method, adaptive=False, **{**kw, "seed": 4})
    assert other.tokens != ar.tokens  # the seed still decides the samples


def test_decode_compiles_once_per_bucket(tiny_model):
    kw = dict(max_new_tokens=16, eos_token_ids=(), k=3)
    specjax.generate(tiny_model, [[5, 6, 7, 5, 6]], "pld", **kw)
    before = engine.decode._cache_size()
    specjax.generate(tiny_model, [[9, 8, 7, 9, 8, 7, 9]], "pld", **kw)  # same bucket, other prompt
    assert engine.decode._cache_size() == before


def test_speculate_max_rows_drafts_only_for_the_last_rows(tiny_checkpoints):
    folder = str(tiny_checkpoints["llama"][0])
    model = specjax.load(folder)
    prompts, eos = [LOOPY, _prompts()[2]], (10,)  # this checkpoint's row 1 says 10 fifth, row 0 never
    ar = specjax.generate(model, prompts, "ar", max_new_tokens=30, eos_token_ids=eos)
    assert [len(t) for t in ar.tokens] == [30, 4]
    # the target itself as draft model: every draft is accepted, so the steps show where drafting ran
    runs = {r: specjax.generate(model, prompts, "draft", draft=folder, k=4, max_new_tokens=30, eos_token_ids=eos,
                                speculate_max_rows=r) for r in (None, 0, 1, 2)}
    for out in runs.values():
        assert out.tokens == ar.tokens  # lossless whether or not a step drafts
    assert runs[0].stats["mean_accepted_tokens"] == 1.0 and runs[0].stats["decode_steps"] == ar.stats["decode_steps"]
    assert runs[2].stats["accepted_hist"] == runs[None].stats["accepted_hist"]  # never more than 2 rows
    # R=1: after the prefill's token, row 1's 4 steps (3 tokens and EOS) are plain ones for both rows;
    # then row 0, alone, takes 5 tokens a step for its last 25
    hist = runs[1].stats["accepted_hist"]
    assert hist[1] == 2 * 4 and hist[5] == 25 // 5 and sum(hist) == 8 + 5
    assert runs[None].stats["decode_steps"] < runs[1].stats["decode_steps"] < ar.stats["decode_steps"]


@pytest.mark.parametrize("method", ["pld", "suffix", "pool", "recycling", "lookahead", "pia"])
def test_speculate_max_rows_gates_every_drafter(tiny_model, method):
    """A closed gate skips `propose`; the state it hands `update` must type-check and stay usable."""
    prompts = _prompts()
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=20)
    assert len({len(t) for t in ar.tokens}) > 1  # rows end at different steps: the gate closes, then opens
    out = specjax.generate(tiny_model, prompts, method, max_new_tokens=20, speculate_max_rows=1)
    assert out.tokens == ar.tokens


@pytest.mark.parametrize("bad, match", [
    (dict(method="ar", speculate_max_rows=-1), "speculate_max_rows must be None or an integer >= 0"),
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(method="pld", window=3), "does not take option"),
    (dict(method="pld", k=-1), "option k of method 'pld' must be >= 0"),
    (dict(method="ar", temperature=-1.0), "temperature must be >= 0"),
    (dict(method="ar", top_p=0.0), "top_p must be in"),
    (dict(method="ar", max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(method="ar", max_new_tokens=2000), "does not fit the cache"),
])
def test_bad_arguments_raise_clear_errors(tiny_model, bad, match):
    kw = dict(max_new_tokens=8)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        specjax.generate(tiny_model, [[5, 6, 7]], **kw)


def test_prompt_longer_than_cache_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="shorten the prompt"):
        specjax.generate(tiny_model, [list(range(3, 60)) * 3], "ar", max_new_tokens=8, max_len=128)
    with pytest.raises(ValueError, match="prompts is empty"):
        specjax.generate(tiny_model, [], "ar")
    with pytest.raises(ValueError, match="need a tokenizer"):
        specjax.generate(tiny_model, ["text"], "ar")


# ------------------------------------------------------------------ the real model

@pytest.mark.real
def test_real_model_speculative_equals_ar(real_model):
    q = "Compute 12 * 13. Then compute 12 * 13 again and check that both answers agree."
    first = specjax.generate(real_model, [q], "ar", max_new_tokens=40).texts[0]
    prompts = [f"{q}\nA previous answer was:\n{first}\nCheck it and answer again.", "What is 2 + 2?"]
    ar = specjax.generate(real_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    for method in NGRAM_METHODS:
        out = specjax.generate(real_model, prompts, method, max_new_tokens=40, eos_token_ids=(), k=6)
        assert out.tokens == ar.tokens, method
        assert out.stats["mean_accepted_tokens"] > 1.2, method
    alone = specjax.generate(real_model, prompts[:1], "suffix", max_new_tokens=40, eos_token_ids=(), k=6)
    assert alone.tokens[0] == ar.tokens[0]


# ------------------------------------------------------------------ token trees in the loop

TREE_PROMPTS = [[5, 6, 7, 20, 5, 6, 7, 30, 5, 6, 7, 40, 5, 6, 7] * 2, LOOPY]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_suffix_tree_drafts_verify_in_one_forward_and_stay_lossless(tiny_model, temperature):
    """branches=3: three chains (the best matches with distinct next tokens) verified as one tree; the
    accepted path's keys/values are compacted, so greedy output still equals ar exactly."""
    kw = dict(max_new_tokens=40, eos_token_ids=(), temperature=temperature)
    ar = specjax.generate(tiny_model, TREE_PROMPTS, "ar", **kw)
    tree = specjax.generate(tiny_model, TREE_PROMPTS, "suffix", k=4, branches=3, min_match=1, **kw)
    assert tree.stats["draft_k"] == 12 and len(tree.stats["accepted_hist"]) == 4 + 2
    if temperature == 0.0:
        assert tree.tokens == ar.tokens
        assert tree.stats["mean_accepted_tokens"] > 1.0
    else:
        assert all(len(t) == 40 for t in tree.tokens)


def test_compact_moves_the_accepted_path_behind_the_root():
    import jax.numpy as jnp

    from specjax.models import cache as kv

    slots = jnp.arange(16, dtype=jnp.float32)
    buf = jnp.broadcast_to(slots[None, None, :, None], (2, 1, 16, 2))  # each slot holds its own index
    c = kv.KVCache(k=(buf,), v=(buf + 100,), lengths=jnp.array([3, 5], jnp.int32))
    path = jnp.array([[2, 5], [1, 4]], jnp.int32)  # row 0: nodes 2 then 5 accepted; row 1: nodes 1, 4
    out = kv.compact(c, c.lengths, path)
    k = np.asarray(out.k[0][:, 0, :, 0])
    assert k[0, 3:6].tolist() == [3, 3 + 2, 3 + 5] and k[1, 5:8].tolist() == [5, 5 + 1, 5 + 4]
    assert k[0, :3].tolist() == [0, 1, 2]  # committed history untouched
    assert np.asarray(out.v[0][0, 0, 4, 0]) == 105


@pytest.mark.real
def test_real_model_shipped_heads_and_hybrid_equal_ar(real_model):
    """The heads shipped for the embedded model load by default; medusa (tree), eagle (chain, gated
    chain and dynamic tree) and hybrid (suffix + the eagle head by default, or the medusa one) stay
    exactly greedy-equal to ar on a mixed-length batch, and the heads' drafts are accepted."""
    prompts = ["Tom has 12 apples and buys 7 more. Then he gives away 5. How many apples does he have now?",
               "What is 2 + 2?"]
    ar = specjax.generate(real_model, prompts, "ar", max_new_tokens=48, eos_token_ids=())
    medusa = specjax.generate(real_model, prompts, "medusa", max_new_tokens=48, eos_token_ids=())
    assert medusa.tokens == ar.tokens
    assert medusa.stats["mean_accepted_tokens"] > 1.3
    for opts in ({}, {"topk": 1, "depth": 5, "min_prob": 0.3}, {"total": 16, "depth": 5, "topk": 3}):
        eagle = specjax.generate(real_model, prompts, "eagle", max_new_tokens=48, eos_token_ids=(), **opts)
        assert eagle.tokens == ar.tokens, opts
        assert eagle.stats["mean_accepted_tokens"] > 1.25, opts
    for head in ("auto", "medusa"):
        hybrid = specjax.generate(real_model, prompts, "hybrid", head=head, max_new_tokens=48, eos_token_ids=())
        assert hybrid.tokens == ar.tokens, head
        assert hybrid.stats["proposer_steps"][2] > 0, head  # the head half drafted
