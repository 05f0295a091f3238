"""Prompts of very different lengths prefilled in parts, each padded to its own bucket: the layout, and
outputs equal to one padded batch's (greedy and sampled, Best-of-N, a drafter that reads the features)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import save_random_eagle_head

import specjax
from specjax import engine
from specjax.plan import prefill_parts


def test_parts_follow_the_lengths_and_cover_every_prompt():
    lengths = np.array([300] + [5] * 10 + [200])
    order, parts = prefill_parts(lengths, 384)
    assert sorted(order.tolist()) == list(range(12)) and set(order[-2:].tolist()) == {0, 11}
    assert sum(c for c, _ in parts) == 12 and all(c % 4 == 0 for c, _ in parts[:-1])
    assert parts[0] == (8, 64) and parts[-1][1] == 384
    assert sum(c * w for c, w in parts) <= 0.6 * 12 * 384
    # alike lengths, or too few prompts: one padded batch
    assert prefill_parts(np.array([60, 64, 50, 61, 40, 63, 62, 59]), 64) is None
    assert prefill_parts(np.array([5, 300, 5]), 384) is None


def test_a_sharded_model_prefills_one_batch_in_its_calls_and_their_calibration(tiny_model, monkeypatch):
    """The layout is asked of the model, so a call and its step-cost calibration (which builds its dummy
    prompts from the same layout) agree: parts for one device, one batch for a model on a mesh."""
    from specjax import plan as plan_mod
    from specjax import sharding
    from specjax.proposers import make_proposer

    prompts = [[5] * 4] * 10 + [[7] * 150, [9] * 90]
    plan = plan_mod.make_plan(tiny_model, prompts, make_proposer("ar"), max_new_tokens=8, chat=False)
    assert engine._prefill_layout(tiny_model, plan) is not None
    monkeypatch.setattr(sharding, "mesh_of", lambda params: object())  # params placed on a mesh
    assert engine._prefill_layout(tiny_model, plan) is None


@pytest.fixture(scope="module")
def mixed_prompts():
    rng = np.random.default_rng(0)
    short = [rng.integers(3, 60, int(n)).tolist() for n in rng.integers(4, 20, 10)]
    return short[:4] + [rng.integers(3, 60, 150).tolist()] + short[4:] + [rng.integers(3, 60, 90).tolist()]


@pytest.mark.parametrize("method", ["ar", "suffix", "eagle"])
def test_parts_give_the_outputs_of_one_padded_batch(tiny_model, mixed_prompts, method, monkeypatch, tmp_path_factory):
    opts = {}
    if method == "eagle":  # a drafter that reads the prefill's features
        opts = {"head": save_random_eagle_head(tiny_model, tmp_path_factory.mktemp("eagle_parts"))}
    assert prefill_parts(np.array([len(p) for p in mixed_prompts]), 192) is not None
    calls = []
    real = engine.prefill_parts
    monkeypatch.setattr(engine, "prefill_parts", lambda *a: calls.append(real(*a)) or calls[-1])
    runs = [dict(max_new_tokens=12), dict(max_new_tokens=10, temperature=0.9, seed=5, num_samples=2)]
    split = [specjax.generate(tiny_model, mixed_prompts, method, chat=False, **opts, **kw) for kw in runs]
    assert all(c is not None for c in calls)
    monkeypatch.setattr(engine, "prefill_parts", lambda *a: None)
    whole = [specjax.generate(tiny_model, mixed_prompts, method, chat=False, **opts, **kw) for kw in runs]
    assert split[0].stats["prefill_parts"] and not whole[0].stats["prefill_parts"]
    assert sum(count for count, _ in split[0].stats["prefill_parts"]) == len(mixed_prompts)
    for a, b in zip(split, whole):
        assert a.tokens == b.tokens
        assert a.stats["mean_accepted_tokens"] == pytest.approx(b.stats["mean_accepted_tokens"])


def test_the_prefill_benchmark_runs_on_a_checkpoint(tiny_chat_checkpoint, tmp_path, capsys):
    """`python -m benchmarks.prefill` on a tiny checkpoint and a JSONL of short and long questions: the
    long ones get a part of their own, and the first tokens agree both ways."""
    import json

    from benchmarks import prefill

    questions = ["What is 2 + 3?"] * 10 + [" ".join(["Count the words in this long question."] * 15)] * 2
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in questions))
    assert prefill.main(["--model", str(tiny_chat_checkpoint), "--dataset", str(data), "--batch-sizes", "12",
                         "--repeats", "1"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "12" and int(row[3]) < int(row[2]) and row[-1] == "True"
    assert "8x64" in row


def test_a_head_start_replays_a_split_prefill_with_the_calls_own_program(tiny_model, mixed_prompts, monkeypatch):
    """A load's replay (and the step-cost calibration) sizes its dummy prompts part by part, so its
    prefill is the program the real call ran and stored, not one more to compile."""
    from specjax import programs, warm_start
    from specjax.config import SamplingConfig
    from specjax.plan import bind_proposer
    from specjax.proposers import make_proposer

    keys = []
    real_call = programs.call

    def spy(fn, args, static):
        if fn is engine.prefill:
            keys.append(programs.program_key(fn, args, static))
        return real_call(fn, args, static)

    monkeypatch.setattr(programs, "call", spy)
    out = specjax.generate(tiny_model, mixed_prompts, "pld", chat=False, max_new_tokens=6, adaptive=False)
    parts = tuple(map(tuple, out.stats["prefill_parts"]))
    assert len(parts) >= 2 and len(keys) == 1
    proposer, _ = bind_proposer(tiny_model, "pld", SamplingConfig())
    dummy = warm_start.dummy_plan(tiny_model, proposer, num_prompts=len(mixed_prompts), num_samples=1,
                                  prompt_bucket=out.stats["prompt_bucket"], cache_len=out.stats["cache_len"],
                                  tokens=4, parts=parts)
    assert prefill_parts(dummy.prompt_lengths, dummy.prompt_bucket)[1] == parts
    recipe = lambda parts: warm_start.Recipe(
        method=make_proposer("pld"), temperature=0.0, top_k=0, top_p=1.0, num_prompts=len(mixed_prompts),
        num_samples=1, prompt_bucket=out.stats["prompt_bucket"], cache_len=out.stats["cache_len"],
        eos_ids=tiny_model.eos_token_ids, speculate_max_rows=None, adaptive=False, programs=(),
        prefill_parts=parts)
    warm_start.replay(tiny_model, recipe(parts))
    warm_start.replay(tiny_model, recipe(()))  # as recorded before parts: one padded batch, another program
    assert keys[0] is not None and keys[1] == keys[0] and keys[2] != keys[0]


def test_a_call_padded_on_request_stays_one_batch(tiny_model, mixed_prompts):
    """`pad_prompts_to` asks for shapes shared across calls: parts fitted to this call's lengths would
    compile a prefill per call, so it keeps one padded batch."""
    free = specjax.generate(tiny_model, mixed_prompts, "ar", chat=False, max_new_tokens=4)
    padded = specjax.generate(tiny_model, mixed_prompts, "ar", chat=False, max_new_tokens=4, pad_prompts_to=150)
    assert free.stats["prefill_parts"] and padded.stats["prefill_parts"] == []
    assert free.tokens == padded.tokens
