"""Routed experts for the one decoder: Mixtral, Qwen2-MoE (with its gated shared expert), Qwen3-MoE.

A sparse layer replaces the dense MLP params (`w_gate_up`, `w_down`) with

    router        [D, E]       softmax over experts, top-k, renormalised when the checkpoint says so
    we_gate_up    [E, D, 2F]   every expert's gate and up projections, fused
    we_down       [E, F, D]
    shared_gate_up [D, 2Fs], shared_down [Fs, D], shared_gate [D, 1]   (Qwen2-MoE only)

Expert compute is picked by shape, statically inside jit: when the token-expert pairs are fewer than
the experts (decode, short verifies), each token gathers only its own experts' weights, so a step
reads the activated experts and no others (what makes sparse MoE decode cheap, and what MoESD's
N(t) counts); otherwise the pairs are sorted by expert and run as one grouped matmul
(`jax.lax.ragged_dot`), which reads each expert once however many tokens it serves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specjax.config import ModelConfig
from specjax.models.linear import matmul


def route(x: Float[Array, "N D"], router: Float[Array, "D E"], k: int,
          norm_topk: bool) -> tuple[Float[Array, "N K"], Int[Array, "N K"]]:
    """Top-k routing weights (float32) and expert ids per token, as the HF reference computes them."""
    probs = jax.nn.softmax(jnp.dot(x, router, preferred_element_type=jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, k)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, idx.astype(jnp.int32)


def _glu(gate_up: jax.Array) -> jax.Array:
    f = gate_up.shape[-1] // 2
    return jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]


def experts_gather(x: Float[Array, "N D"], we_gate_up, we_down, idx: Int[Array, "N K"],
                   weights: Float[Array, "N K"]) -> jax.Array:
    """Each token runs its own K experts, read by gathering their weights: N*K expert reads."""
    act = _glu(jnp.einsum("nd,nkdf->nkf", x, jnp.take(we_gate_up, idx, axis=0)))
    out = jnp.einsum("nkf,nkfd->nkd", act, jnp.take(we_down, idx, axis=0))
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


def experts_grouped(x: Float[Array, "N D"], we_gate_up, we_down, idx: Int[Array, "N K"],
                    weights: Float[Array, "N K"]) -> jax.Array:
    """Token-expert pairs sorted by expert, one grouped matmul per projection: each expert read once."""
    n, k = idx.shape
    num_experts = we_gate_up.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    rows = jnp.take(jnp.repeat(x, k, axis=0), order, axis=0)  # pair p = token p // k
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    act = _glu(jax.lax.ragged_dot(rows, we_gate_up, sizes))
    out = jax.lax.ragged_dot(act, we_down, sizes)
    out = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)  # back to token-major pairs
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


def moe_mlp(lp, cfg: ModelConfig, h: Float[Array, "B T D"]) -> tuple[jax.Array, jax.Array]:
    """The sparse MLP of one layer: (output [B, T, D], distinct experts activated by these tokens)."""
    b, t, d = h.shape
    x = h.reshape(b * t, d)
    weights, idx = route(x, lp["router"], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    run = experts_gather if b * t * cfg.num_experts_per_tok < cfg.num_experts else experts_grouped
    y = run(x, lp["we_gate_up"], lp["we_down"], idx, weights)
    if "shared_gate_up" in lp:
        shared = matmul(_glu(matmul(x, lp["shared_gate_up"])), lp["shared_down"])
        y = y + jax.nn.sigmoid(x @ lp["shared_gate"]) * shared
    activated = jnp.sum(jnp.any(jax.nn.one_hot(idx, cfg.num_experts, dtype=bool), axis=(0, 1)))
    return y.reshape(b, t, d).astype(h.dtype), activated


def init_moe(cfg: ModelConfig, normal) -> dict:
    """Random sparse-MLP params (tests, synthetic sweeps); `normal(shape)` draws the weights."""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    lp = {"router": normal((d, e)), "we_gate_up": normal((e, d, 2 * f)), "we_down": normal((e, f, d))}
    if cfg.shared_expert_intermediate_size:
        fs = cfg.shared_expert_intermediate_size
        lp.update(shared_gate_up=normal((d, 2 * fs)), shared_down=normal((fs, d)), shared_gate=normal((d, 1)))
    return lp
