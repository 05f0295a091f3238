"""Bad input fails early and in words: one ValueError/TypeError line naming the argument, what was given and
what is allowed; the CLIs print that line and exit 2 before any model loads. Also the finish reason per row,
resumed training's metrics, the damaged-checkpoint message and eval.report's refusal of partial files."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specjax
from specjax import validation
from specjax.proposers import make_proposer, option_fields, registry
from specjax.stats import FINISH_REASONS, finish_reason

VOCAB = 64  # the tiny_model fixture's vocabulary


def _raises(fn, exc, *names):
    """Calls fn; it must raise `exc` with a one-line message naming every one of `names`."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


# ------------------------------------------------------------------ the API: silent wrong results


def test_token_ids_outside_the_vocabulary_are_refused(tiny_model):
    gen = lambda p: specjax.generate(tiny_model, p, "ar", max_new_tokens=4)
    _raises(lambda: gen([[5, VOCAB]]), ValueError, "prompts[0]", str(VOCAB), f"[0, {VOCAB})")
    _raises(lambda: gen([[5, -1]]), ValueError, "prompts[0]", "-1")
    _raises(lambda: gen([[5, 6], [7, 49152]]), ValueError, "prompts[1]", "49152")
    _raises(lambda: gen([[5, 2.0]]), TypeError, "prompts[0][1]", "2.0", "float")
    _raises(lambda: gen([[True, 5]]), TypeError, "prompts[0][0]", "bool")
    _raises(lambda: gen([np.array([1.5])]), TypeError, "prompts[0]", "float64")
    assert len(gen([np.array([5, 6], np.int64)]).tokens[0]) <= 4  # numpy integer ids are fine


def test_logits_refuses_ids_outside_the_vocabulary(tiny_model):
    _raises(lambda: tiny_model.logits([[1, 2, VOCAB]]), ValueError, "token_ids[0]", str(VOCAB))
    _raises(lambda: tiny_model.logits(np.array([3, -2])), ValueError, "token_ids", "-2")
    _raises(lambda: tiny_model.logits(np.array([[1.0, 2.0]])), TypeError, "token_ids", "float")
    _raises(lambda: tiny_model.logits([]), ValueError, "token_ids", "empty")
    _raises(lambda: tiny_model.logits([[1, 2], [3]]), ValueError, "token_ids", "differ in length")
    out = tiny_model.logits([1, 2, 3])
    assert out.shape == (1, 3, VOCAB) and np.isfinite(out).all()


@pytest.mark.parametrize("kw, exc, names", [
    (dict(num_samples=2.5), TypeError, ("num_samples", "2.5", "an integer")),
    (dict(num_samples=True), TypeError, ("num_samples", "bool")),
    (dict(top_k=1.5), TypeError, ("top_k", "1.5")),
    (dict(max_new_tokens=4.0), TypeError, ("max_new_tokens", "4.0")),
    (dict(temperature="hot"), TypeError, ("temperature", "'hot'", "a finite number >= 0")),
    (dict(temperature=float("nan")), ValueError, ("temperature", "nan")),
    (dict(top_p=float("inf")), ValueError, ("top_p", "inf")),
    (dict(seed=2**40), ValueError, ("seed", str(2**40))),
    (dict(chat="no"), TypeError, ("chat", "'no'", "True or False")),
    (dict(keep_session="yes"), TypeError, ("keep_session",)),
    (dict(session="junk"), TypeError, ("session", "'junk'", "Session")),
    (dict(eos_token_ids=[VOCAB]), ValueError, ("eos_token_ids[0]", str(VOCAB))),
    (dict(eos_token_ids=2), TypeError, ("eos_token_ids",)),
    (dict(group=[0.5]), TypeError, ("group[0]",)),
    (dict(stop_rows="yes"), TypeError, ("stop_rows",)),
    (dict(check_every=0), ValueError, ("check_every", ">= 1")),
    (dict(speculate_max_rows=1.5), TypeError, ("speculate_max_rows",)),
    (dict(method="suffix", shared="no"), TypeError, ("shared", "'suffix'", "'no'", "True or False")),
    (dict(method="pld", k="abc"), TypeError, ("option k", "'pld'", "'abc'", "an integer >= 0")),
    (dict(method="pld", k=2.5), TypeError, ("option k", "2.5")),
    (dict(method="pld", k=True), TypeError, ("option k", "bool")),
    (dict(method="pld", k=-3), ValueError, ("option k", ">= 0", "-3")),
    (dict(method="lookahead", window=0), ValueError, ("option window", "'lookahead'", ">= 1")),
    (dict(method="pia", decay=1.0), ValueError, ("option decay", "in (0, 1)")),
    (dict(method="ar", k=3), ValueError, ("option k", "'ar'", "equal to 0")),
    (dict(method=5), TypeError, ("method", "5")),
])
def test_bad_arguments_name_the_argument_and_what_is_allowed(tiny_model, kw, exc, names):
    args = dict(method="ar", max_new_tokens=4)
    args.update(kw)
    _raises(lambda: specjax.generate(tiny_model, [[5, 6, 7]], args.pop("method"), **args), exc, *names)


