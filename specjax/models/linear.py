"""The decoder's one matmul rule, shared by dense and sparse layers: full precision, or weights held
in bf16 beside float32 activations (`specjax.load(matmul_dtype="bfloat16")`), the fast form on
CPUs with AMX/AVX512-BF16 where a float32 dot of more than one row is compute-bound."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array

# XLA:CPU compiles a bf16 dot of at least this many rows to a YNNPACK kernel (`ynn_fusion`), and one
# of fewer to a float32 loop, ~10x slower (the LM head: 29.8 ms at 1 row, 2.6 ms at 4)
MIN_LOW_PRECISION_ROWS = 4


def matmul(x: Array, w: Array, out_dtype=None, blocks: int = 1) -> Array:
    """`x @ w` over the last axis. With weights in a lower precision than x (`load(matmul_dtype=)`),
    x is cast to it and the product accumulated in float32, then returned in x's dtype (or
    `out_dtype`); the rows are padded up to MIN_LOW_PRECISION_ROWS, which XLA:CPU needs for its fast
    bf16 path (a few wasted rows elsewhere). `blocks` > 1 splits a one-row product (see `split_gemv`)."""
    out_dtype = out_dtype or x.dtype
    if w.dtype == x.dtype:
        rows = math.prod(x.shape[:-1])
        if blocks > 1 and rows == 1 and out_dtype == x.dtype and w.shape[0] % blocks == 0:
            return split_gemv(x, w, blocks)
        return jnp.dot(x, w, preferred_element_type=out_dtype) if out_dtype != x.dtype else x @ w
    return _low_precision(x, w, out_dtype, 0)


def _low_precision(x: Array, w: Array, out_dtype, w_in: int) -> Array:
    """x (cast to w's dtype) times w over w's axis `w_in`, accumulated in float32, the rows padded up to
    MIN_LOW_PRECISION_ROWS."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(w.dtype)
    m = rows.shape[0]
    if m < MIN_LOW_PRECISION_ROWS:
        rows = jnp.pad(rows, ((0, MIN_LOW_PRECISION_ROWS - m), (0, 0)))
    y = jax.lax.dot_general(rows, w, (((1,), (w_in,)), ((), ())), preferred_element_type=jnp.float32)[:m]
    return y.reshape(*lead, y.shape[-1]).astype(out_dtype)


def matmul_t(x: Array, wt: Array, out_dtype=None) -> Array:
    """`x @ wt.T` over the last axis: `matmul` for a matrix held as [out, in] (`models/weight_layout.py`),
    contracted over both last axes, with the same precision rule (float32 accumulation of lower-precision
    weights, rows padded up to MIN_LOW_PRECISION_ROWS)."""
    out_dtype = out_dtype or x.dtype
    if wt.dtype != x.dtype:
        return _low_precision(x, wt, out_dtype, 1)
    acc = out_dtype if out_dtype != x.dtype else None
    return jax.lax.dot_general(x, wt, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=acc)


def split_gemv(x: Array, w: Array, blocks: int) -> Array:
    """One row times w as a batched product of `blocks` slices of the inner dimension, summed.

    XLA:CPU compiles a plain one-row dot to its own matrix-vector kernel and runs a layer-sized one on
    a single core (docs/decode_profile.md); written as a batched dot it is lowered differently, and on
    a 2-core Xeon a batch-1 decode step of the default model took 7% less time. Whether it pays is
    measured per machine (`models/gemv_blocks.py`). The reshape of w is free (row-major, contiguous
    slices); the sum changes the float32 rounding in the last bits only."""
    i, o = w.shape
    parts = x.reshape(1, blocks, i // blocks).transpose(1, 0, 2)  # [blocks, 1, i / blocks]
    y = jnp.einsum("bki,bio->bko", parts, w.reshape(blocks, i // blocks, o)).sum(0)
    return y.reshape(*x.shape[:-1], o)
