"""One-token attention scored as a multiply-and-reduce (`ModelConfig.reduce_scores_from`) and the
per-machine choice of the batch it starts at (`models/attention_form.py`): same scores, same greedy
tokens, a timed choice kept in the cache folder that needs a clear win at every larger batch, a
checked override."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import step_cost
from specjax.models import attention_form, transformer


def _with(model, **fields):
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **fields))


def _prompts():
    from tests.test_generate import _prompts as prompts

    return prompts()


@pytest.mark.parametrize("start", [1, 2])
@pytest.mark.parametrize("method, opts", [("ar", {}), ("pld", {"k": 4})])
def test_greedy_tokens_are_the_same_with_either_attention_form(tiny_model, method, opts, start):
    prompts = _prompts()  # rows of different lengths, each masked to its own context
    plain = specjax.generate(tiny_model, prompts, method, max_new_tokens=24, eos_token_ids=(), **opts)
    other = specjax.generate(_with(tiny_model, reduce_scores_from=start), prompts, method, max_new_tokens=24,
                             eos_token_ids=(), **opts)
    assert other.tokens == plain.tokens


def _reductions(cfg, model, batch: int, width: int = 1) -> int:
    """reduce_sum ops of a cached forward of `width` new tokens per row (the norms have some too)."""
    from specjax.models import cache as kv

    cache = kv.KVCache.init(cfg, batch, 32, jnp.float32).replace(lengths=jnp.full((batch,), 5, jnp.int32))
    tokens = jnp.ones((batch, width), jnp.int32)
    return str(jax.make_jaxpr(lambda p, c: transformer.forward(p, cfg, tokens, c).logits)(model.params, cache)
               ).count("reduce_sum")


def test_the_reduce_form_runs_from_its_batch_on_and_only_for_one_new_token(tiny_model):
    dots, layers = tiny_model.config, tiny_model.config.num_layers
    reduce = dataclasses.replace(dots, reduce_scores_from=2)
    assert _reductions(reduce, tiny_model, 2) == _reductions(dots, tiny_model, 2) + layers
    assert _reductions(reduce, tiny_model, 1) == _reductions(dots, tiny_model, 1)  # below its batch: the dots
    assert _reductions(reduce, tiny_model, 2, width=3) == _reductions(dots, tiny_model, 2, width=3)  # a verify


def test_the_crossing_is_the_smallest_batch_that_wins_clearly_at_every_larger_one():
    def crossing(wins: dict[int, float]) -> int:
        secs = {k: v for b, r in wins.items() for k, v in (((b, "dots"), 1.0), ((b, "reduce"), r))}
        return attention_form.crossing(secs, tuple(wins))

    assert crossing({1: 1.3, 4: 1.2, 16: 0.8, 64: 0.6}) == 16
    assert crossing({1: 0.8, 4: 0.8, 16: 1.1, 64: 0.6}) == 64  # not at 16: not from 4 either
    assert crossing({1: 0.9, 4: 0.9, 16: 0.9, 64: 0.9}) == 1  # whatever batches were timed
    assert crossing({4: 0.5, 16: 0.5, 64: 0.97}) == 0  # within the margin at 64: never


def test_the_form_is_timed_once_per_machine(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(attention_form.ENV, raising=False)
    monkeypatch.setattr(step_cost, "_MEMORY", {})
    cfg, params = tiny_model.config, tiny_model.params
    assert attention_form.choose(cfg, params) == 0  # a tiny model: the dots, nothing timed
    monkeypatch.setattr(attention_form, "MIN_MODEL_BYTES", 0)
    calls = []

    def fake(cfg, dtype):
        calls.append(dtype)
        return {(b, form): (0.5 if form == "reduce" and b >= 16 else 1.0)
                for b in attention_form.BATCHES for form in ("dots", "reduce")}

    monkeypatch.setattr(attention_form, "measure", fake)
    assert attention_form.choose(cfg, params) == 16 and len(calls) == 1
    assert "attention-scores" in (tmp_path / "step_costs.json").read_text()
    monkeypatch.setattr(step_cost, "_MEMORY", {})  # a new process reads the timings back
    assert attention_form.configure(cfg, params).reduce_scores_from == 16 and len(calls) == 1
    assert attention_form.choose(cfg, params, mesh=object()) == 0


def test_both_forms_are_timed_and_give_the_same_attention(tiny_model):
    cfg = tiny_model.config
    secs = attention_form.measure(cfg, jnp.float32, batches=(2,))
    assert set(secs) == {(2, "dots"), (2, "reduce")} and all(0 < s < 5 for s in secs.values())
    rng = np.random.default_rng(0)
    shape = (3, cfg.num_kv_heads, 40, cfg.head_dim)
    caches = tuple((jnp.asarray(rng.standard_normal(shape), jnp.float32),) * 2 for _ in range(2))
    q = jnp.asarray(rng.standard_normal((3, 1, cfg.num_heads, cfg.head_dim)), jnp.float32)
    mask = jnp.asarray(np.arange(40)[None, None, :] < np.array([3, 20, 39])[:, None, None])
    reduce = dataclasses.replace(cfg, reduce_scores_from=1)
    np.testing.assert_allclose(attention_form._attention(reduce, q, caches, mask),
                               attention_form._attention(cfg, q, caches, mask), rtol=1e-5, atol=1e-5)


def test_the_environment_sets_the_batch_and_a_bad_value_names_the_fix(tiny_model, monkeypatch):
    cfg, params = tiny_model.config, tiny_model.params
    monkeypatch.setenv(attention_form.ENV, "8")
    assert attention_form.configure(cfg, params).reduce_scores_from == 8
    for bad in ("eight", "-1"):
        monkeypatch.setenv(attention_form.ENV, bad)
        with pytest.raises(ValueError, match="SPECJAX_REDUCE_SCORES_FROM"):
            attention_form.choose(cfg, params)
