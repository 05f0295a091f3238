"""The adaptive loop: widths chosen per step from measured step costs and online acceptance, losslessly."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import adaptive, programs, step_cost
from specjax.adaptive import confidence_bucket, loop_widths
from specjax.proposers import make_proposer

METHODS = [("pld", {}), ("suffix", {}), ("pool", {}), ("recycling", {}), ("pia", {}),
           ("draft", {"draft": "self:1", "k": 3}), ("suffix", {"branches": 2, "k": 4})]
REPEATING = [[5, 6, 7, 8, 9, 10] * 6]


@pytest.fixture
def cpu_like_costs(monkeypatch):
    """Crafted step costs with a CPU's shape (a verify of 5 costs 1.5x a 1-token step, of 9 2x, and
    proposing 0.2x), so decisions do not depend on how busy the test machine is."""
    from specjax import engine

    def costs(model, plan, proposer, *rest):
        widths = adaptive.loop_widths(proposer)
        return (np.asarray([1.0 + 0.125 * (w - 1) for w in widths], np.float32) * 1e-3, np.float32(2e-4),
                np.float32(0), np.float32(0), 0.0)

    monkeypatch.setattr(engine, "step_costs", costs)


@pytest.mark.parametrize("method, opts", METHODS, ids=[f"{m}{'-tree' if o.get('branches') else ''}"
                                                       for m, o in METHODS])
def test_greedy_adaptive_equals_ar(tiny_model, method, opts):
    prompts = [[5, 6, 7, 8, 5, 6] * 2, [9, 10, 11] * 5]
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=48, eos_token_ids=())
    out = specjax.generate(tiny_model, prompts, method, max_new_tokens=48, eos_token_ids=(), adaptive=True, **opts)
    assert out.tokens == ar.tokens
    s = out.stats
    assert s["adaptive"] and s["widths"] == list(loop_widths(make_proposer(method, **opts)))
    assert sum(s["width_hist"]) == s["decode_steps"] and len(s["step_costs_s"]) == len(s["widths"])
    assert all(c > 0 for c in s["step_costs_s"]) and 0 < s["drafted_share"] <= 1
    assert s["predicted_tokens"] > 0 and s["predicted_decode_s"] > 0
    # each step's verify forward ran at most the width chosen (narrower where every draft was shorter)
    verified, chosen = s["verified_hist"], s["width_hist"]
    assert sum(verified) == s["decode_steps"] and len(verified) == len(chosen)
    assert all(sum(verified[j:]) <= sum(chosen[j:]) for j in range(len(chosen)))


def test_sampling_is_reproducible_and_fixed_widths_stay_available(tiny_model):
    kw = dict(max_new_tokens=32, temperature=0.8, seed=3, eos_token_ids=())
    a = specjax.generate(tiny_model, REPEATING, "suffix", adaptive=True, **kw)
    b = specjax.generate(tiny_model, REPEATING, "suffix", adaptive=True, **kw)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 32
    fixed = specjax.generate(tiny_model, REPEATING, "suffix", adaptive=False, **kw)
    assert not fixed.stats["adaptive"] and fixed.stats["width_hist"] == []


@pytest.mark.parametrize("alpha", [0.95, 0.0])
def test_drafts_wide_when_drafts_are_accepted_and_not_when_they_are_not(tiny_model, alpha, cpu_like_costs):
    """An oracle drafter accepted with probability alpha per position (random weights repeat nothing):
    at 0.95 the loop verifies wide and takes fewer steps than plain decoding; at 0 it backs off to
    1-token steps and (lossless) never falls far behind plain decoding in steps."""
    from specjax.analysis.oracle import Oracle

    prompt = [[3, 17, 41, 29, 11, 60, 7]]
    ar = specjax.generate(tiny_model, prompt, "ar", max_new_tokens=64, eos_token_ids=())
    oracle = Oracle.for_outputs(prompt, ar.tokens, alpha=alpha, k=8)
    out = specjax.generate(tiny_model, prompt, oracle, max_new_tokens=64, eos_token_ids=(), adaptive=True)
    assert out.tokens == ar.tokens
    hist, steps = out.stats["width_hist"], out.stats["decode_steps"]
    if alpha > 0.5:
        assert sum(hist[1:]) > hist[0] and steps < 0.6 * ar.stats["decode_steps"]
    else:
        assert hist[0] >= 0.8 * steps and out.stats["drafted_share"] < 0.5 and steps == ar.stats["decode_steps"]


def test_a_costly_drafter_backs_off_on_text_it_cannot_draft(tiny_model, cpu_like_costs):
    out = specjax.generate(tiny_model, [[3, 17, 41, 29, 11, 60, 7]], "draft", draft="self:1", k=3,
                           max_new_tokens=64, eos_token_ids=(), adaptive=True)
    assert out.stats["drafted_share"] < 1.0  # propose was skipped on some steps (then probed again)


def test_a_tree_verifies_its_first_ranked_chain_where_the_whole_tree_is_dear(monkeypatch):
    """Recycling's tree (14 nodes) offers three sub-trees: the root, the chain of first-ranked successors
    (4 nodes) and the whole tree. Where the whole tree costs 10x a 1-token step and the chain 1.5x, on a
    random model whose greedy output falls into a cycle, the chain is verified (a probe alternates
    between the two), losslessly, and each step's verify runs the sub-tree chosen."""
    import jax

    from specjax import engine
    from specjax.config import ModelConfig
    from specjax.drafting import branching_tree
    from specjax.model import Model
    from specjax.models.transformer import init_params

    tree = branching_tree((2, 2), 4)
    assert tree.subtrees == ((0,), (0, 1, 3, 7, 11), tuple(range(15)))
    assert tree.subtree((0, 1, 3, 7, 11)).parents == (-1, 0, 1, 2, 3)
    with pytest.raises(ValueError, match="not a sub-tree"):
        tree.subtree((0, 3))  # node 3's parent (1) is missing
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=512, eos_token_ids=(2,))
    cyclic = Model(config=cfg, params=init_params(cfg, jax.random.PRNGKey(0)), tokenizer=None, name="cyclic")
    monkeypatch.setattr(engine, "step_costs", lambda *a: (np.asarray([1.0, 1.5, 10.0], np.float32) * 1e-3,
                                                          np.float32(2e-4), np.float32(0), np.float32(0), 0.0))
    ar = specjax.generate(cyclic, REPEATING, "ar", max_new_tokens=64, eos_token_ids=())
    out = specjax.generate(cyclic, REPEATING, "recycling", max_new_tokens=64, eos_token_ids=(), adaptive=True)
    assert out.tokens == ar.tokens and out.stats["widths"] == [1, 5, 15]
    hist = out.stats["width_hist"]
    assert hist[1] > 0 and out.stats["decode_steps"] < ar.stats["decode_steps"]
    assert out.stats["verified_hist"] == hist  # a tree's verify runs the sub-tree chosen


