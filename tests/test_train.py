"""train.draft_head on a tiny model: loss falls, resume replays exactly, bad checkpoints say so; the
exported head drives method='medusa' losslessly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import specjax

ARGS = ["--head", "medusa", "--dataset", "arith", "--num-prompts", "8", "--seq-len", "48", "--batch-size", "4",
        "--lr", "3e-2", "--num-heads", "2", "--shard-size", "4", "--save-every", "1", "--keep", "2",
        "--eval-prompts", "2"]


def _run(model_dir, out, steps, *extra):
    from train import draft_head

    return draft_head.main(["--model", str(model_dir), "--out", str(out), "--steps", str(steps), *ARGS, *extra])


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return [r for r in _records(out) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tiny_chat_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("medusa_full")
    assert _run(tiny_chat_checkpoint, out, 12) == 0
    return out


def test_loss_falls_and_head_is_exported(trained):
    records = _losses(trained)
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
    assert last < first * 0.9, (first, last)
    config = json.loads((trained / "head.json").read_text())
    assert config["kind"] == "medusa" and config["num_heads"] == 2
    assert len(json.loads((trained / "data" / "manifest.json").read_text())["shards"]) == 2
    kept = sorted(p.name for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["11", "12"]  # keep-last-2


def test_kill_and_restart_resumes_with_the_same_next_loss(trained, tiny_chat_checkpoint, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(trained / "data", out / "data")  # same data, no regeneration
    assert _run(tiny_chat_checkpoint, out, 8, "--stop-after", "5") == 0  # "killed" after step 5
    assert not (out / "head.json").exists()
    before = _records(out)
    assert [r["step"] for r in before] == [1, 2, 3, 4, 5] and before[4]["elapsed_s"] > before[0]["elapsed_s"] > 0
    before[4]["elapsed_s"] = 1000.0  # as if the first run had taken 1000 s to step 5
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in before))
    assert _run(tiny_chat_checkpoint, out, 8) == 0  # restart: resumes at 5
    resumed = _losses(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert 1000.0 < resumed[5]["elapsed_s"] <= resumed[6]["elapsed_s"] <= resumed[7]["elapsed_s"]  # goes on
    full = {r["step"]: r["loss"] for r in _losses(trained)}
    ref = tmp_path / "reference"
    ref.mkdir()
    shutil.copytree(trained / "data", ref / "data")
    assert _run(tiny_chat_checkpoint, ref, 8) == 0
    assert [r["loss"] for r in _losses(ref)] == pytest.approx([r["loss"] for r in resumed], rel=1e-5)
    assert full[1] == pytest.approx(resumed[0]["loss"], rel=1e-5)


def test_corrupt_checkpoint_gives_a_clear_error(trained, tiny_chat_checkpoint, tmp_path, capsys):
    out = tmp_path / "corrupt"
    shutil.copytree(trained, out)
    for f in (out / "checkpoints" / "12").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    assert _run(tiny_chat_checkpoint, out, 14) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 12" in err and "corrupt" in err and "delete" in err


def test_medusa_method_with_the_trained_head_equals_ar(trained, tiny_chat_model):
    prompts = ["What is 3 + 4?", "Tom has 5 apples and buys 7 more. How many apples does he have?"]
    ar = specjax.generate(tiny_chat_model, prompts, "ar", max_new_tokens=24, eos_token_ids=())
    for branches in (1, 2):
        out = specjax.generate(tiny_chat_model, prompts, "medusa", head=str(trained), branches=branches,
                               max_new_tokens=24, eos_token_ids=())
        assert out.tokens == ar.tokens, branches
        assert out.stats["draft_k"] == 2 * branches
    # a confidence gate no guess passes drafts nothing: plain decoding, one token per forward
    gated = specjax.generate(tiny_chat_model, prompts, "medusa", head=str(trained), branches=1, min_prob=1.01,
                             max_new_tokens=24, eos_token_ids=())
    assert gated.tokens == ar.tokens and gated.stats["mean_accepted_tokens"] == 1.0
    sampled = specjax.generate(tiny_chat_model, prompts, "medusa", head=str(trained), max_new_tokens=24,
                               temperature=1.0, eos_token_ids=())
    assert all(len(t) == 24 for t in sampled.tokens)


def test_head_errors_name_the_fix(trained, tiny_chat_model, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs head=DIR .no head ships for"):
        specjax.generate(tiny_chat_model, ["hi"], "medusa", max_new_tokens=4)
    with pytest.raises(ValueError, match="no trained head"):
        specjax.generate(tiny_chat_model, ["hi"], "medusa", head=str(tmp_path), max_new_tokens=4)
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    (bad / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        specjax.generate(tiny_chat_model, ["hi"], "medusa", head=str(bad), max_new_tokens=4)
    from train import draft_head

    assert draft_head.main(["--head", "eagle2", "--out", str(tmp_path / "x")]) == 2
    assert "not available" in capsys.readouterr().err


def test_hybrid_with_a_medusa_head_equals_ar(trained, tiny_chat_model):
    prompts = ["Count: 1 2 3 1 2 3 1 2 3 1 2 3", "What is 3 + 4?"]
    ar = specjax.generate(tiny_chat_model, prompts, "ar", max_new_tokens=24, eos_token_ids=())
    out = specjax.generate(tiny_chat_model, prompts, "hybrid", head="medusa", head_path=str(trained), k=4,
                           threshold=3, head_min_prob=0.0, max_new_tokens=24, eos_token_ids=())
    assert out.tokens == ar.tokens
    assert out.stats["proposer_steps"][2] > 0  # the medusa half drafted
    sampled = specjax.generate(tiny_chat_model, prompts, "hybrid", head="medusa", head_path=str(trained), k=4,
                               threshold=3, head_min_prob=0.0, max_new_tokens=24, eos_token_ids=(), temperature=0.8)
    assert all(len(t) == 24 for t in sampled.tokens)


def test_medusa_targets_and_batches_are_replayable():
    from train.draft_head import batch_at, medusa_targets

    labels = np.array([[11, 12, 13, 14, 0, 0]])  # the target's next token at each position of 10 11 12 13 14
    mask = np.array([[True] * 5 + [False]])
    target, valid = medusa_targets(labels, mask, np.array([[0, 2, 3]]), num_heads=2)
    assert target[0].tolist() == [[12, 13], [14, 0], [0, 0]]  # head i at t: token t + 2 + i
    assert valid[0].tolist() == [[True, True], [True, False], [False, False]]
    a, b = batch_at(7, 0, 100, 4, 64, 16), batch_at(7, 0, 100, 4, 64, 16)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and a[1].shape == (4, 16)
    assert not (batch_at(8, 0, 100, 4, 64, 16)[1] == a[1]).all()


EAGLE_ARGS = ["--head", "eagle", "--dataset", "arith", "--num-prompts", "8", "--seq-len", "48", "--batch-size", "4",
              "--lr", "3e-2", "--ttt-steps", "3", "--shard-size", "4", "--save-every", "4", "--keep", "1",
              "--eval-prompts", "0"]


def test_eagle_head_learns_its_data_and_drafts_it_back(tiny_chat_checkpoint, tiny_chat_model, tmp_path):
    """Trained (a kill and a resume on the way) on the tiny model's own generations, the EAGLE head has
    learnt them: replaying a training prompt, most drafts are accepted, and the output is still ar's."""
    from train import draft_head

    out = tmp_path / "eagle"
    run = lambda steps, *extra: draft_head.main(["--model", str(tiny_chat_checkpoint), "--out", str(out),
                                                 "--steps", str(steps), *EAGLE_ARGS, *extra])
    assert run(16, "--stop-after", "8") == 0 and not (out / "head.json").exists()
    assert run(16) == 0
    records = _losses(out)
    assert [r["step"] for r in records] == list(range(1, 17))
    assert np.mean([r["loss"] for r in records[-3:]]) < 0.5 * np.mean([r["loss"] for r in records[:3]])
    assert len(records[-1]["top1_per_step"]) == 3
    config = json.loads((out / "head.json").read_text())
    assert config["kind"] == "eagle" and config["ttt_steps"] == 3 and config["draft_vocab_size"] <= 8192
    from train.distill_data import ShardedData

    tokens = ShardedData(out / "data").take(np.arange(2))["tokens"]
    for row in tokens:
        prompt = row[:26].tolist()
        ar = specjax.generate(tiny_chat_model, [prompt], "ar", max_new_tokens=20, eos_token_ids=())
        assert ar.tokens[0] == row[26:46].tolist()  # the training data are the model's own greedy text
        for opts in ({}, {"topk": 2, "total": 6, "depth": 3}):
            got = specjax.generate(tiny_chat_model, [prompt], "eagle", head=str(out), max_new_tokens=20,
                                   eos_token_ids=(), **opts)
            assert got.tokens == ar.tokens
            assert got.stats["mean_accepted_tokens"] > 2.5, opts
    # warm start: a second run begins from this head (its own data copied in, so none is generated)
    warm = tmp_path / "warm"
    shutil.copytree(out / "data", warm / "data")
    assert draft_head.main(["--model", str(tiny_chat_checkpoint), "--out", str(warm), "--steps", "1", *EAGLE_ARGS,
                            "--init-head", str(out), "--lr", "1e-9"]) == 0
    assert _losses(warm)[0]["loss"] < 0.5 * records[0]["loss"]  # the same first batch, learnt weights
    from specjax.heads.io import load_head

    (_, before), (config, after) = load_head(out, "eagle"), load_head(warm, "eagle")
    assert (after["draft_vocab"] == before["draft_vocab"]).all()  # the head's vocabulary, not a recount
    assert config["init_head"]["path"] == str(out) and config["init_head"]["steps"] == 16
    got = specjax.generate(tiny_chat_model, [tokens[0][:26].tolist()], "eagle", head=str(warm), max_new_tokens=20,
                           eos_token_ids=())
    assert got.stats["mean_accepted_tokens"] > 2.5


