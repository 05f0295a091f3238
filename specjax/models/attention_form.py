"""From which batch size one-token attention should score the cache's keys as a multiply-and-reduce
instead of batched dots. Chosen by timing on the machine at hand, never assumed.

A decode step's attention over a [B, KV, S, hd] cache is, as batched dots, B x KV products of a few
query rows (the heads of a group) with S keys. XLA:CPU runs these degenerate products far below the
machine's bandwidth once B grows: on a 2-core AMD EPYC, 64 rows over 512 slots read their keys and
values at about 6 GB/s, and as a multiply-and-reduce the same scores came 2.6x faster, while at one
row the dots were faster (docs/decode_profile.md). Where the two cross differs between CPUs, so `load`
times both forms at a few batch sizes (a few seconds, once per machine and model: the result is kept
in `<cache>/step_costs.json` beside the step costs) and sets `ModelConfig.reduce_scores_from` to the
smallest timed batch from which the reduce form wins by MARGIN at every larger one (0: never).
`SPECJAX_REDUCE_SCORES_FROM=N` sets it instead (0 turns it off). Both forms give the same scores up
to float rounding, so a choice changes sampled outputs only where a rounding flips a near-tie.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from specjax import step_cost
from specjax.config import ModelConfig
from specjax.models import transformer

ENV = "SPECJAX_REDUCE_SCORES_FROM"
# not 1: one row's caches of a few layers fit in the CPU's caches, where the timing favoured the reduce
# form, while in the decode loop (whose weights evict them) one row ran 7% slower with it
BATCHES = (4, 16, 64)
SLOTS = 512  # a cache of a long answer's size; the crossing moves little with it
LAYERS = 8  # distinct caches chained (25 MB at 4 rows), so that keys come from memory as in a step
# the reduce form is kept only where it is this much faster: below it, timing noise on a shared machine
# would flip the choice between processes (and with it the compiled programs and sampled outputs)
MARGIN = 0.05
REPEATS = 7
# models smaller than this (tiny test models) keep the dots without timing: their steps cost nothing
# either way, and a timing at every load would cost more than it could save
MIN_MODEL_BYTES = 64 << 20


def from_env() -> int | None:
    """`SPECJAX_REDUCE_SCORES_FROM`, checked, or None when unset."""
    return step_cost.env_rows(ENV, "0 = never")


@functools.partial(jax.jit, static_argnums=(0,))
def _attention(cfg: ModelConfig, q: jax.Array, caches: tuple, mask: jax.Array) -> jax.Array:
    """LAYERS one-token attentions over distinct caches, each query fed by the last output."""
    b, _, h, hd = q.shape
    kv_new = jnp.zeros((b, 1, cfg.num_kv_heads, hd), q.dtype)
    for k, v in caches:
        out = transformer._attend(q, kv_new, kv_new, jnp.ones((1, 1), bool), (k, v, mask), cfg)
        q = q + out.reshape(b, 1, h, hd)
    return q


def measure(cfg: ModelConfig, dtype: Any, batches: tuple[int, ...] = BATCHES) -> dict[tuple[int, str], float]:
    """Seconds of LAYERS one-token attentions at each batch size, as dots and as multiply-and-reduce."""
    keys = iter(jax.random.split(jax.random.key(0), len(batches) * (2 * LAYERS + 1)))
    normal = lambda shape: jax.random.normal(next(keys), shape, dtype)  # made by XLA: quick at 400 MB
    runs = {}
    for b in batches:
        shape = (b, cfg.num_kv_heads, SLOTS, cfg.head_dim)
        caches = tuple((normal(shape), normal(shape)) for _ in range(LAYERS))
        q = normal((b, 1, cfg.num_heads, cfg.head_dim))
        mask = jnp.broadcast_to(jnp.arange(SLOTS) < SLOTS // 2, (b, 1, SLOTS))
        for form, start in (("dots", 0), ("reduce", b)):
            form_cfg = dataclasses.replace(cfg, reduce_scores_from=start)
            runs[(b, form)] = functools.partial(_attention, form_cfg, q, caches, mask)
    return step_cost.interleaved_seconds(runs, REPEATS)


def crossing(secs: dict[tuple[int, str], float], batches: tuple[int, ...] = BATCHES) -> int:
    """The smallest batch from which the reduce form beats the dots by MARGIN at every larger timed
    batch; 0 when it does not win at the largest."""
    chosen = 0
    for b in sorted(batches, reverse=True):
        if secs[(b, "reduce")] >= (1 - MARGIN) * secs[(b, "dots")]:
            break
        chosen = b
    return chosen


def choose(cfg: ModelConfig, params: Any, mesh: Any = None, before_timing: Callable[[], None] | None = None) -> int:
    """`reduce_scores_from` for this model on this machine: the env value, else 0 off the CPU, for a
    sharded model or a tiny one, else the timed choice (from the cache folder when measured before)."""
    chosen = from_env()
    if chosen is not None:
        return chosen
    if not params.get("layers") or mesh is not None or jax.devices()[0].platform != "cpu":
        return 0
    if sum(x.nbytes for x in jax.tree.leaves(params)) < MIN_MODEL_BYTES:
        return 0
    dtype = transformer.compute_dtype(params)
    model = step_cost.model_key(dataclasses.replace(cfg, reduce_scores_from=0), params)
    forms = [(b, form) for b in BATCHES for form in ("dots", "reduce")]
    keys = [step_key(model, b, form) for b, form in forms]

    def timed(todo: list[str]) -> dict[str, float]:
        if before_timing is not None:
            before_timing()
        secs = measure(cfg, dtype)
        return {k: secs[f] for k, f in zip(keys, forms) if k in todo}

    secs, _ = step_cost.cached_seconds(keys, timed, "two forms of one-token attention")
    return crossing(dict(zip(forms, secs)))


def step_key(model: str, batch: int, form: str) -> str:
    return step_cost.step_key("attention-scores", model, batch, SLOTS, f"{form}-{LAYERS}layers")


def configure(cfg: ModelConfig, params: Any, mesh: Any = None,
              before_timing: Callable[[], None] | None = None) -> ModelConfig:
    """`cfg` with `reduce_scores_from` set by `choose`."""
    return dataclasses.replace(cfg, reduce_scores_from=choose(cfg, params, mesh, before_timing))