def test_step_costs_are_measured_once_and_kept_in_the_cache_folder(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(step_cost, "_MEMORY", {})
    first = specjax.generate(tiny_model, [[5, 6, 7]], "pld", max_new_tokens=8, adaptive=True, max_len=384)
    assert first.stats["calibration_s"] > 0
    saved = (tmp_path / "step_costs.json").read_text()
    assert "|loop|" in saved and step_cost.device_name() in saved
    monkeypatch.setattr(step_cost, "_MEMORY", {})  # a new process: read back from the file
    again = specjax.generate(tiny_model, [[5, 6, 7]], "pld", max_new_tokens=8, adaptive=True, max_len=384)
    assert again.stats["calibration_s"] == 0 and again.stats["step_costs_s"] == first.stats["step_costs_s"]
    # a sampled run times its own steps (a softmax and a draw per verified position), and so does a
    # changed specjax source: greedy seconds, or an older loop's, are not its costs
    sampled = specjax.generate(tiny_model, [[5, 6, 7]], "pld", max_new_tokens=8, adaptive=True, max_len=384,
                               temperature=0.7)
    assert sampled.stats["calibration_s"] > 0
    monkeypatch.setattr(step_cost, "_MEMORY", {})
    monkeypatch.setattr(programs, "_source_digest", "another source")
    changed = specjax.generate(tiny_model, [[5, 6, 7]], "pld", max_new_tokens=8, adaptive=True, max_len=384)
    assert changed.stats["calibration_s"] > 0


def test_a_narrower_width_timed_dearer_than_a_wider_one_costs_what_the_wider_did(tiny_model, monkeypatch):
    """Timing noise only adds time: a 3-token step timed above a 5-token one was slowed by other work."""
    from specjax import engine, warm_start
    from specjax.config import SamplingConfig
    from specjax.plan import bind_proposer

    proposer, weights = bind_proposer(tiny_model, "pld", SamplingConfig(), k=8)
    widths = adaptive.loop_widths(proposer)
    assert len(widths) >= 4
    timed = [1.0, 0.1, 1.1, 2.6, 2.0, *[3.0 + i for i in range(len(widths) - 3)]]  # skip, propose, w1, w3, ...
    monkeypatch.setattr(step_cost, "cached_seconds", lambda keys, measure, what="": (list(timed), 0.0))
    plan = warm_start.dummy_plan(tiny_model, proposer, num_prompts=1, num_samples=1, prompt_bucket=64,
                                 cache_len=256, tokens=8)
    costs, drafter, _, _, _ = engine.step_costs(tiny_model, plan, proposer, weights, SamplingConfig())
    assert drafter == pytest.approx(0.1)
    expected = [1.0, 1.9, 1.9, *[2.9 + i for i in range(len(widths) - 3)]]  # w3 at w5's 2.0 - 0.1
    np.testing.assert_allclose(costs, expected, rtol=1e-6)
    assert np.all(np.diff(costs) >= 0)


@pytest.mark.parametrize("method, opts", [("pld", {"k": 8}), ("suffix", {"branches": 2, "k": 4})],
                         ids=["chain", "tree"])
def test_the_calibration_times_each_width_it_names(tiny_model, method, opts):
    """Each timed run of the in-loop calibration ran its verify forwards at the width it is filed under
    (the `lax.switch` branch, `verify_hist`), and the run filed as skipping proposed nothing."""
    from specjax import engine, warm_start
    from specjax.config import SamplingConfig
    from specjax.plan import bind_proposer

    proposer, weights = bind_proposer(tiny_model, method, SamplingConfig(), **opts)
    widths = adaptive.loop_widths(proposer)
    plan = warm_start.dummy_plan(tiny_model, proposer, num_prompts=1, num_samples=2, prompt_bucket=64,
                                 cache_len=256, tokens=engine.CALIBRATION_STEPS * max(widths) + 1)
    timed = engine._run(tiny_model, plan, proposer, weights, SamplingConfig(), 0, (), None, None, 32, None,
                        adaptive=True, warm_up="measure")
    assert sorted(timed) == [engine.PROPOSE, engine.SKIP, *range(len(widths))]
    del timed[engine.PROPOSE]
    for i, (seconds, verified, drafted) in timed.items():
        assert seconds > 0 and len(verified) == len(widths)
        ran = 0 if i == engine.SKIP else i
        assert verified[ran] == engine.CALIBRATION_STEPS and sum(verified) == verified[ran]
        assert drafted == (0 if i == engine.SKIP else engine.CALIBRATION_STEPS)


def _calibrate_on_crafted_rounds(model, monkeypatch, rounds: dict[int, list[float]], num_samples: int = 1):
    """`engine._run(warm_up="measure")` for `pld` (k=4) with the timed rounds of the listed configurations
    replaced by `rounds` (seconds of CALIBRATION_STEPS steps; other widths 1.0). The real runs still fill
    the loop states the timing reads; the proposal timed alone (`timed_seconds`) passes through."""
    from specjax import engine, step_cost, warm_start
    from specjax.config import SamplingConfig
    from specjax.plan import bind_proposer

    real = step_cost.interleaved_times

    def crafted(runs, repeats, inputs=None):
        times = real(runs, repeats, inputs)
        if "run" in runs:
            return times
        return {k: rounds.get(k, [1.0] * repeats) for k in times}

    monkeypatch.setattr(step_cost, "interleaved_times", crafted)
    proposer, weights = bind_proposer(model, "pld", SamplingConfig(), k=4)
    widths = adaptive.loop_widths(proposer)
    plan = warm_start.dummy_plan(model, proposer, num_prompts=1, num_samples=num_samples, prompt_bucket=64,
                                 cache_len=256, tokens=engine.CALIBRATION_STEPS * max(widths) + 1)
    return engine._run(model, plan, proposer, weights, SamplingConfig(), 0, (), None, None, 32, None,
                       adaptive=True, warm_up="measure")


def test_the_drafter_cost_is_the_median_of_paired_rounds(tiny_model, monkeypatch):
    """A burst of other work in one round lands on both runs of that round: the drafter's cost is
    width 1's time less the skipping run's time of the same round (median over rounds), not the
    difference of two separately taken quartiles (here 0: a drafter that looks free proposes every step)."""
    from specjax import engine

    rounds = {engine.SKIP: [0.40, 0.80, 0.90], 0: [0.80, 0.84, 0.40]}  # seconds of CALIBRATION_STEPS steps
    timed = _calibrate_on_crafted_rounds(tiny_model, monkeypatch, rounds)
    steps = engine.CALIBRATION_STEPS
    assert timed[engine.PROPOSE][0] == pytest.approx(0.04 / steps)  # differences 0.40, 0.04, -0.50
    assert timed[0][0] == pytest.approx(timed[engine.SKIP][0])  # the quartiles alone: no cost at all


def test_the_drafter_cost_is_at_least_what_its_proposal_alone_takes(tiny_model, monkeypatch):
    """Paired rounds that say the drafter is free, or cheaper than nothing (noise on a shared machine),
    give way to the proposal's own seconds, timed as a program of its own."""
    from specjax import engine, step_cost

    seen = []

    def alone(run, repeats=5, percentile=25):
        seen.append(run())  # the proposal itself: a state and a draft
        return 0.003

    monkeypatch.setattr(step_cost, "timed_seconds", alone)
    rounds = {engine.SKIP: [0.80, 0.80, 0.80], 0: [0.70, 0.80, 0.78]}  # paired differences -0.1, 0, -0.02
    timed = _calibrate_on_crafted_rounds(tiny_model, monkeypatch, rounds, num_samples=2)
    assert timed[engine.PROPOSE][0] == pytest.approx(0.003)
    assert seen[0][1].tokens.shape == (2, 4)  # it timed the proposal: a draft of k tokens per row


def test_a_session_carries_the_acceptance_estimate(tiny_model, cpu_like_costs):
    from specjax.analysis.oracle import Oracle

    prompt = [[3, 17, 41, 29, 11, 60, 7]]
    ar = specjax.generate(tiny_model, prompt, "ar", max_new_tokens=32, eos_token_ids=())
    oracle = Oracle.for_outputs(prompt, ar.tokens, alpha=0.9, k=4)
    r1 = specjax.generate(tiny_model, prompt, oracle, max_new_tokens=32, eos_token_ids=(), adaptive=True,
                          keep_session=True)
    tried, hit = (np.asarray(x) for x in r1.session.acceptance)
    assert tried.sum() > 0 and 0.5 * tried.sum() < hit.sum() <= tried.sum()  # mostly accepted, as drafted
    r2 = specjax.generate(tiny_model, prompt, oracle, max_new_tokens=32, eos_token_ids=(), adaptive=True,
                          session=r1.session)
    assert r2.tokens == ar.tokens and r2.stats["width_hist"][0] < r1.stats["width_hist"][0] + 2


@pytest.mark.parametrize("single", [True, False], ids=["one-row", "batch"])
def test_one_row_averages_the_saving_its_estimate_expected(single):
    """A width-3 verify (1.5x a step, drafting 0.1x) that the estimate expected to yield 3 tokens yields
    one. One row averages what was expected (3 - 1.5 saved: proposing goes on), since one row's realised
    savings swing from -0.5 to +1.5 steps around a thin margin; a batch averages what it got (-0.5: the
    wait doubles), since its rows' acceptance need not move it."""
    from specjax.adaptive import init_adapt, settle

    adapt = init_adapt(make_proposer("pld", k=8)).replace(proposing=jnp.asarray(True), expected=jnp.float32(3.0))
    costs = jnp.asarray([1.0, 1.5, 1.8, 2.0])
    out = settle(adapt, jnp.float32(1), jnp.float32(1), jnp.int32(1), costs, jnp.float32(0.1), single=single)
    assert float(out.saving) == pytest.approx(0.9 * 0.1 + 0.1 * (1.5 if single else -0.5))
    assert (int(out.wait), int(out.backoff)) == ((0, 1) if single else (2, 2))


def test_counts_hold_on_steps_that_observe_nothing():
    """The acceptance counts decay on steps that propose or score a shadow, and hold on a backed-off
    drafter's steps (lean or not), so a drafter that waits between proposals keeps each one's evidence."""
    from specjax.adaptive import DECAY, idle_observe, init_adapt, observe
    from specjax.drafting import Draft

    adapt = init_adapt(make_proposer("pld", k=4))
    adapt = adapt.replace(tried=adapt.tried + 4.0, hit=adapt.hit + 3.0)
    held = idle_observe(adapt, jnp.asarray([9]), scored=True)
    np.testing.assert_array_equal(held.tried, adapt.tried)
    np.testing.assert_array_equal(held.hit, adapt.hit)
    none = Draft(tokens=jnp.zeros((1, 4), jnp.int32), num=jnp.zeros((1,), jnp.int32))
    args = (none, jnp.zeros((1,), bool), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), None)
    np.testing.assert_array_equal(observe(adapt, *args, decay=False).hit, adapt.hit)
    np.testing.assert_allclose(observe(adapt, *args).hit, DECAY * adapt.hit)


