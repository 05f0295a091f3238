"""How much any draft-width rule could gain on a run's own drafts: a fixed-width run's `StepTrace`
(`generate(trace=True)`) replayed under other widths and priced with the calibrated step costs.

The adaptive loop picks each step's width from what is known before the verify: the drafting source,
its confidence bucket, whether the row's last draft was accepted whole. These ceilings say how far that
information can take any rule on the device at hand:

- `priced`: the trace as it ran, under the cost model (checks the model against the measured time);
- `hindsight`: every step at the narrowest width that holds what it accepted, and no proposal at all
  where nothing was accepted: a rule that knew each draft's fate (no rule can);
- `by_features`: each group of steps with the same (source, confidence bucket, streak) verified at the
  one width best for the group, its tokens generated at that width's rate: the best any rule reading
  those features can do, fitted in hindsight on the same steps (so optimistic). `skip_known` lets a
  group also skip the proposal, as if its features were known before proposing.

Batch-1 traces only: in a batch the width is one per step for all rows, and the rows' fates mix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class StepPrices:
    """Seconds of a decode step (`generate` stats of an adaptive run on the same shapes)."""

    widths: tuple[int, ...]  # the static verify widths (`adaptive.loop_widths`)
    step_s: tuple[float, ...]  # per width: the step less the drafter (width 1: a step with no draft)
    propose_s: float  # one whole proposal
    cheap_s: float = 0.0  # a proposer's cheap part alone (the hybrid's suffix match)
    cheap_sources: tuple[int, ...] = ()  # sources that run the cheap part alone (the hybrid's suffix: 1)

    @classmethod
    def from_stats(cls, stats: Any, cheap_sources: tuple[int, ...] = ()) -> "StepPrices":
        if not stats["step_costs_s"]:
            raise ValueError("the stats hold no calibrated step costs: take them from an adaptive run "
                             "(generate(adaptive=True)) on the same shapes")
        return cls(widths=tuple(stats["widths"]), step_s=tuple(stats["step_costs_s"]),
                   propose_s=float(stats["propose_s"]), cheap_s=float(stats["cheap_part_s"]),
                   cheap_sources=cheap_sources)

    def holding(self, tokens: np.ndarray) -> np.ndarray:
        """Index of the narrowest width verifying `tokens` draft tokens (the widest where none does)."""
        widths = np.asarray(self.widths)
        return np.minimum(np.searchsorted(widths, np.asarray(tokens) + 1), len(widths) - 1)

    def drafter(self, proposing: np.ndarray, source: np.ndarray) -> np.ndarray:
        """Each step's drafting seconds: the cheap part's where a cheap source drafted (the rest of the
        proposal skipped), the whole proposal's where it ran, none where nothing did."""
        cheap = np.isin(source, self.cheap_sources)
        return np.where(cheap, self.cheap_s, np.where(proposing, self.propose_s, 0.0))


@dataclasses.dataclass(frozen=True)
class Steps:
    """One row's decode steps, concatenated over calls (`steps_of`)."""

    source: np.ndarray
    confidence: np.ndarray
    proposed: np.ndarray
    accepted: np.ndarray
    proposing: np.ndarray
    width: np.ndarray  # index into StepPrices.widths
    streak: np.ndarray  # the row's previous drafted step accepted its whole draft (the loop's split)

    @property
    def tokens(self) -> int:
        return int(np.sum(self.accepted + 1))


def steps_of(traces: Sequence[dict[str, list]], widths: Sequence[int]) -> Steps:
    """The steps of batch-1 `stats["step_trace"]`s (one per call), the done steps dropped."""
    parts: dict[str, list] = {k: [] for k in ("source", "confidence", "proposed", "accepted", "proposing", "width",
                                              "streak")}
    index = {w: i for i, w in enumerate(widths)}
    for trace in traces:
        if len(trace["accepted"]) != 1:
            raise ValueError(f"width ceilings replay one row's steps; this trace has {len(trace['accepted'])} "
                             "rows (run with batch 1)")
        accepted = np.asarray(trace["accepted"][0])
        live = accepted >= 0
        verified = np.asarray(trace["verified"][0])
        streak, prev = np.zeros(len(accepted), np.int32), 0
        for t in range(len(accepted)):  # as the loop keeps it: set by each step that drafted
            streak[t] = prev
            if verified[t] > 0 and live[t]:
                prev = int(accepted[t] >= verified[t])
        parts["source"].append(np.asarray(trace["source"][0])[live])
        parts["confidence"].append(np.asarray(trace["confidence"][0])[live])
        parts["proposed"].append(np.asarray(trace["proposed"][0])[live])
        parts["accepted"].append(accepted[live])
        parts["proposing"].append(np.asarray(trace["proposing"], bool)[live])
        parts["width"].append(np.asarray([index[w] for w in trace["width"]], np.int32)[live])
        parts["streak"].append(streak[live])
    return Steps(**{k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()})


