"""`hybrid`: suffix match when the history repeats, a model drafter when it does not (SAM[EAGLE-3]).

Per row and per step, inside the jitted loop: if the longest suffix match is at least `threshold`
tokens long the row copies its continuation (up to `k` tokens, q one-hot), else it takes the head
drafter's tokens: a chain of up to `head_k` from a trained EAGLE head (`head="eagle"`, the default
when one ships for the model), one per head from trained Medusa heads (`head="medusa"`), or `head_k`
from a draft model or `self:L` layer-skip draft (`head="draft"`, real q). Trained heads stop their
chain at the first guess below `head_min_prob`. The head's drafting only runs on steps where some
row needs it (`lax.cond`), so a batch-1 stretch of copying costs no draft forwards (an EAGLE head
still absorbs every step's accepted tokens, one small layer). `Draft.source` says who drafted each
row: 1 suffix, 2 head, 0 nobody.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from specjax.config import SamplingMode
from specjax.drafting import Context, Draft
from specjax.proposers.base import Proposer, bound, option, register
from specjax.proposers.draft_model import DraftModel
from specjax.proposers.ngram import SuffixMatch

SOURCE_SUFFIX, SOURCE_HEAD = 1, 2


@register("hybrid")
@dataclasses.dataclass(frozen=True)
class Hybrid(Proposer):
    paper: ClassVar[tuple[int, str] | None] = (9, "SAM[EAGLE-3]")
    sources: ClassVar[tuple[str, ...]] = ("none", "suffix", "head")
    cheap_part: ClassVar[bool] = True  # the suffix match; the head runs only when ctx.full_draft allows
    k: int = option(16, min=0)  # suffix draft length (capped at the match length, as `suffix` does)
    threshold: int = option(3, min=1)  # match length from which the suffix drafts (suffix's own min_match)
    # "eagle" / "medusa" (a trained head in head_path, default: the one shipped for the model), "draft"
    # (a draft model or self:L), or "auto": head_path's kind if set, else the shipped eagle head, else the
    # shipped medusa head, else draft
    head: str = "auto"
    # chain length of an eagle or draft-model head; a medusa head drafts one token per head
    head_k: int = option(4, min=1)
    draft: str = "self:8"
    head_path: str = ""
    # a trained head drafts only its leading guesses at least this sure; < 0: per kind, as measured best
    # on the think-twice benchmark (eagle 0: its chain is cheap to verify in full; medusa 0.6)
    head_min_prob: float = -1.0
    max_match: int = option(32, min=1)
    store_size: int = option(0, min=0)
    lazy: bool = True  # an EAGLE head absorbs accepted tokens only before a proposal (False: every step)
    forget: bool = True  # ... and skips the oldest of a wait longer than its lag buffer (`eagle`'s `forget`)
    head_proposer: Proposer | None = bound(None)
    sampling_cfg: SamplingMode | None = bound(None)  # the static mode
    vocab: int = bound(0)

    def __post_init__(self):
        if self.head not in ("auto", "draft", "medusa", "eagle"):
            raise ValueError(f"hybrid head {self.head!r} is not available; use head='eagle' or head='medusa' "
                             "(head_path=DIR of a trained head, or the shipped one), head='draft' (draft=self:L "
                             "or a model) or head='auto'")
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

    @property
    def depth(self) -> int:
        return self.width

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return () if self.head_proposer is None else self.head_proposer.feature_layers

    def bind(self, model, sampling_cfg: SamplingMode) -> tuple["Hybrid", Any]:
        from specjax.heads.io import default_head, head_kind

        kind = self.head
        if kind == "auto" and self.head_path:
            kind = head_kind(self.head_path)
        elif kind == "auto":
            kind = next((kind for kind in ("eagle", "medusa") if default_head(model, kind)), "draft")
        if kind == "eagle":
            from specjax.proposers.eagle import Eagle

            eagle = Eagle(head=self.head_path, topk=1, depth=self.head_k, total=self.head_k,
                          min_prob=max(self.head_min_prob, 0.0), lazy=self.lazy,
                          forget=self.forget)
            head, weights = eagle.bind(model, sampling_cfg)
        elif kind == "medusa":
            from specjax.proposers.medusa import Medusa

            medusa = Medusa(head=self.head_path, branches=1,
                            min_prob=0.6 if self.head_min_prob < 0 else self.head_min_prob)
            head, weights = medusa.bind(model, sampling_cfg)
        else:
            head, weights = DraftModel(k=self.head_k, draft=self.draft).bind(model, sampling_cfg)
        bound = dataclasses.replace(self, head=kind, head_proposer=head, sampling_cfg=sampling_cfg, head_k=head.k,
                                    vocab=model.config.vocab_size)
        return bound, weights

    def _head(self) -> Proposer:
        if self.head_proposer is None:
            raise ValueError("the hybrid proposer is unbound: generate() binds it to the model (call bind())")
        return self.head_proposer

    def init(self, ctx: Context):
        return self.suffix.init(ctx), self._head().init(ctx)

    def resume(self, state, ctx: Context, prev_state, prev: Context):
        return (self.suffix.resume(state[0], ctx, prev_state[0], prev),
                self._head().resume(state[1], ctx, prev_state[1], prev))

    @property
    def confidence_kind(self) -> tuple[str, ...]:  # type: ignore[override]
        """Per source (`sources`): nobody and the suffix a match length, the head its own kind."""
        head = "probability" if self.head_proposer is None else self.head_proposer.confidence_kind
        return "count", "count", head

    @property
    def catches_up(self) -> bool:
        return self.head_proposer is not None and self.head_proposer.catches_up

    def waking(self, state, ctx: Context):
        return state[0], self._head().waking(state[1], ctx)

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[Any, Draft]:
        head = self._head()
        s_state, h_state = state
        r_suffix, r_head = jax.random.split(rng)
        s_state, sd = self.suffix.propose(s_state, ctx, r_suffix)
        use_suffix = sd.num > 0
        need_head = ctx.active & ~use_suffix
        if ctx.full_draft is not None:  # an adaptive loop backing off from the head: the suffix match alone
            need_head = need_head & ctx.full_draft
        batch, vocab = ctx.tokens.shape[0], self.vocab
        greedy = self.sampling_cfg.greedy
        real_q = not greedy and isinstance(head, DraftModel)  # trained heads draft deterministically (q one-hot)

        def run_head(h_state):
            h_state, d = head.propose(h_state, ctx.replace(active=need_head), r_head)
            return h_state, d.replace(valid=None, probs=d.probs if real_q else None)

        def skip_head(h_state):
            probs = jnp.zeros((batch, self.head_k, vocab), jnp.float32) if real_q else None
            return h_state, Draft(tokens=jnp.zeros((batch, self.head_k), jnp.int32),
                                  num=jnp.zeros((batch,), jnp.int32), probs=probs,
                                  confidence=jnp.zeros((batch,), jnp.float32))

        h_state, hd = jax.lax.cond(jnp.any(need_head), run_head, skip_head, h_state)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, self.width - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
        tokens = jnp.where(use_suffix[:, None], pad(sd.tokens), pad(hd.tokens))
        num = jnp.where(use_suffix, sd.num, jnp.where(need_head, hd.num, 0)).astype(jnp.int32)
        probs = None
        if not greedy and hd.probs is not None:  # a draft model's real q; suffix rows are one-hot on their tokens
            one_hot = jax.nn.one_hot(pad(sd.tokens), vocab, dtype=jnp.float32)
            probs = jnp.where(use_suffix[:, None, None], one_hot, pad(hd.probs))
        source = jnp.where(num == 0, 0, jnp.where(use_suffix, SOURCE_SUFFIX, SOURCE_HEAD)).astype(jnp.int32)
        # each row's confidence is its source's: the match length, or the head's first-guess probability
        # (`confidence_kind`), so the adaptive loop can cut a head draft it is unsure of
        confidence = jnp.where(use_suffix, sd.confidence, hd.confidence).astype(jnp.float32)
        return (s_state, h_state), Draft(tokens=tokens, num=num, probs=probs, confidence=confidence,
                                         source=source)

    def update(self, state, ctx: Context, prev_lengths):
        return (self.suffix.update(state[0], ctx, prev_lengths),
                self._head().update(state[1], ctx, prev_lengths))
