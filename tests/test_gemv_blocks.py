"""One-row products split into blocks of the inner dimension (`linear.split_gemv`) and the per-machine
choice of how many (`models/gemv_blocks.py`): same products, same greedy tokens, a timed choice kept in
the cache folder that needs a clear win, and a checked override."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import step_cost
from specjax.models import gemv_blocks, transformer
from specjax.models.linear import matmul


@pytest.mark.parametrize("blocks", [2, 4])
def test_a_split_one_row_product_equals_the_plain_dot(blocks):
    rng = np.random.default_rng(blocks)
    w = jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 1, 48)), jnp.float32)
    y = matmul(x, w, blocks=blocks)
    assert y.shape == (1, 1, 24)
    np.testing.assert_allclose(y[0], np.asarray(x, np.float64)[0] @ np.asarray(w, np.float64), rtol=1e-5, atol=1e-5)
    split = str(jax.make_jaxpr(lambda a: matmul(a, w, blocks=blocks))(x))
    assert "dot_general" in split and f"f32[{blocks},1,24]" in split  # the batched form ran
    rows = jnp.asarray(rng.standard_normal((3, 1, 48)), jnp.float32)  # several rows: the plain product
    plain = str(jax.make_jaxpr(lambda a: a @ w)(rows))
    assert str(jax.make_jaxpr(lambda a: matmul(a, w, blocks=blocks))(rows)) == plain
    np.testing.assert_array_equal(matmul(x, w, blocks=5), x @ w)  # 48 is no multiple of 5: plain


def _split(model, blocks: int):
    return dataclasses.replace(model, config=dataclasses.replace(model.config, gemv_blocks=blocks))


@pytest.mark.parametrize("method, opts", [("ar", {}), ("pld", {"k": 4})])
def test_greedy_tokens_are_the_same_with_split_one_row_products(tiny_model, method, opts):
    from tests.test_generate import _prompts

    prompt = _prompts()[2:]  # batch 1: the decode steps are one-row products
    plain = specjax.generate(tiny_model, prompt, method, max_new_tokens=24, eos_token_ids=(), **opts)
    split = specjax.generate(_split(tiny_model, 4), prompt, method, max_new_tokens=24, eos_token_ids=(), **opts)
    assert split.tokens == plain.tokens
    one = jnp.ones((1, 1), jnp.int32)

    def jaxpr(cfg) -> str:
        return str(jax.make_jaxpr(lambda p, t: transformer.forward(p, cfg, t).logits)(tiny_model.params, one))

    assert "f32[4,1," in jaxpr(_split(tiny_model, 4).config)  # the layers took the split form
    assert "f32[4,1," not in jaxpr(tiny_model.config)


def _timings(monkeypatch, secs: dict[int, float]) -> list[int]:
    calls: list[int] = []

    def fake(cfg, params, candidates):
        calls.append(len(candidates))
        return {n: secs[n] for n in candidates}

    monkeypatch.setattr(gemv_blocks, "measure", fake)
    return calls


def test_the_split_is_timed_once_per_machine_and_kept_only_on_a_clear_win(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(gemv_blocks.ENV, raising=False)
    monkeypatch.setattr(step_cost, "_MEMORY", {})
    cfg, params = tiny_model.config, tiny_model.params
    assert gemv_blocks.choose(cfg, params) == 1  # a tiny model: plain dots, nothing timed
    monkeypatch.setattr(gemv_blocks, "MIN_LAYER_BYTES", 0)
    calls = _timings(monkeypatch, {1: 1.0, 2: 0.9, 4: 0.8})
    assert gemv_blocks.choose(cfg, params) == 4 and calls == [3]
    assert "gemv-forward" in (tmp_path / "step_costs.json").read_text()
    monkeypatch.setattr(step_cost, "_MEMORY", {})  # a new process reads the timings back
    assert gemv_blocks.choose(cfg, params) == 4 and calls == [3]
    assert gemv_blocks.choose(cfg, params, mesh=object()) == 1  # sharded: the blocks would cross shards
    step_cost.forget("gemv-forward")
    calls = _timings(monkeypatch, {1: 1.0, 2: 0.99, 4: 0.985})
    assert gemv_blocks.choose(cfg, params) == 1 and calls == [3]  # 1.5% is within a noisy machine's drift


def test_the_decoders_own_forward_is_timed_at_each_number_of_blocks(tiny_model):
    secs = gemv_blocks.measure(tiny_model.config, tiny_model.params, (1, 2))
    assert set(secs) == {1, 2} and all(0 < s < 5 for s in secs.values())
    split = dataclasses.replace(tiny_model.config, gemv_blocks=2)
    np.testing.assert_allclose(gemv_blocks._one_token(tiny_model.params, split),
                               gemv_blocks._one_token(tiny_model.params, tiny_model.config), rtol=1e-5, atol=1e-5)


def test_the_environment_sets_the_blocks_and_a_bad_value_names_the_fix(tiny_model, monkeypatch):
    cfg, params = tiny_model.config, tiny_model.params
    monkeypatch.setenv(gemv_blocks.ENV, "2")
    assert gemv_blocks.configure(cfg, params).gemv_blocks == 2
    monkeypatch.setenv(gemv_blocks.ENV, "3")  # 64 and 128 are no multiples of 3
    with pytest.raises(ValueError, match="does not divide.*choose one of"):
        gemv_blocks.choose(cfg, params)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(gemv_blocks.ENV, bad)
        with pytest.raises(ValueError, match="SPECJAX_GEMV_BLOCKS"):
            gemv_blocks.choose(cfg, params)


def test_load_sets_the_blocks_of_a_checkpoint(tiny_checkpoints, monkeypatch):
    folder, _ = tiny_checkpoints["llama"]
    monkeypatch.delenv(gemv_blocks.ENV, raising=False)
    assert specjax.load(str(folder), tokenizer=False).config.gemv_blocks == 1  # tiny: not worth timing
    monkeypatch.setenv(gemv_blocks.ENV, "2")
    model = specjax.load(str(folder), tokenizer=False)
    assert model.config.gemv_blocks == 2
    out = specjax.generate(model, [[5, 6, 7]], "ar", max_new_tokens=6, eos_token_ids=())
    assert len(out.tokens[0]) == 6


def test_load_times_the_forms_with_none_of_its_own_threads_running(tiny_checkpoints, tmp_path, monkeypatch):
    """The split forms need both cores: timed beside the tokenizer load, they lost to plain dots that
    decoded 12% slower on a 2-core machine."""
    import threading
    import time

    from specjax.models import loading

    folder, _ = tiny_checkpoints["llama"]
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(gemv_blocks.ENV, raising=False)
    monkeypatch.setattr(step_cost, "_MEMORY", {})
    monkeypatch.setattr(gemv_blocks, "MIN_LAYER_BYTES", 0)
    busy: list[str] = []

    def fake_measure(cfg, params, candidates):
        busy.extend(t.name for t in threading.enumerate() if t.name.startswith("specjax-"))
        return {n: 1.0 / n for n in candidates}

    def slow_tokenizer(kind, path):
        time.sleep(0.3)
        return None

    monkeypatch.setattr(gemv_blocks, "measure", fake_measure)
    monkeypatch.setattr(loading, "load_tokenizer", slow_tokenizer)
    model = specjax.load(str(folder))
    assert model.config.gemv_blocks == 4 and busy == []
