"""Draft-head training data in shards: a kill during generation resumes at the shard boundary with the
data an uninterrupted run writes; memory-mapped shards give the same batches as in-memory arrays; the
learning-curve records are written."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from train import distill_data

SPEC = dict(model="tiny", dataset="arith", skip=0, num_prompts=6, samples_per_prompt=2, temperature=0.8, seq_len=40,
            shard_size=2, seed=3, feature_layers=(0, 1), store_features=True)


class Killed(Exception):
    pass


def _questions(n):
    from specjax.tts.datasets import load_dataset

    return load_dataset("arith", limit=n)


def _build(model, folder, after_shard=None, sampler=None, **changes):
    spec = distill_data.DataSpec(**{**SPEC, **changes})
    return distill_data.build_shards(model, spec, _questions(spec.num_prompts), folder, log=lambda *a: None,
                                     after_shard=after_shard, make_sampler=None if sampler is None else lambda: sampler)


@pytest.fixture(scope="module")
def full(tiny_chat_model, tmp_path_factory):
    return _build(tiny_chat_model, tmp_path_factory.mktemp("full"))


def test_a_killed_generation_resumes_at_the_shard_boundary_with_the_same_data(full, tiny_chat_model, tmp_path):
    def kill_after_second(shard):
        if shard == 1:
            raise Killed

    with pytest.raises(Killed):
        _build(tiny_chat_model, tmp_path, after_shard=kill_after_second)
    assert len(json.loads((tmp_path / "manifest.json").read_text())["shards"]) == 2
    (tmp_path / "shard-00002.partial").mkdir()  # what a kill in the middle of a shard leaves
    (tmp_path / "shard-00002.partial" / "tokens.npy").write_bytes(b"cut short")
    regenerated = []
    resumed = _build(tiny_chat_model, tmp_path, after_shard=regenerated.append)
    assert regenerated == [2]  # only the missing shard is generated again
    assert not list(tmp_path.glob("*.partial"))
    a, b = full.in_memory(), resumed.in_memory()
    assert a.tokens.shape == (12, 40) and a.features.shape == (12, 40, 2 * tiny_chat_model.config.hidden_size)
    for key in distill_data.ARRAYS:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    # sampled answers: two per prompt, which differ (the shard seed drives the sampling, not the run)
    assert not np.array_equal(a.tokens[0], a.tokens[1])
    shards = json.loads((tmp_path / "manifest.json").read_text())["shards"]
    assert [s["name"] for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert all(s["sample_s"] > 0 and s["label_s"] > 0 for s in shards)  # each shard's own seconds


def test_labels_are_the_targets_greedy_next_tokens(full, tiny_chat_model):
    import specjax

    data = full.in_memory()
    for end in (12, 30):  # inside the prompt and inside the sampled answer
        prefix = data.tokens[1, :end].tolist()
        ar = specjax.generate(tiny_chat_model, [prefix], "ar", max_new_tokens=1, eos_token_ids=(), chat=False)
        assert data.labels[1, end - 1] == ar.tokens[0][0]
    assert data.mask.sum() == full.num_tokens


def test_answers_come_from_the_sampler_and_labels_from_the_full_precision_model(tiny_chat_model, tmp_path):
    """--sample-matmul-dtype: the answers are drawn by the sampler (here the weights scaled, so that its
    choices differ visibly from the target's), the labels and features are the target's own."""
    import dataclasses

    import jax

    sampler = dataclasses.replace(tiny_chat_model, programs_key="",
                                  params=jax.tree.map(lambda x: x * 1.5, tiny_chat_model.params))
    spec = distill_data.DataSpec(**{**SPEC, "num_prompts": 2, "sample_matmul_dtype": "bfloat16"})
    data = _build(tiny_chat_model, tmp_path, sampler=sampler, num_prompts=2, sample_matmul_dtype="bfloat16").in_memory()
    prompts = distill_data.encode_prompts(tiny_chat_model, _questions(2), spec.seq_len)
    drawn, _ = distill_data.generate_rows(sampler, prompts, spec, 0)
    own, _ = distill_data.generate_rows(tiny_chat_model, prompts, spec, 0)
    np.testing.assert_array_equal(data.tokens, drawn)
    assert not np.array_equal(data.tokens, own)
    feats, labels = distill_data.target_outputs(tiny_chat_model, data.tokens, SPEC["feature_layers"])
    _, sampler_labels = distill_data.target_outputs(sampler, data.tokens, SPEC["feature_layers"])
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.features, feats)
    assert not np.array_equal(labels, sampler_labels)
    # the precision is part of what the data are a function of; a folder written without it keeps its key
    assert "sample_matmul_dtype" not in distill_data.DataSpec(**SPEC).key()
    with pytest.raises(ValueError, match="sample_matmul_dtype 'bfloat16' -> None"):
        _build(tiny_chat_model, tmp_path, num_prompts=2)


def test_more_prompts_extend_the_data_and_fewer_read_a_prefix(full, tiny_chat_model, tmp_path):
    import shutil

    shutil.copytree(full.folder, tmp_path / "d")
    made = []
    small = _build(tiny_chat_model, tmp_path / "d", after_shard=made.append, num_prompts=4)
    assert made == [] and small.num_rows == 8  # the first two shards, reused
    grown = _build(tiny_chat_model, tmp_path / "d", after_shard=made.append, num_prompts=7)
    assert made == [3] and grown.num_rows == 14  # one new shard (a short one: 1 prompt)
    np.testing.assert_array_equal(grown.in_memory().tokens[:12], full.in_memory().tokens)
    _build(tiny_chat_model, tmp_path / "d", after_shard=made.append, num_prompts=8)
    assert made == [3, 3]  # the short shard is regenerated in full


def test_other_settings_are_refused_with_the_fix(full, tiny_chat_model):
    with pytest.raises(ValueError, match=r"other settings \(seq_len 40 -> 48\).*another --out, or delete"):
        _build(tiny_chat_model, full.folder, seq_len=48)


def test_sharded_and_in_memory_data_give_the_same_training_batches(full, tiny_chat_model):
    from train import draft_head

    args = argparse.Namespace(seed=0, batch_size=3, positions=8, num_heads=2, ttt_steps=2, draft_vocab=64)
    for make in (draft_head.medusa_task, draft_head.eagle_task):
        streamed, held = make(args, tiny_chat_model, full), make(args, tiny_chat_model, full.in_memory())
        for step in (0, 5):
            for x, y in zip(streamed.batch(step), held.batch(step)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_extra_data_mix_in_as_if_one_data_set(full, tiny_chat_model, tmp_path):
    """Rows numbered across the parts in order, a batch's rows in its own order from whichever part holds
    them; a folder that a step could not read beside this run's is refused before anything loads."""
    other = _build(tiny_chat_model, tmp_path / "other", dataset="spectts-like", num_prompts=2, seed=5)
    spec = distill_data.DataSpec(**SPEC)
    mixed = distill_data.ConcatData([full, distill_data.extra_data(other.folder, spec)])
    assert mixed.num_rows == full.num_rows + other.num_rows == 16
    assert mixed.num_tokens == full.num_tokens + other.num_tokens
    rows = np.array([13, 0, 12, 5, 15, 11])  # parts interleaved, out of order
    got, a, b = mixed.take(rows), full.in_memory(), other.in_memory()
    for key in distill_data.ARRAYS:
        want = np.stack([getattr(a, key)[r] if r < 12 else getattr(b, key)[r - 12] for r in rows])
        np.testing.assert_array_equal(got[key], want)
    v = tiny_chat_model.config.vocab_size
    np.testing.assert_array_equal(mixed.token_counts(v), full.token_counts(v) + other.token_counts(v))
    for change, field in ((dict(seq_len=48), "seq_len"), (dict(feature_layers=(0,)), "feature_layers"),
                          (dict(store_features=False), "store_features")):
        with pytest.raises(ValueError, match=f"built with {field}=.*same model, --seq-len and --features"):
            distill_data.extra_data(other.folder, distill_data.DataSpec(**{**SPEC, **change}))
    with pytest.raises(ValueError, match="holds no data shards"):
        distill_data.extra_data(tmp_path / "nothing", spec)


def test_recomputed_features_match_the_stored_ones(full, tiny_chat_model, tmp_path):
    from train import draft_head

    bare = _build(tiny_chat_model, tmp_path, store_features=False)
    assert bare.take(np.arange(2))["features"] is None
    args = argparse.Namespace(seed=0, batch_size=3, positions=8, num_heads=2, ttt_steps=2, draft_vocab=64)
    stored, recomputed = draft_head.eagle_task(args, tiny_chat_model, full), draft_head.eagle_task(
        args, tiny_chat_model, bare)
    x, y = stored.batch(2)[0], recomputed.batch(2)[0]
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-2, rtol=1e-2)  # float16 storage


