"""Latency-aware test-time scaling (Wang et al., "Faster and Better LLMs via Latency-Aware Test-Time
Scaling", arXiv 2505.19634): how to spend a wall-clock budget per question between branches (N
samples + majority vote) and speculation (fewer target forwards per token).

A configuration is (method, N, early stop). Its latency and accuracy are predicted from a short
calibration on the device at hand, never guessed:

* `CostModel` (timings): the target's forward time T(B, k) for B rows verifying k tokens each, and per
  configuration the measured decode step time, decode steps per token of the longest row (1 for `ar`,
  about 1 / mean accepted tokens for a speculative method), prefill time and host time per question.
  The step time splits into T(N, K+1) plus an overhead (proposer, acceptance bookkeeping, narrower
  forwards when drafts are short: it can be negative); for an N not calibrated, T comes from a roofline
  fit over tokens per forward (`moesd.StepTimeFit`) and the overhead from the nearest calibrated N.
      latency(method, N) = prefill + host + E[longest branch's tokens] * steps_per_token * step_s
* `SampleModel` (answers): every calibration sample's length and answer class. maj@N accuracy is
  estimated by drawing N of a question's samples (all lossless methods sample the same distribution,
  so samples from every configuration pool), and so is the expected longest branch of N, or with early
  stopping the length at which the vote of N branches is settled (`grading.vote_settled`).
* `choose`: exhaustive search over the enumerated configurations (there are tens, not millions):
  the highest predicted accuracy within the budget, ties to the lower latency. This is exact over the
  grid, where the paper's greedy allocation (add branches, then speculation) can stop at a local
  optimum.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = ("branch", "speculation", "combined")


@dataclasses.dataclass(frozen=True)
class ConfigTiming:
    """Calibration timings of one (method, N) configuration, averaged over the calibration questions."""

    method: str
    n: int
    width: int  # draft tokens per step (K, or tree nodes); 0 for ar
    step_s: float  # decode time per loop step (one target forward + drafting + bookkeeping)
    steps_per_token: float  # decode steps per generated token of the longest branch
    prefill_s: float  # per question
    host_s: float  # per question: tokenising, detokenising, dispatch (wall - prefill - decode)
    mean_accepted_tokens: float


@dataclasses.dataclass(frozen=True)
class QuestionSamples:
    """A calibration question's samples: generated tokens and answer class (-1: no answer) of each."""

    lengths: tuple[int, ...]
    classes: tuple[int, ...]
    correct_class: int  # the class equivalent to the reference; -1 when no sample got it


@dataclasses.dataclass
class Calibration:
    """What a calibration run measured; saved as JSON and reloaded with `--calibration FILE`."""

    meta: dict[str, Any]  # model, device, dataset, max_new_tokens, temperature, check_every, ...
    forward_s: dict[tuple[int, int], float]  # (B, k) -> T(B, k)
    timings: list[ConfigTiming]
    questions: list[QuestionSamples]

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({
            "meta": self.meta,
            "forward_s": [[b, k, t] for (b, k), t in sorted(self.forward_s.items())],
            "timings": [dataclasses.asdict(t) for t in self.timings],
            "questions": [dataclasses.asdict(q) for q in self.questions],
        }, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            raw = json.loads(Path(path).read_text())
            return cls(meta=raw["meta"], forward_s={(int(b), int(k)): float(t) for b, k, t in raw["forward_s"]},
                       timings=[ConfigTiming(**t) for t in raw["timings"]],
                       questions=[QuestionSamples(lengths=tuple(q["lengths"]), classes=tuple(q["classes"]),
                                                  correct_class=int(q["correct_class"])) for q in raw["questions"]])
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a calibration file written by eval.latency ({e}); delete it or "
                             "point --calibration at a new path to calibrate again") from e


@dataclasses.dataclass(frozen=True)
class Plan:
    method: str
    n: int
    early_stop: bool
    predicted_s: float
    predicted_accuracy: float

    @property
    def family(self) -> str:
        """branch: ar with N samples; speculation: one sample, a speculative method; combined: both."""
        if self.method == "ar":
            return "branch"
        return "speculation" if self.n == 1 else "combined"

    @property
    def name(self) -> str:
        return f"{self.method} N={self.n}" + (" early-stop" if self.early_stop else "")


class CostModel:
    """Predicted wall time per question of a configuration (see the module docstring)."""

    def __init__(self, forward_s: dict[tuple[int, int], float], timings: Sequence[ConfigTiming],
                 fit: Any = None):
        self.forward_s = dict(forward_s)
        self.timings = {(t.method, t.n): t for t in timings}
        self.fit = fit  # T over tokens per forward, for widths/batches off the grid; None: grid only

    def forward(self, batch: int, width: int) -> float:
        """T(B, k): measured where calibrated, else the roofline fit over B * k tokens."""
        if (batch, width) in self.forward_s:
            return self.forward_s[(batch, width)]
        if self.fit is None:
            raise ValueError(f"T(B={batch}, k={width}) was not calibrated and no fit is given")
        return float(self.fit(batch * width))

    def timing(self, method: str, n: int) -> ConfigTiming:
        """The calibrated timing of (method, n); an uncalibrated n scales the nearest calibrated one."""
        if (method, n) in self.timings:
            return self.timings[(method, n)]
        ns = sorted(m for (meth, m) in self.timings if meth == method)
        if not ns:
            raise ValueError(f"method {method!r} was not calibrated; calibrated: "
                             f"{', '.join(sorted({m for m, _ in self.timings}))}")
        near = self.timings[(method, min(ns, key=lambda m: abs(np.log2(m) - np.log2(n))))]
        w = near.width + 1
        overhead = near.step_s - self.forward(near.n, w)
        return dataclasses.replace(near, n=n, step_s=max(self.forward(n, w) + overhead, 1e-6))

    def overhead(self, method: str, n: int) -> float:
        """Step time beyond the target's T(N, K+1): drafting and bookkeeping (negative when the loop
        often runs a narrower forward because drafts are short)."""
        t = self.timing(method, n)
        return t.step_s - self.forward(n, t.width + 1)

    def latency(self, method: str, n: int, longest_tokens: float) -> float:
        """Seconds for one question whose longest (or vote-settling) branch emits `longest_tokens`."""
        t = self.timing(method, n)
        return t.prefill_s + t.host_s + longest_tokens * t.steps_per_token * t.step_s


