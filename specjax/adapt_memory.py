"""What the adaptive loop learned about a method, carried from one `generate` call to the next.

A Best-of-N run, an evaluation over many questions or a server answering requests calls `generate`
again and again with the same method, sampling settings and batch. Started afresh, each call pays
again for the probes and fruitless proposals that taught the previous one what does not pay (a
costly drafter on text it cannot draft proposed on 22% of the steps of a first call on the tests'
tiny model, 3% of a second that started from the first's state). So the loop's policy state (the
decayed acceptance counts, the saving average, the backoff and the probe budget) is kept
per model for each (method, sampling settings, batch, cache size) and the next call of the same kind
starts from it. Outputs never depend on it: the width decision only cuts drafts, and
any prefix of a draft verifies exactly.

The counts decay by `adaptive.DECAY` per step that proposes, so text of another kind overrides a
remembered estimate within some 50 such steps, and probes keep testing it. The wait is not carried:
it counts down through the text the last call wrote, not the next one's. `SPECJAX_ADAPTIVE_MEMORY=0`
turns the memory off (every call starts fresh, as a `Session` aside); `forget(model)` clears it.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import jax.numpy as jnp

ENV = "SPECJAX_ADAPTIVE_MEMORY"
# the fields of `adaptive.Adapt` that describe the method on this kind of run, not one call's rows or record
# (not the wait: a call that started inside the last answer's closing backoff waited through most of a
# fresh 100-token answer that a fixed EAGLE chain drafted at 2.7 tokens a forward)
POLICY = ("tried", "hit", "backoff", "saving", "probe_due", "credit", "probe_misses", "idle_misses")

_memory: "weakref.WeakKeyDictionary[Any, dict[tuple, dict[str, Any]]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def enabled() -> bool:
    """On unless `SPECJAX_ADAPTIVE_MEMORY` is 0 / false / off / no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def key(proposer: Any, temperature: float, top_k: int, top_p: float, batch: int, cache_len: int) -> tuple:
    """What must match for a call to start from another's state: the method and its options (a bound
    proposer is hashable), the sampling settings (acceptance depends on the temperature) and the
    shapes the step costs were calibrated for."""
    return (proposer, float(temperature), int(top_k), float(top_p), int(batch), int(cache_len))


def recall(model: Any, k: tuple) -> dict[str, Any] | None:
    """The policy fields a previous call of kind `k` ended with, or None (first call, or memory off)."""
    if not enabled():
        return None
    with _lock:
        return _memory.get(model, {}).get(k)


def remember(model: Any, k: tuple, adapt: Any) -> None:
    """Keeps copies of `adapt`'s policy fields (on the device) for the next call of kind `k`: the arrays
    themselves may be handed on (a Session's counts) to a loop that donates them."""
    if not enabled():
        return
    kept = {name: jnp.copy(getattr(adapt, name)) for name in POLICY}
    with _lock:
        _memory.setdefault(model, {})[k] = kept


def forget(model: Any) -> None:
    """Drops everything remembered for `model`: its next calls start their estimates afresh."""
    with _lock:
        _memory.pop(model, None)


def snapshot(model: Any) -> dict[tuple, dict[str, Any]]:
    """Everything remembered for `model` (for `restore`: a benchmark interleaving other calls)."""
    with _lock:
        return dict(_memory.get(model, {}))


def restore(model: Any, saved: dict[tuple, dict[str, Any]]) -> None:
    """Puts back what `snapshot` returned, in place of what is remembered now."""
    with _lock:
        _memory[model] = dict(saved)
