"""One functional decoder for every supported family (Llama, Llama-3, SmolLM2, Mistral, Qwen2, Qwen3,
and the sparse Mixtral, Qwen2-MoE, Qwen3-MoE: their layers swap the MLP for `moe.moe_mlp`).

Params are a plain pytree; `forward` is a pure function of (params, cfg, tokens, cache). The same code
serves the target, a draft model, a layer-skip self-draft and the features that draft heads read.

Param tree (weights stored [in, out], every matmul `x @ W`, and a layer's matrices also or instead as
[out, in] where `models/weight_layout.py` timed products of many rows faster that way):

    lm_head     [D, V]        (tied models: the embedding table is lm_head's columns)
    embed       [V, D]        (untied models only)
    final_norm  [D]
    layers      tuple of dicts, one per layer (separate buffers: no per-step slicing copies):
        attn_norm [D], wqkv [D, (H + 2 KV) hd], bqkv [(H + 2 KV) hd] (qkv-bias families),
        q_norm [hd], k_norm [hd] (Qwen3), wo [H hd, D], mlp_norm [D], w_gate_up [D, 2 F], w_down [F, D]
        (sparse layers, `cfg.moe_layers`: router, we_gate_up, we_down [, shared_*] instead: see moe.py)
        (and/or wqkv_t, wo_t, w_gate_up_t, w_down_t: the same matrices as [out, in], read by products
        of `cfg.transposed_from` rows or more, where `models/weight_layout.py` found that faster)

q/k/v and gate/up are fused into one matmul each: at batch 1 per-op overhead, not FLOPs, dominates
small matrices on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from specjax.config import ModelConfig
from specjax.models import cache as kv
from specjax.models import moe
from specjax.models.linear import matmul, matmul_t

Params = dict[str, Any]


@struct.dataclass
class ForwardOut:
    logits: Float[Array, "B P V"]  # float32; P = T, or the number of requested logit positions
    hidden: Float[Array, "B T D"]  # last layer output after the final norm
    cache: kv.KVCache | None
    layer_hidden: tuple[jax.Array, ...] = ()  # outputs of the requested layers (pre-norm), [B, T, D] each
    experts_activated: tuple[jax.Array, ...] = ()  # per sparse layer: distinct experts these tokens used
    # write_cache=False: per layer, the new tokens' (k, v) [B, T, KV, hd], for the caller to write
    new_kv: tuple[tuple[jax.Array, jax.Array], ...] = ()


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies for the checkpoint's theta, with Llama-3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = cfg.rope_scaling
    if s is None or s.factor == 1.0:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: Int[Array, "B T"], inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, 1, hd] computed once per forward and shared by every layer."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T N hd"], cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout; GGUF weights are un-permuted at load time)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def embed(params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"]) -> jax.Array:
    if "embed" in params:
        return jnp.take(params["embed"], tokens, axis=0)
    return jnp.take(params["lm_head"], tokens, axis=1).transpose(1, 2, 0)


def context_mask(start: Int[Array, "B"], num_new: int, num_slots: int,
                 sliding_window: int | None) -> Bool[Array, "B T S"]:
    """Which committed cache slots each new token sees: slots before `start[b]`.

    Worked example, start=[2], 5 slots, 2 new tokens, no window:
        t=0: 1 1 0 0 0
        t=1: 1 1 0 0 0
    (slots 2.. hold stale or about-to-be-written entries; new tokens see each other via `new_mask`.)
    """
    slots = jnp.arange(num_slots)[None, None, :]
    visible = jnp.broadcast_to(slots < start[:, None, None], (start.shape[0], num_new, num_slots))
    if sliding_window is not None:
        q_slot = start[:, None, None] + jnp.arange(num_new)[None, :, None]
        visible &= (q_slot - slots) < sliding_window
    return visible


def new_token_mask(num_new: int, tree_mask: Bool[Array, "T T"] | None,
                   sliding_window: int | None = None) -> Bool[Array, "T T"]:
    """Among the new tokens: causal (within the sliding window) for chains, ancestors-and-self for trees."""
    if tree_mask is not None:
        return tree_mask
    i = jnp.arange(num_new)
    causal = i[None, :] <= i[:, None]
    return causal if sliding_window is None else causal & (i[:, None] - i[None, :] < sliding_window)


def _attend(q, k_new, v_new, new_mask, ctx, cfg: ModelConfig) -> jax.Array:
    """Attention of new tokens over the committed cache plus themselves; softmax in float32.

    q [B,T,H,hd]; k_new/v_new [B,T,KV,hd]; new_mask [T,T] or per row [B,T,T];
    ctx = (K, V [B,KV,S,hd], mask [B,T,S]) or None.
    Heads are grouped as [B, KV, G*T, hd] and the cache is used in its stored 4-D shape: reshaping the
    freshly updated cache makes XLA duplicate the update into two buffers and copy every layer's cache
    on every step (measured: 240 cache copies per decode step).
    """
    b, t, _, hd = q.shape
    nkv, g = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(b, t, nkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, nkv, g * t, hd)
    scores_of = lambda k: jax.lax.dot_general(qg, k.astype(q.dtype), (((3,), (3,)), ((0, 1), (0, 1))),
                                              preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
    neg = jnp.finfo(jnp.float32).min

    def masked(scores, mask):  # scores [B, KV, G*T, N], mask [B or 1, T, N]
        s5 = scores.reshape(b, nkv, g, t, -1)
        return jnp.where(mask[:, None, None], s5, neg).reshape(scores.shape)

    new_k, new_v = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
    parts = [masked(scores_of(new_k), new_mask if new_mask.ndim == 3 else new_mask[None])]
    if ctx is not None:
        if t == 1 and 0 < cfg.reduce_scores_from <= b:  # see models/attention_form.py
            keys = ctx[0][:, :, None].astype(jnp.float32)  # [B, KV, 1, S, hd] against [B, KV, G, 1, hd]
            ctx_scores = jnp.sum(qg[:, :, :, None, :].astype(jnp.float32) * keys, -1) * (1.0 / math.sqrt(hd))
        else:
            ctx_scores = scores_of(ctx[0])
        parts.insert(0, masked(ctx_scores, ctx[2]))
    probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1).astype(q.dtype)
    pv = lambda p, v: jax.lax.dot_general(p, v.astype(q.dtype), (((3,), (2,)), ((0, 1), (0, 1))))
    out = pv(probs[..., -t:], new_v)
    if ctx is not None:
        out = out + pv(probs[..., : ctx[0].shape[2]], ctx[1])
    return out.reshape(b, nkv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads * hd)


def _dense(x: jax.Array, lp: Params, name: str, cfg: ModelConfig) -> jax.Array:
    """x times the layer's matrix `name`: read as [out, in] (`name + "_t"`) in products of at least
    `cfg.transposed_from` rows, where that multiplies faster on this machine (`models/weight_layout.py`),
    else as [in, out] (a layer may hold both)."""
    rows = math.prod(x.shape[:-1])
    if name + "_t" in lp and (name not in lp or 0 < cfg.transposed_from <= rows):
        return matmul_t(x, lp[name + "_t"])
    return matmul(x, lp[name], blocks=cfg.gemv_blocks)


def decoder_layer(lp: Params, cfg: ModelConfig, x, rope, new_mask, ctx_mask, cache_kv, slots, write: bool = True):
    """One pre-norm decoder layer; shared by every model and by the EAGLE head.

    new_mask [T, T] or [B, T, T] (which new tokens see each other); ctx_mask/cache_kv/slots: the cache
    context (None without a cache). Returns (x, (k, v) buffers with the new entries written, or None,
    distinct experts activated: a scalar for sparse layers, None for dense ones). `write=False` returns
    the new entries themselves ([B, T, KV, hd]) instead, with or without a cache: the context is read
    from the unwritten buffers, which is the same (the context mask covers committed slots only).
    """
    b, t, _ = x.shape
    hd = cfg.head_dim
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    qkv = _dense(h, lp, "wqkv", cfg)
    if "bqkv" in lp:
        qkv = qkv + lp["bqkv"]
    nq, nk = cfg.num_heads * hd, cfg.num_kv_heads * hd
    q = qkv[..., :nq].reshape(b, t, cfg.num_heads, hd)
    k = qkv[..., nq : nq + nk].reshape(b, t, cfg.num_kv_heads, hd)
    v = qkv[..., nq + nk :].reshape(b, t, cfg.num_kv_heads, hd)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, *rope)
    k = apply_rope(k, *rope)
    if cache_kv is None:
        ctx, new_kv = None, (None if write else (k, v))
    elif not write:
        new_kv = (k, v)
        ctx = None if ctx_mask is None else (cache_kv[0], cache_kv[1], ctx_mask)
    else:
        new_kv = (kv.write(cache_kv[0], k, slots), kv.write(cache_kv[1], v, slots))
        ctx = None if ctx_mask is None else (new_kv[0], new_kv[1], ctx_mask)
    x = x + _dense(_attend(q, k, v, new_mask, ctx, cfg), lp, "wo", cfg)
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    if "router" in lp:
        y, activated = moe.moe_mlp(lp, cfg, h)
        return x + y, new_kv, activated
    gate_up = _dense(h, lp, "w_gate_up", cfg)
    f = gate_up.shape[-1] // 2
    x = x + _dense(jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:], lp, "w_down", cfg)
    return x, new_kv, None


def compute_dtype(params: Params):
    """The dtype activations and the KV cache are held in: the norms' (matmul weights may be lower)."""
    return params["final_norm"].dtype


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: Int[Array, "B T"],
    cache: kv.KVCache | None = None,
    *,
    tree_mask: Bool[Array, "T T"] | Bool[Array, "B T T"] | None = None,
    pos_offsets: Int[Array, "T"] | Int[Array, "B T"] | None = None,
    logit_positions: Int[Array, "B P"] | None = None,
    hidden_layers: tuple[int, ...] = (),
    num_layers: int | None = None,
    cache_is_empty: bool = False,
    write_cache: bool = True,
) -> ForwardOut:
    """Runs the decoder on `tokens`.

    Without a cache: a plain causal forward from position 0 (parity checks, training).
    With a cache: token t of row b goes to slot `cache.lengths[b] + t` at position
    `cache.lengths[b] + pos_offsets[t]` (pos_offsets defaults to t; trees pass node depths), attending
    to the committed context plus the new tokens allowed by `tree_mask` (default: causal).
    The returned cache holds the new keys/values but the same lengths: the caller commits.
    `logit_positions` selects which positions get logits (saves the LM head on prefill);
    `num_layers` runs only the first layers (layer-skip self-drafting); `cache_is_empty` (prefill of a
    fresh cache) skips attending to the cache's stale slots. `write_cache=False` leaves the cache as it
    is and returns the new keys/values (`new_kv`) for the caller to write where it chooses: the verify
    step writes a sub-tree's nodes at their whole-tree slots, and writing after the attention has read
    the cache lets XLA:CPU update it in place inside the step's nested loops.
    """
    b, t = tokens.shape
    chex.assert_rank(tokens, 2)
    n_layers = cfg.num_layers if num_layers is None else num_layers
    offsets = jnp.arange(t) if pos_offsets is None else pos_offsets
    if cache is None:
        start = jnp.zeros((b,), jnp.int32)
        num_slots, slots = t, None
    else:
        chex.assert_shape(cache.lengths, (b,))
        start, num_slots = cache.lengths, cache.max_len
        slots = start[:, None] + jnp.arange(t)[None, :]
    positions = start[:, None] + (offsets[None, :] if offsets.ndim == 1 else offsets)
    new_mask = new_token_mask(t, tree_mask, cfg.sliding_window)
    ctx_mask = None if cache is None or cache_is_empty else context_mask(start, t, num_slots, cfg.sliding_window)
    rope = rope_tables(positions, rope_inv_freq(cfg))
    dtype = compute_dtype(params)
    x = embed(params, cfg, tokens).astype(dtype)
    new_k, new_v, collected, activated = [], [], [], []
    for i in range(n_layers):
        layer_kv = None if cache is None else (cache.k[i], cache.v[i])
        x, written, experts = decoder_layer(params["layers"][i], cfg, x, rope, new_mask, ctx_mask, layer_kv, slots,
                                            write=write_cache)
        if experts is not None:
            activated.append(experts)
        if written is not None:
            new_k.append(written[0])
            new_v.append(written[1])
        if i in hidden_layers:
            collected.append(x)
    new_cache, fresh = None, ()
    if cache is not None and write_cache:
        new_cache = cache.replace(k=tuple(new_k) + cache.k[n_layers:], v=tuple(new_v) + cache.v[n_layers:])
    elif cache is not None:
        fresh = tuple(zip(new_k, new_v))
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    h = hidden if logit_positions is None else jnp.take_along_axis(hidden, logit_positions[..., None], axis=1)
    logits = matmul(h, params["lm_head"], jnp.float32)
    return ForwardOut(logits=logits, hidden=hidden, cache=new_cache, layer_hidden=tuple(collected),
                      experts_activated=tuple(activated), new_kv=fresh)


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params (tests, draft heads from scratch); loading real weights lives in loading.py."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    keys = iter(jax.random.split(rng, 4 + 4 * cfg.num_layers))
    moe_keys = iter(jax.random.split(jax.random.fold_in(rng, 1), 6 * cfg.num_layers))
    normal = lambda shape: (scale * jax.random.normal(next(keys), shape)).astype(dtype)
    layers = []
    for i in range(cfg.num_layers):
        lp = {
            "attn_norm": jnp.ones((d,), dtype),
            "wqkv": normal((d, cfg.qkv_size)),
            "wo": normal((cfg.num_heads * hd, d)),
            "mlp_norm": jnp.ones((d,), dtype),
        }
        if i in cfg.moe_layers:
            lp.update(moe.init_moe(cfg, lambda shape: (scale * jax.random.normal(next(moe_keys), shape)).astype(dtype)))
        else:
            lp.update(w_gate_up=normal((d, 2 * f)), w_down=normal((f, d)))
        if cfg.attention_bias:
            lp["bqkv"] = jnp.zeros((cfg.qkv_size,), dtype)
        if cfg.qk_norm:
            lp["q_norm"] = jnp.ones((hd,), dtype)
            lp["k_norm"] = jnp.ones((hd,), dtype)
        layers.append(lp)
    params: Params = {"lm_head": normal((d, cfg.vocab_size)), "final_norm": jnp.ones((d,), dtype),
                      "layers": tuple(layers)}
    if not cfg.tie_word_embeddings:
        params["embed"] = normal((cfg.vocab_size, d))
    return params
