"""Paradigms and the eval.tts CLI on a tiny model with the real tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import save_random_eagle_head

import specjax
from specjax.tts import paradigms
from specjax.tts.datasets import Question

QUESTIONS = [Question(id="a", question="What is 2 + 3?", answer="5"),
             Question(id="b", question="Compute 4 * 6 - 1.", answer="23"),
             Question(id="c", question="Tom has 3 boxes of 4 apples. How many apples?", answer="12")]


def test_best_of_n_prefills_once_and_batches_branches(tiny_chat_model):
    out = specjax.generate(tiny_chat_model, ["What is 2 + 3?", "Name a color."], "ar", num_samples=4,
                           max_new_tokens=12, temperature=1.0, eos_token_ids=())
    assert out.stats["prefilled_rows"] == 2 and out.stats["batch"] == 8
    assert len(out.tokens) == 8
    assert len({tuple(t) for t in out.tokens[:4]}) > 1  # sampled branches differ
    greedy = specjax.generate(tiny_chat_model, ["What is 2 + 3?"], "ar", num_samples=3, max_new_tokens=12)
    alone = specjax.generate(tiny_chat_model, ["What is 2 + 3?"], "ar", max_new_tokens=12)
    assert greedy.tokens == alone.tokens * 3


def test_best_of_n_paradigm_shape(tiny_chat_model):
    res = paradigms.run(tiny_chat_model, QUESTIONS[:2], "suffix", "best_of_n", n=4, max_new_tokens=10,
                        temperature=0.8, k=4)
    assert [len(o) for o in res.outputs] == [4, 4]
    assert res.rounds[0]["prefilled_rows"] == 2 and res.rounds[0]["batch"] == 8


def test_speculate_max_rows_reaches_every_round(tiny_chat_model):
    kw = dict(rounds=2, max_new_tokens=24, k=4)
    free = paradigms.run(tiny_chat_model, QUESTIONS[:1], "suffix", "multi_round", **kw)
    gated = paradigms.run(tiny_chat_model, QUESTIONS[:1], "suffix", "multi_round", speculate_max_rows=0, **kw)
    assert free.rounds[1]["mean_accepted_tokens"] > 1.0  # round 2 copies round 1 ...
    assert [r["mean_accepted_tokens"] for r in gated.rounds] == [1.0, 1.0]  # ... unless no step may draft
    assert gated.history == free.history


def test_multi_round_chains_previous_answer(tiny_chat_model, monkeypatch):
    seen = []
    real = paradigms.generate

    sessions = []

    def spy(model, prompts, method, **kw):
        seen.append(list(prompts))
        sessions.append(kw.get("session"))
        return real(model, prompts, method, **kw)

    monkeypatch.setattr(paradigms, "generate", spy)
    res = paradigms.run(tiny_chat_model, QUESTIONS[:2], "ar", "multi_round", rounds=3, max_new_tokens=8, batch_size=2)
    assert len(res.history) == 3 and len(res.rounds) == 3
    for r in (1, 2):
        for q, prev, prompt in zip(QUESTIONS, res.history[r - 1], seen[r]):
            assert prompt == paradigms.next_round_prompt(q.question, prev)
            assert prev.strip() in prompt
    assert [o[0] for o in res.outputs] == res.history[-1]
    # rounds chain through a session: later rounds prefill only past the prefix shared with the history
    assert sessions[0] is None and all(s is not None for s in sessions[1:])
    assert res.rounds[0]["reused_prefix_tokens"] == 0
    assert all(r["reused_prefix_tokens"] > 0 for r in res.rounds[1:])


@pytest.mark.parametrize("paradigm, kw", [("single", {}), ("best_of_n", {"n": 2}), ("multi_round", {"rounds": 2})])
def test_greedy_paradigms_are_lossless_for_every_method(tiny_chat_model, paradigm, kw, tmp_path):
    head = save_random_eagle_head(tiny_chat_model, tmp_path / "eagle")
    with pytest.warns(UserWarning) if paradigm == "best_of_n" else _nullcontext():
        ar = paradigms.run(tiny_chat_model, QUESTIONS[:2], "ar", paradigm, max_new_tokens=16, batch_size=2, **kw)
    for method, opts in [("pld", {}), ("suffix", {}), ("pool", {}), ("recycling", {}), ("draft", {"draft": "self:1"}),
                         ("hybrid", {"draft": "self:1", "head_k": 3}), ("eagle", {"head": head}),
                         ("hybrid", {"head_path": head, "head_min_prob": 0.0})]:
        with pytest.warns(UserWarning) if paradigm == "best_of_n" else _nullcontext():
            out = paradigms.run(tiny_chat_model, QUESTIONS[:2], method, paradigm, max_new_tokens=16, batch_size=2,
                                k=4, **opts, **kw)
        assert out.outputs == ar.outputs, (method, paradigm)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_bad_paradigm_arguments(tiny_chat_model):
    with pytest.raises(ValueError, match="unknown paradigm"):
        paradigms.run(tiny_chat_model, QUESTIONS, "ar", "tree_of_thought")
    with pytest.raises(ValueError, match="--n must be >= 1"):
        paradigms.run(tiny_chat_model, QUESTIONS, "ar", "best_of_n", n=0)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_cli(checkpoint, tmp_path, *args: str) -> int:
    """`eval.tts` on the two QUESTIONS, 12 new tokens, results to tmp_path/res.<method>.json."""
    from eval import tts

    data = tmp_path / "q.jsonl"
    _write_jsonl(data, [{"question": q.question, "answer": q.answer} for q in QUESTIONS])
    return tts.main(["--model", str(checkpoint), "--dataset", str(data), "--limit", "2", "--max-new-tokens", "12",
                     "--seed", "0", "--output", str(tmp_path / "res.json"), *args])


def test_cli_writes_results_in_the_contract_schema(tiny_chat_checkpoint, tmp_path, capsys):
    rc = _run_cli(tiny_chat_checkpoint, tmp_path, "--method", "pld,hybrid", "--paradigm", "multi_round",
                  "--rounds", "2", "--temperature", "0", "--k", "4", "--option", "draft=self:1", "--option", "head_k=2")
    assert rc == 0
    for method in ("pld", "hybrid"):
        res = json.loads((tmp_path / f"res.{method}.json").read_text())
        assert set(res) == {"config", "summary", "samples"}
        s = res["summary"]
        for key in ("method", "paradigm", "questions", "generated_tokens", "wall_s", "tokens_per_s",
                    "target_forwards", "mean_accepted_tokens", "accuracy", "baseline", "speedup_vs_ar"):
            assert key in s, key
        assert s["method"] == method and s["paradigm"] == "multi_round" and s["questions"] == 2
        assert s["baseline"]["method"] == "ar" and len(s["per_round"]) == 2
        assert s["outputs_equal_ar"] == 1.0  # greedy: ar's outputs, question for question
        assert res["config"]["k"] == 4 and res["config"]["rounds"] == 2
        for sample in res["samples"]:
            assert set(sample) >= {"id", "question", "answer", "outputs", "predicted", "correct"}
    printed = capsys.readouterr().out
    assert "speedup" in printed and "hybrid" in printed and "pld" in printed
    assert "== ar" in printed and "warning" not in printed


def test_sampled_best_of_n_results_say_the_outputs_are_ars(tiny_chat_checkpoint, tmp_path, capsys):
    """With the same seeds, a deterministic drafter's sampled branches are `ar`'s, and the results say
    so; a draft model's real q gives other samples, which is no warning."""
    rc = _run_cli(tiny_chat_checkpoint, tmp_path, "--method", "pld,draft", "--paradigm", "best_of_n", "--n", "3",
                  "--temperature", "0.8", "--k", "3", "--option", "draft=self:1")
    assert rc == 0
    pld = json.loads((tmp_path / "res.pld.json").read_text())["summary"]
    draft = json.loads((tmp_path / "res.draft.json").read_text())["summary"]
    assert pld["outputs_equal_ar"] == 1.0 and draft["outputs_equal_ar"] < 1.0
    printed = capsys.readouterr().out
    assert "== ar" in printed and "warning" not in printed


