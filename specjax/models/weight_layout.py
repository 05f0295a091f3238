"""From how many rows a product with a layer matrix should read it as [out, in] (PyTorch's layout,
contracted over both last axes) instead of [in, out] (`x @ w`, as loading converts it). Chosen by
timing the model's own forwards on the machine at hand, never assumed.

A verify forward multiplies a few rows (the draft's tokens, times the batch) by every layer matrix, and
XLA:CPU lowers a float32 product of more than one row differently for the two layouts. On a 2-core
Xeon with AMX, the default model's whole forward took, [in, out] against [out, in]: 22.4 / 26.9 ms
at one row, 51.7 / 53.0 at 5, 63.9 / 57.5 at 9, and at batch 8: 57.0 / 53.9 ms at 1 token, 77.1 /
67.2 at 3, 114.8 / 86.3 at 5. So one-row steps want [in, out] and verifies of 8 rows or more want
[out, in]. `load` times the forward at 1, 2, 4, 8, 16 and 32 rows in both layouts (about 11 s for the
default model on a 2-core CPU, once per machine and model: kept in `<cache>/step_costs.json`) and sets
`ModelConfig.transposed_from` to the fewest timed rows from which [out, in] wins by MARGIN at every
larger count (0: never). Products of fewer rows keep [in, out]: where both are used the layer holds
both copies (`<name>` and `<name>_t`), one more copy of the layer matrices in memory, which is held
only where it takes at most MAX_MEMORY_SHARE of the machine's memory; from 1 row on, the [out, in]
copy alone. `SPECJAX_TRANSPOSED_FROM=N` sets it instead (0 turns it off; a sharded model keeps
[in, out]). The two layouts give the same products up to float32 rounding.
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

ENV = "SPECJAX_TRANSPOSED_FROM"
NAMES = ("wqkv", "wo", "w_gate_up", "w_down")  # a dense layer's matrices (a sparse layer's experts stay)
SUFFIX = "_t"  # the name of a matrix held as [out, in]
ROWS = (1, 2, 4, 8, 16, 32)  # timed as one row's forward of that many tokens
# [out, in] is used only from where it is this much faster: below it, timing noise on a shared machine
# would flip the choice between processes (and with it the compiled programs)
MARGIN = 0.03
# layers' matrices smaller than this (tiny test models) stay [in, out] without timing
MIN_LAYER_BYTES = 64 << 20
# a second copy of the layer matrices is held only where it takes at most this share of the memory
MAX_MEMORY_SHARE = 0.125
REPEATS = 5


def arranged(params: Any, rows_from: int) -> Any:
    """`params` as `transposed_from = rows_from` reads them: unchanged for 0, every dense layer's
    matrices as [out, in] (`<name>_t`) for 1, both copies beside each other above 1."""
    if rows_from == 0:
        return params

    def layer(lp: dict) -> dict:
        out = {k: v for k, v in lp.items() if rows_from > 1 or k not in NAMES}
        out.update({k + SUFFIX: jnp.asarray(v.T) for k, v in lp.items() if k in NAMES})
        return out

    return dict(params, layers=tuple(layer(lp) for lp in params["layers"]))


def standard(lp: dict) -> dict:
    """One layer's params with its matrices as [in, out] under their own names only (an EAGLE head
    starts from a copy of the target's last layer in that form)."""
    out = {k: v for k, v in lp.items() if not (k.endswith(SUFFIX) and k[:-len(SUFFIX)] in NAMES)}
    out.update({k[:-len(SUFFIX)]: jnp.asarray(v.T) for k, v in lp.items()
                if k.endswith(SUFFIX) and k[:-len(SUFFIX)] in NAMES and k[:-len(SUFFIX)] not in lp})
    return out


def plain(params: Any) -> Any:
    """`params` with every layer's matrices as [in, out] only (`transposed_from = 0`)."""
    return dict(params, layers=tuple(standard(lp) for lp in params["layers"]))


