"""`hybrid`: suffix match when the history repeats, a model drafter when it does not (SAM[EAGLE-3]).

Per row and per step, inside the jitted loop: if the longest suffix match is at least `threshold`
tokens long the row copies its continuation (up to `k` tokens, q one-hot), else it takes the head
drafter's tokens: `head_k` from a draft model or `self:L` layer-skip draft (real q), or one per head
from trained Medusa heads (`head="medusa", head_path=DIR`, no draft forward at all). The head only
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
    k: int = 16  # suffix draft length (capped at the match length, as `suffix` does)
    threshold: int = 3  # match length from which the suffix drafts (suffix's own min_match)
    # "medusa" (trained heads in head_path, default: the head shipped for the model), "draft" (a draft
    # model or self:L), or "auto": medusa when a head ships for the model (or head_path is set), else draft
    head: str = "auto"
    head_k: int = 4  # draft length of a draft-model head; a medusa head drafts one token per head
    draft: str = "self:8"
    head_path: str = ""
    head_min_prob: float = 0.6  # a medusa head drafts only its leading guesses at least this sure
    max_match: int = 32
    store_size: int = 0
    head_proposer: Proposer | None = None  # set by bind
    sampling_cfg: SamplingConfig | None = None

    def __post_init__(self):
        if self.head not in ("auto", "draft", "medusa"):
            raise ValueError(f"hybrid head {self.head!r} is not available; use head='draft' (draft=self:L or a "
                             "model), head='medusa' (head_path=DIR of a trained head) or head='auto'")
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
        from specjax.heads.io import default_head

        kind = self.head
        if kind == "auto":
            kind = "medusa" if self.head_path or default_head(model, "medusa") else "draft"
        if kind == "medusa":
            from specjax.proposers.medusa import Medusa

            medusa = Medusa(head=self.head_path, branches=1, min_prob=self.head_min_prob)
            head, weights = medusa.bind(model, sampling_cfg)
        else:
            head, weights = DraftModel(k=self.head_k, draft=self.draft).bind(model, sampling_cfg)
        bound = dataclasses.replace(self, head=kind, head_proposer=head, sampling_cfg=sampling_cfg, head_k=head.k)
        return bound, weights

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
        batch, vocab = ctx.tokens.shape[0], ctx.weights["lm_head"].shape[-1]
        greedy = self.sampling_cfg.greedy

        def run_head(h_state):
            h_state, d = head.propose(h_state, ctx.replace(active=need_head), r_head)
            if not greedy and d.probs is None:  # a deterministic head: q one-hot
                d = d.replace(probs=jax.nn.one_hot(d.tokens, vocab, dtype=jnp.float32))
            return h_state, d.replace(valid=None)

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