@pytest.mark.parametrize("argv, match", [
    (["--method", "nope"], "unknown method"),
    (["--paradigm", "nope"], "unknown --paradigm"),
    (["--n", "0", "--paradigm", "best_of_n"], "--n must be >= 1"),
    (["--speculate-max-rows", "-1"], "--speculate-max-rows must be >= 0"),
    (["--dataset", "/no/such/file.jsonl"], "not"),
    (["--method", "pld", "--option", "threshold=3"], "none of the methods pld takes it"),
    (["--option", "draft"], "write KEY=VALUE"),
    (["--method", "pld", "--option", "suffix.k=3"], "'suffix' is not a method of this run"),
])
def test_cli_bad_input(argv, match, capsys):
    from eval import tts

    assert tts.main(argv) == 2
    assert match in capsys.readouterr().err


def test_option_scoping():
    from eval.tts import parse_options

    got = parse_options(["k=4", "hybrid.head=medusa", "head=/h", "head_path=/h"], ["medusa", "hybrid", "pld"])
    assert got["medusa"] == {"k": 4, "head": "/h"}
    assert got["hybrid"] == {"k": 4, "head": "medusa", "head_path": "/h"}  # the scoped value wins
    assert got["pld"] == {"k": 4}


def test_all_covers_the_paper_table_and_needs_artifacts_given():
    from eval.tts import select_methods

    plain = select_methods("all", "no-such-model", [])
    # SpS, PLD, Lookahead, PIA, Token Recycling, SAM-Decoding, SAM[EAGLE-3] run without artifacts
    assert {"ar", "draft", "pld", "lookahead", "pia", "recycling", "suffix", "hybrid"} <= set(plain)
    assert not {"rest", "eagle", "medusa"} & set(plain)  # no datastore given, no head ships for this name
    given = select_methods("all", "no-such-model", ["rest.datastore=/d", "head=/h"])
    assert {"rest", "eagle", "medusa"} <= set(given)
    shipped = select_methods("all", "smollm2-135m-instruct", [])
    assert {"eagle", "medusa"} <= set(shipped) and "rest" not in shipped


