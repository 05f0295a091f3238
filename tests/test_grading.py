"""Answer extraction, math_verify equivalence, majority voting and per-question grading."""

from __future__ import annotations

import threading

import pytest

from specjax.tts.grading import extract_answer, grade_samples, is_equivalent, majority_vote


@pytest.mark.parametrize("text, expected", [
    ("so the result is \\boxed{42}.", "42"),
    ("first \\boxed{1}, then \\boxed{\\frac{a}{\\sqrt{b^{2}}}} done", "\\frac{a}{\\sqrt{b^{2}}}"),  # nested, last
    ("\\fbox{7}", "7"),
    ("ok \\boxed{5} and a truncated \\boxed{6", "5"),  # unbalanced last box is skipped
    ("The answer is 42 apples.", "42"),
    ("Final answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("The answer is x = 5.", "x = 5"),
    ("3 boxes of 4 make 12, minus 5 leaves 7", "7"),
    ("We owe -12 dollars", "-12"),
    ("3-5 = -2, so it is 2.5 in total", "2.5"),
    ("ratio 3/4", "3/4"),
    ("total 1,234", "1234"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, ref", [
    ("\\frac{1}{2}", "0.5"), ("1/2", "0.5"), ("0.5", "\\boxed{\\frac{1}{2}}"), ("204.0", "204"),
    ("113", "\\boxed{113}"), ("\\dfrac{14}{3}", "\\frac{14}{3}"), ("1,000", "1000"),
])
def test_equivalent(pred, ref):
    assert is_equivalent(pred, ref)


@pytest.mark.parametrize("pred, ref", [("112", "\\boxed{113}"), ("0.6", "\\frac{1}{2}"), (None, "1"), ("", "1"),
                                       ("\\frac{", "1")])
def test_not_equivalent(pred, ref):
    assert not is_equivalent(pred, ref)


def test_equivalent_off_main_thread():
    """math_verify's signal.alarm timeout only works in the main thread; ours must work in any."""
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.extend([is_equivalent("\\frac{3}{6}", "0.5"), is_equivalent("2", "3")]))
    t.start()
    t.join(30)
    assert out == [True, False]


def test_majority_vote_groups_equivalent_forms():
    assert majority_vote(["3", "0.5", None, "\\frac{1}{2}", "3", "1/2"]) == "0.5"  # 3 halves beat 2 threes
    assert majority_vote(["7", "8"]) == "7"  # tie: first seen
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_grade_samples():
    g = grade_samples(["... \\boxed{0.5}", "The answer is 1/2.", "I think 7", "nothing"], "\\boxed{\\frac{1}{2}}")
    assert g["answers"] == ["0.5", "1/2", "7", None]
    assert g["predicted"] == "0.5" and g["correct"] and g["pass_at_n"]
    assert g["mean_accuracy"] == pytest.approx(0.5)
    g = grade_samples(["\\boxed{3}", "\\boxed{3}", "\\boxed{113}"], "113")
    assert g["predicted"] == "3" and not g["correct"] and g["pass_at_n"]
    assert g["mean_accuracy"] == pytest.approx(1 / 3)