def test_the_memory_of_earlier_calls_does_not_carry_the_wait(monkeypatch):
    """A call starts proposing at once: the wait counted down through the text the last call wrote."""
    from specjax import adapt_memory
    from specjax.adaptive import init_adapt

    monkeypatch.setenv(adapt_memory.ENV, "1")

    class Owner:  # any object a model's memory can be keyed on (held weakly)
        pass

    owner = Owner()
    adapt = init_adapt(make_proposer("pld", k=4)).replace(wait=jnp.int32(44), backoff=jnp.int32(64))
    adapt_memory.remember(owner, ("k",), adapt)
    kept = adapt_memory.recall(owner, ("k",))
    assert "wait" not in kept and int(kept["backoff"]) == 64


def test_a_call_starts_from_what_the_previous_call_of_its_kind_learned(tiny_model, cpu_like_costs, monkeypatch):
    """A costly drafter on text it cannot draft learns to back off in its first call; the next call of the
    same kind starts backed off (fewer proposals, the same tokens), one of another kind starts afresh."""
    from specjax import adapt_memory

    monkeypatch.setenv(adapt_memory.ENV, "1")
    adapt_memory.forget(tiny_model)
    prompt = [[3, 17, 41, 29, 11, 60, 7]]
    run = lambda **kw: specjax.generate(tiny_model, prompt, "draft", draft="self:1", k=3, max_new_tokens=64,
                                        eos_token_ids=(), adaptive=True, **kw)
    ar = specjax.generate(tiny_model, prompt, "ar", max_new_tokens=64, eos_token_ids=())
    first, second, third = run(), run(), run()
    assert [r.stats["from_earlier_call"] for r in (first, second, third)] == [False, True, True]
    assert first.tokens == second.tokens == third.tokens == ar.tokens
    assert second.stats["drafted_share"] < first.stats["drafted_share"]
    assert not run(temperature=0.5).stats["from_earlier_call"]  # other sampling settings: their own estimate
    assert not specjax.generate(tiny_model, prompt * 2, "draft", draft="self:1", k=3, max_new_tokens=64,
                                eos_token_ids=(), adaptive=True).stats["from_earlier_call"]  # another batch
    # a Session continued from a call hands its counts to a loop that donates them: the memory keeps its own
    kept = run(keep_session=True)
    specjax.generate(tiny_model, prompt, "draft", draft="self:1", k=3, max_new_tokens=64, eos_token_ids=(),
                     adaptive=True, session=kept.session)
    assert run().stats["from_earlier_call"]
    adapt_memory.forget(tiny_model)
    assert not run().stats["from_earlier_call"]
    monkeypatch.setenv(adapt_memory.ENV, "0")
    off = run()
    assert not off.stats["from_earlier_call"] and off.stats["drafted_share"] == first.stats["drafted_share"]


def test_confidence_buckets():
    counts = confidence_bucket(jnp.asarray([0.0, 1.0, 3.0, 7.0, 100.0]), "count", 5)
    assert counts.tolist() == [0, 1, 2, 3, 5]
    probs = confidence_bucket(jnp.asarray([0.0, 0.5, 0.99, 1.0]), "probability", 4)
    assert probs.tolist() == [0, 3, 5, 5]
    assert np.all(np.asarray(confidence_bucket(None, "count", 3)) == 0)
    # one kind per source (a hybrid): a suffix row's 7-token match and a head row's 0.99 guess
    mixed = confidence_bucket(jnp.asarray([7.0, 0.99, 0.2]), ("count", "count", "probability"), 3,
                              jnp.asarray([1, 2, 2]))
    assert mixed.tolist() == [3, 5, 1]


def _decide(costs, hit_rate, num=8, drafter_s=0.0, observed=1000.0, backoff=1):
    """One decision of the loop on crafted inputs: a chain proposer of k=8, one row drafting `num` tokens,
    whose positions were each tried `observed` times and accepted at `hit_rate`; `backoff` > 1: the
    drafter proposes again after backing off, with the credit for a probe (else the loop is mid-run, its
    probe credit spent)."""
    from specjax.adaptive import choose_width, init_adapt
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=8)
    adapt = init_adapt(prop)
    adapt = adapt.replace(tried=adapt.tried + observed, hit=adapt.hit + observed * hit_rate,
                          backoff=jnp.int32(backoff), probe_due=jnp.asarray(backoff > 1),
                          credit=jnp.float32(10.0 if backoff > 1 else 0.0))
    draft = Draft(tokens=jnp.zeros((1, 8), jnp.int32), num=jnp.asarray([num], jnp.int32),
                  confidence=jnp.zeros((1,), jnp.float32))
    on = jnp.ones((1,), bool)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    out, _, adapt, best, _ = choose_width(draft, on, on, jnp.asarray(True), adapt, jnp.asarray(costs, jnp.float32),
                                          jnp.float32(drafter_s), widths, None, prop, jnp.int32(0))
    return int(widths[best]), int(out.num[0]), bool(adapt.probing)


def test_a_batch_drafts_only_when_its_slowest_row_gains():
    """Two rows with the same tokens left, one drafting 8 tokens accepted at 0.9, the other with no draft:
    the batch is no shorter for the first row's draft, so it verifies one token. Once the row without a
    draft has only 3 tokens left (the other 100), the drafting row is the one the batch waits for, and
    its draft is verified. With free verification the draft always rides along."""
    from specjax.adaptive import choose_width, init_adapt
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=8)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    adapt = init_adapt(prop, batch=2)
    adapt = adapt.replace(tried=adapt.tried + 1000.0, hit=adapt.hit + 900.0)
    draft = Draft(tokens=jnp.zeros((2, 8), jnp.int32), num=jnp.asarray([8, 0], jnp.int32),
                  confidence=jnp.zeros((2,), jnp.float32))
    on = jnp.ones((2,), bool)

    def width(costs, remaining):
        _, _, _, best, _ = choose_width(draft, on, on, jnp.asarray(True), adapt, jnp.asarray(costs),
                                        jnp.float32(0), widths, None, prop, jnp.int32(0),
                                        jnp.asarray(remaining, jnp.int32))
        return int(widths[best])

    dear = [1.0, 1.3, 1.5, 2.0]
    assert width(dear, [100, 100]) == 1
    assert width(dear, [100, 3]) == 9  # E = 6.1 tokens at 2x
    assert width([1.0] * 4, [100, 100]) == 9


def test_an_unseen_confidence_bucket_starts_from_its_sources_rate():
    """A drafter that has accepted 9 in 10 at one match length meets a longer match for the first time:
    that bucket starts from the source's pooled rate, so a dear verify (width 5 at 2x a 1-token step)
    pays; from the flat 0.5 prior it would not (width 3 at 1.8x: E = 1.75 / 1.8, width 5: 1.94 / 2.0), and the
    bucket would then never be tried. Its own evidence still overrides the pool."""
    from specjax.adaptive import choose_width, init_adapt
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=4)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    assert widths.tolist() == [1, 3, 5]
    adapt = init_adapt(prop).replace(credit=jnp.zeros((), jnp.float32))  # mid-run: no probe credit left
    seen = adapt.replace(tried=adapt.tried.at[0, 1].set(200.0), hit=adapt.hit.at[0, 1].set(180.0))
    draft = Draft(tokens=jnp.zeros((1, 4), jnp.int32), num=jnp.asarray([4], jnp.int32),
                  confidence=jnp.full((1,), 7.0))  # log2(7 + 1) = 3: bucket 3, never observed
    on = jnp.ones((1,), bool)

    def width(a):
        _, _, _, best, bucket = choose_width(draft, on, on, jnp.asarray(True), a, jnp.asarray([1.0, 1.8, 2.0]),
                                             jnp.float32(0), widths, None, prop, jnp.int32(0))
        assert int(bucket[0]) == 3
        return int(widths[best])

    assert width(seen) == 5
    assert width(adapt) == 1  # nothing observed anywhere: the 0.5 prior, and width 5 does not pay
    rejected = seen.replace(tried=seen.tried.at[0, 3, 0].set(50.0))  # bucket 3 tried 50 times, never accepted
    assert width(rejected) == 1


