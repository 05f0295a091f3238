"""Multi-host runs through `jax.distributed`: initialise, split questions, gather results.

Evaluation is data-parallel over questions: each process runs its own block of questions on its own
devices (no cross-process arrays), then results are gathered with JAX's collectives
(`multihost_utils.process_allgather`) so process 0 can write one results file. On a TPU pod slice or
a SLURM/Kubernetes cluster `jax.distributed.initialize()` finds its peers itself; on CPUs (or to
choose) pass the coordinator address, process count and id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize`, with CPU collectives (gloo) so CPU-only hosts can gather too."""
    if jax.distributed.is_initialized():  # e.g. by a notebook cell (jax.process_count() here would start
        return                           # the backend, which must come after initialize)
    given = [coordinator is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together (or none of them, "
                         "on a cluster JAX can detect)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def block(count: int, align: int = 1) -> tuple[int, int]:
    """This process's [start, stop) of `count` items: contiguous blocks whose starts are multiples of
    `align` (a batch size), so per-batch seeds match a single-process run."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align (questions per batch, --batch-size) must be an integer >= 1, got {align!r}")
    per = -(-count // jax.process_count())
    per = -(-per // align) * align
    start = min(jax.process_index() * per, count)
    return start, min(start + per, count)


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]


def _add_counts(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Per-key sums of count dicts (rows per finish reason), keys in first-seen order."""
    out: dict[str, int] = {}
    for c in counts:
        for key, n in c.items():
            out[key] = out.get(key, 0) + n
    return out


def merge_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-process summaries of the same method -> one: counts add up, wall time is the slowest
    process's (they ran in parallel), rates are recomputed from those."""
    if len(parts) == 1:
        return dict(parts[0])
    out = dict(parts[0])
    for key in ("generated_tokens", "target_forwards", "questions"):
        out[key] = sum(p[key] for p in parts)
    out["wall_s"] = max(p["wall_s"] for p in parts)
    hist = np.zeros(max(len(p["accepted_hist"]) for p in parts), np.int64)
    for p in parts:
        hist[: len(p["accepted_hist"])] += p["accepted_hist"]
    out["accepted_hist"] = hist.tolist()
    out["finish_reasons"] = _add_counts([p.get("finish_reasons", {}) for p in parts])
    out["mean_accepted_tokens"] = float((hist * np.arange(hist.size)).sum() / max(hist.sum(), 1))
    emitted = sum(p["tokens_per_s"] * p["wall_s"] for p in parts)
    out["tokens_per_s"] = emitted / out["wall_s"] if out["wall_s"] else 0.0
    rounds = []
    for i, first in enumerate(parts[0]["per_round"]):
        rs = [p["per_round"][i] for p in parts]
        wall = max(r["wall_s"] for r in rs)
        rounds.append({**first, "wall_s": wall, "generated_tokens": sum(r["generated_tokens"] for r in rs),
                       "finish_reasons": _add_counts([r.get("finish_reasons", {}) for r in rs]),
                       "tokens_per_s": sum(r["tokens_per_s"] * r["wall_s"] for r in rs) / wall if wall else 0.0,
                       # tokens / row-steps, with each part's row-steps = its tokens / its mean
                       "mean_accepted_tokens": sum(r["generated_tokens"] for r in rs) / max(sum(
                           r["generated_tokens"] / r["mean_accepted_tokens"] for r in rs if r["mean_accepted_tokens"]),
                           1e-9)})
    out["per_round"] = rounds
    return out
