"""Static KV cache: fixed-size buffers plus a per-row length.

Layout per layer: k, v are [batch, kv_heads, max_len, head_dim] (kv-heads before positions, so the
attention dots need no transpose of the cache). Layers are separate arrays in a tuple, not one stacked
buffer: a static layer index into a stacked buffer costs a copy of that layer per step on CPU.

A forward pass writes new keys/values at slots `lengths[b] + t` but never moves `lengths`: the caller
commits what it accepted by setting the new lengths. Rejecting draft tokens is therefore just not
advancing the length (or moving it back); stale slots past a row's length are masked and overwritten.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int

from specjax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer: [B, KV, S, hd]
    v: tuple[jax.Array, ...]
    lengths: Int[Array, "B"]  # committed tokens per row

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    def with_lengths(self, lengths: Int[Array, "B"]) -> "KVCache":
        """Commit (or roll back to) `lengths` tokens per row; buffers are untouched."""
        return self.replace(lengths=lengths.astype(jnp.int32))

    def select_rows(self, rows: Int[Array, "N"]) -> "KVCache":
        """A cache whose row i is a copy of row `rows[i]` (e.g. one prefilled prompt -> N branches)."""
        take = lambda a: jnp.take(a, rows, axis=0)
        return KVCache(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)), lengths=take(self.lengths))


def compact(cache: KVCache, start: Int[Array, "B"], path: Int[Array, "B D"]) -> KVCache:
    """After a tree verify wrote node j at slot start + j: moves the accepted path's nodes path[b, :]
    to slots start + 1, start + 2, ... (the root stays at `start`), so the cache is a plain history again.
    Entries past the accepted depth are junk past the committed length, as after any verify."""
    b, d = path.shape
    src = (start[:, None] + path)[:, None, :, None]  # [B, 1, D, 1] slots to read
    dst = start[:, None] + 1 + jnp.arange(d)[None]

    def move(buf):
        picked = jnp.take_along_axis(buf, jnp.clip(src, 0, buf.shape[2] - 1), axis=2)  # [B, KV, D, hd]
        return write(buf, picked.transpose(0, 2, 1, 3), dst)

    return cache.replace(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)))


def write(layer_cache: jax.Array, new: jax.Array, slots: Int[Array, "B T"]) -> jax.Array:
    """Writes new [B, T, KV, hd] entries into a layer buffer [B, KV, S, hd]: entry t of row b at slot
    slots[b, t].

    A scatter of just the B*T new rows, in place in the decode loop's donated buffers (XLA:CPU needs
    the region-analysis copy insertion `specjax.xla_flags` sets to see that, or it copies every buffer
    each step: `tests/test_decode_buffers.py`). Slots outside the buffer are dropped, never clamped
    onto earlier slots."""
    b, t = slots.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return layer_cache.at[rows, :, slots].set(new.astype(layer_cache.dtype), mode="drop")


def write_layers(cache: KVCache, new_kv: tuple[tuple[jax.Array, jax.Array], ...], slots: Int[Array, "B T"]) -> KVCache:
    """Every layer's new (k, v) [B, T, KV, hd] (a `forward(write_cache=False)`'s `new_kv`) written at
    `slots`: after the forward, whose attention read the cache and the new entries apart, so that the
    write is in place even inside the verify step's loops."""
    return cache.replace(k=tuple(write(c, k, slots) for c, (k, _) in zip(cache.k, new_kv)),
                         v=tuple(write(c, v, slots) for c, (_, v) in zip(cache.v, new_kv)))