def test_a_long_match_seldom_seen_starts_from_the_best_shorter_matchs_rate():
    """Fresh text: 1-token matches (bucket 1) tried 400 times, accepted 10% of the time; 3-token matches
    (bucket 2) 40 times, accepted 90%. A 7-token match (bucket 3), never seen, starts from the 3-token
    rate, not the pooled 0.2 the short matches hold down: a width-5 verify at 2x a step pays. A bucket
    below the good one gains nothing from it, and a long match's own rejections outweigh the prior."""
    from specjax.adaptive import choose_width, confidence_prior, init_adapt
    from specjax.drafting import Draft

    first = jnp.asarray([0.5, 0.1, 0.9, 0.4, 0.3, 0.2, 0.1, 0.2, 0.3, 0.2, 0.1, 0.9])  # 6 buckets, then after a streak
    np.testing.assert_allclose(confidence_prior(first),
                               [0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9], rtol=1e-6)
    prop = make_proposer("pld", k=4)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    adapt = init_adapt(prop).replace(credit=jnp.zeros((), jnp.float32))  # mid-run: no probe credit left
    adapt = adapt.replace(tried=adapt.tried.at[0, 1].set(400.0).at[0, 2].set(40.0),
                          hit=adapt.hit.at[0, 1].set(40.0).at[0, 2].set(36.0))
    on = jnp.ones((1,), bool)

    def width(a, match):
        draft = Draft(tokens=jnp.zeros((1, 4), jnp.int32), num=jnp.asarray([4], jnp.int32),
                      confidence=jnp.full((1,), float(match)))
        best = choose_width(draft, on, on, jnp.asarray(True), a, jnp.asarray([1.0, 1.8, 2.0]), jnp.float32(0),
                            widths, None, prop, jnp.int32(0))[3]
        return int(widths[best])

    assert width(adapt, 7) == 5 and width(adapt, 3) == 5
    assert width(adapt, 1) == 1
    assert width(adapt.replace(tried=adapt.tried.at[0, 3].set(50.0)), 7) == 1  # 7-token matches: 50 tries, no hit


def test_a_sampled_batch_drafts_by_the_expected_progress_of_its_slowest_row():
    """Eight rows with the same tokens left, each drafting 4 tokens accepted at 0.5: each expects 1.94
    tokens from a width-5 verify at 1.8x a step, but the batch moves by the least any row gains, and with
    eight rows that is almost always one token (expected 1.01). So the batch verifies no draft, where
    the minimum of the rows' expectations (1.94 / 1.8 > 1) verified every one; one row alone drafts. Rows
    far behind the row the batch waits for do not hold it back."""
    from specjax.adaptive import batch_worth, choose_width, init_adapt
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=4)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)

    def width(batch, remaining=None):
        adapt = init_adapt(prop, batch=batch).replace(credit=jnp.zeros((), jnp.float32))
        adapt = adapt.replace(tried=adapt.tried + 1000.0, hit=adapt.hit + 500.0)
        draft = Draft(tokens=jnp.zeros((batch, 4), jnp.int32), num=jnp.full((batch,), 4, jnp.int32),
                      confidence=jnp.zeros((batch,), jnp.float32))
        on = jnp.ones((batch,), bool)
        rem = None if remaining is None else jnp.asarray(remaining, jnp.int32)
        best = choose_width(draft, on, on, jnp.asarray(True), adapt, jnp.asarray([1.0, 1.7, 1.8]), jnp.float32(0),
                            widths, None, prop, jnp.int32(0), rem)[3]
        return int(widths[best])

    assert width(1) == 5
    assert width(8) == 1
    assert width(8, [100] + [50] * 7) == 5  # the other seven end long before the first: it alone counts
    half = jnp.asarray([1.0, 0.5, 0.25, 0.125, 0.0625])[None, None]  # P(at least j + 1 tokens), 4 drafted
    on = jnp.ones((8,), bool)
    worth = batch_worth(jnp.broadcast_to(half, (8, 1, 5)), on, jnp.full((8,), 100), tie_break=0.0)
    np.testing.assert_allclose(worth, [1 + 0.5**8 + 0.25**8 + 0.125**8 + 0.0625**8], rtol=1e-6)


def test_deep_positions_with_few_observations_inherit_the_shallow_rate():
    """Copied text: the first positions were tried often and almost always accepted, the deep ones seldom
    reached. Their estimate follows the positions before them, not the 0.5 prior, so the full width wins
    where it pays (width 9 at 2.3x a 1-token step: E = 8.1 / 2.3 against 4.8 / 1.5 for width 5; with a
    fixed 0.5 prior at the deep positions E would be 6.3 / 2.3 and width 5 would win)."""
    from specjax.adaptive import acceptance_estimate

    tried = jnp.asarray([400.0, 390.0, 380.0, 370.0, 2.0, 1.0, 0.0, 0.0])
    p = np.asarray(acceptance_estimate(tried, tried * 0.98))
    assert p[:4].min() > 0.97 and p[4:].min() > 0.96  # with a fixed 0.5 prior: 0.74, 0.66, 0.5, 0.5
    from specjax.adaptive import choose_width, init_adapt
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=8)
    adapt = init_adapt(prop)
    adapt = adapt.replace(tried=adapt.tried + tried, hit=adapt.hit + tried * 0.98)
    draft = Draft(tokens=jnp.zeros((1, 8), jnp.int32), num=jnp.asarray([8], jnp.int32),
                  confidence=jnp.zeros((1,), jnp.float32))
    on = jnp.ones((1,), bool)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    _, _, _, best, _ = choose_width(draft, on, on, jnp.asarray(True), adapt, jnp.asarray([1.0, 1.3, 1.5, 2.3]),
                                    jnp.float32(0), widths, None, prop, jnp.int32(0))
    assert int(widths[best]) == 9


def test_decision_rule_on_crafted_costs_and_acceptance():
    assert loop_widths(make_proposer("pld", k=8)) == (1, 3, 5, 9)
    assert loop_widths(make_proposer("pld", k=8), adaptive=False) == (1, 5, 9)  # whole drafts: no width 3
    # drafts that are always rejected: verify one token
    assert _decide([1.0, 1.3, 1.5, 2.0], hit_rate=0.0, drafter_s=0.1) == (1, 0, False)
    # free verification and drafts that are often right: the full width, the whole draft
    assert _decide([1.0, 1.0, 1.0, 1.0], hit_rate=0.7)[:2] == (9, 8)
    # accepted 90% but a width-9 verify costs 8x: width 5 wins (E = 4.1 at 1.5x vs 2.7 at 1.3x and 6.1 at 8x)
    assert _decide([1.0, 1.3, 1.5, 8.0], hit_rate=0.9)[:2] == (5, 4)
    # a draft of 3 with free verification: the narrowest width that holds it, the draft as it is
    assert _decide([1.0, 1.0, 1.0, 1.0], hit_rate=0.7, num=3)[:2] == (5, 3)
    # the first proposal after a backoff is a probe: verified at its best drafting width even where the
    # estimate says no draft pays, so that an estimate gone stale is tested, then backs off further
    assert _decide([1.0, 1.3, 1.5, 2.0], hit_rate=0.0, drafter_s=0.1, backoff=4) == (3, 2, True)


def _settle_steps(savings: list[float | None], drafter_s: float, costs=(1.0, 1.5, 1.8, 2.0), field: str = "wait"
                  ) -> list:
    """The wait after each of a row's proposing steps that yielded `savings` (in 1-token steps' worth,
    verified at width 3; None: nothing was worth verifying, a 1-token step), starting fresh: 0 = propose
    again at once; or another field of the state after each step."""
    from specjax.adaptive import init_adapt, settle

    adapt, waits = init_adapt(make_proposer("pld", k=8)), []
    for saved in savings:
        best, progress = (0, 1.0) if saved is None else (1, costs[1] + saved)
        adapt = settle(adapt.replace(proposing=jnp.asarray(True), wait=jnp.int32(0)), jnp.float32(progress),
                       jnp.float32(progress), jnp.int32(best), jnp.asarray(costs), jnp.float32(drafter_s))
        waits.append(getattr(adapt, field).item())
    return waits


