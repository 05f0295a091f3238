"""`medusa`: K trained heads guess tokens t+2..t+K+1 from the hidden state that predicted t+1.

No draft forward at all: one small matmul per head on the stored hidden state, then the target's LM
head. Heads guess independently, so a tree whose chains start with the top-`branches` guesses of
head 0 and continue with the other heads' top-1 (`drafting.branching_tree((branches,), k)`) is verified in one forward;
`branches=1` is a plain chain. The drafts are deterministic (q one-hot), so sampling stays lossless.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from specjax.drafting import Context, Draft, TreeTemplate, branching_tree, chains_to_tree
from specjax.models import transformer
from specjax.models.linear import matmul
from specjax.proposers.base import Proposer, bound, option, register


@register("medusa")
@dataclasses.dataclass(frozen=True)
class Medusa(Proposer):
    confidence_kind: ClassVar[str] = "probability"
    needs: ClassVar[str | None] = "head"
    head: str = ""  # folder of a trained head (train.draft_head --head medusa --out DIR); '' = the shipped one
    branches: int = option(2, min=1)
    # chain mode: draft only the leading heads whose top-1 probability reaches this
    min_prob: float = option(0.0, min=0)
    k: int = option(0, min=0)  # set by bind: the number of heads
    hidden: int = bound(0)

    def __post_init__(self):
        if self.branches < 1:
            raise ValueError(f"branches must be >= 1, got {self.branches}")

    def bind(self, model, sampling_cfg) -> tuple["Medusa", Any]:
        from specjax.heads.io import head_for

        path, config, params = head_for(model, "medusa", self.head)
        cfg = model.config
        bound = dataclasses.replace(self, head=path, k=int(config["num_heads"]), hidden=cfg.hidden_size)
        dtype = transformer.compute_dtype(model.params)
        return bound, {"heads": jax.tree.map(lambda x: jnp.asarray(x, dtype), params),
                       "lm_head": model.params["lm_head"]}

    @property
    def template(self) -> TreeTemplate | None:
        return None if self.branches == 1 or self.k == 0 else branching_tree((self.branches,), self.k)

    def propose(self, state, ctx: Context, rng: jax.Array) -> tuple[Any, Draft]:
        from specjax.heads.medusa import MedusaHeads

        if self.k == 0:
            raise ValueError("the medusa proposer is unbound: generate() binds it to the model (call bind())")
        batch = ctx.tokens.shape[0]
        w = ctx.weights
        dtype = jax.tree.leaves(w["heads"])[0].dtype  # the target's activations' (its LM head may be lower)
        feats = MedusaHeads(self.k, self.hidden).apply({"params": w["heads"]}, ctx.hidden.astype(dtype))
        logits = matmul(feats, w["lm_head"], jnp.float32)  # [B, K, V]
        top1 = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, K]
        probs = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)  # [B, K] each head's top-1 probability
        conf = probs[:, 0]
        if self.template is None:
            # a confident prefix only: an unsure head's guess would cost a wider verify for little
            sure = jnp.cumprod((probs >= self.min_prob).astype(jnp.int32), axis=1).sum(axis=1)
            num = jnp.where(ctx.active, sure, 0).astype(jnp.int32)
            return state, Draft(tokens=jnp.where(jnp.arange(self.k) < num[:, None], top1, 0), num=num,
                                confidence=conf)
        firsts = jax.lax.top_k(logits[:, 0], self.branches)[1].astype(jnp.int32)  # [B, branches]
        chains = jnp.concatenate([firsts[:, :, None], jnp.broadcast_to(top1[:, None, 1:], (batch, self.branches,
                                                                                          self.k - 1))], axis=2)
        tokens = chains_to_tree(chains)
        valid = jnp.broadcast_to(ctx.active[:, None], tokens.shape)
        num = jnp.where(ctx.active, tokens.shape[1], 0).astype(jnp.int32)
        return state, Draft(tokens=tokens, num=num, confidence=conf, valid=valid)
