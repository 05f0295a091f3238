"""`specjax.load`: a loaded model is its config, its params pytree and its tokenizer."""

from __future__ import annotations

import dataclasses
import threading
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from specjax import programs, sharding, validation, warm_start
from specjax.config import ModelConfig
from specjax.models import attention_form, gemv_blocks, loading, transformer, weight_layout


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    config: ModelConfig
    params: Any
    tokenizer: Any
    name: str = ""
    programs_key: str = ""  # its name in the compiled-program store (`specjax.programs`); "" = none

    @property
    def mesh(self) -> Mesh | None:
        """The mesh the params are sharded over (None: one device)."""
        return sharding.mesh_of(self.params)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def logits(self, token_ids) -> np.ndarray:
        """Full causal forward without a cache: float32 [B, T, V] (parity checks against other stacks).
        Ids outside the vocabulary are refused: the embedding gather would clamp or fill them silently."""
        tokens = validation.token_array("token_ids", token_ids, self.config.vocab_size)
        return np.asarray(_full_logits(self.params, self.config, tokens))


@partial(jax.jit, static_argnums=1)
def _full_logits(params, cfg: ModelConfig, tokens):
    return transformer.forward(params, cfg, tokens).logits


def load(name: str, dtype: Any = "float32", tokenizer: bool = True, mesh: Mesh | None = None,
         matmul_dtype: Any = None) -> Model:
    """Loads an embedded name, a .gguf file, a local HF folder or a hub id (see `loading.resolve`).

    With a `mesh` (`specjax.sharding.make_mesh`), params are placed sharded by `sharding.PARAM_RULES`
    as they load, and every `generate` on the model runs under that mesh. `matmul_dtype="bfloat16"`
    holds the dense layers' and the LM head's weights in bf16 beside `dtype` activations, norms,
    embeddings and KV cache (`models/linear.py`: products accumulate in float32): half the weight
    bytes, and on CPUs with AMX/AVX512-BF16 a verify forward of many tokens costs little more than
    one, where float32 is compute-bound (docs/cpu_precision.md).
    """
    validation.load_args(name, dtype, tokenizer, mesh, matmul_dtype)
    kind, path = loading.resolve(name)
    jdtype = loading.parse_dtype(dtype)
    low = None if matmul_dtype is None else loading.parse_dtype(matmul_dtype)
    if low is not None and jnp.dtype(low).itemsize > jnp.dtype(jdtype).itemsize:
        raise ValueError(f"matmul_dtype={matmul_dtype!r} is wider than dtype={dtype!r}: it may only lower precision")
    owner = "" if mesh is not None else _programs_owner(kind, path, dtype, matmul_dtype)
    warm_start.prefetch(owner)  # reads the programs of last time's calls while the weights load
    cfg, host = loading.load_gguf(path) if kind == "gguf" else loading.load_dir(path)
    params = sharding.place_params(host, jdtype, mesh)
    if low is not None and low != jdtype:
        params = sharding.lower_matmul_weights(params, low)
    del host
    loaded: dict[str, Any] = {}

    def load_tokenizer() -> None:
        try:
            loaded["tok"] = loading.load_tokenizer(kind, path)
        except BaseException as e:  # raised on the caller's thread below
            loaded["error"] = e

    # timed once per machine and model (with no other work of ours running), then cached
    cfg = gemv_blocks.configure(cfg, params, mesh, before_timing=programs.settle)
    cfg, params = weight_layout.configure(cfg, params, mesh, before_timing=programs.settle)
    cfg = attention_form.configure(cfg, params, mesh, before_timing=programs.settle)
    reader = threading.Thread(target=load_tokenizer, name="specjax-tokenizer", daemon=True) if tokenizer else None
    if reader is not None:
        reader.start()
    # last time's calls replayed on a dummy prompt (their programs' first runs) while the tokenizer loads
    warm_start.replay_last(Model(config=cfg, params=params, tokenizer=None, name=str(name), programs_key=owner))
    if reader is not None:
        reader.join()
        if "error" in loaded:
            raise loaded["error"]
    return Model(config=cfg, params=params, tokenizer=loaded.get("tok"), name=str(name), programs_key=owner)


def _programs_owner(kind: str, path, dtype: Any, matmul_dtype: Any) -> str:
    """What a load's programs depend on: the checkpoint (path, size, mtime) and the dtypes asked for."""
    source = path if kind == "gguf" else path / "config.json"
    try:
        stat = source.stat()
    except OSError:
        return ""
    return programs.owner_key(kind, source.resolve(), stat.st_size, stat.st_mtime_ns, dtype, matmul_dtype)
