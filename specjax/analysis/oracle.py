"""An oracle drafter for analysis (not a decoding method): it knows the target's greedy continuation
and drafts each of its K tokens correctly with probability `alpha`, wrongly otherwise.

Acceptance is then under control: with greedy verification, each draft position is accepted
independently with probability alpha until the first wrong one, so the tokens per step follow
MoESD's sigma(alpha, gamma) exactly and a speedup model can be checked at chosen alphas, on random
weights where no real drafter would be accepted. The reference is each row's greedy output (run
`ar` first); drafts cost nothing, so measured speedups isolate the target's verification cost.

    ref = specjax.generate(model, prompts, "ar", ...)
    oracle = Oracle.for_outputs(prompt_ids, ref.tokens, alpha=0.8, k=3)
    out = specjax.generate(model, prompt_ids, oracle, ...)   # a Proposer instance is a method too
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from specjax.drafting import Context, Draft
from specjax.proposers.base import Proposer, bound


@dataclasses.dataclass(frozen=True)
class Oracle(Proposer):
    name: ClassVar[str] = "oracle"
    k: int = 3
    alpha: float = 0.8
    reference: tuple[tuple[int, ...], ...] = ()  # per row: the whole greedy history (prompt + ar output)
    vocab: int = bound(0)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.reference:
            raise ValueError("the oracle needs reference=(row histories): build it with Oracle.for_outputs")

    @classmethod
    def for_outputs(cls, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], alpha: float,
                    k: int) -> "Oracle":
        return cls(k=k, alpha=alpha, reference=tuple(tuple(p) + tuple(o) for p, o in zip(prompts, outputs)))

    def bind(self, model, sampling_cfg) -> tuple["Oracle", Any]:
        if not sampling_cfg.greedy:
            raise ValueError("the oracle drafts the greedy continuation: use temperature=0")
        width = max(map(len, self.reference)) + self.k + 1
        ref = jnp.full((len(self.reference), width), -1, jnp.int32)
        for b, row in enumerate(self.reference):
            ref = ref.at[b, : len(row)].set(jnp.asarray(row, jnp.int32))
        return dataclasses.replace(self, vocab=model.config.vocab_size), ref

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[Any, Draft]:
        ref = ctx.weights
        batch = ctx.tokens.shape[0]
        if ref.shape[0] != batch:
            raise ValueError(f"the oracle holds {ref.shape[0]} reference rows, the batch has {batch}")
        cols = jnp.clip(ctx.lengths[:, None] + jnp.arange(self.k)[None], 0, ref.shape[1] - 1)
        right = jnp.take_along_axis(ref, cols, axis=1)
        r_hit, r_tok = jax.random.split(rng)
        hit = jax.random.uniform(r_hit, right.shape) < self.alpha
        # a wrong token is never the right one: shift it by 1..V-1
        wrong = (jnp.maximum(right, 0) + 1 + jax.random.randint(r_tok, right.shape, 0, self.vocab - 1)) % self.vocab
        tokens = jnp.where(hit & (right >= 0), right, wrong).astype(jnp.int32)
        num = jnp.where(ctx.active, self.k, 0).astype(jnp.int32)
        return state, Draft(tokens=tokens, num=num)
