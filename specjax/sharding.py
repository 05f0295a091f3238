"""Scale-out through JAX's own sharding: a `Mesh` with named axes and `NamedSharding` rules.

Axes: `data` splits the batch (rows of the token buffer, the KV cache, Best-of-N branches), `model`
splits attention heads and MLP width (tensor parallel, Megatron style: column-split the matrices that
fan out, row-split the ones that fan back in), `expert` splits a sparse layer's experts. The jitted
prefill and decode loop are unchanged: arrays carry their shardings and XLA's partitioner (GSPMD)
inserts the collectives, so every method runs under a mesh with the same code and the same tokens.

Rules (a dimension an axis does not divide evenly stays whole, e.g. 2 kv-heads on a model axis of 8):

    wqkv  [D, (H + 2 KV) hd]  columns over model      wo      [H hd, D]  rows over model
    w_gate_up [D, 2F]         columns over model      w_down  [F, D]     rows over model
    lm_head [D, V]            vocab over model        embed   [V, D]     vocab over model
    we_gate_up [E, D, 2F']    experts over expert, columns over model; we_down [E, F', D] experts, rows
    norms, biases, router     replicated
    KV cache [B, KV, S, hd]   batch over data, kv-heads over model
    tokens, lengths, ... [B, ...]  batch over data
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model", "expert")

# param leaf name -> the mesh axis of each dimension (None: whole)
PARAM_RULES: dict[str, tuple[str | None, ...]] = {
    "wqkv": (None, "model"), "bqkv": ("model",), "wo": ("model", None),
    "w_gate_up": (None, "model"), "w_down": ("model", None),
    "lm_head": (None, "model"), "embed": ("model", None),
    "we_gate_up": ("expert", None, "model"), "we_down": ("expert", "model", None),
    "shared_gate_up": (None, "model"), "shared_down": ("model", None),
}


def make_mesh(data: int = 1, model: int = 1, expert: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model, expert) mesh over `devices` (default: all of them, which must number data*model*expert)."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * model * expert
    if min(data, model, expert) < 1 or need != len(devices):
        raise ValueError(f"a mesh of data={data} x model={model} x expert={expert} needs {need} devices, "
                         f"{len(devices)} are visible: pick axis sizes whose product is {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model, expert), AXES)


def spec_for(mesh: Mesh, shape: Sequence[int], axes: Sequence[str | None]) -> P:
    """A PartitionSpec giving each dimension its axis where the axis size divides it, else none."""
    parts = []
    for dim, axis in zip(shape, axes):
        parts.append(axis if axis is not None and mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0 else None)
    return P(*parts)


def param_sharding(mesh: Mesh, name: str, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, spec_for(mesh, shape, PARAM_RULES.get(name, (None,) * len(shape))))


def _leaf_name(path) -> str:
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def place_params(params: Any, dtype: Any, mesh: Mesh | None = None) -> Any:
    """Host (numpy) params -> device arrays in `dtype`; with a mesh each device receives only its shard
    (`device_put` of a host array with a sharding slices on the host), never a full copy per device."""
    def put(path, x):
        x = np.asarray(x).astype(dtype)
        if mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, param_sharding(mesh, _leaf_name(path), x.shape))

    return jax.tree_util.tree_map_with_path(put, params)


# the weights `models.linear.matmul` multiplies (dense layers, shared experts, the LM head)
MATMUL_WEIGHTS = frozenset({"wqkv", "wo", "w_gate_up", "w_down", "shared_gate_up", "shared_down", "lm_head"})


def lower_matmul_weights(params: Any, dtype: Any) -> Any:
    """The matmul weights cast to `dtype` where they lie (a sharded array keeps its sharding)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(dtype) if _leaf_name(path) in MATMUL_WEIGHTS else x, params)


def mesh_of(params: Any) -> Mesh | None:
    """The mesh the params were placed on (None: a single device)."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Rows over `data` (when it divides the batch); every other dimension whole."""
    return NamedSharding(mesh, spec_for(mesh, shape, ("data",) + (None,) * (len(shape) - 1)))


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """A KV layer buffer [B, KV, S, hd]: rows over data, kv-heads over model."""
    return NamedSharding(mesh, spec_for(mesh, shape, ("data", "model", None, None)))


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Places every array of `tree` with its leading (batch) dimension over `data`."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.shape(x))) if np.ndim(x) else x, tree)


def constrain_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Inside jit: pins every array of `tree` to rows over `data`."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.shape)), tree)


def constrain_cache(cache: Any, mesh: Mesh | None) -> Any:
    """Inside jit: pins each KV buffer to `cache_sharding` (GSPMD would otherwise pick a layout itself)."""
    if mesh is None:
        return cache
    pin = lambda x: jax.lax.with_sharding_constraint(x, cache_sharding(mesh, x.shape))
    return cache.replace(k=tuple(map(pin, cache.k)), v=tuple(map(pin, cache.v)))