def test_a_drafter_keeps_proposing_while_its_savings_cover_its_cost():
    """Proposals that never save anything stop, however cheap the drafter (a rule exempting cheap ones
    kept n-gram lookups proposing every step of a best-of-8 batch: 0.93x `ar`), and the waits double.
    A drafter whose proposals saved 3 steps' worth keeps proposing through a few fruitless steps (text
    that repeats now and then); a costly one whose savings fall short backs off."""
    from specjax.adaptive import probe_interval

    assert _settle_steps([0.0] * 4, drafter_s=0.01) == [2, 4, 8, 16]
    assert _settle_steps([0.0] * 2, drafter_s=0.0) == [2, 4]  # measured as free, it still stops
    assert _settle_steps([3.0, 0.0, 0.0, 0.0, 0.0], drafter_s=0.01) == [0] * 5
    assert _settle_steps([0.6, 0.2, 0.2, 0.2], drafter_s=0.5) == [0, 2, 4, 8]
    # the waits stop doubling where a probe (drafter + widest verify over a 1-token step) costs 2% of the time
    assert int(probe_interval(jnp.asarray([1.0, 1.5, 1.8, 2.0]), 0.01)) == 51
    assert max(_settle_steps([0.0] * 20, drafter_s=0.01)) == 51
    assert int(probe_interval(jnp.asarray([1.0, 1.01]))) == 2  # near-free verification probes often


def test_a_proposal_with_nothing_worth_verifying_costs_the_drafter_alone():
    """Fresh text: the drafts are not worth verifying (1-token steps), so each proposal lost the
    drafter's cost and nothing else. A drafter under 2% of a step proposes on every such step (an n-gram
    lookup at batch 1 then catches text that repeats again); a dearer one waits so that its proposals
    cost 2% of the time (0.1 of a step: 5 steps skipped), and each fruitless proposal after it halves
    that share, three times at most (10, 20, 40 steps), until a draft is worth verifying again. Verified
    drafts that fall short still double the wait, and fruitless proposals in between keep that backoff
    for the next loss."""
    from specjax.adaptive import idle_wait, probe_interval

    assert _settle_steps([None] * 6, drafter_s=0.01) == [0] * 6
    assert _settle_steps([None] * 6, drafter_s=0.0) == [0] * 6
    assert _settle_steps([None] * 5, drafter_s=0.1) == [5, 10, 20, 40, 40]
    assert _settle_steps([None, None, 0.0, None], drafter_s=0.1) == [5, 10, 2, 5]  # a verified draft restores it
    assert int(idle_wait(jnp.asarray([1.0, 1.5, 1.8, 2.0]), 0.1)) == 5
    assert int(idle_wait(jnp.asarray([1.0, 1.5, 1.8, 2.0]), 0.1, misses=9)) == 40
    assert _settle_steps([0.0, None, 0.0, None, 0.0], drafter_s=0.01) == [2, 0, 4, 0, 8]
    # after verified drafts fell short, the next draft probes; fruitless proposals before it do not spend that
    assert _settle_steps([0.0, None, None], drafter_s=0.01, field="probe_due") == [True, True, True]
    assert _settle_steps([3.0, None], drafter_s=0.01, field="probe_due") == [False, False]
    # a match after fresh text that saves 3 steps' worth keeps the drafter proposing
    assert _settle_steps([None] * 10 + [3.0, None, None], drafter_s=0.01)[-3:] == [0, 0, 0]
    # however dear, the wait never exceeds the probe interval
    costs = jnp.asarray([1.0, 1.5, 1.8, 2.0])
    assert int(idle_wait(costs, 50.0)) == int(probe_interval(costs, 50.0)) == 256


@pytest.mark.parametrize("tokens, progress, backoff, wait", [(3.0, 1.0, 4, 0), (1.2, 1.0, 8, 8), (3.0, 3.0, 1, 0)],
                         ids=["paid-on-the-mean", "did-not-pay", "moved-the-batch"])
def test_a_probe_after_a_backoff_is_settled_by_what_it_yielded(tokens, progress, backoff, wait):
    """A probe at width 3 (1.5x a 1-token step, drafting 0.1x): 3 tokens pay (3 / 1.6 > 1), so proposing
    resumes; where only the rows' mean gained them (the batch moved by one token), with the wait it had
    (4) kept for the next time the average fails, where the batch moved by them too, with the shortest
    wait. 1.2 do not pay, so the backoff doubles from 4 and the drafter waits that long. Only a step
    that proposed is settled."""
    from specjax.adaptive import init_adapt, settle

    adapt = init_adapt(make_proposer("pld", k=8)).replace(backoff=jnp.int32(4), probing=jnp.asarray(True),
                                                          proposing=jnp.asarray(True))
    costs = jnp.asarray([1.0, 1.5, 1.8, 2.0])
    # the batch progressed by `progress` tokens (its slowest row's), the rows by `tokens` on average
    out = settle(adapt, jnp.float32(progress), jnp.float32(tokens), jnp.int32(1), costs, jnp.float32(0.1))
    assert (int(out.backoff), int(out.wait), bool(out.probing)) == (backoff, wait, False)
    assert bool(out.probe_due) == (wait > 0)  # a failed probe: the first draft after the wait probes again
    idle = settle(adapt.replace(probing=jnp.asarray(False), proposing=jnp.asarray(False), wait=jnp.int32(3)),
                  jnp.float32(1), jnp.float32(tokens), jnp.int32(1), costs, jnp.float32(0.1))
    assert (int(idle.backoff), int(idle.wait)) == (4, 3)  # not a probe: nothing changes


def test_every_probe_is_paid_from_a_budget_of_two_percent_of_the_time():
    """Drafts that could gain, all turned down by the estimate, with a probe due at every step (as after
    each refusal): every probe is paid from the credit, so over 400 steps probes cost at most 2% of the
    time plus the one probe a fresh loop starts with, and the budget is spent. Unbudgeted, the draft after
    each refusal probed: here every step."""
    import jax

    from specjax.adaptive import PROBE_SHARE, choose_width, init_adapt
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=8)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    costs, drafter_s, steps = np.asarray([1.0, 1.3, 1.5, 2.0], np.float32), 0.1, 400
    adapt = init_adapt(prop)
    adapt = adapt.replace(tried=adapt.tried + 1000.0)  # every position tried, none accepted
    draft = Draft(tokens=jnp.zeros((1, 8), jnp.int32), num=jnp.asarray([8], jnp.int32),
                  confidence=jnp.zeros((1,), jnp.float32))
    on = jnp.ones((1,), bool)
    decide = jax.jit(lambda a, step: choose_width(draft, on, on, jnp.asarray(True), a, jnp.asarray(costs),
                                                  jnp.float32(drafter_s), widths, None, prop, step)[2:4])
    spent, probes = 0.0, 0
    for step in range(steps):
        adapt, best = decide(adapt.replace(probe_due=jnp.asarray(True)), jnp.int32(step))
        if int(best) > 0:
            probes += 1
            spent += drafter_s + costs[int(best)] - costs[0]
    one_probe = drafter_s + costs[-1] - costs[0]
    assert spent <= PROBE_SHARE * steps * costs[0] + one_probe + 1e-4
    assert spent >= PROBE_SHARE * steps * costs[0] - one_probe and probes > 10


@pytest.mark.parametrize("tokens,progress", [(1.0, 1.0), (8.0, 8.0), (8.0, 1.0)],
                         ids=["probes-miss", "probes-pay", "pay-on-the-mean-alone"])