def test_session_must_come_from_the_same_model(tiny_model):
    first = specjax.generate(tiny_model, [[5, 6, 7]], "ar", max_new_tokens=4, keep_session=True)
    twin = specjax.Model(config=tiny_model.config, params=tiny_model.params, tokenizer=None, name="twin")
    _raises(lambda: specjax.generate(twin, [[5, 6, 7, 8]], "ar", max_new_tokens=4, session=first.session),
            ValueError, "session", "another model")
    again = specjax.generate(tiny_model, [[5, 6, 7, 8]], "ar", max_new_tokens=4, session=first.session)
    assert again.stats["reused_prefix_tokens"] > 0


def test_empty_prompt_after_encoding(tiny_chat_model):
    _raises(lambda: specjax.generate(tiny_chat_model, [""], "ar", chat=False, max_new_tokens=4), ValueError,
            "prompts[0]", "empty after encoding")
    _raises(lambda: specjax.generate(tiny_chat_model, "What is 2 + 3?", "ar"), TypeError, "prompts", "list")


def test_load_checks_its_arguments_before_reading_files():
    _raises(lambda: specjax.load(3), TypeError, "name", "3")
    _raises(lambda: specjax.load("  "), ValueError, "name", "empty")
    _raises(lambda: specjax.load("smollm2-135m-instruct", tokenizer="no"), TypeError, "tokenizer", "'no'")
    _raises(lambda: specjax.load("smollm2-135m-instruct", mesh="x"), TypeError, "mesh")
    _raises(lambda: specjax.load("smollm2-135m-instruct", dtype=3.5), TypeError, "dtype")


def test_distributed_block_refuses_a_zero_batch():
    from specjax import distributed

    _raises(lambda: distributed.block(10, align=0), ValueError, "align", "--batch-size", ">= 1")


# ------------------------------------------------------------------ proposer ranges are declared on the fields


def test_every_option_has_a_checkable_type_and_a_default_in_range():
    simple = {int, float, bool, str, tuple[int, ...]}
    for method, cls in registry().items():
        types = validation.option_types(cls)
        fields = option_fields(cls)
        for name, hint in types.items():
            assert hint in simple, (method, name, hint)
            default = fields[name].default
            assert validation.option_value(name, default, hint, fields[name].metadata) == default, (method, name)
        make_proposer(method)  # defaults build


def test_option_ranges_come_from_the_field_metadata():
    from specjax.proposers.ngram import PromptLookup

    meta = option_fields(PromptLookup)["k"].metadata
    assert meta == {"min": 0}
    assert make_proposer("pia", branching=[3, 3]).branching == (3, 3)  # a list as the field holds it
    assert type(make_proposer("pld", spec_factor=1).spec_factor) is float
    _raises(lambda: make_proposer("pia", branching=(2, 0)), ValueError, "option branching[1]", ">= 1")
    _raises(lambda: make_proposer("pia", branching=2), TypeError, "option branching", "tuple")


