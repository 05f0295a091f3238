"""Medusa heads: K residual blocks on the target's last hidden state, sharing its LM head.

Head i reads the (final-norm) hidden state h_t that predicted token t+1 and predicts token t+2+i.
Each block is h + SiLU(W h + b) with W zero-initialised, so an untrained head starts as the base
model's own next-token guess (the Medusa paper's initialisation) and training only has to learn the
shift. The LM head stays the target's, frozen: the heads add K * (D^2 + D) weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class ResBlock(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        return x + nn.silu(nn.Dense(self.hidden, kernel_init=nn.initializers.zeros, name="proj")(x))


class MedusaHeads(nn.Module):
    num_heads: int
    hidden: int

    @nn.compact
    def __call__(self, h):
        """h [..., D] -> features [..., K, D]; logits are features @ lm_head."""
        return jnp.stack([ResBlock(self.hidden, name=f"head_{i}")(h) for i in range(self.num_heads)], axis=-2)