def priced(steps: Steps, prices: StepPrices) -> float:
    """Seconds of the steps as they ran."""
    return float(np.sum(prices.drafter(steps.proposing, steps.source) + np.asarray(prices.step_s)[steps.width]))


def hindsight(steps: Steps, prices: StepPrices) -> float:
    """Seconds if each step had known its draft's fate: the narrowest width holding what it accepted, no
    proposal where nothing was."""
    step_s = np.asarray(prices.step_s)
    drafted = prices.drafter(steps.proposing, steps.source) + step_s[prices.holding(steps.accepted)]
    return float(np.sum(np.where(steps.accepted > 0, drafted, step_s[0])))


def by_features(steps: Steps, prices: StepPrices, bucket: Callable[[np.ndarray, np.ndarray], np.ndarray],
                skip_known: bool = False) -> tuple[float, dict[tuple[int, int, int], int]]:
    """Seconds if each (source, bucket, streak) group ran at its own best width (see the module's
    docstring), and the width chosen per group. `bucket(confidence, source)`: the loop's confidence buckets."""
    step_s = np.asarray(prices.step_s)
    keys = np.stack([steps.source, bucket(steps.confidence, steps.source), steps.streak], axis=1)
    total, chosen = 0.0, {}
    drafter = prices.drafter(steps.proposing, steps.source)
    for key in {tuple(int(x) for x in k) for k in keys}:
        mine = np.all(keys == key, axis=1)
        fits = prices.holding(steps.proposed[mine])  # the widest a step's proposal fills
        best_rate, best_w = -1.0, 0
        for w in range(len(prices.widths)):
            run = np.minimum(w, fits)
            kept = np.minimum(steps.accepted[mine], np.asarray(prices.widths)[run] - 1)
            rate = np.sum(kept + 1) / np.sum(drafter[mine] + step_s[run])
            if rate > best_rate:
                best_rate, best_w = rate, prices.widths[w]
        if skip_known and 1.0 / step_s[0] > best_rate:
            best_rate, best_w = 1.0 / step_s[0], 0  # 0: no proposal at all
        total += np.sum(steps.accepted[mine] + 1) / best_rate
        chosen[key] = best_w
    return float(total), chosen


def ceilings(adaptive: Sequence[Any], fixed: Sequence[Any], bucket: Callable[[np.ndarray, np.ndarray], np.ndarray],
             cheap_sources: tuple[int, ...] = ()) -> dict[str, Any]:
    """The ceilings of a fixed-width run beside an adaptive run of the same calls: `adaptive` / `fixed`
    hold each call's traced stats (`generate(trace=True)`; the adaptive run's carry the step costs).
    Speedups over the fixed widths in decode time: the adaptive run's measured one, and the fixed steps'
    `by_features` (with `skip_known` too) and `hindsight` ones under the cost model; `model_s` beside
    `decode_s` checks the model against the clock."""
    prices = StepPrices.from_stats(adaptive[0], cheap_sources)
    runs = {"adaptive": adaptive, "fixed": fixed}
    steps = {name: steps_of([s["step_trace"] for s in stats], prices.widths) for name, stats in runs.items()}
    decode_s = {name: float(sum(s["decode_s"] for s in stats)) for name, stats in runs.items()}
    model_s = {name: priced(s, prices) for name, s in steps.items()}
    features, widths = by_features(steps["fixed"], prices, bucket)
    known, _ = by_features(steps["fixed"], prices, bucket, skip_known=True)
    base, sight = model_s["fixed"], hindsight(steps["fixed"], prices)
    return dict(decode_s=decode_s, model_s=model_s, adaptive=decode_s["fixed"] / decode_s["adaptive"],
                features=base / features, features_known=base / known, hindsight=base / sight,
                group_widths={str(k): w for k, w in sorted(widths.items())}, steps=len(steps["fixed"].accepted))