# ------------------------------------------------------------------ finish reasons


def test_finish_reasons_per_row(tiny_model):
    free = specjax.generate(tiny_model, [[5, 6, 7]], "ar", max_new_tokens=6, eos_token_ids=())
    assert free.stats["finish_reasons"] == ["budget"]
    stop = free.tokens[0][2]
    first = free.tokens[0].index(stop)  # the first time that token comes
    ended = specjax.generate(tiny_model, [[5, 6, 7]], "ar", max_new_tokens=6, eos_token_ids=(stop,))
    assert ended.stats["finish_reasons"] == ["eos"] and ended.tokens[0] == free.tokens[0][:first]
    stopped = specjax.generate(tiny_model, [[5, 6, 7]], "ar", max_new_tokens=20, eos_token_ids=(), num_samples=2,
                               check_every=2, stop_rows=lambda g, f: np.array([False, True]))
    assert stopped.stats["finish_reasons"] == ["budget", "stopped"]
    assert stopped.stats.to_dict()["finish_reasons"] == ["budget", "stopped"]
    # the loop also ends when no row has room for another step (the rows share one cache length)
    assert finish_reason(10, False, False, max_new_tokens=32) == "cache_full"
    assert finish_reason(32, True, False, max_new_tokens=32) == "eos"
    assert finish_reason(3, False, True, max_new_tokens=32) == "stopped"
    assert set(FINISH_REASONS) == {"eos", "budget", "cache_full", "stopped"}


def test_results_files_count_finish_reasons():
    from specjax.distributed import merge_stats
    from specjax.tts.paradigms import aggregate

    stat = dict(generated_tokens=4, emitted_tokens=5, target_forwards=3, decode_steps=2, prefill_s=0.1,
                decode_s=0.2, wall_s=0.3, prefilled_rows=2, batch=2, accepted_hist=[0, 2], proposer_steps=[2])
    total = aggregate([dict(stat, finish_reasons=["eos", "budget"]), dict(stat, finish_reasons=["eos", "eos"]),
                       stat])  # a record written before the field existed
    assert total["finish_reasons"] == {"eos": 3, "budget": 1, "cache_full": 0, "stopped": 0}
    summary = {"generated_tokens": 1, "target_forwards": 1, "questions": 1, "wall_s": 1.0, "accepted_hist": [0, 1],
               "tokens_per_s": 1.0, "finish_reasons": {"eos": 1, "budget": 0},
               "per_round": [{"wall_s": 1.0, "generated_tokens": 1, "tokens_per_s": 1.0, "mean_accepted_tokens": 1.0,
                              "finish_reasons": {"eos": 1, "budget": 0}}]}
    merged = merge_stats([summary, dict(summary, finish_reasons={"eos": 0, "budget": 2})])
    assert merged["finish_reasons"] == {"eos": 1, "budget": 2}
    assert merged["per_round"][0]["finish_reasons"] == {"eos": 2, "budget": 0}