def test_learning_curve_records_and_plot(tiny_chat_checkpoint, tmp_path):
    from train import draft_head

    out = tmp_path / "eagle"
    argv = ["--model", str(tiny_chat_checkpoint), "--out", str(out), "--head", "eagle", "--dataset", "arith",
            "--num-prompts", "4", "--seq-len", "40", "--batch-size", "2", "--lr", "3e-2", "--ttt-steps", "2",
            "--shard-size", "4", "--steps", "6", "--save-every", "2", "--eval-every", "2", "--eval-prompts", "2",
            "--eval-tokens", "8", "--eval-tree", "4,2,2"]
    assert draft_head.main(argv) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert [r["eval"]["tokens_seen"] for r in evals] == [2 * 32 * s for s in (2, 4, 6)]  # batch x positions
    for r in evals:
        assert set(r["eval"]["configs"]) == {"chain", "tree"} and r["eval"]["equals_ar"] is True
        assert all(v["mean_accepted_tokens"] >= 1.0 for v in r["eval"]["configs"].values())
    curves = draft_head.learning_curve(out / "metrics.jsonl")
    assert [x for x, _ in curves["chain"]] == [r["eval"]["tokens_seen"] for r in evals]
    assert (out / "learning_curve.png").stat().st_size > 1000