def test_probes_that_do_not_pay_halve_the_probing_share(tokens, progress):
    """Drafts that could gain, all turned down by the estimate, over 600 steps of the decision and the
    settling together. Probes that yield one token (not the verify's price) halve the share each time,
    down to 2% / 2**MAX_PROBE_MISSES: probing then costs under half of the 2% budget. Probes that pay
    keep the full share, and the budget is spent. Probes whose rows gain 8 tokens on average while the
    batch moves by one (its slowest row's: EAGLE in a sampled best-of-8 batch) resume proposing, yet
    halve the share as misses do: they did not shorten the batch."""
    import jax

    from specjax.adaptive import MAX_PROBE_MISSES, PROBE_SHARE, choose_width, init_adapt, settle
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=8)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    costs, drafter_s, steps = jnp.asarray([1.0, 1.3, 1.5, 2.0]), jnp.float32(0.1), 600
    adapt = init_adapt(prop)
    adapt = adapt.replace(tried=adapt.tried + 1000.0)  # every position tried, none accepted
    draft = Draft(tokens=jnp.zeros((1, 8), jnp.int32), num=jnp.asarray([8], jnp.int32),
                  confidence=jnp.zeros((1,), jnp.float32))
    on = jnp.ones((1,), bool)

    @jax.jit
    def step(a, i):
        want = a.wait <= 0
        a, best = choose_width(draft, on & want, on, want, a, costs, drafter_s, widths, None, prop, i)[2:4]
        drafted = lambda n: jnp.where(best > 0, jnp.float32(n), 1.0)  # a 1-token step yields one token
        return settle(a, drafted(progress), drafted(tokens), best, costs, drafter_s), best

    spent, misses = 0.0, []
    for i in range(steps):
        adapt, best = step(adapt, jnp.int32(i))
        spent += float(drafter_s + costs[int(best)] - costs[0]) if int(best) > 0 else 0.0
        misses.append(int(adapt.probe_misses))
    one_probe = float(drafter_s + costs[-1] - costs[0])
    if progress == 1.0:
        assert max(misses) == misses[-1] == MAX_PROBE_MISSES
        assert 0 < spent < 0.5 * PROBE_SHARE * steps * float(costs[0])
    else:
        assert max(misses) == 0
        assert spent >= PROBE_SHARE * steps * float(costs[0]) - one_probe


def test_a_batch_progresses_by_what_its_slowest_row_gains():
    """Rows with 10 and 6 tokens left: the batch ends with the first, so a step giving it 1 token and
    the other 4 moved the batch by 1; one giving the first 3 moved it by 3. A row ending at EOS counts
    at most the step's largest yield."""
    from specjax.adaptive import batch_progress
    from specjax.engine import LoopState

    def progress(num_new, done_after=(False, False)):
        lengths = jnp.asarray([5, 9])
        mk = lambda lengths, done: LoopState(
            tokens=None, lengths=lengths, prompt_lengths=jnp.asarray([5, 5]), done=jnp.asarray(done), cache=None,
            hidden=None, features=None, proposer_state=None, rng=None, steps=None, accept_hist=None,
            verify_hist=None, source_counts=None, adapt=None)
        before = mk(lengths, (False, False))
        after = mk(lengths + jnp.asarray(num_new), done_after)
        return float(batch_progress(before, after, jnp.asarray(num_new), 10))

    assert progress([1, 4]) == 1.0
    assert progress([3, 1]) == 3.0
    assert progress([2, 1], done_after=(True, False)) == 2.0  # 10 left to 5 left: counted as 2


def test_a_batch_whose_slowest_row_has_no_draft_does_not_probe():
    """The periodic probe verifies a draft the estimate would not: worth it to keep learning, but not in a
    batch where the row with the most tokens left has no draft, since no outcome could shorten the batch.
    Once that row drafts too, the probe runs."""
    from specjax.adaptive import choose_width, init_adapt
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=8)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    adapt = init_adapt(prop, batch=2).replace(credit=jnp.float32(10.0))  # full: a periodic probe is due
    on = jnp.ones((2,), bool)

    costs = jnp.asarray([1.0, 2.0, 2.5, 3.0])
    step = jnp.int32(0)

    def width(num, remaining):
        draft = Draft(tokens=jnp.zeros((2, 8), jnp.int32), num=jnp.asarray(num, jnp.int32),
                      confidence=jnp.zeros((2,), jnp.float32))
        _, _, _, best, _ = choose_width(draft, on, on, jnp.asarray(True), adapt, costs, jnp.float32(0), widths,
                                        None, prop, step, jnp.asarray(remaining, jnp.int32))
        return int(widths[best])

    assert width([8, 0], [10, 100]) == 1
    assert width([8, 8], [10, 100]) == 3
    assert width([0, 8], [10, 100]) == 3  # the row the batch waits for drafts: a probe could pay


def test_a_costly_drafter_that_starts_pessimistic_learns_its_drafts_pay(tiny_model, monkeypatch):
    """Verifies cost 1.9x (width 3), 2.2x (width 5) and 3x (width 9) a 1-token step and proposing 0.2x: under the 0.5
    prior no draft pays, so the first draft is turned down and the drafter waits (10 steps: its cost over
    2% of a step). The drafts are in fact accepted at 0.95 a position; the probe of the next draft finds
    that out and the loop then verifies drafts on over 40% of its steps, in under 40% of plain
    decoding's (without the probe it proposed only when a wait happened to end on a periodic probe
    step, and ran at 1 token a step)."""
    from specjax import engine
    from specjax.analysis.oracle import Oracle

    def costs(model, plan, proposer, *rest):
        return np.asarray([1.0, 1.9, 2.2, 3.0], np.float32) * 1e-3, np.float32(2e-4), np.float32(0), np.float32(0), 0.0

    monkeypatch.setattr(engine, "step_costs", costs)
    prompt = [[3, 17, 41, 29, 11, 60, 7]]
    ar = specjax.generate(tiny_model, prompt, "ar", max_new_tokens=64, eos_token_ids=())
    oracle = Oracle.for_outputs(prompt, ar.tokens, alpha=0.95, k=8)
    out = specjax.generate(tiny_model, prompt, oracle, max_new_tokens=64, eos_token_ids=(), adaptive=True)
    assert out.tokens == ar.tokens
    hist, steps = out.stats["width_hist"], out.stats["decode_steps"]
    assert sum(hist[1:]) > 0.4 * steps and steps < 0.4 * ar.stats["decode_steps"]


def _sampling_p_values(tiny_model, monkeypatch, method: str, rows: int = 3000, new: int = 4,
                       temperature: float = 1.0, costs: tuple[float, ...] | None = None,
                       **opts) -> tuple[list[float], list[int]]:
    """`rows` sampled branches of one prompt with adaptive widths against plain sampling: the p-value of a
    two-sample chi-square test at every verified position. Verification is made as cheap as a 1-token
    step (an accelerator's regime) unless `costs` says otherwise, so drafts are verified whenever their
    estimate expects anything: the decision then varies per step with the acceptance counts. Returns the
    p-values and the steps run at each width."""
    from scipy.stats import chi2_contingency

    from specjax import engine

    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]
    kw = dict(num_samples=rows, max_new_tokens=new, eos_token_ids=(), temperature=temperature)
    ref = specjax.generate(tiny_model, [prompt], "ar", seed=1, **kw).tokens
    free = lambda model, plan, proposer, *rest: (
        np.asarray(costs or [1.0] * len(adaptive.loop_widths(proposer)), np.float32), np.float32(0), np.float32(0),
        np.float32(0), 0.0)
    monkeypatch.setattr(engine, "step_costs", free)
    out = specjax.generate(tiny_model, [prompt], method, seed=2, adaptive=True, **opts, **kw)
    assert out.stats["adaptive"] and sum(out.stats["width_hist"][1:]) > 0  # some steps verified drafts
    assert out.stats["mean_accepted_tokens"] > 1.0
    vocab = tiny_model.config.vocab_size
    p_values = []
    for pos in range(1, new):
        table = np.stack([np.bincount([t[pos] for t in ref], minlength=vocab),
                          np.bincount([t[pos] for t in out.tokens], minlength=vocab)])
        p_values.append(chi2_contingency(table[:, table.sum(axis=0) > 0])[1])
    return p_values, out.stats["width_hist"]


TREE = {"k": 3, "branching": (2,)}
# the whole tree (7 nodes) dearer than its first-ranked chain (4 nodes): with nothing to show that the
# whole tree accepts more, the chain sub-tree is verified
SUBTREE = {**TREE, "costs": (1.0, 1.0, 1.01)}
# a layer-skip draft model: a real q close to p, so drafts are often accepted and the test has power
CHAIN = {"draft": "self:1", "k": 2, "rows": 6000, "new": 6, "temperature": 0.6}