def test_the_adaptive_benchmark_runs_question_by_question_as_a_whole_run_would(tiny_chat_checkpoint, tmp_path):
    """benchmarks.adaptive interleaves `ar`, adaptive and fixed question by question; each question keeps
    its whole-run seed and shapes, so the outputs are those of one run over all the questions."""
    from benchmarks import adaptive
    from eval.tts import parse_args, run_method
    from specjax.tts.datasets import load_dataset

    out = tmp_path / "adaptive.json"
    assert adaptive.main(["--model", str(tiny_chat_checkpoint), "--cells", "single-arith,bon-arith",
                          "--methods", "pld", "--limit", "3", "--bon-limit", "2", "--max-new-tokens", "8",
                          "--fresh", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["cell"], r["method"]) for r in rows] == [("single-arith", "pld"), ("bon-arith", "pld")]
    for r in rows:  # lossless: greedy, and sampled with ar's draws per row and position
        assert r["adaptive_outputs_equal_ar"] == r["fixed_outputs_equal_ar"] == r["fresh_outputs_equal_ar"] == 1.0
        assert r["adaptive_summary"]["questions"] == (3 if r["cell"] == "single-arith" else 2)
        assert r["ar_tokens_per_s"] > 0 and r["fixed_speedup"] > 0
    model = specjax.load(str(tiny_chat_checkpoint))
    args = parse_args(["--paradigm", "best_of_n", "--dataset", "arith", "--max-new-tokens", "8",
                       "--temperature", "0.7", "--n", "8", "--limit", "2"])
    questions = load_dataset("arith", limit=2)
    _, whole, _ = run_method(model, questions, "ar", args)
    got = adaptive.interleaved(model, questions, "pld", args)
    assert [s["outputs"] for s in got["ar"][1]] == [s["outputs"] for s in whole]


def test_the_best_of_n_and_think_twice_benchmarks_run_on_a_checkpoint(tiny_chat_checkpoint, tmp_path, capsys):
    """The benchmark scripts a user runs from the README, end to end on a tiny checkpoint: each prints its
    table, and think-twice's drafting methods return `ar`'s greedy outputs."""
    from benchmarks import best_of_n, think_twice

    assert best_of_n.main(["--model", str(tiny_chat_checkpoint), "--questions", "1", "--n", "2",
                           "--methods", "ar,pld", "--max-new-tokens", "6"]) == 0
    out = tmp_path / "tt.json"
    assert think_twice.main(["--model", str(tiny_chat_checkpoint), "--questions", "1", "--dataset", "arith",
                             "--methods", "ar,pld", "--max-new-tokens", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best-of-2" in printed and "pld" in printed
    figures = json.loads(out.read_text())
    assert figures["round2"]["pld"]["equals_ar"] and figures["round2"]["pld"]["tokens"] > 0


def test_the_methods_take_turns_batch_by_batch_with_whole_run_outputs(tiny_chat_checkpoint, tmp_path):
    """eval.tts runs `ar` and the methods in turn, batch by batch, the order rotating, so a host that slows
    down mid-run slows them alike; each batch keeps a whole run's seed and shapes, so the samples are
    those of one method's run over all the questions."""
    from eval import tts
    from eval.records import records_path
    from specjax.tts.datasets import load_dataset

    out = tmp_path / "turns.json"
    argv = ["--model", str(tiny_chat_checkpoint), "--method", "pld,suffix", "--dataset", "arith", "--limit", "3",
            "--max-new-tokens", "10", "--paradigm", "best_of_n", "--n", "2", "--temperature", "0.7"]
    assert tts.main(argv + ["--output", str(out)]) == 0
    keys = [json.loads(line)["key"] for line in records_path(out).read_text().splitlines()[1:]]
    assert keys == ["ar/0", "pld/0", "suffix/0", "pld/1", "suffix/1", "ar/1", "suffix/2", "ar/2", "pld/2"]
    model = specjax.load(str(tiny_chat_checkpoint))
    args = tts.parse_args(argv)
    _, whole, _ = tts.run_method(model, load_dataset("arith", limit=3), "suffix", args)
    assert json.loads(tmp_path.joinpath("turns.suffix.json").read_text())["samples"] == whole


def test_a_prompt_is_measured_once_per_model_however_often_a_run_asks(tiny_chat_model, monkeypatch):
    """Each batch of a run in turns sizes its shapes from every question of the run: the lengths are
    tokenised once, and the answer is the longest prompt's length either way."""
    tok = tiny_chat_model.tokenizer
    calls = []
    real = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = [f"question {i} " + "word " * i for i in range(6)]
    first = paradigms.chat_prompt_length(tiny_chat_model, prompts)
    assert len(calls) == 6
    assert paradigms.chat_prompt_length(tiny_chat_model, prompts) == first and len(calls) == 6
    assert paradigms.chat_prompt_length(tiny_chat_model, prompts[:2]) < first and len(calls) == 6
    expected = max(len(real([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)["input_ids"])
                   for p in prompts)
    assert first == expected
