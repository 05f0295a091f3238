"""The one drafting interface: pure functions over a state pytree, static shapes, jit-safe.

Every proposer is a frozen (hashable) dataclass holding only its configuration, so it can be a static
argument of the jitted decode loop. Its runtime state is a pytree returned by `init` and threaded
through the loop by the engine:

    proposer, weights = proposer.bind(model, sampling_mode)  # on the host, before the loop
    state = proposer.init(ctx)                      # once, after prefill
    state, draft = proposer.propose(state, ctx, rng) # every step, before the target forward
    state = proposer.update(state, ctx, prev_lengths) # every step, after acceptance
    state = proposer.resume(state, ctx, prev_state, prev)  # after init, when continuing a Session

`ctx.tokens[b, :ctx.lengths[b]]` is row b's whole history (prompt + generated). Its last token is the
*pending* token: sampled, but not yet fed to the target (it is the first token of the next verify
forward). A draft is K tokens meant to follow the pending token; `draft.num[b] <= K` of them are
real, the rest is padding that verification ignores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

State = Any


@struct.dataclass
class Context:
    """What every proposer may read at a step."""

    tokens: Int[Array, "B S"]  # history, right-padded with zeros
    lengths: Int[Array, "B"]  # valid tokens per row, the pending token included
    group: Int[Array, "B"]  # rows sharing a group may draft from each other (Best-of-N branches)
    active: Bool[Array, "B"]  # rows still generating
    hidden: Float[Array, "B D"] | None = None  # target hidden state that predicted the pending token
    weights: Any = None  # the proposer's own weights (from `bind`), e.g. a draft model's params
    cache: Any = None  # the target's KVCache (read-only), holding every history token but the pending one
    # target features (the `feature_layers` outputs, concatenated) of consecutive history positions
    # starting at `feature_start[b]`: the prefill's at init/resume, the accepted path's at update
    features: Float[Array, "B T F"] | None = None
    feature_start: Int[Array, "B"] | None = None
    # at update, for proposers with `logit_topk > 0`: the tokens the verify forward fed (pending token,
    # then the draft: chain positions or tree nodes), the top-k tokens of its logits at each, and
    # which of them were real (not padding, row active)
    verified: Int[Array, "B K1"] | None = None
    verified_topk: Int[Array, "B K1 C"] | None = None
    verified_valid: Bool[Array, "B K1"] | None = None
    # the call's traced `sampling.Sampling`: a drafter whose q must match the target's processing reads
    # temperature / top-k / top-p here (it is bound to the static `SamplingMode` only)
    sampling: Any = None


@struct.dataclass
class Draft:
    """K proposed tokens per row; entries at or past `num` are padding."""

    tokens: Int[Array, "B K"]
    num: Int[Array, "B"]
    probs: Float[Array, "B K V"] | None = None  # draft distribution q; None means deterministic (one-hot)
    confidence: Float[Array, "B"] | None = None  # proposer-specific, e.g. suffix match length
    source: Int[Array, "B"] | None = None  # which sub-proposer drafted (hybrid); 0 otherwise
    valid: Bool[Array, "B K"] | None = None  # tree drafts: which nodes are real (None: the first `num`)


@dataclasses.dataclass(frozen=True)
class Proposer:
    """Base of all drafters; subclasses override the three pure functions."""

    name: ClassVar[str] = "none"
    k: int = 0

    @property
    def width(self) -> int:
        """Draft tokens (chain positions or tree nodes) per row per step: the verify forward is width + 1 wide."""
        return self.k if self.template is None else self.template.size - 1

    @property
    def template(self):
        """A static `verify.TreeTemplate` for tree drafters (tokens are its nodes 1..T-1), None for chains."""
        return None

    @property
    def depth(self) -> int:
        """Most draft tokens one step can accept."""
        return self.k if self.template is None else self.template.max_depth

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Target layers whose outputs this proposer reads (`ctx.features`); () for none (no extra cost)."""
        return ()

    @property
    def logit_topk(self) -> int:
        """> 0: `update` receives the verify forward's top-k tokens per fed position (`ctx.verified_topk`)."""
        return 0

    def bind(self, model, sampling_cfg) -> tuple["Proposer", Any]:
        """Called by generate before the loop: returns the proposer configured for this target and
        sampling mode (`config.SamplingMode`: greedy or not, which processors are on; the numbers
        come traced in `ctx.sampling`), and the weights pytree it reads as `ctx.weights` (None for
        model-free ones)."""
        return self, None

    def init(self, ctx: Context) -> State:
        return ()

    def propose(self, state: State, ctx: Context, rng: jax.Array) -> tuple[State, Draft]:
        batch = ctx.tokens.shape[0]
        return state, Draft(
            tokens=jnp.zeros((batch, self.k), jnp.int32), num=jnp.zeros((batch,), jnp.int32)
        )

    def update(self, state: State, ctx: Context, prev_lengths: Int[Array, "B"]) -> State:
        """Called after acceptance: `ctx` holds the new history; `prev_lengths` the lengths before."""
        return state

    def resume(self, state: State, ctx: Context, prev_state: State, prev: Context) -> State:
        """Continuing a session (next round): `state` is a fresh `init(ctx)`; `prev_state` and `prev` are
        this proposer's final state and history from the previous call. Returns what persists; default
        nothing."""
        return state


@dataclasses.dataclass(frozen=True)
class NoDraft(Proposer):
    """Plain autoregressive decoding: the verify forward is one token and accepts nothing extra."""

    name: ClassVar[str] = "ar"
    k: int = 0
