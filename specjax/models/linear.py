"""The decoder's one matmul rule, shared by dense and sparse layers: full precision, or weights held
in bf16 beside float32 activations (`specjax.load(matmul_dtype="bfloat16")`), the fast form on
CPUs with AMX/AVX512-BF16 where a float32 dot of more than one row is compute-bound."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array

# XLA:CPU compiles a bf16 dot of at least this many rows to a YNNPACK kernel (`ynn_fusion`), and one
# of fewer to a float32 loop, ~10x slower (the LM head: 29.8 ms at 1 row, 2.6 ms at 4)
MIN_LOW_PRECISION_ROWS = 4


def matmul(x: Array, w: Array, out_dtype=None) -> Array:
    """`x @ w` over the last axis. With weights in a lower precision than x (`load(matmul_dtype=)`),
    x is cast to it and the product accumulated in float32, then returned in x's dtype (or
    `out_dtype`); the rows are padded up to MIN_LOW_PRECISION_ROWS, which XLA:CPU needs for its fast
    bf16 path (a few wasted rows elsewhere)."""
    out_dtype = out_dtype or x.dtype
    if w.dtype == x.dtype:
        return jnp.dot(x, w, preferred_element_type=out_dtype) if out_dtype != x.dtype else x @ w
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(w.dtype)
    m = rows.shape[0]
    if m < MIN_LOW_PRECISION_ROWS:
        rows = jnp.pad(rows, ((0, MIN_LOW_PRECISION_ROWS - m), (0, 0)))
    y = jnp.dot(rows, w, preferred_element_type=jnp.float32)[:m]
    return y.reshape(*lead, w.shape[-1]).astype(out_dtype)
