"""How this machine should run a layer's one-row matmuls: plain, or split into blocks of the inner
dimension (`linear.split_gemv`). Chosen by timing the model's own layer matrices, never assumed.

A batch-1 decode step is a chain of one-row products. XLA:CPU lowers a plain one to a kernel that runs
the smaller layer matrices on one core; the split form is lowered as a batched dot and, on a 2-core
Xeon with AMX, cut a step of the default model by 7% (docs/decode_profile.md), while at 8 rows it was
slower (so only one-row products split). Another CPU or XLA release may differ, so `load` times the
decoder's one-token forward at 1, 2 and 4 blocks (a few seconds for the default model on a 2-core
CPU, once per machine and model: the result is kept in `<cache>/step_costs.json` beside the step
costs) and keeps the split only where it beats the plain dot by MARGIN. `SPECJAX_GEMV_BLOCKS=N` sets
it instead (1 turns it off).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from specjax import step_cost
from specjax.config import ModelConfig
from specjax.models import transformer

ENV = "SPECJAX_GEMV_BLOCKS"
CANDIDATES = (1, 2, 4)
# a split is kept only when its forward is this much faster than with plain dots: below it, timing noise on a
# shared machine would flip the choice between processes (and with it the compiled programs)
MARGIN = 0.03
# layers' matrices smaller than this (tiny test models) fit in cache, where the split has nothing to
# gain: they keep plain dots without timing
MIN_LAYER_BYTES = 64 << 20
REPEATS = 7


def _matrices(lp: dict) -> tuple[jax.Array, ...]:
    return tuple(lp[k] for k in ("wqkv", "wo", "w_gate_up", "w_down") if k in lp)


def _fits(layers: list[dict], blocks: int) -> bool:
    return all(w.shape[0] % blocks == 0 for lp in layers for w in _matrices(lp))


def from_env(cfg: ModelConfig, layers: list[dict]) -> int | None:
    """`SPECJAX_GEMV_BLOCKS`, checked, or None when unset."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV}={value!r}: set a whole number of blocks, at least 1 (1 = plain dots), "
                         f"or unset it to let specjax time the choice")
    blocks = int(value)
    if not _fits(layers, blocks):
        raise ValueError(f"{ENV}={blocks} does not divide every layer matrix's inner dimension "
                         f"(hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}); "
                         f"choose one of {[n for n in CANDIDATES if _fits(layers, n)]}")
    return blocks


@functools.partial(jax.jit, static_argnums=1)
def _one_token(params: Any, cfg: ModelConfig) -> jax.Array:
    """The decoder's own forward of one token (no cache): every layer's one-row products, as decoding
    runs them, plus what does not depend on the split (the LM head, norms)."""
    return transformer.forward(params, cfg, jnp.ones((1, 1), jnp.int32)).logits


def measure(cfg: ModelConfig, params: Any, candidates: tuple[int, ...]) -> dict[int, float]:
    """Seconds of a one-token forward at each number of blocks, timed in interleaved rounds."""
    runs = {n: (lambda n=n: _one_token(params, dataclasses.replace(cfg, gemv_blocks=n))) for n in candidates}
    return step_cost.interleaved_seconds(runs, REPEATS)


def choose(cfg: ModelConfig, params: Any, mesh: Any = None, before_timing: Callable[[], None] | None = None) -> int:
    """The number of blocks for this model on this machine: the env value, else 1 where a split
    cannot help (a sharded model, an accelerator, weights held in another dtype than activations, a
    small model), else the timed choice (from the cache folder when measured before).

    `before_timing` runs first when the forms must be timed: the caller's own background work must
    be over by then. The split forms need both cores, so they time slower beside any other busy
    thread; on a 2-core AMD EPYC a tokenizer loading alongside had the plain dots chosen (26.2 / 26.9
    ms at 1 / 4 blocks, where alone they took 22.4 / 20.0), and decoding ran 12% slower for it."""
    layers = [lp for lp in params.get("layers", ()) if "wqkv" in lp]
    chosen = from_env(cfg, layers)
    if chosen is not None:
        return chosen
    if not layers or mesh is not None or jax.devices()[0].platform != "cpu":
        return 1
    act = transformer.compute_dtype(params)
    mats = [w for lp in layers for w in _matrices(lp)]
    if any(w.dtype != act for w in mats) or sum(w.nbytes for w in mats) < MIN_LAYER_BYTES:
        return 1
    candidates = tuple(n for n in CANDIDATES if _fits(layers, n))
    model = step_cost.model_key(cfg, params)
    keys = [step_cost.step_key("gemv-forward", model, 1, 0, f"blocks{n}") for n in candidates]

    def timed(todo: list[str]) -> dict[str, float]:
        if before_timing is not None:
            before_timing()
        secs = measure(cfg, params, candidates)
        return {k: secs[n] for k, n in zip(keys, candidates) if k in todo}

    secs, _ = step_cost.cached_seconds(keys, timed, "the model's one-row products in blocks")
    best = min(range(len(candidates)), key=secs.__getitem__)
    return candidates[best] if secs[best] < (1 - MARGIN) * secs[0] else 1


def configure(cfg: ModelConfig, params: Any, mesh: Any = None,
              before_timing: Callable[[], None] | None = None) -> ModelConfig:
    """`cfg` with `gemv_blocks` set by `choose`."""
    return dataclasses.replace(cfg, gemv_blocks=choose(cfg, params, mesh, before_timing))
