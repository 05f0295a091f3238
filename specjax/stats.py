"""What one `generate` call measured: a dataclass with a documented schema, read like a dict.

`GenerateOutput.stats` is a `GenerationStats`; results files and aggregations hold `to_dict()` of it.
Metric definitions follow Spec-Bench: `mean_accepted_tokens` counts the bonus token (plain decoding
scores exactly 1.0), and speedups are ratios of `tokens_per_s` measured in the same process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any


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
    reused_prefix_tokens: int = 0  # prompt tokens a continued session found already cached
    prompt_bucket: int = 0  # static prompt width of the prefill
    cache_len: int = 0  # static cache length (bucket) of the run

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
