"""MoESD formulas against hand-computed values, the step-time fit on synthetic timings, the oracle
drafter's acceptance, and the moe_sweep CLI end to end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

import specjax
from specjax.analysis import moesd
from specjax.analysis.oracle import Oracle
from specjax.config import ModelConfig


def test_expected_experts_by_hand():
    # E=8, K=2: one token activates 2; two tokens 8 * (1 - (6/8)^2) = 8 * 7/16 = 3.5
    assert moesd.expected_experts(8, 2, 1) == pytest.approx(2.0)
    assert moesd.expected_experts(8, 2, 2) == pytest.approx(3.5)
    assert moesd.expected_experts(64, 8, 0) == pytest.approx(0.0)
    assert moesd.expected_experts(8, 8, 5) == pytest.approx(8.0)  # dense limit: every expert
    assert moesd.expected_experts(64, 8, 1000) == pytest.approx(64.0)


def test_expected_tokens_by_hand():
    # alpha 0.5, gamma 2: 1 + 0.5 + 0.25 = 1.75
    assert moesd.expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert moesd.expected_tokens(0.0, 4) == pytest.approx(1.0)
    assert moesd.expected_tokens(1.0, 3) == pytest.approx(4.0)
    assert moesd.estimate_alpha(1.75, 2) == pytest.approx(0.5, abs=1e-9)


def test_batch_tokens_per_step_by_hand():
    # gamma 1, alpha .5, 2 tokens: a row needs 1 step (p .5) or 2; E[steps] = 1.5 -> 2 / 1.5 tokens per step;
    # two rows end in 1 step only if both do (p .25): E[max] = 1.75 -> 2 / 1.75
    assert moesd.batch_tokens_per_step(0.5, 1, 1, 2, samples=20000) == pytest.approx(2 / 1.5, abs=0.02)
    assert moesd.batch_tokens_per_step(0.5, 1, 2, 2, samples=20000) == pytest.approx(2 / 1.75, abs=0.02)
    assert moesd.batch_tokens_per_step(0.0, 3, 8, 50) == 1.0
    assert moesd.batch_tokens_per_step(1.0, 3, 8, 160) == 4.0
    long = moesd.batch_tokens_per_step(0.8, 3, 1, 3000, samples=500)
    assert long == pytest.approx(float(moesd.expected_tokens(0.8, 3)), rel=0.01)  # one long row: sigma
    by_batch = [moesd.batch_tokens_per_step(0.8, 3, b, 160) for b in (1, 4, 16, 64)]
    assert by_batch == sorted(by_batch, reverse=True) and by_batch[-1] < 0.92 * by_batch[0]  # stragglers
    # it stands for sigma in the speedup
    assert moesd.speedup(0.8, 3, 10.0, 15.0, tokens_per_step=2.5) == pytest.approx(2.5 / 1.5)
    with pytest.raises(ValueError, match="new_tokens"):
        moesd.batch_tokens_per_step(0.8, 3, 4, 0)


def test_speedup_and_efficiency_by_hand():
    # sigma(0.8, 3) = 1 + .8 + .64 + .512 = 2.952; cost = 3 * 1/10 + 15/10 + 0.5/10 = 1.85
    assert moesd.speedup(0.8, 3, t_ar=10.0, t_verify=15.0, t_draft=1.0, t_reject=0.5) == pytest.approx(2.952 / 1.85)
    assert moesd.target_efficiency(10.0, 15.0) == pytest.approx(2 / 3)
    assert moesd.speedup(0.0, 4, 1.0, 1.0) == pytest.approx(1.0)  # nothing accepted, free verify: no gain


def test_weight_profile_counts_active_and_total_params():
    cfg = ModelConfig(family="mixtral", vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=1,
                      num_kv_heads=1, head_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=6,
                      moe_layers=(0, 1))
    p = moesd.WeightProfile.of(cfg)
    assert p.expert_params == 3 * 4 * 6 and p.sparse_layers == 2
    # one token reads the dense part and K experts per layer; many tokens read all E
    assert p.bytes_read(1) == pytest.approx(4 * (p.dense_params + 2 * p.expert_params * 2))
    assert p.bytes_read(10_000) == pytest.approx(4 * (p.dense_params + 2 * p.expert_params * 8), rel=1e-6)
    assert p.flops(3) == pytest.approx(2 * (p.dense_params + 2 * p.expert_params * 2) * 3)


def test_step_time_fit_recovers_synthetic_hardware():
    cfg = ModelConfig(family="mixtral", vocab_size=100, hidden_size=64, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=2,
                      moe_intermediate_size=64, moe_layers=(0, 1))
    p = moesd.WeightProfile.of(cfg)
    tokens = np.asarray([1, 2, 4, 8, 16, 32, 64, 128, 256])
    truth = 2e-4 + 1e-10 * p.bytes_read(tokens) + 3e-12 * p.flops(tokens)
    fit = moesd.StepTimeFit.fit(p, tokens, truth)
    assert (fit.c0, fit.c_w, fit.c_f) == pytest.approx((2e-4, 1e-10, 3e-12), rel=1e-3)
    np.testing.assert_allclose(fit(tokens), truth, rtol=1e-4)


def test_oracle_acceptance_follows_alpha(tiny_model):
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=120, eos_token_ids=())
    for alpha, k in ((0.0, 3), (1.0, 3), (0.6, 3)):
        oracle = Oracle.for_outputs(prompts, ar.tokens, alpha=alpha, k=k)
        out = specjax.generate(tiny_model, prompts, oracle, max_new_tokens=120, eos_token_ids=())
        assert out.tokens == ar.tokens
        assert out.stats["mean_accepted_tokens"] == pytest.approx(float(moesd.expected_tokens(alpha, k)), rel=0.15)
    with pytest.raises(ValueError, match="temperature=0"):
        specjax.generate(tiny_model, prompts, Oracle.for_outputs(prompts, ar.tokens, 0.5, 2), temperature=1.0)


def test_moe_sweep_cli_end_to_end(tmp_path, capsys):
    from eval import moe_sweep

    assert moe_sweep.main(["--make-tiny", str(tmp_path / "m"), "--tiny-size", "tiny"]) == 0
    out = tmp_path / "sweep"
    rc = moe_sweep.main(["--model", str(tmp_path / "m/moe"), "--dense", str(tmp_path / "m/dense"), "--batch-sizes",
                         "1,2", "--gamma", "2", "--alpha", "0.7", "--context", "16", "--new-tokens", "12",
                         "--repeats", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "moe_sweep.json").read_text())["results"]
    assert [r["moe"] for r in res] == [True, False]
    for model in res:
        assert [(r["batch"], r["gamma"]) for r in model["rows"]] == [(1, 2), (2, 2)]
        for r in model["rows"]:
            assert r["t_ar_step_s"] > 0 and r["t_verify_step_s"] > 0 and r["alpha"] == 0.7
            assert r["predicted_speedup"] > 0 and r["measured_speedup"] > 0 and r["fit_efficiency"] > 0
            assert r["rows_equal_to_ar"] == 1.0  # greedy: the oracle's output is ar's
    assert (out / "moe_sweep.png").stat().st_size > 10_000
    assert "measured" in capsys.readouterr().out
    assert moe_sweep.main(["--model", "x", "--batch-sizes", "0"]) == 2
    assert moe_sweep.main(["--model", "x", "--alpha", "1.5"]) == 2
