"""The EAGLE-3 style feature head: one decoder layer of the target's own kind on fused target features.

At history slot j the head reads the pair (u_j, x_{j+1}): u_j the fused low/middle/high target layer
outputs at position j (EAGLE-3), x_{j+1} the token that position produced. Its output g_j predicts
x_{j+2} through the target's LM head restricted to a draft vocabulary (EAGLE-3's reduced vocab: the
most frequent tokens of the training data, so the per-node LM head costs a fraction of the full one).
Drafting further, a node's own output g replaces u for its children ("training-time test": the head
is trained on its own outputs, so it stays accurate several steps deep).

The layer is `transformer.decoder_layer`, the model's own code, with the head's one-layer config; it
keeps its own one-layer KV cache (slot j = pair j), rolled back like the target's.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig
from specjax.models import transformer, weight_layout
from specjax.models.linear import matmul


def feature_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high layers whose outputs are fused (EAGLE-3's choice: 2, N/2, N-3)."""
    return tuple(sorted({min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)}))


def head_config(cfg: ModelConfig) -> ModelConfig:
    """The head's one-layer config; its layer holds its matrices as [in, out] whatever the target's layout."""
    return dataclasses.replace(cfg, num_layers=1, transposed_from=0)


class EagleHead(nn.Module):
    """Params: fuse [L*D, D], proj [2D, D], emb_norm/feat_norm/norm [D], layer (decoder_layer params)."""

    cfg: ModelConfig  # the head's one-layer config (`head_config(target)`)

    def setup(self):
        d = self.cfg.hidden_size
        self.fuse_dense = nn.Dense(d, use_bias=False, name="fuse")
        self.proj = nn.Dense(d, use_bias=False, name="proj")
        self.emb_norm = self.param("emb_norm", nn.initializers.ones, (d,))
        self.feat_norm = self.param("feat_norm", nn.initializers.ones, (d,))
        self.norm = self.param("norm", nn.initializers.ones, (d,))
        self.layer = self.param("layer", lambda rng: transformer.init_params(self.cfg, rng)["layers"][0])

    def fuse(self, features):
        """Target features [..., L*D] -> u [..., D]."""
        return self.fuse_dense(features)

    def __call__(self, tok_emb, u, rope, new_mask, ctx_mask=None, cache_kv=None, slots=None, write: bool = True):
        """(token embeddings, features) [B, T, D] -> head outputs g [B, T, D] and the written (k, v)
        (`write=False`: the new entries alone, the cache buffers left as they are)."""
        eps = self.cfg.rms_norm_eps
        x = self.proj(jnp.concatenate([transformer.rms_norm(tok_emb, self.emb_norm, eps),
                                       transformer.rms_norm(u.astype(tok_emb.dtype), self.feat_norm, eps)], axis=-1))
        x, kv, _ = transformer.decoder_layer(self.layer, self.cfg, x, rope, new_mask, ctx_mask, cache_kv, slots,
                                             write=write)
        return x, kv

    def logits(self, g, lm_draft):
        """g [..., D] -> draft-vocabulary logits [..., Vd] (float32)."""
        h = transformer.rms_norm(g, self.norm, self.cfg.rms_norm_eps)
        return matmul(h, lm_draft, jnp.float32)

    def init_all(self, features, tok_emb, lm_draft):
        """Touches every parameter (for `init`)."""
        u = self.fuse(features)
        b, t = tok_emb.shape[:2]
        rope = transformer.rope_tables(jnp.broadcast_to(jnp.arange(t), (b, t)), transformer.rope_inv_freq(self.cfg))
        g, _ = self(tok_emb, u, rope, transformer.new_token_mask(t, None))
        return self.logits(g, lm_draft)


