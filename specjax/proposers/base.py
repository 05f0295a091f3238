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
from jaxtyping import Array, Int

from specjax.drafting import Context, Draft, TreeTemplate, branching_tree

__all__ = ["BranchingTree", "Context", "Draft", "NoDraft", "Proposer", "State", "bound", "option", "option_fields",
           "register", "registered"]

State = Any
_REGISTRY: dict[str, type["Proposer"]] = {}


def register(name: str):
    """Class decorator: the `Proposer` subclass becomes method `name` of `generate`, `make_proposer` and
    every CLI (`--method name`), with its dataclass fields (but `bound` ones) as its options."""

    def add(cls: type[Proposer]) -> type[Proposer]:
        if not (isinstance(cls, type) and issubclass(cls, Proposer)):
            raise TypeError(f"register({name!r}) decorates a Proposer subclass, got {cls!r}")
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def registered() -> dict[str, type["Proposer"]]:
    """Every method registered so far, in registration order."""
    return dict(_REGISTRY)


def bound(default: Any) -> Any:
    """A dataclass field that `Proposer.bind` fills from the model (a config, a vocabulary size): not an
    option a user passes."""
    return dataclasses.field(default=default, metadata={"bound": True})


def option(default: Any, *, min: float | None = None, max: float | None = None, gt: float | None = None,
           lt: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A user option with the values it may take: `k: int = option(8, min=0)`. `min`/`max` are inclusive
    bounds, `gt`/`lt` exclusive ones (for a tuple field, of each entry), `choices` the allowed strings.
    `specjax.validation` checks every option against its field's annotated type and this range before a
    proposer is built (`make_proposer`, every CLI), so `__post_init__` keeps only the checks that relate
    fields to each other."""
    meta = {"min": min, "max": max, "gt": gt, "lt": lt, "choices": choices}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def option_fields(cls: type["Proposer"]) -> dict[str, dataclasses.Field]:
    """The user options of a proposer class: its dataclass fields that are not `bound`."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("bound")}


@dataclasses.dataclass(frozen=True)
class Proposer:
    """Base of all drafters; subclasses override the three pure functions."""

    name: ClassVar[str] = "none"  # set by `register`
    # the option a method cannot run without unless one ships for the model (a trained head, a datastore)
    needs: ClassVar[str | None] = None
    paper: ClassVar[tuple[int, str] | None] = None  # (row, name) in the SpecTTS-Bench table (arXiv 2509.04474)
    sources: ClassVar[tuple[str, ...]] = ("drafter",)  # what `Draft.source` ids mean (stats["proposer_steps"])
    # what `Draft.confidence` measures, for the adaptive loop's buckets: "count" (a match length, an
    # n-gram order: log2 buckets) or "probability" (a head's or draft model's, in [0, 1]); or one kind per
    # source, indexed by `Draft.source`, where a method's sources measure different things (`hybrid`)
    confidence_kind: ClassVar[str | tuple[str, ...]] = "count"
    # False: the adaptive loop leaves this method's widths alone (its forward does work beyond the draft,
    # e.g. lookahead's Jacobi window, that a narrower verify would drop)
    adaptive_widths: ClassVar[bool] = True
    # True: `propose` has a part that costs next to nothing (a suffix match beside a model drafter) and
    # runs only that part when `ctx.full_draft` is False. An adaptive loop backing off from the costly
    # part still proposes the cheap one every step
    cheap_part: ClassVar[bool] = False
    k: int = option(0, min=0)

    @property
    def width(self) -> int:
        """Draft tokens (chain positions or tree nodes) per row per step: the verify forward is width + 1 wide."""
        return self.k if self.template is None else self.template.size - 1

    @property
    def template(self) -> TreeTemplate | None:
        """A static `drafting.TreeTemplate` for tree drafters (tokens are its nodes 1..T-1), None for chains."""
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

    @property
    def catches_up(self) -> bool:
        """Whether `waking` does any work: a proposal after a wait first catches up on what it put off."""
        return type(self).waking is not Proposer.waking

    def waking(self, state: State, ctx: Context) -> State:
        """What the first proposal after a long wait runs before drafting, from `state` (for the step-cost
        calibration, which prices probes and waits with it): a lazy EAGLE head absorbs a full lag buffer.
        Default: nothing, for proposers whose `update` keeps up on every step."""
        return state

    def resume(self, state: State, ctx: Context, prev_state: State, prev: Context) -> State:
        """Continuing a session (next round): `state` is a fresh `init(ctx)`; `prev_state` and `prev` are
        this proposer's final state and history from the previous call. Returns what persists; default
        nothing."""
        return state


@register("ar")
@dataclasses.dataclass(frozen=True)
class NoDraft(Proposer):
    """Plain autoregressive decoding: the verify forward is one token and accepts nothing extra."""

    k: int = option(0, min=0, max=0)


class BranchingTree:
    """Mixin for proposers whose draft is `drafting.branching_tree(branching, k)` (`branching` and `k`
    are dataclass fields); node i reads the successor of rank `template.ranks[i]`."""

    @property
    def template(self) -> TreeTemplate:
        return branching_tree(tuple(self.branching), self.k)
