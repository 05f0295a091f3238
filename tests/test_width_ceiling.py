"""`generate(trace=True)`'s per-step record, and the width ceilings replayed from it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import specjax
from specjax.analysis import width_ceiling as wc

PROMPTS = [[5, 6, 7, 8] * 4, [9, 10, 11, 12, 13] * 2]


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_trace_accounts_for_every_step_and_token(tiny_model, adaptive):
    """An oracle drafter accepted with probability 0.7 per position (random weights repeat nothing), two
    rows: the trace holds every step, every emitted token, and the widths the loop counted."""
    from specjax.analysis.oracle import Oracle

    kw = dict(max_new_tokens=24, eos_token_ids=())
    ar = specjax.generate(tiny_model, PROMPTS, "ar", **kw)
    oracle = Oracle.for_outputs(PROMPTS, ar.tokens, alpha=0.7, k=4)
    plain = specjax.generate(tiny_model, PROMPTS, oracle, adaptive=adaptive, **kw)
    out = specjax.generate(tiny_model, PROMPTS, oracle, adaptive=adaptive, trace=True, **kw)
    assert out.tokens == plain.tokens == ar.tokens and plain.stats["step_trace"] is None
    trace = out.stats["step_trace"]
    steps = out.stats["decode_steps"]
    assert len(trace["width"]) == len(trace["proposing"]) == steps
    accepted, proposed, verified = (np.asarray(trace[k]) for k in ("accepted", "proposed", "verified"))
    assert accepted.shape == (2, steps)
    for b in range(2):  # each live step emits its accepted tokens and the target's own (the prefill the first)
        assert int(np.sum(accepted[b][accepted[b] >= 0] + 1)) == len(out.tokens[b]) - 1
    assert np.all(verified <= proposed) and np.all(accepted <= np.maximum(verified, 0))
    assert np.any(accepted > 0) and np.any((accepted >= 0) & (accepted < verified))  # taken whole and in part
    if not adaptive:
        assert np.array_equal(verified, proposed)
    ran = Counter(trace["width"])  # the verify widths the steps ran, as the loop counted them
    assert [ran[w] for w in specjax.adaptive.loop_widths(oracle)] == out.stats["verified_hist"]


def test_a_trace_of_a_batch_is_refused_by_the_ceilings(tiny_model):
    out = specjax.generate(tiny_model, PROMPTS, "pld", max_new_tokens=8, eos_token_ids=(), adaptive=False, trace=True)
    with pytest.raises(ValueError, match="batch 1"):
        wc.steps_of([out.stats["step_trace"]], (1, 3, 5, 9))


PRICES = wc.StepPrices(widths=(1, 3, 5), step_s=(1.0, 1.5, 2.0), propose_s=0.5)


def _trace(accepted, proposed=4, width=5, source=1, confidence=2.0):
    n = len(accepted)
    return {"source": [[source] * n], "confidence": [[confidence] * n], "proposed": [[proposed] * n],
            "verified": [[proposed] * n], "accepted": [list(accepted)], "proposing": [True] * n, "width": [width] * n}


def _bucket(conf, src):
    return np.zeros(len(conf), np.int32)


def test_drafts_that_are_always_rejected_are_worth_no_draft():
    steps = wc.steps_of([_trace([0] * 10)], PRICES.widths)
    assert wc.priced(steps, PRICES) == pytest.approx(10 * (0.5 + 2.0))
    assert wc.hindsight(steps, PRICES) == pytest.approx(10 * 1.0)  # no proposal, a 1-token step
    features, widths = wc.by_features(steps, PRICES, _bucket)
    assert set(widths.values()) == {1} and features == pytest.approx(10 * (0.5 + 1.0))  # proposed, not verified
    known, widths = wc.by_features(steps, PRICES, _bucket, skip_known=True)
    assert set(widths.values()) == {0} and known == pytest.approx(10 * 1.0)


def test_free_verification_keeps_the_full_width():
    free = wc.StepPrices(widths=(1, 3, 5), step_s=(1.0, 1.0, 1.0), propose_s=0.0)
    steps = wc.steps_of([_trace([4, 2, 4, 1])], free.widths)
    features, widths = wc.by_features(steps, free, _bucket)
    # no width gains over the fixed one; the groups holding full acceptances keep it (ties: the narrowest)
    assert features == pytest.approx(wc.priced(steps, free)) and widths[(1, 0, 0)] == 5
    assert steps.tokens == 5 + 3 + 5 + 2


def test_hindsight_verifies_just_what_each_step_accepted():
    steps = wc.steps_of([_trace([4, 2, 0, 1])], PRICES.widths)
    # 4 accepted: width 5; 2: width 3; 0: no proposal; 1: width 3
    assert wc.hindsight(steps, PRICES) == pytest.approx((0.5 + 2.0) + (0.5 + 1.5) + 1.0 + (0.5 + 1.5))
    assert steps.streak.tolist() == [0, 1, 0, 0]  # the first draft was accepted whole


def test_the_cheap_part_of_a_proposal_is_priced_apart():
    prices = wc.StepPrices(widths=(1, 3, 5), step_s=(1.0, 1.5, 2.0), propose_s=0.5, cheap_s=0.1, cheap_sources=(1,))
    steps = wc.steps_of([_trace([4, 4], source=1), _trace([4, 4], source=2)], prices.widths)
    assert wc.priced(steps, prices) == pytest.approx(2 * (0.1 + 2.0) + 2 * (0.5 + 2.0))


def test_step_prices_need_a_calibrated_run():
    with pytest.raises(ValueError, match="adaptive"):
        wc.StepPrices.from_stats({"step_costs_s": [], "widths": []})


def test_ceilings_of_a_run_beside_its_adaptive_twin():
    """What `benchmarks.adaptive_ceiling` prints per round, from traced stats: a fixed run that verified
    width 5 on every step and accepted nothing half the time, beside an adaptive run that cut those."""
    costs = dict(widths=[1, 3, 5], step_costs_s=[1.0, 1.5, 2.0], propose_s=0.5, cheap_part_s=0.0)
    fixed = [{"decode_s": 10.0, "step_trace": _trace([4, 0, 4, 0])}]
    cut = _trace([4, 0, 4, 0], width=1)
    adaptive = [{"decode_s": 8.0, "step_trace": cut, **costs}]
    got = wc.ceilings(adaptive, fixed, _bucket)
    assert got["adaptive"] == pytest.approx(10.0 / 8.0)
    assert got["model_s"]["fixed"] == pytest.approx(4 * 2.5) and got["steps"] == 4
    assert got["model_s"]["adaptive"] == pytest.approx(4 * 1.5)
    # hindsight: two steps at width 5 with their proposal, two with no proposal at all
    assert got["hindsight"] == pytest.approx(10.0 / (2 * 2.5 + 2 * 1.0))
    # the streak splits them: after a draft accepted whole the next is rejected, so that group drafts nothing
    assert got["group_widths"] == {"(1, 0, 0)": 5, "(1, 0, 1)": 1}
    assert got["features"] == pytest.approx(10.0 / (10 / 2.0 + 2 / (2 / 3.0)))


def test_the_ceiling_benchmark_runs_on_a_checkpoint(tiny_chat_checkpoint, tmp_path, capsys, monkeypatch):
    """`python -m benchmarks.adaptive_ceiling` as the README runs it, on a tiny checkpoint: per round the
    measured and modelled seconds of both runs, and ceilings that never fall below the fixed widths. With
    adaptive widths turned off by the environment it says so before loading anything."""
    import json

    from benchmarks import adaptive_ceiling

    monkeypatch.setenv("SPECJAX_ADAPTIVE", "0")  # (the suite's default)
    with pytest.raises(SystemExit):
        adaptive_ceiling.main(["--model", str(tiny_chat_checkpoint)])
    assert "unset it" in capsys.readouterr().err
    monkeypatch.setenv("SPECJAX_ADAPTIVE", "1")

    out = tmp_path / "ceiling.json"
    assert adaptive_ceiling.main(["--model", str(tiny_chat_checkpoint), "--cell", "single-arith", "--method", "pld",
                                  "--limit", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    assert "hindsight" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["steps"] > 0 and row["model_s"]["fixed"] > 0 and row["decode_s"]["adaptive"] > 0
    # each ceiling holds the fixed widths among its choices; knowing the features early adds a choice
    assert row["features_known"] >= row["features"] >= 1.0 - 1e-9 and row["hindsight"] >= 1.0 - 1e-9
