"""Parity of the one decoder with transformers, and the KV cache's invariants."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.models import transformer
from specjax.models.cache import KVCache
from tests.conftest import FAMILIES, save_tiny


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_parity_with_transformers(tiny_checkpoints, family):
    folder, hf_model = tiny_checkpoints[family]
    model = specjax.load(str(folder))
    assert model.tokenizer is None  # weights-only folder
    tokens = np.random.default_rng(0).integers(3, 96, size=(2, 40))
    ours = model.logits(tokens)
    ref = _torch_logits(hf_model, tokens)
    assert ours.shape == ref.shape == (2, 40, 96)
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


def test_family_features_are_read_from_config(tiny_checkpoints):
    cfgs = {f: specjax.load(str(tiny_checkpoints[f][0])).config for f in FAMILIES}
    assert cfgs["qwen2"].attention_bias and not cfgs["qwen3"].attention_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32
    assert cfgs["llama3"].rope_scaling is not None and cfgs["llama3"].rope_scaling.factor == 8.0
    assert cfgs["smollm2"].tie_word_embeddings and not cfgs["llama"].tie_word_embeddings
    assert cfgs["mistral"].sliding_window == 4096


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = save_tiny("qwen2", tmp_path, seed=3, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = np.arange(3, 23)[None]
    ours = specjax.load(str(tmp_path)).logits(tokens)
    np.testing.assert_array_less(np.abs(ours - _torch_logits(hf_model, tokens)).max(), 1e-4)


def test_bfloat16_load_is_close(tiny_checkpoints):
    folder, hf_model = tiny_checkpoints["llama"]
    model = specjax.load(str(folder), dtype="bfloat16")
    assert model.params["lm_head"].dtype == jnp.bfloat16
    tokens = np.arange(3, 30)[None]
    ref = _torch_logits(hf_model, tokens)
    ours = model.logits(tokens)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 0.05


# ------------------------------------------------------------------ KV cache

def _step_logits(model, tokens, lengths, max_len=64):
    """Prefill row-wise prompts of `lengths`, then feed the rest one token at a time."""
    cfg, params = model.config, model.params
    b, t = tokens.shape
    cache = KVCache.init(cfg, b, max_len)
    p = int(max(lengths))
    out = transformer.forward(params, cfg, jnp.asarray(tokens[:, :p]), cache)
    cache = out.cache.with_lengths(jnp.asarray(lengths))
    logits = [out.logits]
    for i in range(p, t):
        step = jnp.asarray(tokens[:, i : i + 1])
        out = transformer.forward(params, cfg, step, cache)
        cache = out.cache.with_lengths(cache.lengths + 1)
        logits.append(out.logits)
    return np.concatenate([np.asarray(x) for x in logits], axis=1)


def test_prefill_then_decode_equals_full_forward(tiny_model):
    tokens = np.random.default_rng(1).integers(3, 64, size=(2, 24))
    full = tiny_model.logits(tokens)
    stepped = _step_logits(tiny_model, tokens, [10, 10])
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)  # jitted vs op-by-op float32 sums


def test_multi_token_decode_and_rollback(tiny_model):
    cfg, params = tiny_model.config, tiny_model.params
    tokens = np.random.default_rng(2).integers(3, 64, size=(1, 20))
    full = tiny_model.logits(tokens)
    cache = KVCache.init(cfg, 1, 64)
    out = transformer.forward(params, cfg, jnp.asarray(tokens[:, :8]), cache)
    cache = out.cache.with_lengths(jnp.array([8]))
    # feed 6 "draft" tokens of which only the first 2 are kept, then roll back and re-decode
    wrong = np.array([[5, 6, 7, 8, 9, 10]])
    wrong[0, :2] = tokens[0, 8:10]
    out = transformer.forward(params, cfg, jnp.asarray(wrong), cache)
    np.testing.assert_allclose(np.asarray(out.logits[:, :2]), full[:, 8:10], atol=1e-5)
    cache = out.cache.with_lengths(jnp.array([10]))  # reject 4: move the length, reuse the buffers
    out = transformer.forward(params, cfg, jnp.asarray(tokens[:, 10:20]), cache)
    np.testing.assert_allclose(np.asarray(out.logits), full[:, 10:20], atol=1e-5)


def test_mixed_prompt_lengths_match_single_rows(tiny_model):
    # (5e-5: the suite compiles at LLVM -O0, tests/conftest.py, whose arithmetic differs in the last bits;
    # a masking error would move the logits by tenths)
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 64, size=17), rng.integers(3, 64, size=9)
    batch = np.zeros((2, 17), np.int64)
    batch[0], batch[1, :9] = a, b
    cfg, params = tiny_model.config, tiny_model.params
    out = transformer.forward(params, cfg, jnp.asarray(batch), KVCache.init(cfg, 2, 64),
                              logit_positions=jnp.array([[16], [8]]))
    np.testing.assert_allclose(np.asarray(out.logits[0, 0]), tiny_model.logits(a[None])[0, -1], atol=5e-5)
    np.testing.assert_allclose(np.asarray(out.logits[1, 0]), tiny_model.logits(b[None])[0, -1], atol=5e-5)
    # decode one more token per row at different positions
    cache = out.cache.with_lengths(jnp.array([17, 9]))
    nxt = np.array([[11], [12]])
    out2 = transformer.forward(params, cfg, jnp.asarray(nxt), cache)
    ref_a = tiny_model.logits(np.concatenate([a, [11]])[None])[0, -1]
    ref_b = tiny_model.logits(np.concatenate([b, [12]])[None])[0, -1]
    np.testing.assert_allclose(np.asarray(out2.logits[0, 0]), ref_a, atol=5e-5)
    np.testing.assert_allclose(np.asarray(out2.logits[1, 0]), ref_b, atol=5e-5)


def test_tree_mask_matches_separate_chains(tiny_model):
    """Two sibling branches verified in one forward give each branch the logits of its own chain."""
    cfg, params = tiny_model.config, tiny_model.params
    prefix = np.arange(3, 13)[None]
    cache = KVCache.init(cfg, 1, 64)
    cache = transformer.forward(params, cfg, jnp.asarray(prefix), cache).cache.with_lengths(jnp.array([10]))
    # nodes: 0 root(20) -> 1 (21) -> 2 (22); 0 -> 3 (23)
    tree = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], bool)
    toks = jnp.array([[20, 21, 22, 23]])
    out = transformer.forward(params, cfg, toks, cache, tree_mask=tree, pos_offsets=jnp.array([0, 1, 2, 1]))
    chain1 = tiny_model.logits(np.concatenate([prefix[0], [20, 21, 22]])[None])[0, -3:]
    chain2 = tiny_model.logits(np.concatenate([prefix[0], [20, 23]])[None])[0, -1]
    # float32 sums in another order (a tree forward vs a plain one): 1.2e-5 seen on logits of size ~5
    np.testing.assert_allclose(np.asarray(out.logits[0, :3]), chain1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logits[0, 3]), chain2, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the real embedded model

REAL_PROMPTS = ["What is 7 + 5?", "Name three primary colors.", "Solve for x: 2x + 3 = 11."]


@pytest.mark.real
def test_real_model_logits_match_transformers(real_model, hf_real):
    for prompt in REAL_PROMPTS:
        ids = real_model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=True)["input_ids"]
        diff = np.abs(real_model.logits([ids]) - _torch_logits(hf_real, [ids])).max()
        assert diff < 1e-3, (prompt, diff)


@pytest.mark.real
@pytest.mark.parametrize("prompt", ["Solve for x: 2x + 3 = 11.", "What is the capital of Japan?"])
def test_real_model_greedy_matches_transformers_generate(real_model, hf_real, prompt):
    """Token-for-token equality with transformers' own cached `generate`.

    The Q4_1 model has near-ties: on some prompts the top-2 logits differ by < 0.02, below the ~0.08 drift
    measured between transformers' cached generate and its own full forward, so those prompts pick
    differently inside transformers itself. These two prompts have margins above that noise; the
    teacher-forced test below covers every prompt strictly.
    """
    import torch

    ids = real_model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True, tokenize=True)["input_ids"]
    with torch.no_grad():
        ref = hf_real.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                               eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    assert len(ref) == 64
    out = specjax.generate(real_model, [ids], "ar", max_new_tokens=64, eos_token_ids=())
    assert out.tokens[0] == ref


@pytest.mark.real
def test_real_model_cached_greedy_is_argmax_of_full_forward(real_model, hf_real):
    """Every greedy token from the cached loop is the argmax of transformers' full forward on that prefix."""
    ids = real_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain why the sky is blue in two sentences."}],
        add_generation_prompt=True, tokenize=True)["input_ids"]
    out = specjax.generate(real_model, [ids], "ar", max_new_tokens=64, eos_token_ids=())
    ref_logits = _torch_logits(hf_real, [ids + out.tokens[0]])[0, len(ids) - 1 : -1]
    assert out.tokens[0] == ref_logits.argmax(-1).tolist()