def from_env() -> int | None:
    """`SPECJAX_TRANSPOSED_FROM`, checked, or None when unset."""
    return step_cost.env_rows(ENV, "0 = never read layer matrices as [out, in], 1 = always")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _forward(params: Any, cfg: ModelConfig, rows: int) -> jax.Array:
    """One row's forward of `rows` tokens (no cache): every layer's products at that many rows, plus
    what does not depend on the layout (the LM head, norms, attention)."""
    return transformer.forward(params, cfg, jnp.ones((1, rows), jnp.int32)).logits


def measure(cfg: ModelConfig, params: Any) -> dict[tuple[int, int], float]:
    """Seconds of the forward at each of ROWS in each layout ((rows_from, rows): 0 = [in, out], 1 =
    [out, in]), timed in interleaved rounds."""
    forms = {0: params, 1: arranged(params, 1)}
    cfgs = {0: cfg, 1: dataclasses.replace(cfg, transposed_from=1)}
    runs = {(f, r): (lambda f=f, r=r: _forward(forms[f], cfgs[f], r)) for f in forms for r in ROWS}
    return step_cost.interleaved_seconds(runs, REPEATS)


def pick(secs: dict[tuple[int, int], float]) -> int:
    """The rule on timed forwards: the fewest timed rows from which [out, in] takes at most 1 - MARGIN
    of [in, out]'s time at every larger count; 0 when it does not at the most rows."""
    chosen = 0
    for rows in reversed(ROWS):
        if secs[(1, rows)] > (1 - MARGIN) * secs[(0, rows)]:
            break
        chosen = rows
    return chosen


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def choose(cfg: ModelConfig, params: Any, mesh: Any = None, before_timing: Callable[[], None] | None = None) -> int:
    """`transposed_from` for this model on this machine: 0 for a sharded model, else the env value, else
    0 where the choice does not arise (an accelerator, weights in another dtype than activations, a
    small model), else the timed choice (from the cache folder when measured before), 0 where both copies
    would take more than MAX_MEMORY_SHARE of the memory. `before_timing` runs first when the layouts
    must be timed (the caller's own background work must be over)."""
    layers = [lp for lp in params.get("layers", ()) if all(k in lp for k in NAMES)]
    chosen = from_env()  # checked first: a bad value is an error wherever it would apply
    if not layers or mesh is not None:  # (the sharding rules place [in, out] matrices only)
        return 0
    if chosen is not None:
        return chosen
    if jax.devices()[0].platform != "cpu":
        return 0
    act = transformer.compute_dtype(params)
    mats = [lp[k] for lp in layers for k in NAMES]
    size = sum(w.nbytes for w in mats)
    if any(w.dtype != act for w in mats) or size < MIN_LAYER_BYTES:
        return 0
    model = step_cost.model_key(cfg, params)
    timings = [(f, r) for f in (0, 1) for r in ROWS]
    keys = [step_cost.step_key("layout-forward", model, 1, 0, f"{'out_in' if f else 'in_out'}-w{r}")
            for f, r in timings]

    def timed(todo: list[str]) -> dict[str, float]:
        if before_timing is not None:
            before_timing()
        secs = measure(cfg, params)
        return {k: secs[t] for k, t in zip(keys, timings) if k in todo}

    secs, _ = step_cost.cached_seconds(keys, timed, "the model's products in two weight layouts")
    chosen = pick(dict(zip(timings, secs)))
    if chosen > 1 and size > MAX_MEMORY_SHARE * _memory_bytes():
        return 0
    return chosen


def configure(cfg: ModelConfig, params: Any, mesh: Any = None,
              before_timing: Callable[[], None] | None = None) -> tuple[ModelConfig, Any]:
    """`cfg` with `transposed_from` set by `choose`, and the params arranged for it."""
    rows_from = choose(cfg, params, mesh, before_timing)
    return dataclasses.replace(cfg, transposed_from=rows_from), arranged(params, rows_from)
