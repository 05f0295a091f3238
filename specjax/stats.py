"""What one `generate` call measured: a dataclass with a documented schema, read like a dict.

`GenerateOutput.stats` is a `GenerationStats`; results files and aggregations hold `to_dict()` of it.
Metric definitions follow Spec-Bench: `mean_accepted_tokens` counts the bonus token (plain decoding
scores exactly 1.0), and speedups are ratios of `tokens_per_s` measured in the same process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

FINISH_REASONS = ("eos", "budget", "cache_full", "stopped")


def finish_reason(emitted: int, ended_on_eos: bool, stopped: bool, max_new_tokens: int) -> str:
    """Why one row ended, from what the host has after the loop: `stop_rows` stopped it, it emitted an EOS
    token, it used its whole budget, or, none of those, the loop ended because the cache had no room for
    another step (the rows share one static cache length)."""
    if stopped:
        return "stopped"
    if ended_on_eos:
        return "eos"
    return "budget" if emitted >= max_new_tokens else "cache_full"


@dataclasses.dataclass
class GenerationStats(Mapping):
    method: str  # the proposer's name
    batch: int  # rows decoded (prompts x num_samples)
    prefilled_rows: int  # distinct prompts prefilled (Best-of-N prefills a question once)
    generated_tokens: int  # tokens returned, EOS excluded
    emitted_tokens: int  # tokens the loop committed, EOS included
    target_forwards: int  # verify forwards + the prefill
    decode_steps: int  # verify forwards
    mean_accepted_tokens: float  # tokens per active row-step, the bonus token included
    accepted_hist: list[int]  # accepted_hist[n]: active row-steps that produced n tokens
    proposer_steps: list[int]  # active row-steps drafted by each proposer id (hybrid: suffix, head)
    prefill_s: float  # wall time of the prefill, compilation included on a first call
    decode_s: float  # wall time of the decode loop (and early-stop pauses)
    wall_s: float  # prefill_s + decode_s
    tokens_per_s: float  # emitted_tokens / wall_s
    decode_tokens_per_s: float  # tokens after the first per row, over decode_s
    draft_k: int  # draft width per step (chain positions or tree nodes)
    speculate_max_rows: int | None  # the batch cut-off for drafting, None: always draft
    stopped_rows: list[bool]  # rows `stop_rows` ended before EOS or the budget
    # per row, why it ended (`finish_reason`): "eos", "budget" (max_new_tokens), "cache_full" (no room for
    # another step) or "stopped" (by `stop_rows`)
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    reused_prefix_tokens: int = 0  # prompt tokens a continued session found already cached
    prompt_bucket: int = 0  # static prompt width of the prefill
    # [prompts, width] of each part a fresh prefill ran in, shortest prompts first (`plan.prefill_parts`);
    # empty: one batch padded to `prompt_bucket`
    prefill_parts: list[list[int]] = dataclasses.field(default_factory=list)
    cache_len: int = 0  # static cache length (bucket) of the run
    # the adaptive loop (`generate(adaptive=True)`, the default for drafting methods); for a fixed-width
    # run these hold zeros, and `width_hist` / `widths` are empty
    adaptive: bool = False
    widths: list[int] = dataclasses.field(default_factory=list)  # the static verify widths (1 = no draft)
    width_hist: list[int] = dataclasses.field(default_factory=list)  # steps run at each of `widths`
    step_costs_s: list[float] = dataclasses.field(default_factory=list)  # calibrated seconds of each width
    propose_s: float = 0.0  # calibrated seconds of one `propose`
    cheap_part_s: float = 0.0  # calibrated seconds of the proposer's `cheap_part` alone (the hybrid's suffix match)
    wake_s: float = 0.0  # calibrated seconds a proposal after a wait first spends catching up (a lazy EAGLE head)
    predicted_tokens: float = 0.0  # expected tokens of the chosen widths, summed over steps (vs emitted_tokens)
    predicted_decode_s: float = 0.0  # calibrated seconds of the chosen widths + drafting (vs decode_s)
    drafted_share: float = 0.0  # share of steps that ran `propose`
    calibration_s: float = 0.0  # spent measuring this machine's step costs (first use of a shape), not in wall_s
    # the loop started from the estimate and backoff an earlier call of the same kind ended with
    # (`specjax.adapt_memory`; off with SPECJAX_ADAPTIVE_MEMORY=0)
    from_earlier_call: bool = False
    # steps whose verify forward ran each static width of `adaptive.loop_widths` (`widths` of an adaptive run):
    # narrower than `width_hist`'s choice where every row's draft was shorter
    verified_hist: list[int] = dataclasses.field(default_factory=list)
    # `generate(trace=True)`: per decode step, what each row drafted, verified and accepted (`step_trace.StepTrace`)
    step_trace: dict[str, list] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