@pytest.mark.parametrize("opts", [TREE, SUBTREE, CHAIN], ids=["recycling-tree", "recycling-subtree", "draft-chain"])
def test_adaptive_sampling_keeps_the_distribution(tiny_model, monkeypatch, opts):
    """A recycling tree (the root alone, its first-ranked chain or the whole tree, chosen per step) and a
    draft model's chain (cut to each step's width): the same distribution as plain sampling at every
    verified position."""
    method = "draft" if opts is CHAIN else "recycling"
    p_values, hist = _sampling_p_values(tiny_model, monkeypatch, method, **opts)
    assert min(p_values) > 1e-3
    if opts is not CHAIN:  # widths 1, 4 (the chain sub-tree), 7 (the whole tree): free, the whole tree
        assert hist[2 if opts is TREE else 1] > 0, hist


def test_the_distribution_test_catches_a_decision_that_peeks(tiny_model, monkeypatch):
    """The same test fails for a width decision allowed to see this step's verification: one that keeps
    only the draft tokens the target is about to accept, then verifies again (the token after them is
    then sampled from the target afresh instead of from the residual, so drafted tokens come out too
    often). This is what the real decision must never do: it reads only what is known before the verify."""
    import jax

    from specjax import engine

    honest = engine.verify_chain

    def peeking(logits, draft, sampling_cfg, rng):
        seen = honest(logits, draft, sampling_cfg, rng)
        cut = draft.replace(num=jnp.minimum(draft.num, seen.num_accepted))
        return honest(logits, cut, sampling_cfg, rng)

    monkeypatch.setattr(engine, "verify_chain", peeking)
    monkeypatch.setenv("SPECJAX_CACHE_DIR", "none")  # the program store would serve the honest decode loop
    jax.clear_caches()  # the decode loop compiled by other tests holds the honest verifier
    try:
        assert min(_sampling_p_values(tiny_model, monkeypatch, "draft", **CHAIN)[0]) < 1e-5
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_best_of_n_groups_greedy_adaptive_equals_ar(tiny_model):
    kw = dict(num_samples=3, max_new_tokens=32, eos_token_ids=())
    ar = specjax.generate(tiny_model, [[5, 6, 7, 8] * 3, [9, 10, 11] * 2], "ar", **kw)
    out = specjax.generate(tiny_model, [[5, 6, 7, 8] * 3, [9, 10, 11] * 2], "suffix", adaptive=True, **kw)
    assert out.tokens == ar.tokens and out.stats["adaptive"]


@pytest.mark.real
def test_real_model_adaptive_equals_ar_with_the_shipped_heads(real_model):
    """The trained-head methods (and the hybrid's suffix/head sources, and the EAGLE head's dynamic tree)
    under the adaptive loop, on the real model, a mixed-length batch: ar's tokens exactly."""
    prompts = ["What is 12 + 30? Answer briefly.", "Name three prime numbers greater than 10 and explain why."]
    ar = specjax.generate(real_model, prompts, "ar", max_new_tokens=40)
    for method, opts in (("eagle", {}), ("eagle", {"total": 16, "depth": 5, "topk": 3}), ("medusa", {}),
                         ("hybrid", {})):
        out = specjax.generate(real_model, prompts, method, max_new_tokens=40, adaptive=True, **opts)
        assert out.tokens == ar.tokens, method
        assert out.stats["adaptive"] and sum(out.stats["width_hist"]) == out.stats["decode_steps"], method


def test_a_fully_accepted_draft_moves_the_row_to_the_streak_buckets():
    """Row 0 accepts its whole draft of 4, row 1 rejects at position 2, row 2 does not draft: only row 0
    is on a streak, its next decision reads the counts kept after full acceptances (bucket + NUM_BUCKETS),
    and row 2 keeps the streak it had."""
    from specjax.adaptive import NUM_BUCKETS, init_adapt, observe
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=8)
    adapt = init_adapt(prop, batch=3).replace(streak=jnp.asarray([0, 1, 1], jnp.int32))
    draft = Draft(tokens=jnp.zeros((3, 8), jnp.int32), num=jnp.asarray([4, 4, 0], jnp.int32),
                  confidence=jnp.zeros((3,), jnp.float32))
    drafting = jnp.asarray([True, True, False])
    bucket = jnp.asarray([0, NUM_BUCKETS, NUM_BUCKETS], jnp.int32)
    out = observe(adapt, draft, drafting, jnp.asarray([4, 2, 0], jnp.int32), bucket, None)
    assert out.streak.tolist() == [1, 0, 1]
    assert out.tried[0, 0, :5].tolist() == [1, 1, 1, 1, 0] and out.hit[0, 0, :5].tolist() == [1, 1, 1, 1, 0]
    assert out.tried[0, NUM_BUCKETS, :4].tolist() == [1, 1, 1, 0] and out.hit[0, NUM_BUCKETS, :3].tolist() == [1, 1, 0]


def _shadowed(draft_tokens, emitted, verified=0, scored_rows=(True,)):
    """A row at history length 3 whose draft `draft_tokens` had its first `verified` tokens verified (and
    accepted) and the rest cut; `emitted`: the tokens the row emits from position 3 on, one step at a time
    after the first (which emits `verified` + 1). Returns the counts of bucket 0 after every step, and the
    shadow's nodes left (0: ended)."""
    from specjax.adaptive import init_adapt, shadow, shadow_score
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=4)
    adapt = init_adapt(prop)
    tokens = jnp.zeros((1, 16), jnp.int32).at[0, :3].set(jnp.asarray([1, 2, 3]))
    draft = Draft(tokens=jnp.asarray([draft_tokens], jnp.int32), num=jnp.asarray([len(draft_tokens)], jnp.int32))
    length, out = 3, []
    done = jnp.zeros((1,), bool)
    for i, tok in enumerate(emitted):
        tokens = tokens.at[0, length].set(tok)
        length += 1
        if i < verified:  # the verified tokens and the step's own token come together
            continue
        if len(out) == 0:
            adapt = shadow(adapt, prop, draft, jnp.asarray(scored_rows), jnp.asarray([verified], jnp.int32),
                           jnp.asarray([3], jnp.int32), jnp.zeros((1,), jnp.int32), tokens,
                           jnp.asarray([length], jnp.int32), done)
        else:
            adapt = shadow_score(adapt, prop, tokens, jnp.asarray([length], jnp.int32), done)
        out.append((np.asarray(adapt.tried[0, 0]).tolist(), np.asarray(adapt.hit[0, 0]).tolist(),
                    int(adapt.shadow_valid[0].sum())))
    return out


def test_a_turned_down_draft_is_scored_by_the_tokens_the_row_emits_next():
    """A draft the width decision turned down is scored position by position as the row emits the tokens
    it predicted: each emitted token says whether the draft's token there would have been accepted (for a
    deterministic draft, exactly: the emitted token is the target's choice, or its own draw, there). The
    shadow ends at its first mismatch; a draft cut after accepted tokens is scored from the cut on."""
    steps = _shadowed([7, 8, 9, 10], [7, 8, 5, 6])
    assert steps[0] == ([1, 0, 0, 0], [1, 0, 0, 0], 4)  # position 0 matched, the rest not known yet
    assert steps[1] == ([1, 1, 0, 0], [1, 1, 0, 0], 4)
    assert steps[2] == ([1, 1, 1, 0], [1, 1, 0, 0], 0)  # position 2 missed: tried, not accepted; ended
    assert steps[3] == steps[2]
    whole = _shadowed([7, 8, 9, 10], [7, 8, 9, 10, 11])
    assert whole[3] == ([1, 1, 1, 1], [1, 1, 1, 1], 0)
    # two tokens verified and accepted, two cut: the step's own token scores position 2, the next one 3
    cut = _shadowed([7, 8, 9, 10], [7, 8, 9, 4], verified=2)
    assert cut[0] == ([0, 0, 1, 0], [0, 0, 1, 0], 4)
    assert cut[1] == ([0, 0, 1, 1], [0, 0, 1, 0], 0)
    assert _shadowed([7, 8, 9, 10], [7, 8], scored_rows=(False,))[-1] == ([0] * 4, [0] * 4, 0)