def test_warm_start_flags_are_checked_before_the_model_loads(trained, tmp_path, monkeypatch, capsys):
    from train import draft_head

    monkeypatch.setattr(specjax, "load", lambda *a, **k: pytest.fail("the model loaded"))
    cases = [(["--init-head", str(tmp_path / "none")], "no trained head in"),
             (["--init-head", str(trained), "--num-heads", "3"], "has 2 Medusa heads: pass --num-heads 2"),
             (["--init-head", "default", "--model", str(tmp_path)], "no medusa head ships for"),
             (["--init-head", str(trained), "--head", "eagle"], "holds a 'medusa' head, not a 'eagle' one"),
             (["--head", "eagle", "--init-head", "default", "--draft-vocab", "7"],  # the shipped head's, found
              "drafts from 8192 tokens: pass --draft-vocab 8192 or leave it out")]
    for extra, message in cases:
        assert draft_head.main([*ARGS, "--out", str(tmp_path / "o"), *extra]) == 2
        assert message in capsys.readouterr().err, extra


def test_warm_started_medusa_begins_where_its_head_left_off(trained, tiny_chat_checkpoint, tmp_path):
    warm = tmp_path / "warm"
    shutil.copytree(trained / "data", warm / "data")
    assert _run(tiny_chat_checkpoint, warm, 1, "--init-head", str(trained), "--eval-prompts", "0") == 0
    fresh, trained_first = _losses(trained)[0]["loss"], _losses(warm)[0]["loss"]  # the same first batch
    assert trained_first < 0.8 * fresh, (fresh, trained_first)
    assert json.loads((warm / "head.json").read_text())["init_head"]["steps"] == 12


