"""Sparse MoE targets: parity with transformers for Qwen2-MoE, Qwen3-MoE and Mixtral, both expert
compute paths, activated-expert counts against N(t), greedy speculative == AR on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.analysis.moesd import expected_experts
from specjax.config import ModelConfig
from specjax.models import moe

MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")


def hf_moe_config(family: str, vocab: int = 96, **over):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    if family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, **over)
    if family == "qwen2_moe":  # layer 0 dense (mlp_only_layers), gated shared expert, no top-k renormalisation
        return tf.Qwen2MoeConfig(**common, intermediate_size=80, moe_intermediate_size=32, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=40, norm_topk_prob=False,
                                 mlp_only_layers=[0], **over)
    return tf.Qwen3MoeConfig(**common, intermediate_size=80, moe_intermediate_size=32, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **over)


def save_tiny_moe(family: str, folder, seed: int = 0, **over):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_moe_config(family, **over), dtype=torch.float32)
    with torch.no_grad():  # random routers are near-uniform; sharpen them so routing is decisive
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] > 1:
                p.mul_(20.0)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: (root / f, save_tiny_moe(f, root / f)) for f in MOE_FAMILIES}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_parity_with_transformers(moe_checkpoints, family):
    import torch

    folder, hf = moe_checkpoints[family]
    model = specjax.load(str(folder), tokenizer=False)
    cfg = model.config
    assert cfg.is_moe and cfg.num_experts == 8
    assert cfg.moe_layers == ((1,) if family == "qwen2_moe" else (0, 1))
    tokens = np.random.default_rng(0).integers(3, 96, size=(2, 13))
    ours = model.logits(tokens)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    assert np.max(np.abs(ours - ref)) < 1e-4


def test_gather_and_grouped_expert_paths_agree():
    rng = np.random.default_rng(0)
    e, d, f, n, k = 6, 16, 24, 9, 2
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    gu = jnp.asarray(rng.normal(size=(e, d, 2 * f)), jnp.float32)
    down = jnp.asarray(rng.normal(size=(e, f, d)), jnp.float32)
    w, idx = moe.route(x, jnp.asarray(rng.normal(size=(d, e)), jnp.float32), k, norm_topk=True)
    a = moe.experts_gather(x, gu, down, idx, w)
    b = moe.experts_grouped(x, gu, down, idx, w)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-6)


def test_activated_expert_counts_follow_n_of_t():
    """Under random routing (random tokens, a fresh random router per trial), the distinct experts t
    tokens activate average N(t) = E (1 - ((E-K)/E)^t), through both expert paths (switch at t*K = E)."""
    cfg = ModelConfig(family="mixtral", vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=2,
                      moe_intermediate_size=8, moe_layers=(0,))
    run = jax.jit(lambda lp, h: moe.moe_mlp(lp, cfg, h)[1])
    key = jax.random.PRNGKey(0)
    for t in (1, 2, 4, 8, 16):
        counts = []
        for _ in range(80):
            key, k1, k2 = jax.random.split(key, 3)
            lp = moe.init_moe(cfg, lambda shape, k1=k1: jax.random.normal(k1, shape))
            counts.append(int(run(lp, jax.random.normal(k2, (1, t, 32)))))
        assert np.mean(counts) == pytest.approx(float(expected_experts(16, 2, t)), rel=0.08), t


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_greedy_speculative_equals_ar_on_moe(moe_checkpoints, family):
    model = specjax.load(str(moe_checkpoints[family][0]), tokenizer=False)
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [11, 12, 13]]
    ar = specjax.generate(model, prompts, "ar", max_new_tokens=24, eos_token_ids=())
    for method, opts in [("pld", {"k": 4}), ("suffix", {"k": 4}), ("draft", {"draft": "self:1", "k": 3})]:
        out = specjax.generate(model, prompts, method, max_new_tokens=24, eos_token_ids=(), **opts)
        assert out.tokens == ar.tokens, (family, method)


def test_unknown_moe_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig(family="mixtral", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, num_experts=2, num_experts_per_tok=3, moe_layers=(0,))