def init_head(model, rng: jax.Array) -> dict:
    """Fresh head params for `model`; the layer starts as a copy of the target's last layer."""
    cfg = model.config
    hcfg = head_config(cfg)
    d, n = cfg.hidden_size, len(feature_layers(cfg.num_layers))
    params = EagleHead(hcfg).init(rng, jnp.zeros((1, 2, n * d)), jnp.zeros((1, 2, d)), jnp.zeros((d, 4)),
                                  method=EagleHead.init_all)["params"]
    params = jax.tree.map(jnp.asarray, dict(params))
    last = weight_layout.standard(dict(model.params["layers"][-1]))  # [in, out], as the head's layer holds it
    params["layer"] = jax.tree.map(lambda x: jnp.array(x, jnp.float32), last)  # a copy
    return params


def draft_vocab(counts: np.ndarray, size: int) -> np.ndarray:
    """The `size` most frequent token ids of the training data (EAGLE-3's draft vocabulary), sorted, from
    per-id counts [V] (the data may be too large to hold at once); topped up with the lowest unused ids
    when the data has fewer distinct tokens."""
    vocab_size = len(counts)
    size = min(size, vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count descending, then id
    return np.sort(order[:size]).astype(np.int32)


def params_dtype(params) -> jnp.dtype:
    """The head's compute dtype: its own parameters' (the target's LM head may be held lower)."""
    return jax.tree.leaves(params)[0].dtype


def unroll(module: EagleHead, params, target_params, features, tokens, anchors, steps: int, lm_draft):
    """The training-time test: draft-vocabulary logits [steps, B, P, Vd] of the head at `anchors`
    [B, P] of full sequences (tokens [B, L], target features [B, L, F]), fed its own outputs.

    Step 1 reads the true pairs (u_j, x_{j+1}) over the whole sequence (causal); step s >= 2 at anchor i
    reads (its step s-1 output, x_{i+s}) at position i+s-1 and attends over step 1's keys and values up
    to the anchor and over its own anchor's nodes of steps 2..s: what a depth-s draft node sees at
    inference (committed history + ancestors). Only the P nodes of a step run after step 1, over step
    1's keys and values as a cache (re-running the whole sequence per step cost about 3x the head
    forwards at 4 steps).
    """
    cfg = module.cfg
    b, length = tokens.shape
    p = anchors.shape[1]
    run = lambda *a, **kw: module.apply({"params": params}, *a, **kw)
    emb_of = lambda t: transformer.embed(target_params, cfg, t).astype(params_dtype(params))
    take = lambda x, i: jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 2)), axis=1)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, KV, hd] -> the cache's [B, KV, T, hd]
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)  # x_{j+1} at slot j
    inv = transformer.rope_inv_freq(cfg)
    rope = transformer.rope_tables(jnp.broadcast_to(jnp.arange(length), (b, length)), inv)
    g, (k, v) = run(emb_of(nxt), run(features, method=EagleHead.fuse), rope, transformer.new_token_mask(length, None),
                    write=False)
    keys, values = [heads_first(k)], [heads_first(v)]
    history = jnp.arange(length)[None, None, :] <= anchors[:, :, None]  # [B, P, L]: step 1 up to the anchor
    eye = jnp.eye(p, dtype=bool)  # node i of a step sees node i of each earlier step (its own anchor's) and itself
    own = jnp.broadcast_to(eye, (b, p, p))
    prev = take(g, anchors)
    logits = [run(prev, lm_draft, method=EagleHead.logits)]
    for s in range(2, steps + 1):
        rope = transformer.rope_tables(anchors + s - 1, inv)
        ctx_mask = jnp.concatenate([history] + [own] * (s - 2), axis=-1)
        cache = (jnp.concatenate(keys, axis=2), jnp.concatenate(values, axis=2))
        prev, (k, v) = run(emb_of(take(tokens, jnp.clip(anchors + s, 0, length - 1))), prev, rope,
                           eye, ctx_mask, cache, write=False)
        keys.append(heads_first(k))
        values.append(heads_first(v))
        logits.append(run(prev, lm_draft, method=EagleHead.logits))
    return jnp.stack(logits)