def test_more_prompts_than_the_datasets_hold_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A dataset that runs out is topped up by the others; when all run out the run stops with the count
    it could have, before any model is loaded or data generated."""
    from train import draft_head

    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answer": str(i)}) + "\n" for i in range(5)))
    args = draft_head.parse_args(["--head", "medusa", "--dataset", f"{data},arith", "--skip", "2",
                                  "--num-prompts", "9", "--out", str(tmp_path / "o")])
    got = [q.question for q in draft_head.training_questions(args)]
    assert len(got) == 9 and got[:6:2] == ["q2?", "q3?", "q4?"]  # interleaved, then arith alone
    held = [q.question for q in draft_head.held_out_questions(args)]  # the skipped ones only, never past them
    assert held[:3:2] == ["q0?", "q1?"] and len(held) == 4 and not set(held) & set(got)
    one = tmp_path / "one.jsonl"  # fewer questions than --skip: arith must not fill in past its own skip
    one.write_text(json.dumps({"question": "only?", "answer": "1"}) + "\n")
    args = draft_head.parse_args(["--head", "medusa", "--dataset", f"{one},arith", "--skip", "2", "--num-prompts",
                                  "4", "--eval-prompts", "6", "--out", str(tmp_path / "o")])
    held, got = ([q.question for q in f(args)] for f in (draft_head.held_out_questions, draft_head.training_questions))
    assert len(held) == 3 and not set(held) & set(got)
    monkeypatch.setattr(specjax, "load", lambda *a, **k: pytest.fail("the model loaded"))
    code = draft_head.main(["--head", "medusa", "--dataset", str(data), "--skip", "2", "--num-prompts", "4",
                            "--out", str(tmp_path / "o")])
    assert code == 2 and "holds only 3 questions past --skip 2: pass --num-prompts 3" in capsys.readouterr().err
