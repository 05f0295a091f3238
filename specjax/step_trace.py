"""What each decode step drafted, verified and accepted (`generate(trace=True)`).

The loop's statistics are sums (accepted tokens, widths run); a width rule can only be judged, or bounded,
on the steps themselves: which source drafted, how sure it was, how deep the proposal went, what the
decision kept and what the target accepted. The trace is written inside the jitted loop into buffers as
long as the cache (a run has fewer steps than its cache has slots), and read once at the end, so it adds
no host sync; `specjax.analysis.width_ceiling` replays it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from specjax.drafting import Draft

FIELDS = ("source", "confidence", "proposed", "verified", "accepted", "proposing", "width")


@struct.dataclass
class StepTrace:
    """Per row and decode step; steps past the run's end and rows already finished hold -1 in `accepted`."""

    source: Int[Array, "B T"]  # who drafted (`Proposer.sources`; 0 where nothing was proposed)
    confidence: Float[Array, "B T"]  # the draft's confidence (`Draft.confidence`: a match length, a probability)
    proposed: Int[Array, "B T"]  # the proposal's depth, before the width decision
    verified: Int[Array, "B T"]  # the depth verified (the decision's cut; = proposed at fixed widths)
    accepted: Int[Array, "B T"]  # draft tokens accepted and emitted (EOS and budget cut them; -1: row done)
    proposing: Bool[Array, "T"]  # the whole proposal ran (not skipped, nor only a `cheap_part`)
    width: Int[Array, "T"]  # the static verify width the step ran (an index into `adaptive.loop_widths`)


def empty(batch: int, steps: int) -> StepTrace:
    rows = jnp.zeros((batch, steps), jnp.int32)
    return StepTrace(source=rows, confidence=jnp.zeros((batch, steps), jnp.float32), proposed=rows, verified=rows,
                     accepted=rows - 1, proposing=jnp.zeros((steps,), bool), width=jnp.zeros((steps,), jnp.int32))


def record(trace: StepTrace, step: Int[Array, ""], proposal: Draft, proposed: Int[Array, "B"],
           verified: Int[Array, "B"], accepted: Int[Array, "B"], active: Bool[Array, "B"],
           proposing: Bool[Array, ""], width: Int[Array, ""]) -> StepTrace:
    """`trace` with step `step` written (a step past the buffer's end writes nothing)."""
    batch = accepted.shape[0]
    source = jnp.zeros((batch,), jnp.int32) if proposal.source is None else proposal.source.astype(jnp.int32)
    confidence = (jnp.zeros((batch,), jnp.float32) if proposal.confidence is None
                  else proposal.confidence.astype(jnp.float32))
    at = lambda x, v: x.at[:, step].set(v, mode="drop")
    return trace.replace(source=at(trace.source, jnp.where(proposed > 0, source, 0)),
                         confidence=at(trace.confidence, confidence), proposed=at(trace.proposed, proposed),
                         verified=at(trace.verified, verified),
                         accepted=at(trace.accepted, jnp.where(active, accepted, -1)),
                         proposing=trace.proposing.at[step].set(proposing, mode="drop"),
                         width=trace.width.at[step].set(width, mode="drop"))


def as_dict(trace: StepTrace, widths: Sequence[int], steps: int) -> dict[str, Any]:
    """The trace as lists cut to the run's steps: per row [B][T], or per step [T]; `width` in tokens."""
    out = {name: np.asarray(getattr(trace, name))[..., :steps].tolist() for name in FIELDS}
    out["width"] = [widths[i] for i in out["width"]]
    return out
