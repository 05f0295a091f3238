"""Logits processing and sampling, shared by the target and every drafter.

Speculative sampling is lossless with respect to the *processed* target distribution, and only if the
draft distribution q went through the same processing: target and drafters therefore all call
`process_logits` with the same `SamplingConfig` (a static argument; its checks below are Python `if`s,
so an inactive processor costs nothing in the compiled program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from specjax.config import SamplingConfig


def process_logits(logits: Float[Array, "... V"], cfg: SamplingConfig) -> Float[Array, "... V"]:
    """Normalised float32 log-probs after temperature, then top-k, then top-p; removed tokens are -inf.

    Top-p keeps the smallest set of tokens, most likely first, whose mass is >= top_p (always the top
    token), measured after top-k. Ties at a cut-off keep every tied token. A greedy config
    (temperature 0) is processed at temperature 1: the argmax is unchanged and drafters that rank
    candidates still get an informative distribution; `sample` takes the argmax.
    """
    x = logits.astype(jnp.float32)
    if not cfg.greedy and cfg.temperature != 1.0:
        x = x / cfg.temperature
    top_k = 0 < cfg.top_k < x.shape[-1]
    if top_k:
        # The barrier keeps XLA:CPU from rewriting a slice of top_k's output into a full sort (~100x slower).
        top = lax.optimization_barrier(lax.top_k(x, cfg.top_k)[0])  # sorted, descending
        x = jnp.where(x < top[..., -1:], -jnp.inf, x)
    if cfg.top_p < 1.0 and top_k:  # the nucleus lies within the k sorted survivors
        p = jax.nn.softmax(top, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p  # mass of the tokens ranked above each token
        keep = jnp.sum(before < cfg.top_p, axis=-1, keepdims=True)  # >= 1: before[0] == 0
        x = jnp.where(x < jnp.take_along_axis(top, keep - 1, axis=-1), -jnp.inf, x)
    elif cfg.top_p < 1.0:
        x = jnp.where(_nucleus(x, cfg.top_p), x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def _nucleus(x: Float[Array, "... V"], top_p: float) -> Array:
    """Mask of the tokens with x >= t, for the largest t whose mass is still >= top_p.

    t is found bit by bit over order-preserving uint32 keys of x: 32 passes over V, ~14x faster than
    sorting V ~ 49k on CPU, and exact. If rounding leaves the total mass below top_p, all is kept.
    """
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # same order as x
    p = jax.nn.softmax(x, axis=-1)

    def next_bit(i, t):
        cand = t | (jnp.uint32(1 << 31) >> i.astype(jnp.uint32))
        enough = jnp.sum(jnp.where(keys >= cand, p, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(enough, cand, t)

    t = lax.fori_loop(0, 32, next_bit, jnp.zeros(x.shape[:-1] + (1,), jnp.uint32))
    return keys >= t


def probs(logits: Float[Array, "... V"], cfg: SamplingConfig) -> Float[Array, "... V"]:
    """`process_logits` as probabilities: what a drafter stores in `Draft.probs`."""
    return jnp.exp(process_logits(logits, cfg))


def sample(rng: jax.Array, logits: Float[Array, "... V"], cfg: SamplingConfig) -> Int[Array, "..."]:
    """One token per leading index: the argmax when greedy (rng unused), else a draw from the processed logits."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, process_logits(logits, cfg), axis=-1).astype(jnp.int32)
