"""Latency-aware TTS: vote settling, early stopping in the loop, the cost/accuracy models, the planner,
and the eval.latency CLI end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import specjax
from specjax.analysis.latency import (
    Calibration,
    ConfigTiming,
    CostModel,
    Plan,
    QuestionSamples,
    SampleModel,
    choose,
    enumerate_plans,
    frontier,
)
from specjax.tts.grading import vote_settled
from specjax.tts.paradigms import SettledVote


def test_vote_settled():
    assert vote_settled(["5", "5", "5"], unfinished=2)  # 3 > 0 + 2
    assert not vote_settled(["5", "5", "5"], unfinished=3)  # three late "7"s would tie
    assert not vote_settled(["5", "5", "7"], unfinished=1)  # 2 vs 1 + 1
    assert vote_settled(["\\frac{1}{2}", "0.5", "3"], unfinished=0)  # equivalent answers pool their votes
    assert not vote_settled([None, None], unfinished=1)
    assert not vote_settled([], unfinished=0)


def test_settled_vote_stops_a_questions_running_rows():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return f"so the answer is {ids[-1]}"

    stop = SettledVote(Tok(), samples=4)
    # question 0: rows 0-2 finished with 7, row 3 running -> settled; question 1: 7 vs 8 with 1 running -> not
    gen = [[7], [7], [7], [1], [7], [8], [1], [1]]
    finished = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)
    assert stop(gen, finished).tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


def test_paused_decode_resumes_exactly(tiny_chat_model):
    """Pausing every few steps (for host checks) must not change a single token, sampled or greedy."""
    kw = dict(max_new_tokens=24, eos_token_ids=(), num_samples=3, k=4)
    for temp in (0.0, 0.9):
        whole = specjax.generate(tiny_chat_model, ["What is 2 + 3?"], "suffix", temperature=temp, seed=3, **kw)
        calls = []
        paused = specjax.generate(tiny_chat_model, ["What is 2 + 3?"], "suffix", temperature=temp, seed=3,
                                  stop_rows=lambda g, f, calls=calls: calls.append(len(g[0])) or np.zeros(len(g), bool),
                                  check_every=3, **kw)
        assert paused.tokens == whole.tokens
        assert len(calls) >= 2 and calls == sorted(calls)  # it really paused, and saw the rows grow
        assert not any(paused.stats["stopped_rows"])


def test_stop_rows_ends_only_those_rows(tiny_chat_model):
    kw = dict(max_new_tokens=30, eos_token_ids=(), num_samples=2, temperature=0.0)
    whole = specjax.generate(tiny_chat_model, ["Name a color."], "ar", **kw)
    out = specjax.generate(tiny_chat_model, ["Name a color."], "ar", check_every=5,
                           stop_rows=lambda g, f: np.array([False, True]), **kw)
    assert out.stats["stopped_rows"] == [False, True]
    assert out.tokens[0] == whole.tokens[0]
    assert 5 <= len(out.tokens[1]) < 30 and out.tokens[1] == whole.tokens[1][: len(out.tokens[1])]
    with pytest.raises(ValueError, match="check_every"):
        specjax.generate(tiny_chat_model, ["Hi"], "ar", check_every=0, stop_rows=lambda g, f: f, max_new_tokens=4)


def test_sample_model_accuracy_and_lengths():
    q = QuestionSamples(lengths=(10, 20, 30, 40, 50), classes=(0, 0, 0, 1, 1), correct_class=0)
    model = SampleModel([q], draws=2000)
    assert model.accuracy(1) == pytest.approx(0.6, abs=0.04)
    acc5, longest5 = model.estimate(5)  # all five samples: 3 votes vs 2, the longest runs 50
    assert acc5 == 1.0 and longest5 == 50.0
    # early stop over all five: finished in length order 0,0,0 -> 3 > 0 + 2 running: settled at length 30
    assert model.estimate(5, early_stop=True)[1] == 30.0
    assert model.estimate(5, early_stop=True, pause_tokens=16)[1] == 32.0  # the next pause after 30
    # maj@3 by hand: P(majority of a 3-subset is class 0) = P(>= 2 zeros) = (3*2 + 1) / 10 = 0.7
    assert model.accuracy(3) == pytest.approx(0.7, abs=0.04)
    never = SampleModel([QuestionSamples(lengths=(5, 5), classes=(-1, 1), correct_class=-1)])
    assert never.accuracy(2) == 0.0
    with pytest.raises(ValueError, match="no samples"):
        SampleModel([])


def _timing(method, n, step, spt, width=4, prefill=0.5, host=0.0):
    return ConfigTiming(method=method, n=n, width=0 if method == "ar" else width, step_s=step, steps_per_token=spt,
                        prefill_s=prefill, host_s=host, mean_accepted_tokens=1 / spt)


def test_cost_model_latency_and_extrapolation():
    forward = {(1, 1): 0.02, (1, 5): 0.04, (2, 1): 0.025, (2, 5): 0.06}
    cost = CostModel(forward, [_timing("ar", 1, 0.021, 1.0, host=0.1), _timing("spec", 2, 0.07, 0.5)],
                     fit=lambda tokens: 0.01 * np.asarray(tokens, float))
    assert cost.latency("ar", 1, 100) == pytest.approx(0.5 + 0.1 + 100 * 0.021)
    assert cost.latency("spec", 2, 100) == pytest.approx(0.5 + 100 * 0.5 * 0.07)
    assert cost.overhead("spec", 2) == pytest.approx(0.07 - 0.06)
    # N=8 was not calibrated: T(8, 5) from the fit (0.01 * 40 tokens) plus N=2's overhead
    assert cost.timing("spec", 8).step_s == pytest.approx(0.4 + 0.01)
    with pytest.raises(ValueError, match="not calibrated"):
        cost.timing("eagle", 1)


def test_planner_picks_the_known_optimum():
    """maj@N rises with N; spec halves the steps but costs more per step: within 12 s only spec reaches N=4."""
    # every question: 3 of 5 samples right, each 100 tokens -> maj@1 = maj@2 = 0.6 (ties at random), maj@4 = 1.0
    q = QuestionSamples(lengths=(100,) * 5, classes=(0, 0, 0, 1, 2), correct_class=0)
    samples = SampleModel([q] * 3, draws=1000)
    forward = {(n, w): 0.01 * n * w for n in (1, 2, 4) for w in (1, 5)}
    timings = [_timing("ar", 1, 0.05, 1.0), _timing("ar", 2, 0.13, 1.0), _timing("ar", 4, 0.15, 1.0),
               _timing("spec", 1, 0.07, 0.5), _timing("spec", 2, 0.09, 0.5), _timing("spec", 4, 0.2, 0.5)]
    cost = CostModel(forward, timings)
    plans = enumerate_plans(cost, samples, ["ar", "spec"], [1, 2, 4])
    by = {p.name: p for p in plans}
    assert by["ar N=4"].predicted_s == pytest.approx(0.5 + 100 * 0.15)  # 15.5 s: over budget
    assert by["spec N=4"].predicted_s == pytest.approx(0.5 + 100 * 0.5 * 0.2)  # 10.5 s: fits
    assert by["spec N=4"].predicted_accuracy == 1.0  # any 4 of the 5 samples: the right answer wins
    assert by["ar N=1"].predicted_accuracy == pytest.approx(0.6, abs=0.05)
    best = choose(plans, 12.0)
    assert (best.method, best.n) == ("spec", 4) and best.family == "combined"
    branch = choose(plans, 12.0, ("branch",))
    assert (branch.method, branch.n) == ("ar", 1)  # ar N=2 takes 13.5 s
    spec = choose(plans, 12.0, ("speculation",))
    assert (spec.method, spec.n) == ("spec", 1)  # as accurate as ar N=1 (the same draws) and faster: 4.0 vs 5.5 s
    assert choose(plans, 0.1) is None
    front = frontier(plans)
    assert [p.name for p in front][0] == "spec N=1" and front[-1].predicted_accuracy == max(
        p.predicted_accuracy for p in plans)


def test_calibration_round_trip_and_corrupt_file(tmp_path):
    cal = Calibration(meta={"model": "m"}, forward_s={(1, 1): 0.02, (2, 5): 0.05},
                      timings=[_timing("ar", 1, 0.02, 1.0)],
                      questions=[QuestionSamples(lengths=(3, 4), classes=(0, -1), correct_class=0)])
    cal.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    assert back.forward_s == cal.forward_s and back.timings == cal.timings and back.questions == cal.questions
    (tmp_path / "bad.json").write_text('{"meta": {}}')
    with pytest.raises(ValueError, match="recalibrate|calibrate again"):
        Calibration.load(tmp_path / "bad.json")


def test_plan_families():
    assert Plan("ar", 4, False, 1.0, 0.5).family == "branch"
    assert Plan("pld", 1, False, 1.0, 0.5).family == "speculation"
    assert Plan("pld", 4, True, 1.0, 0.5).family == "combined"
    assert Plan("pld", 4, True, 1.0, 0.5).name == "pld N=4 early-stop"


def test_cli_end_to_end(tiny_chat_checkpoint, tmp_path):
    from eval import latency

    cal = tmp_path / "cal.json"
    args = ["--model", str(tiny_chat_checkpoint), "--methods", "ar,pld", "--n-values", "1,3", "--budget", "0.5,30",
            "--calibration-questions", "2", "--limit", "2", "--max-new-tokens", "8", "--early-stop",
            "--calibration", str(cal), "--check-every", "2"]
    assert latency.main(args + ["--out", str(tmp_path / "out"), "--sweep"]) == 0
    res = json.loads((tmp_path / "out" / "latency.json").read_text())
    assert {(t["method"], t["n"]) for t in res["timings"]} == {("ar", 1), ("ar", 3), ("pld", 1), ("pld", 3)}
    assert {p["plan"] for p in res["plans"]} >= {"ar N=3 early-stop", "pld N=3"}
    big = res["budgets"][1]
    assert big["budget_s"] == 30 and big["combined"]["predicted_accuracy"] >= max(
        big["branch"]["predicted_accuracy"], big["speculation"]["predicted_accuracy"])
    for m in (big["combined"], big["branch"], big["speculation"]):
        assert len(m["latencies_s"]) == 2 and m["mean_s"] > 0 and 0 <= m["accuracy"] <= 1
    assert (tmp_path / "out" / "latency_frontier.png").stat().st_size > 10_000
    saved = json.loads(cal.read_text())
    assert len(saved["questions"]) == 2 and all(len(q["lengths"]) == 2 * (1 + 3) for q in saved["questions"])
    # a calibration killed after its first configuration resumes from its records: only the rest is run
    rec = tmp_path / "out" / "calibration.records.jsonl"
    lines = rec.read_text().splitlines()
    assert len(lines) == 1 + 1 + 4  # settings, the forward grid, 2 methods x 2 N
    rec.write_text("\n".join(lines[:3]) + "\n")
    no_file = [a for a in args if a not in ("--calibration", str(cal))]
    assert latency.main(no_file + ["--out", str(tmp_path / "out"), "--resume", "--no-compare"]) == 0
    assert rec.read_text().splitlines()[:3] == lines[:3] and len(rec.read_text().splitlines()) == 6
    # a second run loads the calibration instead of measuring again
    assert latency.main(args + ["--out", str(tmp_path / "out2"), "--no-compare"]) == 0
    assert json.loads((tmp_path / "out2" / "latency.json").read_text())["calibration_meta"] == saved["meta"]
    # a calibration measured for other settings is refused, not silently reused
    other = [a if a != "8" else "16" for a in args]  # --max-new-tokens 16
    assert latency.main(other + ["--out", str(tmp_path / "out3")]) == 2
    assert latency.main(args + ["--matmul-dtype", "bfloat16", "--out", str(tmp_path / "out4")]) == 2  # other weights


@pytest.mark.parametrize("flag,value,message", [("--budget", "abc", "comma list of seconds"),
                                                ("--n-values", "0,2", "integers >= 1"),
                                                ("--methods", "ar,nope", "unknown method"),
                                                ("--limit", "0", "--limit must be >= 1")])
def test_cli_bad_flags(flag, value, message, capsys):
    from eval import latency

    assert latency.main([flag, value]) == 2
    assert message in capsys.readouterr().err
