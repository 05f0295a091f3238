"""XLA flags specjax sets for its users, before JAX starts a backend.

`--xla_cpu_copy_insertion_use_region_analysis=true`: without it XLA:CPU cannot prove that a decode
step's reads of a KV-cache buffer (attention) end before the step's in-place write of the new entries,
and copies the buffer instead: 120 whole-buffer copies per step at batch 8 (13.7 ms of an 85 ms step),
which the analysis removes (docs/decode_profile.md). It changes no result, only which buffers XLA copies.

A flag the user already put in `XLA_FLAGS` is left as they set it; `SPECJAX_XLA_FLAGS=none` sets nothing.
XLA reads `XLA_FLAGS` once, when the first backend starts: a process that ran JAX computations before
importing specjax keeps the flags it started with (`in_force` says whether they apply).
"""

from __future__ import annotations

import os

ENV = "SPECJAX_XLA_FLAGS"
DEFAULTS: dict[str, str] = {"xla_cpu_copy_insertion_use_region_analysis": "true"}


def merged(current: str, defaults: dict[str, str] = DEFAULTS) -> str:
    """`current` (an XLA_FLAGS value) with each default flag it does not name appended."""
    named = {part.lstrip("-").split("=", 1)[0] for part in current.split()}
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in named]
    return " ".join([current.strip(), *extra]).strip()


def apply() -> bool:
    """Adds specjax's defaults to `XLA_FLAGS` (unless `SPECJAX_XLA_FLAGS=none`); returns whether they
    take effect (False when off, or when a JAX backend had already started in this process)."""
    global in_force
    if os.environ.get(ENV, "").strip().lower() == "none":
        return False
    from jax._src import xla_bridge

    os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""))
    in_force = not xla_bridge.backends_are_initialized()
    return in_force


in_force = False  # set by `apply` at `import specjax`
