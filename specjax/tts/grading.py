"""Answer extraction, equivalence, majority voting and per-question grading for math answers.

Equivalence is math_verify's (sympy-backed) so that `\\frac{1}{2}`, `0.5` and `1/2` agree without
hand-written normalisation here; this module only finds the answer string and guards the call.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

TIMEOUT_S = 5  # per parse / comparison: sympy can hang on adversarial model output

# off the main thread we run math_verify with its timeout off and time it out ourselves (below); drop its
# once-per-process "timeout is disabled" warning, which would otherwise read as a misconfiguration
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda r: "Timeout is disabled" not in r.getMessage())

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|the answer is)\s*(?:is)?\s*[:=]?\s*(.+)", re.IGNORECASE)
# a number: thousands separators only in groups of 3 (so "3,4" is two numbers), optional decimals or
# /denominator; a minus sign only when not glued to a preceding operand ("3-5" is not "-5")
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every balanced `\\boxed{...}` / `\\fbox{...}`; truncated ones are skipped."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[m.end():i - 1].strip())
    return found


def _numbers(text: str) -> list[str]:
    return [re.sub(r"[,\s]", "", n) for n in _NUMBER.findall(text)]


def extract_answer(text: str) -> str | None:
    """The final answer in a model output: last boxed, else "the answer is X", else the last number.

    Models asked for `\\boxed{}` usually comply; small ones often just state the answer in words or
    end on a number, and a grader that only reads boxes would score them as wrong for formatting.
    """
    if not text:
        return None
    boxed = _boxed_contents(text)
    if boxed and boxed[-1]:
        return boxed[-1]
    stated = _ANSWER_IS.findall(text)
    if stated:
        sentence = re.split(r"\.\s|\.$", stated[-1].strip())[0]
        ans = sentence.strip().strip("$").strip()
        math = re.search(r"\$([^$]+)\$", sentence)
        if math:  # "the answer is $\frac{3}{4}$ cups" -> the math part
            return math.group(1).strip()
        if ans and not _WORD.search(ans):  # "x = 5", "3/4", "\sqrt{2}"
            return ans
        nums = _numbers(ans)
        if nums:  # "The answer is 42 apples" -> 42
            return nums[0]
    nums = _numbers(text)
    return nums[-1] if nums else None


def _as_latex(s: str) -> str:
    """math_verify extracts from LaTeX environments; a bare "0.5" or "\\frac12" needs a box around it."""
    s = s.strip()
    return s if ("\\boxed" in s or "$" in s or "\\fbox" in s) else f"\\boxed{{{s}}}"


def _verify(pred: str, ref: str, timeout: int | None) -> bool:
    from math_verify import parse, verify

    gold = parse(_as_latex(ref), parsing_timeout=timeout)
    target = parse(_as_latex(pred), parsing_timeout=timeout)
    return bool(gold and target and verify(gold, target, timeout_seconds=timeout))


@functools.lru_cache(maxsize=8192)
def _equivalent(pred: str, ref: str) -> bool:
    if pred.strip() == ref.strip():
        return True
    try:
        if threading.current_thread() is threading.main_thread():
            return _verify(pred, ref, TIMEOUT_S)  # math_verify's own signal.alarm timeout
        # signal.alarm only works in the main thread: run math_verify without its timeout in a daemon
        # thread and stop waiting after TIMEOUT_S (a hung sympy call is abandoned, not killed)
        box: list[bool] = []
        worker = threading.Thread(target=lambda: box.append(_verify(pred, ref, None)), daemon=True)
        worker.start()
        worker.join(2 * TIMEOUT_S)
        return bool(box and box[0])
    except Exception:  # malformed LaTeX etc.: not equivalent, never a crash mid-evaluation
        return False


def is_equivalent(pred: str | None, ref: str) -> bool:
    """Whether a predicted answer equals the reference (`\\boxed{...}` or plain) mathematically."""
    if pred is None or not pred.strip() or ref is None:
        return False
    return _equivalent(pred, ref)


def answer_classes(answers: list[str | None]) -> tuple[list[int], list[str]]:
    """Groups answers by equivalence: (class id per answer, -1 for none; one representative per class).

    Groups by equivalence, not string equality, so "0.5" and "\\frac{1}{2}" pool their votes.
    """
    reps: list[str] = []
    ids: list[int] = []
    for a in answers:
        if a is None or not a.strip():
            ids.append(-1)
            continue
        for i, r in enumerate(reps):
            if is_equivalent(a, r):
                ids.append(i)
                break
        else:
            ids.append(len(reps))
            reps.append(a)
    return ids, reps


def majority_vote(answers: list[str | None]) -> str | None:
    """The answer of the largest group of equivalent answers (ties: the group seen first)."""
    ids, reps = answer_classes(answers)
    if not reps:
        return None
    counts = [ids.count(i) for i in range(len(reps))]
    return reps[counts.index(max(counts))]


def vote_settled(answers: list[str | None], unfinished: int) -> bool:
    """Whether the majority among finished samples' answers can no longer change: its lead over the
    runner-up exceeds the samples still running (each could at best join the runner-up).

    The early-stopping rule for Best-of-N: stopping the rest then cannot change the maj@N answer.
    """
    ids, reps = answer_classes(answers)
    counts = sorted((ids.count(i) for i in range(len(reps))), reverse=True) + [0, 0]
    return counts[0] > counts[1] + unfinished


def grade_samples(outputs: list[str], ref: str) -> dict[str, Any]:
    """Grade the n outputs of one question: majority answer, maj@n, pass@n and mean accuracy."""
    answers = [extract_answer(o) for o in outputs]
    predicted = majority_vote(answers)
    per_sample = [is_equivalent(a, ref) for a in answers]
    return {"predicted": predicted, "correct": is_equivalent(predicted, ref), "pass_at_n": any(per_sample),
            "mean_accuracy": sum(per_sample) / len(per_sample) if per_sample else 0.0, "answers": answers}