# ------------------------------------------------------------------ the CLIs: one line, exit 2, no model loaded


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: bad flags must be refused before it."""
    import specjax.model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(specjax, "load", refuse)
    monkeypatch.setattr(specjax.model, "load", refuse)


def _refused(main, argv, capsys, *fragments):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("argv, fragments", [
    (["hi", "--method", "nope"], ("unknown method 'nope'",)),
    (["hi", "--max-new-tokens", "0"], ("--max-new-tokens must be >= 1", "got 0")),
    (["hi", "--max-new-tokens", "2.5"], ("--max-new-tokens", "invalid int value")),
    (["hi", "--temperature", "hot"], ("--temperature", "'hot'")),
    (["hi", "--temperature", "nan"], ("--temperature", "nan")),
    (["hi", "--temperature", "-1"], ("--temperature must be >= 0",)),
    (["hi", "--top-k", "-1"], ("--top-k must be >= 0",)),
    (["hi", "--top-p", "1.5"], ("--top-p must be in (0, 1]",)),
    (["", "--no-chat"], ("prompt is empty", "--no-chat")),
    (["hi", "--method", "suffix", "--option", "k=-1"], ("--option k of method 'suffix'", ">= 0", "-1")),
    (["hi", "--method", "suffix", "--option", "threshold=4"], ("--option threshold", "suffix: branches")),
    (["hi", "--method", "pld", "--option", "k"], ("--option 'k'", "KEY=VALUE")),
    (["hi", "--matmul-dtype", "float16"], ("--matmul-dtype", "invalid choice")),
])
def test_specjax_cli_refuses_bad_flags_before_loading(argv, fragments, capsys, no_load):
    from specjax.__main__ import main

    _refused(main, argv, capsys, *fragments)


@pytest.mark.parametrize("argv, fragments", [
    (["--method", "pld", "--option", "k=abc"], ("--option k of method 'pld'", "an integer >= 0", "'abc'")),
    (["--method", "pld", "--option", 'k="abc"'], ("--option k", "'abc'")),
    (["--method", "pld", "--option", "k=2.5"], ("--option k", "2.5 (float)")),
    (["--method", "pld", "--option", "k=-3"], ("--option k", ">= 0", "-3")),
    (["--method", "suffix", "--option", "shared=no"], ("--option shared", "True or False", "'no'")),
    (["--method", "pia", "--option", "pia.branching=2,0"], ("--option pia.branching", ">= 1")),
    (["--method", "pld", "--k", "-3"], ("--k of method 'pld' must be >= 0", "-3")),
    (["--method", "lookahead", "--k", "0"], ("--k of method 'lookahead' must be >= 1",)),
    (["--k", "2.5"], ("--k", "invalid int value")),
    (["--top-p", "0"], ("--top-p must be in (0, 1]",)),
    (["--temperature", "-0.5"], ("--temperature must be >= 0",)),
    (["--top-k", "-2"], ("--top-k must be >= 0",)),
    (["--max-new-tokens", "0"], ("--max-new-tokens must be >= 1",)),
    (["--batch-size", "0"], ("--batch-size must be >= 1",)),
    (["--limit", "0"], ("--limit must be >= 1",)),
    (["--method", "nope"], ("unknown method",)),
])
def test_tts_cli_refuses_bad_flags_before_loading(argv, fragments, capsys, no_load):
    from eval import tts

    _refused(tts.main, argv, capsys, *fragments)


def test_tts_cli_refuses_bad_output_paths(tmp_path, capsys, no_load):
    from eval import tts

    _refused(tts.main, ["--method", "pld", "--output", str(tmp_path)], capsys, "--output", "is a folder")
    inside = _a_file(tmp_path) / "res.json"
    _refused(tts.main, ["--method", "pld", "--output", str(inside)], capsys, "--output", "is a file, not a folder")


def test_tts_option_values_are_typed_by_their_field():
    from eval.tts import parse_options

    got = parse_options(["k=4", "shared=false", "draft=self:1", "hybrid.head=medusa", "spec_factor=1",
                         "pia.branching=3,3", "head_path=123"], ["suffix", "hybrid", "pia", "draft"])
    assert got["suffix"] == {"k": 4, "shared": False, "spec_factor": 1.0}
    assert got["hybrid"] == {"k": 4, "head": "medusa", "head_path": "123", "draft": "self:1"}  # text stays text
    assert got["pia"] == {"k": 4, "branching": (3, 3)} and got["draft"] == {"k": 4, "draft": "self:1"}
    assert type(got["suffix"]["spec_factor"]) is float


def test_latency_cli_refuses_bad_input_before_loading(tmp_path, capsys, no_load):
    from eval import latency

    bad = tmp_path / "calibration.json"
    bad.write_text('{"meta": {}, "forward_s": "nope"}')
    out = ["--out", str(tmp_path / "out"), "--limit", "1", "--calibration-questions", "1"]
    _refused(latency.main, ["--calibration", str(bad)] + out, capsys, str(bad), "not a calibration file")
    _refused(latency.main, ["--calibration", str(tmp_path)] + out, capsys, "--calibration", "is a folder")
    _refused(latency.main, ["--top-p", "2"] + out, capsys, "--top-p must be in (0, 1]")
    _refused(latency.main, ["--k", "-1"] + out, capsys, "--k of method 'pld' must be >= 0")
    _refused(latency.main, ["--out", str(_a_file(tmp_path))], capsys, "--out", "is a file")


def test_moe_sweep_cli_refuses_bad_input_before_work(tmp_path, capsys, no_load):
    from eval import moe_sweep

    _refused(moe_sweep.main, ["--make-tiny", str(_a_file(tmp_path))], capsys, "--make-tiny", "is a file")
    _refused(moe_sweep.main, ["--model", "x", "--alpha", "abc"], capsys, "--alpha", "'abc'")
    _refused(moe_sweep.main, ["--model", "x", "--new-tokens", "1"], capsys, "--new-tokens must be >= 2")
    _refused(moe_sweep.main, ["--model", "x", "--dtype", "int8"], capsys, "--dtype 'int8'")
    _refused(moe_sweep.main, ["--model", "x", "--out", str(_a_file(tmp_path))], capsys, "--out", "is a file")


def test_build_datastore_cli_refuses_a_bad_out(tmp_path, capsys, no_load):
    from eval import build_datastore

    out = _a_file(tmp_path) / "store"
    _refused(build_datastore.main, ["--dataset", "arith", "--out", str(out)], capsys, "--out", "is a file")


def test_train_cli_refuses_bad_input_before_loading(tmp_path, capsys, no_load):
    from train import draft_head

    head = ["--head", "medusa"]
    _refused(draft_head.main, head + ["--out", str(_a_file(tmp_path))], capsys, "--out", "is a file, not a folder")
    out = ["--out", str(tmp_path / "head")]
    _refused(draft_head.main, head + out + ["--lr", "nan"], capsys, "--lr", "nan")
    _refused(draft_head.main, head + out + ["--dataset", "/no/such.jsonl"], capsys, "--dataset", "not found")
    _refused(draft_head.main, head + out + ["--eval-prompts", "-1"], capsys, "--eval-prompts must be >= 0")
    _refused(draft_head.main, head + out + ["--steps", "x"], capsys, "--steps", "invalid int value")
    _refused(draft_head.main, head + out + ["--samples-per-prompt", "4"], capsys, "identical answers",
             "--temperature > 0")
    _refused(draft_head.main, head + out + ["--eval-tree", "16,5"], capsys, "--eval-tree", "total,depth,topk")
    _refused(draft_head.main, head + out + ["--eval-tree", "3,5,2"], capsys, "total=3", "set total in that range")
    _refused(draft_head.main, head + out + ["--features", "ram"], capsys, "--features", "invalid choice")
    _refused(draft_head.main, ["--head", "eagle2"] + out, capsys, "--head 'eagle2' is not available")
    _refused(draft_head.main, head + out + ["--extra-data", str(tmp_path / "none")], capsys, "--extra-data",
             "holds no data shards")
    _refused(draft_head.main, head + out + ["--eval-dataset", "/no/such.jsonl"], capsys, "--eval-dataset",
             "not found")


# ------------------------------------------------------------------ eval.report


def test_report_refuses_partial_results_and_a_file_as_out(tmp_path, capsys):
    from eval import report

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"summary": {"method": "pld"}}))
    _refused(report.main, [str(partial), "--out", str(tmp_path / "r")], capsys, str(partial), "lacks", "tokens_per_s")
    assert not (tmp_path / "r" / "report.md").exists()
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"summary": {"method": "pld", "questions": 1, "accuracy": "high", "tokens_per_s": 1,
                                             "mean_accepted_tokens": 1, "target_forwards": 1}}))
    _refused(report.main, [str(wrong), "--out", str(tmp_path / "r")], capsys, "accuracy='high'", "numbers")
    _refused(report.main, [str(partial), "--out", str(_a_file(tmp_path))], capsys, "--out", "is a file")


# ------------------------------------------------------------------ training: resume and damaged checkpoints


def _tiny_task():
    import jax.numpy as jnp

    from train.draft_head import HeadTask

    loss = lambda p, consts, batch: (jnp.sum((p["w"] - 1.0) ** 2), jnp.zeros(1))
    return HeadTask(params={"w": jnp.zeros(3)}, loss=loss, consts=jnp.zeros(()), batch=lambda step: (),
                    metric="acc", config={}, extra={})


def test_resume_after_deleting_a_damaged_checkpoint_keeps_each_step_once(tmp_path):
    from train.draft_head import train

    args = lambda steps: argparse.Namespace(steps=steps, lr=0.1, warmup=None, save_every=1, keep=3, head="tiny",
                                            stop_after=None)
    steps = lambda: [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train(args(3), _tiny_task(), tmp_path, log=lambda *a: None)
    assert steps() == [1, 2, 3]
    damaged = tmp_path / "checkpoints" / "3"
    for f in damaged.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    msg = _raises(lambda: train(args(4), _tiny_task(), tmp_path, log=lambda *a: None), ValueError,
                  "checkpoint step 3", "corrupt", f"delete {damaged}", "resume from step 2", "_CHECKPOINT_METADATA")
    assert "<" not in msg and "object at 0x" not in msg and "bound method" not in msg, msg
    shutil.rmtree(damaged)  # as the message advises
    train(args(4), _tiny_task(), tmp_path, log=lambda *a: None)
    assert steps() == [1, 2, 3, 4]  # step 3 rewritten, not appended twice


def test_damaged_checkpoint_message_drops_library_reprs(tmp_path):
    from train.draft_head import damaged_checkpoint

    step = tmp_path / "checkpoints" / "7"
    (step / "default").mkdir(parents=True)
    (step / "default" / "manifest.ocdbt").write_bytes(b"x")
    error = ValueError(f"<bound method CheckpointHandler.restore of <orbax._src.X object at 0x7f>> failed "
                       f"for {step.absolute()}/default/manifest.ocdbt")
    msg = damaged_checkpoint(tmp_path / "checkpoints", 7, [5, 7], error)
    assert "manifest.ocdbt" in msg and "step 7" in msg and "resume from step 5" in msg
    assert "bound method" not in msg and "0x7f" not in msg


# ------------------------------------------------------------------ property-based: generate and make_proposer

INVALID = {
    "max_new_tokens": [0, -3, 2.5, True, "4", None, float("nan")],
    "temperature": [-0.5, float("nan"), float("inf"), "hot", None, True],
    "top_k": [-1, 1.5, True, "1", None],
    "top_p": [0.0, 1.5, float("nan"), "x", None],
    "seed": [2.5, "0", None, 2**40, True],
    "chat": ["no", 1, None],
    "num_samples": [0, 2.5, True, "2"],
    "max_len": [0, 2.5, "x", True],
    "eos_token_ids": [[2.5], ["a"], [-1], [VOCAB], 5, "2"],
    "pad_prompts_to": [-1, 2.5, "x"],
    "keep_session": ["yes", 1, None],
    "pad_new_to": [-1, "x"],
    "stop_rows": [5, "f"],
    "check_every": [0, 1.5, None],
    "speculate_max_rows": [-1, 1.5, True, "1"],
    "session": ["junk", 3, {}],
    "group": [["a"], [0.5], 7, [0, 0, 0, 0, 0]],
    "prompts": [[], "text", [[]], [[VOCAB]], [[-1]], [[1.5]], [[True]], [None], ["text"], [[3, 2**40]]],
    "method": ["nope", 5, None],
    "k": [-1, 2.5, "abc", True, None],
}


@st.composite
def generate_calls(draw):
    """A valid `generate` call with up to two arguments swapped for invalid values; returns (kwargs, bad)."""
    n_prompts, num_samples = draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]))
    prompt = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
    temperature, top_k, top_p = draw(st.sampled_from([(0.0, 0, 1.0), (0.7, 5, 0.9)]))
    kw = dict(prompts=draw(st.lists(prompt, min_size=n_prompts, max_size=n_prompts)),
              method=draw(st.sampled_from(["ar", "pld"])), max_new_tokens=draw(st.integers(1, 6)),
              temperature=temperature, top_k=top_k, top_p=top_p, seed=draw(st.integers(0, 1000)),
              chat=draw(st.booleans()), num_samples=num_samples, max_len=draw(st.sampled_from([None, 256])),
              eos_token_ids=draw(st.sampled_from([None, (), (2,)])), pad_prompts_to=draw(st.sampled_from([0, 8])),
              keep_session=draw(st.booleans()), stop_rows=draw(st.sampled_from([None, lambda g, f: f & False])),
              check_every=draw(st.sampled_from([2, 32])))
    if kw["method"] == "pld":
        kw["k"] = 2
    bad = draw(st.lists(st.sampled_from(sorted(INVALID)), max_size=2, unique=True))
    for name in bad:
        kw[name] = draw(st.sampled_from(INVALID[name]))
    return kw, bad


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(call=generate_calls())
def test_generate_returns_or_names_the_bad_argument(tiny_model, call):
    kw, bad = call
    args = dict(kw)
    prompts, method = args.pop("prompts"), args.pop("method")
    try:
        out = specjax.generate(tiny_model, prompts, method, **args)
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert bad, f"a valid call was refused: {msg}"
        assert any(re.search(rf"\b{name}\b", msg) for name in bad), (bad, msg)
        assert "\n" not in msg
        return
    assert not bad, f"accepted {[(name, kw[name]) for name in bad]}"  # never a silent coercion
    rows = len(prompts) * kw["num_samples"]
    assert len(out.tokens) == rows and out.stats["batch"] == rows
    assert all(len(t) <= kw["max_new_tokens"] and all(0 <= x < VOCAB for x in t) for t in out.tokens)
    assert len(out.stats["finish_reasons"]) == rows and set(out.stats["finish_reasons"]) <= set(FINISH_REASONS)
    assert (out.session is not None) == kw["keep_session"]


VALUES = st.one_of(st.integers(-3, 9), st.sampled_from([2.5, -1.0, 0.5, float("nan"), True, False, None, "abc",
                                                         "self:1", (2, 2), (), (0,), [2], 1e9]))


@st.composite
def proposer_calls(draw):
    method = draw(st.sampled_from(sorted(registry())))
    names = sorted(option_fields(registry()[method])) + ["bogus"]
    options = draw(st.dictionaries(st.sampled_from(names), VALUES, max_size=3))
    return method, options


@settings(max_examples=150, deadline=None)
@given(call=proposer_calls())
def test_make_proposer_builds_exactly_what_was_asked_or_names_the_option(call):
    method, options = call
    try:
        proposer = make_proposer(method, **options)
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert options, msg  # the defaults always build
        assert any(re.search(rf"\b{re.escape(name)}\b", msg) for name in options), (options, msg)
        assert "\n" not in msg
        return
    types = validation.option_types(registry()[method])
    for name, value in options.items():  # nothing coerced: the value and its kind are the ones passed
        held = getattr(proposer, name)
        hint = types[name]
        if hint is float:
            assert type(held) is float and held == value and not isinstance(value, bool)
        elif hint == tuple[int, ...]:
            assert held == tuple(value) and all(type(x) is int for x in held)
        else:
            assert type(held) is hint and held == value, (name, value, held)
