"""`hybrid`: suffix match when the history repeats, a model drafter when it does not (SAM[EAGLE-3]).

Per row and per step, inside the jitted loop: if the longest suffix match is at least `threshold`
tokens long the row copies its continuation (up to `k` tokens, q one-hot), else it takes `head_k`
tokens from the head drafter (a draft model or `self:L` layer-skip draft, real q). The head only
runs on steps where some row needs it (`lax.cond`), so a batch-1 stretch of copying costs no draft
forwards. `Draft.source` says who drafted each row: 1 suffix, 2 head, 0 nobody.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from specjax.config import SamplingConfig
from specjax.proposers.base import Context, Draft, Proposer
from specjax.proposers.draft_model import DraftModel
from specjax.proposers.ngram import SuffixMatch

SOURCE_SUFFIX, SOURCE_HEAD = 1, 2


@dataclasses.dataclass(frozen=True)
class Hybrid(Proposer):
    name: ClassVar[str] = "hybrid"
    k: int = 8  # suffix draft length
    threshold: int = 5  # match length from which the suffix drafts
    head: str = "draft"
    head_k: int = 4
    draft: str = "self:8"
    max_match: int = 32
    store_size: int = 0
    head_proposer: Proposer | None = None  # set by bind
    sampling_cfg: SamplingConfig | None = None

    def __post_init__(self):
        if self.head != "draft":
            raise ValueError(f"hybrid head {self.head!r} is not available; use head='draft' (draft=self:L or a model)")
        if self.threshold < 1:
            raise ValueError(f"threshold (suffix match length) must be >= 1, got {self.threshold}")

    @property
    def suffix(self) -> SuffixMatch:
        return SuffixMatch(k=self.k, max_match=max(self.max_match, self.threshold), min_match=self.threshold,
                           store_size=self.store_size)

    @property
    def width(self) -> int:
        """K of the loop: the longer of the two drafts."""
        return max(self.k, self.head_k)

    def bind(self, model, sampling_cfg: SamplingConfig) -> tuple["Hybrid", Any]:
        head, weights = DraftModel(k=self.head_k, draft=self.draft).bind(model, sampling_cfg)
        return dataclasses.replace(self, head_proposer=head, sampling_cfg=sampling_cfg), weights

    def _head(self) -> Proposer:
        if self.head_proposer is None:
            raise ValueError("the hybrid proposer is unbound: generate() binds it to the model (call bind())")
        return self.head_proposer

    def init(self, ctx: Context):
        return self.suffix.init(ctx), self._head().init(ctx)

    def resume(self, state, ctx: Context, prev_state, prev: Context):
        return self.suffix.resume(state[0], ctx, prev_state[0], prev), state[1]

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[Any, Draft]:
        head = self._head()
        s_state, h_state = state
        r_suffix, r_head = jax.random.split(rng)
        s_state, sd = self.suffix.propose(s_state, ctx, r_suffix)
        use_suffix = sd.num > 0
        need_head = ctx.active & ~use_suffix
        batch, vocab = ctx.tokens.shape[0], head.cfg.vocab_size
        greedy = self.sampling_cfg.greedy

        def run_head(h_state):
            return head.propose(h_state, ctx.replace(active=need_head), r_head)

        def skip_head(h_state):
            probs = None if greedy else jnp.zeros((batch, self.head_k, vocab), jnp.float32)
            return h_state, Draft(tokens=jnp.zeros((batch, self.head_k), jnp.int32),
                                  num=jnp.zeros((batch,), jnp.int32), probs=probs,
                                  confidence=jnp.zeros((batch,), jnp.float32))

        h_state, hd = jax.lax.cond(jnp.any(need_head), run_head, skip_head, h_state)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, self.width - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
        tokens = jnp.where(use_suffix[:, None], pad(sd.tokens), pad(hd.tokens))
        num = jnp.where(use_suffix, sd.num, jnp.where(need_head, hd.num, 0)).astype(jnp.int32)
        probs = None
        if not greedy:  # suffix rows are deterministic: q one-hot on their tokens
            one_hot = jax.nn.one_hot(pad(sd.tokens), vocab, dtype=jnp.float32)
            probs = jnp.where(use_suffix[:, None, None], one_hot, pad(hd.probs))
        source = jnp.where(num == 0, 0, jnp.where(use_suffix, SOURCE_SUFFIX, SOURCE_HEAD)).astype(jnp.int32)
        return (s_state, h_state), Draft(tokens=tokens, num=num, probs=probs, confidence=sd.confidence,
                                         source=source)

    def update(self, state, ctx: Context, prev_lengths):
        return (self.suffix.update(state[0], ctx, prev_lengths),
                self._head().update(state[1], ctx, prev_lengths))
