"""bf16 matmul weights beside float32 activations (`load(matmul_dtype=)`, `models/linear.py`): the
product rule, which weights are lowered, closeness to float32, and losslessness within the mode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import sharding
from specjax.models import transformer
from specjax.models.linear import matmul


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_matmul_of_bf16_weights_accumulates_in_float32(rows):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 1, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 24)), jnp.bfloat16)
    y = matmul(x, w)
    assert y.shape == (rows, 1, 24) and y.dtype == jnp.float32
    # bf16 x bf16 products are exact in float32: only the summation order may differ
    want = np.asarray(x.astype(jnp.bfloat16), np.float64)[:, 0] @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(y)[:, 0], want, rtol=1e-5, atol=1e-5)
    assert matmul(x, w, jnp.bfloat16).dtype == jnp.bfloat16
    # a row's product is the same alone (padded up to 4 rows, the padding dropped) as in a batch
    np.testing.assert_allclose(matmul(x[:1], w), y[:1], rtol=1e-6, atol=1e-6)
    same = jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)
    np.testing.assert_allclose(matmul(x, same), x @ same, rtol=1e-6)  # equal dtypes: the plain product


def _lowered(model):
    return dataclasses.replace(model, params=sharding.lower_matmul_weights(model.params, jnp.bfloat16))


def test_lowered_model_keeps_activations_and_cache_in_float32(tiny_model):
    low = _lowered(tiny_model)
    for path, x in jax.tree_util.tree_flatten_with_path(low.params)[0]:
        name = str(path[-1].key)
        assert x.dtype == (jnp.bfloat16 if name in sharding.MATMUL_WEIGHTS else jnp.float32), name
    assert transformer.compute_dtype(low.params) == jnp.float32
    tokens = np.random.default_rng(0).integers(3, 64, (2, 24))
    full, mixed = tiny_model.logits(tokens), low.logits(tokens)
    assert mixed.dtype == np.float32
    scale = np.abs(full).max()
    assert np.abs(mixed - full).max() < 0.05 * scale  # bf16 weights: a small, bounded change
    assert (mixed.argmax(-1) == full.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("method, opts", [("pld", {"k": 5}), ("suffix", {"k": 5}),
                                          ("draft", {"k": 3, "draft": "self:1"})])
def test_greedy_speculative_equals_ar_with_bf16_weights(tiny_model, method, opts):
    from tests.test_generate import _prompts

    low = _lowered(tiny_model)
    prompts = _prompts()
    ar = specjax.generate(low, prompts, "ar", max_new_tokens=32, eos_token_ids=())
    spec = specjax.generate(low, prompts, method, max_new_tokens=32, eos_token_ids=(), **opts)
    assert spec.tokens == ar.tokens
    assert spec.stats["mean_accepted_tokens"] > 1.0
    alone = specjax.generate(low, prompts[2:], method, max_new_tokens=32, eos_token_ids=(), **opts)
    assert alone.tokens[0] == ar.tokens[2]  # one row alone (1-row forwards, padded) = its row in the batch


def test_load_lowers_matmul_weights_of_a_checkpoint(tiny_checkpoints):
    folder, _ = tiny_checkpoints["qwen2"]
    full = specjax.load(str(folder), tokenizer=False)
    low = specjax.load(str(folder), tokenizer=False, matmul_dtype="bfloat16")
    assert low.params["lm_head"].dtype == jnp.bfloat16 and low.params["layers"][0]["wqkv"].dtype == jnp.bfloat16
    assert low.params["layers"][0]["bqkv"].dtype == jnp.float32 and low.params["final_norm"].dtype == jnp.float32
    tokens = np.random.default_rng(1).integers(0, full.config.vocab_size, (1, 16))
    assert np.abs(low.logits(tokens) - full.logits(tokens)).max() < 0.05 * np.abs(full.logits(tokens)).max()
    with pytest.raises(ValueError, match="wider than dtype"):
        specjax.load(str(folder), dtype="bfloat16", matmul_dtype="float32", tokenizer=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        specjax.load(str(folder), matmul_dtype="int3", tokenizer=False)