def test_an_estimate_held_low_recovers_from_the_drafts_it_turned_down():
    """The loop once turned down 18 drafts in a row of text the model was repeating word for word: the
    bucket's two early misses held its estimate under the price of a verify, and only verified drafts were
    counted. Scored in the shadow, the turned-down drafts that the row then emits raise the estimate
    until the draft is verified, with no probe."""
    from specjax.adaptive import choose_width, init_adapt, shadow
    from specjax.drafting import Draft

    prop = make_proposer("pld", k=4)
    widths = jnp.asarray(loop_widths(prop), jnp.int32)
    adapt = init_adapt(prop).replace(credit=jnp.zeros((), jnp.float32))  # no probe credit
    adapt = adapt.replace(tried=adapt.tried.at[0, 0, 0].set(2.0))  # two misses
    costs = jnp.asarray([1.0, 1.6, 2.0])
    on = jnp.ones((1,), bool)
    text = list(range(10, 60))
    tokens = jnp.zeros((1, 64), jnp.int32).at[0, :3].set(jnp.asarray(text[:3]))
    chosen = []
    for length in range(3, 20):
        draft = Draft(tokens=jnp.asarray([text[length:length + 4]], jnp.int32), num=jnp.asarray([4], jnp.int32))
        out, drafting, adapt, best, bucket = choose_width(draft, on, on, jnp.asarray(True), adapt, costs,
                                                          jnp.float32(0), widths, None, prop, jnp.int32(0),
                                                          probes=False)
        chosen.append(int(widths[best]))
        if chosen[-1] > 1:
            break
        tokens = tokens.at[0, length].set(text[length])  # a 1-token step emits the draft's first token
        adapt = shadow(adapt, prop, draft, drafting & (out.num == 0), out.num, jnp.asarray([length], jnp.int32),
                       bucket, tokens, jnp.asarray([length + 1], jnp.int32), jnp.zeros((1,), bool))
    assert chosen[0] == 1 and chosen[-1] > 1, chosen
    assert len(chosen) <= 6, chosen


def test_a_cheap_drafter_whose_drafts_are_all_scored_never_waits():
    """A drafter under 2% of a step whose every draft is scored (verified, or in the shadow) keeps
    proposing after drafts that fell short: its estimate already says what to verify, and waits left
    `pld` blind to the repeats that followed them."""
    from specjax.adaptive import init_adapt, settle

    adapt = init_adapt(make_proposer("pld", k=8))
    for _ in range(4):
        adapt = settle(adapt.replace(proposing=jnp.asarray(True), wait=jnp.int32(0)), jnp.float32(1.0),
                       jnp.float32(1.0), jnp.int32(1), jnp.asarray([1.0, 1.5, 1.8, 2.0]), jnp.float32(0.0),
                       free=jnp.asarray(True))
        assert int(adapt.wait) == 0


def test_a_turned_down_tree_is_scored_per_sub_tree_along_the_emitted_path():
    """A recycling tree turned down, then the row emits the tokens of its second-ranked depth-1 node and
    that node's first child, then something else: the whole tree would have accepted two tokens (depth 3
    tried, missed); its first-ranked chain, whose depth-1 token was not emitted, none. Each sub-tree's
    counts get what it would have accepted."""
    from specjax.drafting import Draft

    prop = make_proposer("recycling")
    parents = prop.template.parents
    assert parents[2] == 0 and parents[5] == 2 and 5 not in (1, 3, 7, 11)  # node 2 is not on the chain
    k = prop.template.size - 1
    draft = Draft(tokens=jnp.arange(100, 100 + k, dtype=jnp.int32)[None], num=jnp.asarray([k], jnp.int32),
                  valid=jnp.ones((1, k), bool))
    adapt = _turned_down_then_emitted(prop, draft, [100 + 2 - 1, 100 + 5 - 1, 999])  # node j + 1 at draft j
    chain, whole = np.asarray(adapt.tried[0, 0]), np.asarray(adapt.tried[1, 0])
    assert chain.tolist() == [1, 0, 0, 0] and np.asarray(adapt.hit[0, 0]).tolist() == [0, 0, 0, 0]
    assert whole.tolist() == [1, 1, 1, 0] and np.asarray(adapt.hit[1, 0]).tolist() == [1, 1, 0, 0]
    assert not bool(adapt.shadow_valid.any())  # ended at the miss


@pytest.mark.parametrize("method, opts, temperature", [
    ("draft", {"draft": "self:1", "k": 3}, 0.0), ("draft", {"draft": "self:1", "k": 3}, 0.8),
    ("suffix", {}, 0.8), ("suffix", {"branches": 2, "k": 4}, 0.0),
    ("suffix", {"adaptive": False, "speculate_max_rows": 1}, 0.0)],
    ids=["draft", "draft-sampled", "suffix-sampled", "suffix-tree", "gated"])
def test_lean_steps_leave_what_full_steps_leave(tiny_model, monkeypatch, method, opts, temperature):
    """A backed-off (or gated) drafter's steps run the lean body (`engine.LEAN_STEPS`); the final loop state (tokens,
    every width and acceptance record, the estimate, waits, probe credit and shadows) equals a loop that
    traces every step in full, all but the KV-cache slots past the committed lengths. The costs make
    proposing dear (0.2x a step) and verifies dearer, so the loop waits between proposals."""
    import jax

    from specjax import engine

    def costs(model, plan, proposer, *rest):
        widths = adaptive.loop_widths(proposer)
        return (np.asarray([1.0 + 0.3 * (w - 1) for w in widths], np.float32) * 1e-3, np.float32(2e-4),
                np.float32(0), np.float32(0), 0.0)

    monkeypatch.setattr(engine, "step_costs", costs)
    finals, run = [], engine._run

    def spy(*args, **kwargs):
        out = run(*args, **kwargs)
        finals.append(out.state)
        return out

    monkeypatch.setattr(engine, "_run", spy)
    prompts = [[3, 17, 41, 29, 11, 60, 7], [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
    kw = dict(max_new_tokens=40, eos_token_ids=(), temperature=temperature, seed=2, adaptive=True) | opts
    outs = []
    for lean in (True, False):
        monkeypatch.setattr(engine, "LEAN_STEPS", lean)
        outs.append(specjax.generate(tiny_model, prompts, method, **kw))
    assert outs[0].tokens == outs[1].tokens
    lean, full = (jax.device_get(s.replace(cache=None)) for s in finals)
    jax.tree.map(np.testing.assert_array_equal, lean, full)
    if kw["adaptive"]:
        keys = ("width_hist", "verified_hist", "drafted_share", "predicted_tokens", "predicted_decode_s")
        assert [outs[0].stats[k] for k in keys] == [outs[1].stats[k] for k in keys]
        assert 0 < outs[0].stats["drafted_share"] < 1  # some steps proposed, and some (the lean ones) did not


def test_a_turned_down_dynamic_tree_is_scored_along_its_own_parents():
    """A dynamic tree (EAGLE-2: each draft sets its nodes' parents) turned down, then the row emits its
    chain's depth-1 token, then the tokens of node 4 (the draft put it under node 1, where the static
    shape hangs it from the root) and of node 5 (under node 4): the whole tree would have accepted all
    three, its chain sub-tree one."""
    from specjax.drafting import Draft

    prop = make_proposer("eagle", total=6, depth=3, topk=2)
    assert prop.template.parents == (-1, 0, 1, 2, 0, 0, 0)
    draft = Draft(tokens=jnp.arange(100, 106, dtype=jnp.int32)[None], num=jnp.asarray([6], jnp.int32),
                  valid=jnp.ones((1, 6), bool), parents=jnp.asarray([[0, 1, 2, 1, 4, 0]], jnp.int32))
    adapt = _turned_down_then_emitted(prop, draft, [100, 103, 104, 999])  # tree node j + 1 at draft j
    assert np.asarray(adapt.tried[0, 0]).tolist() == [1, 1, 0] and np.asarray(adapt.hit[0, 0]).tolist() == [1, 0, 0]
    assert np.asarray(adapt.tried[1, 0]).tolist() == [1, 1, 1] and np.asarray(adapt.hit[1, 0]).tolist() == [1, 1, 1]
    assert not bool(adapt.shadow_valid.any())


def _turned_down_then_emitted(prop, draft, emitted: list[int]):
    """A one-row loop's estimate after `draft` was turned down at history length 3 (and kept as a shadow)
    and the row then emitted `emitted`, one token a step."""
    from specjax.adaptive import init_adapt, shadow, shadow_score

    adapt = init_adapt(prop)
    tokens = jnp.zeros((1, 16), jnp.int32)
    done = jnp.zeros((1,), bool)
    for i, tok in enumerate(emitted):
        tokens = tokens.at[0, 3 + i].set(tok)
        length = jnp.asarray([4 + i], jnp.int32)
        if i == 0:
            adapt = shadow(adapt, prop, draft, jnp.asarray([True]), jnp.zeros((1,), jnp.int32),
                           jnp.asarray([3], jnp.int32), jnp.zeros((1,), jnp.int32), tokens, length, done)
        else:
            adapt = shadow_score(adapt, prop, tokens, length, done)
    return adapt
