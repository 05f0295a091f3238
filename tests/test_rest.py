"""REST: the datastore (suffix array, binary search vs brute force, files and their errors), the
frequency tree on crafted datastores, the build CLI, and losslessness through the engine."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.datastore import build_datastore, datastore_paths, load_datastore, save_datastore, windows
from specjax.drafting import Context
from specjax.proposers import make_proposer
from specjax.proposers.rest import Rest, RestStore, match_range, spread

_propose = jax.jit(lambda p, ctx: p.propose((), ctx, None)[1], static_argnums=0)
_range = jax.jit(match_range)


def _device(store) -> RestStore:
    return RestStore(tokens=jnp.asarray(store.tokens), suffix_array=jnp.asarray(store.suffix_array))


def _ctx(rows, weights, width=8, active=None):
    tokens = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    b = len(rows)
    return Context(tokens=jnp.asarray(tokens), lengths=jnp.asarray([len(r) for r in rows], jnp.int32),
                   group=jnp.arange(b), active=jnp.ones((b,), bool) if active is None else jnp.asarray(active),
                   weights=weights)


def test_suffix_array_is_sorted_and_search_finds_brute_force_ranges():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 4, size=int(rng.integers(1, 30))).tolist() for _ in range(12)] + [[]]
    store = build_datastore(docs, vocab_size=4, window=6)
    tokens, sa = store.tokens, store.suffix_array
    assert store.meta["documents"] == 12 and store.meta["tokens"] == sum(map(len, docs)) == sa.size
    assert sorted(sa.tolist()) == np.nonzero(tokens != -1)[0].tolist()  # every non-separator position once
    keys = [tuple(w) for w in windows(tokens, sa, 6)]
    assert keys == sorted(keys)  # lexicographic, -1 (document end) first
    assert all(-1 not in k[: k.index(-1)] for k in keys if -1 in k)
    for n in (1, 2, 4):
        queries = rng.integers(0, 4, size=(24, n)).astype(np.int32)
        lo, hi = map(np.asarray, _range(_device(store), jnp.asarray(queries)))
        for q, a, b in zip(queries.tolist(), lo, hi):
            brute = {p for p in range(tokens.size - n + 1) if tokens[p : p + n].tolist() == q}
            assert set(sa[a:b].tolist()) == brute and (b > a) == bool(brute)


def test_spread_takes_all_or_evenly_spaced():
    idx, real = map(np.asarray, spread(jnp.asarray([3, 0, 5]), jnp.asarray([5, 10, 5]), 4))
    assert idx[0, :2].tolist() == [3, 4] and real[0].tolist() == [True, True, False, False]
    assert idx[1].tolist() == [0, 2, 5, 7] and real[1].all()  # floor(j * 10 / 4)
    assert not real[2].any()


# after "5 6": 7 8 (x3, then 2), 7 9 (x1, document ends), 4 4 (x2, document ends); "1 5 6" only before 7 8 2
CRAFTED = [[1, 5, 6, 7, 8, 2]] * 3 + [[5, 6, 7, 9]] + [[3, 5, 6, 4, 4]] * 2


def test_tree_is_built_by_frequency_and_the_longest_key_wins():
    weights = _device(build_datastore(CRAFTED, vocab_size=16))
    p = Rest(datastore="unused", k=3, branching=(2, 2), max_key=4, min_key=2)
    # nodes: 1, 2 under the root; 3, 4 under 1; 5, 6 under 2; 7..10 one child each under 3..6
    assert p.template.parents == (-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6)
    rows = [[9, 9, 5, 6], [1, 5, 6], [2, 3, 1, 2], [5, 6]]
    d = _propose(p, _ctx(rows, weights, active=[True, True, True, False]))
    tokens, valid = np.asarray(d.tokens), np.asarray(d.valid)
    # key "5 6": 7 (x4) then 4 (x2); under 7: 8 (x3) then 9; under 4: 4; below 8: 2; 9 and 4 4 end their documents
    assert tokens[0].tolist() == [7, 4, 8, 9, 4, 0, 2, 0, 0, 0]
    assert valid[0].tolist() == [True, True, True, True, True, False, True, False, False, False]
    # key "1 5 6" (longer, so it wins): only 7 8 2 follows it
    assert tokens[1].tolist() == [7, 0, 8, 0, 0, 0, 2, 0, 0, 0] and valid[1].sum() == 3
    assert not valid[2].any() and not valid[3].any()  # "1 2" is nowhere; an inactive row drafts nothing
    assert np.asarray(d.num).tolist() == [6, 3, 0, 0]
    assert np.asarray(d.confidence).tolist() == [2.0, 3.0, 0.0, 2.0]
    # with fewer candidates than the range, an even spread keeps the majority continuation first
    few = _propose(dataclasses.replace(p, candidates=3), _ctx(rows[:1], weights))
    assert np.asarray(few.tokens)[0, 0] == 7


def test_files_round_trip_and_bad_inputs_name_the_fix(tmp_path, tiny_model):
    path = tmp_path / "store"
    save_datastore(build_datastore(CRAFTED, vocab_size=64, model="tiny"), path)
    npz, meta = datastore_paths(path)
    assert npz.name == "store.npz" and meta.name == "store.json"
    loaded = load_datastore(npz, 64)  # the .npz path and the bare path both work
    assert loaded.meta["documents"] == 6 and loaded.tokens.tolist()[:7] == [1, 5, 6, 7, 8, 2, -1]
    with pytest.raises(ValueError, match="no datastore file .*eval.build_datastore"):
        load_datastore(tmp_path / "nope.npz", 64)
    with pytest.raises(ValueError,
                       match="built for model 'tiny' .*vocab 64.*rebuild it with python -m eval.build_datastore"):
        load_datastore(path, 49152)
    bad = tmp_path / "bad"
    save_datastore(build_datastore(CRAFTED, vocab_size=64), bad)
    datastore_paths(bad)[0].write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt.*rebuild"):
        load_datastore(bad, 64)
    empty = tmp_path / "empty"
    np.savez(datastore_paths(empty)[0], tokens=np.zeros(0, np.int32), suffix_array=np.zeros(0, np.int32))
    datastore_paths(empty)[1].write_text(json.dumps({"format": "specjax-rest-datastore", "vocab_size": 64,
                                                     "window": 16}))
    with pytest.raises(ValueError, match="empty"):
        load_datastore(empty, 64)
    with pytest.raises(ValueError, match="every document is empty"):
        build_datastore([[], []], vocab_size=64)
    with pytest.raises(ValueError, match="datastore=PATH; build one with python -m eval.build_datastore"):
        make_proposer("rest").bind(tiny_model, None)
    with pytest.raises(ValueError, match="max_key<=16"):
        make_proposer("rest", datastore=str(npz), max_key=20).bind(tiny_model, None)
    with pytest.raises(ValueError, match="min_key <= max_key"):
        Rest(min_key=3, max_key=2)
    with pytest.raises(ValueError, match="candidates >= max"):
        Rest(candidates=1, branching=(2,))


LOOPY = [5, 6, 7, 8, 9, 10, 11, 12] * 4


def test_greedy_equals_ar_and_sampling_is_lossless_in_the_loop(tiny_model, tmp_path):
    prompts = [LOOPY, [3, 9, 4, 4, 17, 2, 30], [40, 41, 42]]
    ar = specjax.generate(tiny_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    # the datastore holds the model's own outputs on the first two prompts; the third is new to it
    path = tmp_path / "tiny"
    save_datastore(build_datastore([p + t for p, t in zip(prompts[:2], ar.tokens)], vocab_size=64), path)
    out = specjax.generate(tiny_model, prompts, "rest", max_new_tokens=40, eos_token_ids=(), datastore=str(path))
    assert out.tokens == ar.tokens
    assert out.stats["mean_accepted_tokens"] > 1.5  # the two known rows accept whole chains
    one_ar = specjax.generate(tiny_model, prompts[1:2], "ar", max_new_tokens=40, eos_token_ids=())
    one = specjax.generate(tiny_model, prompts[1:2], "rest", max_new_tokens=40, eos_token_ids=(), datastore=str(path))
    assert one.tokens == one_ar.tokens and one.stats["mean_accepted_tokens"] > 2.0
    sampled = [specjax.generate(tiny_model, prompts[1:2], "rest", max_new_tokens=12, eos_token_ids=(),
                                temperature=1.0, seed=s, datastore=str(path)).tokens[0] for s in range(2)]
    assert sampled[0] != sampled[1] and [len(s) for s in sampled] == [12, 12]


def test_cli_builds_from_text_and_generations(tiny_chat_checkpoint, tiny_chat_model, tmp_path, capsys):
    from eval.build_datastore import main

    data = tmp_path / "qa.jsonl"
    items = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5. The answer is 5."},
             {"question": "What is 4 + 4?", "answer": "4 + 4 = 8. The answer is 8."},
             {"question": "What is 6 - 1?", "answer": "6 - 1 = 5. The answer is 5."}]
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    model = str(tiny_chat_checkpoint)
    vocab = tiny_chat_model.config.vocab_size
    text = tmp_path / "text"
    assert main(["--model", model, "--dataset", str(data), "--out", str(text), "--source", "text"]) == 0
    assert "6 documents" in capsys.readouterr().out
    store = load_datastore(text, vocab)
    assert store.meta["source"] == "text" and store.meta["model"] == model and store.meta["documents"] == 6
    first = store.tokens[: np.argmax(store.tokens == -1)].tolist()
    assert tiny_chat_model.tokenizer.decode(first) == items[0]["question"]
    held_out = tmp_path / "held_out"  # --skip leaves out the questions a benchmark then runs on
    assert main(["--model", model, "--dataset", str(data), "--out", str(held_out), "--source", "text",
                 "--skip", "2"]) == 0
    assert "2 documents" in capsys.readouterr().out
    first = load_datastore(held_out, vocab).tokens
    assert tiny_chat_model.tokenizer.decode(first[: np.argmax(first == -1)].tolist()) == items[2]["question"]
    assert main(["--model", model, "--dataset", str(data), "--out", str(held_out), "--skip", "3"]) == 2
    assert "leaves no items" in capsys.readouterr().err

    gen = tmp_path / "gen.npz"
    assert main(["--model", model, "--dataset", str(data), "--out", str(gen), "--limit", "2",
                 "--max-new-tokens", "8", "--batch-size", "2"]) == 0
    line = capsys.readouterr().out
    assert "KiB on disk" in line and " s" in line
    store = load_datastore(gen, vocab)
    assert store.meta["source"] == "generate" and store.meta["documents"] == 2
    answer = store.tokens[: np.argmax(store.tokens == -1)].tolist()
    out = specjax.generate(tiny_chat_model, [items[0]["question"]], "rest", max_new_tokens=8, datastore=str(gen))
    assert out.tokens[0] == answer  # the stored greedy answer, drafted back from the store
    # killed after its first batch: --resume reads that batch from the records and builds the same store
    gen3 = ["--model", model, "--dataset", str(data), "--out", str(tmp_path / "gen3"), "--max-new-tokens", "8",
            "--batch-size", "2"]
    assert main(gen3) == 0
    whole = load_datastore(tmp_path / "gen3", vocab)
    rec = tmp_path / "gen3.records.jsonl"
    lines = rec.read_text().splitlines()
    assert len(lines) == 1 + 2  # settings, 2 batches
    rec.write_text(lines[0] + "\n" + lines[1] + "\n")
    (tmp_path / "gen3.npz").unlink()
    capsys.readouterr()
    assert main(gen3 + ["--resume"]) == 0
    assert "1 finished batches skipped" in capsys.readouterr().out
    again = load_datastore(tmp_path / "gen3", vocab)
    assert np.array_equal(again.tokens, whole.tokens) and again.meta == whole.meta

    assert main(["--model", model, "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(gen)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--model", model, "--dataset", str(data), "--out", str(gen), "--window", "0"]) == 2
    capsys.readouterr()
    assert main(["--dataset", str(data), "--out", str(gen), "--source", "web"]) == 2  # one line, as every bad flag
    assert capsys.readouterr().err.startswith("error: argument --source: invalid choice: 'web'")


@pytest.mark.real
def test_real_model_drafts_from_its_own_answers(real_model, tmp_path):
    from eval.build_datastore import model_answers
    from specjax.tts.datasets import arith_problems

    problems = arith_problems(7, seed=0)  # 2, 3, 5, 6 share the template "A shelf has R rows with B books..."
    answers = model_answers(real_model, [problems[i].question for i in (2, 3)], max_new_tokens=64, batch_size=2)
    path = tmp_path / "real"
    save_datastore(build_datastore(answers, vocab_size=real_model.config.vocab_size, source="generate"), path)
    prompts = [problems[i].question for i in (5, 6)]  # related questions the store has not seen
    ar = specjax.generate(real_model, prompts, "ar", max_new_tokens=40, eos_token_ids=())
    out = specjax.generate(real_model, prompts, "rest", max_new_tokens=40, eos_token_ids=(), datastore=str(path))
    assert out.tokens == ar.tokens
    assert out.stats["mean_accepted_tokens"] > 1.6  # 2.0 measured (a different template's prompts: 1.07)
