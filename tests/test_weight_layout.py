"""The layer matrices held as [out, in] where that multiplies faster (`models/weight_layout.py`): the same
outputs, a choice taken by the timing rule and kept in the cache folder, and a clear error for a bad
override."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.models import transformer, weight_layout


def _arranged(model, rows_from):
    cfg = dataclasses.replace(model.config, transposed_from=rows_from)
    return dataclasses.replace(model, config=cfg, params=weight_layout.arranged(model.params, rows_from),
                               name=f"tiny-t{rows_from}")


@pytest.mark.parametrize("rows_from", [1, 4])
def test_layers_read_as_out_in_give_the_same_logits_and_tokens(tiny_model, rows_from):
    """From 1 row: the [out, in] copies alone; from 4: both, the one-row steps on [in, out]. The same
    forward (float32 rounding apart) and the same greedy tokens, plain and speculative (verifies of 2
    rows and more); an EAGLE head started from such a model gets its last layer as [in, out]."""
    from specjax.heads.eagle import init_head

    model = _arranged(tiny_model, rows_from)
    layer = model.params["layers"][0]
    assert set(layer) >= {"wqkv_t", "wo_t", "w_gate_up_t", "w_down_t"}
    assert ("wqkv" in layer) == (rows_from > 1)
    for rows in (1, 7):
        tokens = jnp.arange(5, 5 + rows)[None]
        np.testing.assert_allclose(transformer.forward(model.params, model.config, tokens).logits,
                                   transformer.forward(tiny_model.params, tiny_model.config, tokens).logits,
                                   rtol=1e-5, atol=1e-5)
    if rows_from > 1:  # each product reads the copy its rows call for: blank the [out, in] one to see which
        blank = dict(model.params, layers=tuple({k: (jnp.zeros_like(v) if k.endswith("_t") else v)
                                                 for k, v in lp.items()} for lp in model.params["layers"]))
        for rows, reads_t in ((1, False), (rows_from - 1, False), (rows_from, True)):
            tokens = jnp.arange(5, 5 + rows)[None]
            same = np.allclose(transformer.forward(blank, model.config, tokens).logits,
                               transformer.forward(tiny_model.params, tiny_model.config, tokens).logits, atol=1e-5)
            assert same != reads_t, rows
    prompts = [[5, 6, 7, 8, 9, 10] * 3, [11, 12, 13]]
    kw = dict(max_new_tokens=24, eos_token_ids=())
    ar = specjax.generate(tiny_model, prompts, "ar", **kw)
    for method in ("ar", "pld"):
        assert specjax.generate(model, prompts, method, **kw).tokens == ar.tokens
    head, own = init_head(model, jax.random.PRNGKey(0)), init_head(tiny_model, jax.random.PRNGKey(0))
    assert set(head["layer"]) == set(own["layer"])
    for name in weight_layout.NAMES:
        np.testing.assert_array_equal(head["layer"][name], own["layer"][name])


def _secs(ratios: dict[int, float]) -> dict[tuple[int, int], float]:
    """[in, out] at 1 s for every row count; [out, in] at `ratios[rows]` of it (1 where not given)."""
    secs = {(0, r): 1.0 for r in weight_layout.ROWS}
    secs.update({(1, r): ratios.get(r, 1.0) for r in weight_layout.ROWS})
    return secs


def test_the_rows_from_which_out_in_is_read_follow_the_timing_rule():
    """The fewest timed rows from which [out, in] wins by the margin at every larger count (the Xeon's
    shape: slower at 1 to 4 rows, faster from 8); 0 when it does not win at the most rows; 1 when it
    wins everywhere. A win at a few rows below a loss at more does not count."""
    pick = weight_layout.pick
    assert pick(_secs({1: 1.2, 2: 1.1, 4: 1.03, 8: 0.9, 16: 0.85, 32: 0.8})) == 8
    assert pick(_secs({r: 0.9 for r in weight_layout.ROWS})) == 1
    assert pick(_secs({1: 0.9, 2: 0.9, 32: 1.0})) == 0
    assert pick(_secs({4: 0.8, 8: 0.99, 16: 0.9, 32: 0.9})) == 16  # 8 rows: within the margin


def test_the_layout_is_timed_once_per_machine_and_model(tiny_model, monkeypatch, tmp_path):
    """The forwards are timed on first use and the seconds kept in the cache folder: a second choice
    (another process, here a cleared memory) reads them instead of timing again. Both copies are held
    only where they fit in the memory share."""
    from specjax import step_cost

    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(weight_layout.ENV, raising=False)
    monkeypatch.setattr(weight_layout, "MIN_LAYER_BYTES", 0)
    calls = []

    def measure(cfg, params):
        calls.append(1)
        return _secs({1: 1.2, 2: 1.1, 4: 0.9, 8: 0.9, 16: 0.9, 32: 0.9})

    monkeypatch.setattr(weight_layout, "measure", measure)
    cfg, params = weight_layout.configure(tiny_model.config, tiny_model.params)
    assert (cfg.transposed_from, len(calls)) == (4, 1)
    assert {"wqkv", "wqkv_t"} <= set(params["layers"][0])
    assert "layout-forward" in (tmp_path / "step_costs.json").read_text()
    step_cost._MEMORY.clear()
    assert weight_layout.choose(tiny_model.config, tiny_model.params) == 4
    assert len(calls) == 1
    monkeypatch.setattr(weight_layout, "_memory_bytes", lambda: 1024)  # no room for a second copy
    assert weight_layout.choose(tiny_model.config, tiny_model.params) == 0


def test_a_bad_override_names_the_fix(tiny_model, monkeypatch):
    monkeypatch.setenv(weight_layout.ENV, "columns")
    with pytest.raises(ValueError, match="number of rows"):
        weight_layout.choose(tiny_model.config, tiny_model.params)
    monkeypatch.setenv(weight_layout.ENV, "1")  # set: even a model too small to time
    assert weight_layout.configure(tiny_model.config, tiny_model.params)[0].transposed_from == 1
    assert weight_layout.choose(tiny_model.config, tiny_model.params, mesh=object()) == 0  # sharded: never


@pytest.mark.parametrize("rows_from", [1, 4])
def test_the_bandwidth_bound_counts_the_copy_a_step_reads(tiny_model, rows_from):
    """`benchmarks.decode_speed` bounds decoding by the bytes a step streams: a layer holding both
    layouts reads one of them."""
    from benchmarks.decode_speed import weight_bytes

    assert weight_bytes(_arranged(tiny_model, rows_from).params) == weight_bytes(tiny_model.params)