class SampleModel:
    """maj@N accuracy and branch lengths of N samples, estimated by drawing from calibration samples."""

    def __init__(self, questions: Sequence[QuestionSamples], draws: int = 500, seed: int = 0):
        if not questions or any(len(q.lengths) == 0 for q in questions):
            raise ValueError("the calibration holds no samples: calibrate on at least one question")
        self.questions = list(questions)
        self.draws, self.seed = draws, seed
        self._cache: dict[tuple[int, bool, float], tuple[float, float]] = {}

    def estimate(self, n: int, early_stop: bool = False, pause_tokens: float = 0.0) -> tuple[float, float]:
        """(maj@n accuracy, expected tokens the batch runs for) over the calibration questions.

        Without early stop the batch runs until its longest branch ends; with it, until the first
        pause (every `pause_tokens`) after the vote of the finished branches is settled. n above a
        question's sample count draws with replacement (an extrapolation).
        """
        key = (n, early_stop, pause_tokens)
        if key not in self._cache:
            rng = np.random.default_rng(self.seed)
            acc, length = [], []
            for q in self.questions:
                a, steps = _draw(q, n, early_stop, pause_tokens, self.draws, rng)
                acc.append(a)
                length.append(steps)
            self._cache[key] = (float(np.mean(acc)), float(np.mean(length)))
        return self._cache[key]

    def accuracy(self, n: int) -> float:
        return self.estimate(n)[0]


def _draw(q: QuestionSamples, n: int, early_stop: bool, pause_tokens: float, draws: int,
          rng: np.random.Generator) -> tuple[float, float]:
    lengths, classes = np.asarray(q.lengths, np.float64), np.asarray(q.classes)
    m = len(lengths)
    num_classes = int(classes.max()) + 1 if classes.size else 0
    correct = stops = 0.0
    for _ in range(draws):
        idx = rng.choice(m, n, replace=n > m)
        order = idx[np.argsort(lengths[idx], kind="stable")]  # branches in the order they finish
        votes = np.zeros(num_classes + 2)  # two spare slots: a runner-up exists even with one class
        stop = lengths[order[-1]]
        for i, j in enumerate(order):
            if classes[j] >= 0:
                votes[classes[j]] += 1
            top = np.sort(votes)[::-1]
            if early_stop and i + 1 < n and top[0] > top[1] + (n - i - 1):
                stop = lengths[j] if pause_tokens <= 0 else min(np.ceil(lengths[j] / pause_tokens) * pause_tokens,
                                                               lengths[order[-1]])
                break
        best = np.flatnonzero(votes[:num_classes] == votes.max()) if votes.max() > 0 else np.asarray([], int)
        if best.size:  # ties broken at random
            correct += float(rng.choice(best) == q.correct_class)
        stops += stop
    return correct / draws, stops / draws


def enumerate_plans(cost: CostModel, samples: SampleModel, methods: Iterable[str], n_values: Iterable[int],
                    early_stop: Sequence[bool] = (False,), check_every: int = 32) -> list[Plan]:
    """Every (method, N, early stop) with its predicted latency and accuracy."""
    plans = []
    for method in methods:
        for n in n_values:
            t = cost.timing(method, n)
            for es in early_stop:
                if es and n < 3:  # a vote of one or two branches settles only when all have finished
                    continue
                acc, longest = samples.estimate(n, es, check_every / t.steps_per_token)
                plans.append(Plan(method, n, es, cost.latency(method, n, longest), acc))
    return plans


def choose(plans: Iterable[Plan], budget_s: float, families: Iterable[str] = FAMILIES) -> Plan | None:
    """The most accurate predicted plan within the budget (ties: the faster); None if none fits.

    `families` restricts the search: ("branch",) is branch-only, ("speculation",) speculation-only;
    the plain `ar` N=1 plan belongs to every family (the common starting point).
    """
    fams = set(families)
    fits = [p for p in plans if p.predicted_s <= budget_s
            and (p.family in fams or (p.method == "ar" and p.n == 1) or "combined" in fams)]
    if not fits:
        return None
    return max(fits, key=lambda p: (round(p.predicted_accuracy, 9), -p.predicted_s))


def frontier(plans: Iterable[Plan]) -> list[Plan]:
    """The accuracy-latency Pareto frontier: each plan more accurate than every faster one."""
    out: list[Plan] = []
    for p in sorted(plans, key=lambda p: (p.predicted_s, -p.predicted_accuracy)):
        if not out or p.predicted_accuracy > out[-1].predicted_accuracy:
            out.append(p)
    return out
