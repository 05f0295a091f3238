"""The one specjax cache folder: compiled programs (JAX's persistent compilation cache), converted GGUF
weights and tokenizers (`models/loading.py`), measured step costs and one-row product timings
(`step_cost.py`, `models/gemv_blocks.py`).

Default `~/.cache/specjax`; `SPECJAX_CACHE_DIR` moves it, and its value `none` turns every disk cache
off. `import specjax` switches JAX's persistent compilation cache on under `<folder>/xla`, so a
second process running the same shapes loads its executables from disk instead of compiling them
(5-15 s per method on a 2-core CPU). A user who already set `jax_compilation_cache_dir` keeps theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "SPECJAX_CACHE_DIR"


def root() -> Path | None:
    """The cache folder, or None when `SPECJAX_CACHE_DIR=none`."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() == "none":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "specjax"


def enable_compilation_cache() -> Path | None:
    """Points JAX's persistent compilation cache at `<root>/xla` (every program, however quick to
    compile: the many small ones add up); returns the folder in use, None when off."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    folder = root()
    if folder is None:
        return None
    xla = folder / "xla"
    try:
        xla.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without a disk cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(xla))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return xla
