"""Shared fixtures: tiny random checkpoints written by transformers, and the real embedded model."""

from __future__ import annotations

import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# most of the suite's time is XLA:CPU compiling small programs once each; LLVM's -O0 compiles a tiny
# model's decode loop about 3x faster, and the matmuls it barely runs are library calls either way. The
# HLO passes (fusion, copy insertion) are the same; floating-point results can differ in the last bits
# (one batched-vs-single-row logits check needed 5e-5 rather than 1e-5), never by a masking-size error.
# Before any backend starts, and inherited by the processes tests start (notebook kernels, 8 devices).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

FAMILIES = ("llama", "llama3", "smollm2", "mistral", "qwen2", "qwen3")


def hf_tiny_config(family: str, vocab: int = 96):
    """A tiny transformers config of each supported family (random weights, float32)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    if family == "llama3":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "smollm2":  # Llama architecture with tied embeddings and theta 100000
        return tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=100000.0)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=4096, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    raise ValueError(family)


def save_tiny(family: str, folder, seed: int = 0, vocab: int = 96, **save_kwargs):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_tiny_config(family, vocab), dtype=torch.float32)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{family: (folder, torch_model)} for every family."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: (root / f, save_tiny(f, root / f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def real_model():
    import specjax

    return specjax.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_real():
    import torch
    import transformers as tf

    from specjax.models.loading import resolve

    _, path = resolve("smollm2-135m-instruct")
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """A random specjax model (no torch): llama family, peaky logits so greedy has clear winners."""
    from specjax.config import ModelConfig
    from specjax.model import Model
    from specjax.models.transformer import init_params

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=1024,
                      eos_token_ids=(2,))
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    return Model(config=cfg, params=params, tokenizer=None, name="tiny")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite checks each method's drafting at its fixed widths (acceptance, trees, sessions); the adaptive
# loop, the default for users, has its own tests (test_adaptive.py), which pass adaptive=True
os.environ["SPECJAX_ADAPTIVE"] = "0"
# each call of the adaptive loop starts afresh, whatever ran before it in the same process (tests that check
# the memory of earlier calls, `specjax.adapt_memory`, turn it on)
os.environ["SPECJAX_ADAPTIVE_MEMORY"] = "0"

@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template, saved as an HF folder.

    String prompts, chat templates and the CLIs run end to end on it in seconds.
    """
    import torch
    import transformers as tf

    from specjax.models.loading import load_tokenizer, resolve

    folder = tmp_path_factory.mktemp("tiny_chat")
    tok = load_tokenizer(*resolve("smollm2-135m-instruct"))
    cfg = hf_tiny_config("llama", vocab=len(tok))
    cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # peakier logits: greedy has clear winners
        model.lm_head.weight.mul_(5.0)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_chat_checkpoint):
    import specjax

    return specjax.load(str(tiny_chat_checkpoint))


def save_random_eagle_head(model, folder, drop=(3, 17, 40)):
    """A random (untrained, not degenerate) EAGLE head for `model`, saved like a trained one; the draft
    vocabulary leaves out the ids in `drop`, so the draft-to-target id mapping is exercised."""
    import jax
    import numpy as np

    from specjax.heads.eagle import feature_layers, init_head
    from specjax.heads.io import save_head

    params = init_head(model, jax.random.PRNGKey(1))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape), params)
    cfg = model.config
    ids = np.setdiff1d(np.arange(cfg.vocab_size), drop).astype(np.int32)
    save_head(folder, {"kind": "eagle", "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                       "draft_vocab_size": len(ids), "feature_layers": list(feature_layers(cfg.num_layers))},
              {**jax.tree.map(np.asarray, dict(params)), "draft_vocab": ids}, dtype="float32")
    return str(folder)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops jit caches and the program store's memory after each test module: one process compiles
    hundreds of programs over the suite, and a late XLA:CPU compile once crashed (segfault) in a run
    that had kept them all."""
    yield
    from specjax import programs

    programs.free_all()
