"""`draft`: a smaller language model drafts K tokens autoregressively, through the one decoder.

The draft is any model `specjax.load` takes (same tokenizer/vocabulary as the target) or `self:L`, a
layer-skip draft made of the target's first L layers plus its final norm and LM head: no extra
weights, so the embedded default has a draft model offline. A self-draft's cache for the committed
history is exactly the target's first L cache layers, so it reads them (`ctx.cache`) instead of
keeping its own. An independent draft keeps its own cache (the proposer state), prefilled at `init`
and caught up after every step on the window of tokens the step committed.

Draft probabilities q are the draft's processed distribution (same temperature/top-k/top-p as the
target), so speculative sampling stays lossless with a real, non-one-hot q.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import struct

from specjax import sampling
from specjax.config import ModelConfig, SamplingConfig, SamplingMode
from specjax.drafting import Context, Draft, gather_rows, pending_tokens
from specjax.models import transformer
from specjax.models.cache import KVCache
from specjax.proposers.base import Proposer, bound, option, register


@struct.dataclass
class DraftState:
    cache: KVCache  # the draft's own cache; lengths = history tokens whose keys/values it holds


def self_draft(model, num_layers: int):
    """The target's first `num_layers` layers + final norm + LM head, sharing the target's buffers."""
    cfg: ModelConfig = model.config
    if not 1 <= num_layers < cfg.num_layers:
        raise ValueError(f"draft='self:{num_layers}' needs 1 <= L < {cfg.num_layers} (the target's layer count)")
    params = dict(model.params, layers=tuple(model.params["layers"][:num_layers]))
    return dataclasses.replace(cfg, num_layers=num_layers), params


@functools.lru_cache(maxsize=4)
def _load_draft(name: str, dtype: str):
    from specjax.model import load

    return load(name, dtype=dtype, tokenizer=False)


def resolve_draft(model, spec: str) -> tuple[ModelConfig, Any, bool]:
    """(config, params, shares the target's cache) for `draft=` (anything `load` takes, or self:L)."""
    if spec.startswith("self:"):
        try:
            layers = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"draft={spec!r}: write self:L with L an integer, e.g. self:8") from None
        return *self_draft(model, layers), True
    dtype = str(jnp.dtype(transformer.compute_dtype(model.params)))
    draft = _load_draft(spec, dtype)
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft {spec!r} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                         f"{model.config.vocab_size}: a draft model must share the target's tokenizer")
    return draft.config, draft.params, False


def draft_chain(weights, cfg: ModelConfig, cache: KVCache, first: jax.Array, k: int,
                sampling_cfg: "SamplingConfig | Any",
                rng: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """K autoregressive draft steps from `first` [B] at slot cache.lengths: tokens [B, K], probs
    [B, K, V] (None when greedy) and the probability the draft gave its first token [B]."""
    greedy = sampling_cfg.greedy

    def step(carry, r):
        c, tok = carry
        out = transformer.forward(weights, cfg, tok[:, None], c)
        logits = out.logits[:, 0]
        if greedy:
            nxt, q = jnp.argmax(logits, axis=-1).astype(jnp.int32), None
            conf = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
        else:
            q = sampling.probs(logits, sampling_cfg)
            nxt = jax.random.categorical(r, jnp.log(q)).astype(jnp.int32)
            conf = jnp.take_along_axis(q, nxt[:, None], axis=-1)[:, 0]
        return (out.cache.with_lengths(c.lengths + 1), nxt), (nxt, q, conf)

    _, (tokens, probs, conf) = jax.lax.scan(step, (cache, first.astype(jnp.int32)), jax.random.split(rng, k))
    probs = None if probs is None else probs.transpose(1, 0, 2)
    return tokens.T, probs, conf[0]


@register("draft")
@dataclasses.dataclass(frozen=True)
class DraftModel(Proposer):
    """K tokens from a draft model; `draft` is a model name/path or `self:L`. `bind` fills the rest."""

    confidence_kind: ClassVar[str] = "probability"
    paper: ClassVar[tuple[int, str] | None] = (1, "SpS")
    k: int = option(4, min=1)
    draft: str = "self:8"
    cfg: ModelConfig | None = bound(None)
    sampling_cfg: SamplingMode | SamplingConfig | None = bound(None)  # the static mode; numbers: ctx.sampling
    shares_cache: bool = bound(False)

    def bind(self, model, sampling_cfg: SamplingMode) -> tuple["DraftModel", Any]:
        cfg, params, shares = resolve_draft(model, self.draft)
        return dataclasses.replace(self, cfg=cfg, sampling_cfg=sampling_cfg, shares_cache=shares), params

    def _check(self, ctx: Context) -> int:
        if self.cfg is None:
            raise ValueError("the draft proposer is unbound: generate() binds it to the model (call bind())")
        chex.assert_rank(ctx.tokens, 2)
        return ctx.tokens.shape[0]

    def init(self, ctx: Context) -> DraftState | tuple:
        batch = self._check(ctx)
        if self.shares_cache:
            return ()
        cache = KVCache.init(self.cfg, batch, ctx.tokens.shape[1], transformer.compute_dtype(ctx.weights))
        out = transformer.forward(ctx.weights, self.cfg, ctx.tokens, cache, cache_is_empty=True,
                                  logit_positions=jnp.zeros((batch, 1), jnp.int32))
        return DraftState(cache=out.cache.with_lengths(ctx.lengths - 1))

    def _cache(self, state, ctx: Context) -> KVCache:
        if self.shares_cache:
            n = self.cfg.num_layers
            return KVCache(k=ctx.cache.k[:n], v=ctx.cache.v[:n], lengths=ctx.lengths - 1)
        return state.cache

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[Any, Draft]:
        batch = self._check(ctx)
        pending = pending_tokens(ctx)
        tokens, probs, conf = draft_chain(ctx.weights, self.cfg, self._cache(state, ctx), pending, self.k,
                                          self.sampling_cfg if ctx.sampling is None else ctx.sampling, rng)
        num = jnp.where(ctx.active, self.k, 0).astype(jnp.int32)
        chex.assert_shape(tokens, (batch, self.k))
        return state, Draft(tokens=tokens, num=num, probs=probs, confidence=conf)

    def update(self, state, ctx: Context, prev_lengths: jax.Array):
        """Own cache: run the draft on the K+1 slots from its length, which cover every token the step
        committed (the pending one, for which nothing is computed yet, excepted)."""
        if self.shares_cache:
            return state
        start = state.cache.lengths
        window = gather_rows(ctx.tokens, start[:, None] + jnp.arange(self.k + 1))
        out = transformer.forward(ctx.weights, self.cfg, window, state.cache,
                                  logit_positions=jnp.zeros((window.shape[0], 1), jnp.int32))
        return DraftState(cache=out.cache.with_lengths(jnp.maximum(ctx.lengths - 1, start)))
