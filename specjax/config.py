"""Frozen, hashable configs: they are static arguments of every jitted function.

`ModelConfig` is built from a Hugging Face config (or GGUF metadata) once at load time; being frozen
and hashable, it can be passed as a static argument to `jax.jit` so that one compiled program serves
every call with the same shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3"); `factor == 1` means none."""

    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder; every supported family is a choice of these fields."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2/2.5: bias on q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    max_position_embeddings: int = 8192
    sliding_window: int | None = None  # Mistral: keys further back than this are not attended
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # sparse mixture of experts (models/moe.py); dense when num_experts == 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights (Mixtral: always)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert
    moe_layers: tuple[int, ...] = ()  # which layers are sparse
    # not the architecture but how this machine runs it: a one-row float32 matmul of a layer is split
    # into this many blocks of its inner dimension (models/linear.py), chosen by timing at load
    # (models/gemv_blocks.py); 1 = a plain dot
    gemv_blocks: int = 1
    # one-token attention scores the cache's keys as a multiply-and-reduce instead of batched dots from
    # this many rows on (0: never), chosen by timing at load (models/attention_form.py)
    reduce_scores_from: int = 0
    # products of at least this many rows read the dense layers' matrices as [out, in] (`<name>_t`), fewer
    # as [in, out] (0: never), chosen by timing at load (models/weight_layout.py)
    transposed_from: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.gemv_blocks < 1:
            raise ValueError(f"gemv_blocks must be at least 1, got {self.gemv_blocks}")
        if self.transposed_from < 0:
            raise ValueError(f"transposed_from must be 0 (never) or a number of rows, got {self.transposed_from}")
        if self.reduce_scores_from < 0:
            raise ValueError(f"reduce_scores_from must be 0 (never) or a number of rows, got {self.reduce_scores_from}")
        if self.moe_layers and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"a sparse model needs 0 < num_experts_per_tok <= num_experts, got "
                             f"{self.num_experts_per_tok} of {self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any) -> "ModelConfig":
        """Builds the config from a transformers `PretrainedConfig` or its `config.json` dict."""
        d = hf if isinstance(hf, Mapping) else hf.to_dict()
        model_type = d.get("model_type", "llama")
        family = model_type if model_type in FAMILIES else None
        if family is None:
            raise ValueError(
                f"model_type {model_type!r} is not supported by specjax; supported: {', '.join(FAMILIES)}"
            )
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        scaling = None
        if rs and rs.get("rope_type", rs.get("type")) == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            raise ValueError(f"rope scaling {rs!r} is not supported (only llama3-style scaling is)")
        theta = d.get("rope_theta")
        if theta is None and isinstance(rs, Mapping):
            theta = rs.get("rope_theta")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        moe: dict[str, Any] = {}
        if family == "mixtral":
            moe = dict(num_experts=d["num_local_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                       moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True,
                       moe_layers=tuple(range(d["num_hidden_layers"])))
        elif family in ("qwen2_moe", "qwen3_moe"):  # HF: sparse unless in mlp_only_layers, every step-th layer
            step, dense = d.get("decoder_sparse_step", 1) or 1, set(d.get("mlp_only_layers") or ())
            experts = d.get("num_experts", d.get("num_local_experts"))  # newer transformers: num_local_experts
            moe = dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                       moe_intermediate_size=d["moe_intermediate_size"],
                       norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                       shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0)
                       if family == "qwen2_moe" else 0,
                       moe_layers=tuple(i for i in range(d["num_hidden_layers"])
                                        if i not in dense and experts > 0 and (i + 1) % step == 0))
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", family in ("qwen2", "qwen2_moe"))),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            sliding_window=(d.get("sliding_window") if family in ("mistral", "mixtral") or d.get("use_sliding_window")
                            else None),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **moe,
        )


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from logits; `temperature == 0` is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def mode(self) -> "SamplingMode":
        """What of this config changes the compiled program; the numbers themselves are traced."""
        return SamplingMode(greedy=self.greedy, top_k_cap=top_k_cap(self.top_k), use_top_p=self.top_p < 1.0)


TOP_K_MIN_CAP = 64  # top-k values up to this share one program; larger ones take the next power of two


def top_k_cap(top_k: int) -> int:
    """The static `lax.top_k` width that serves a top-k value: 0 (off), 64, 128, 256, ..."""
    return 0 if top_k <= 0 else max(TOP_K_MIN_CAP, 1 << (int(top_k) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static part of a `SamplingConfig`: proposers bound to it serve every temperature, top-k
    value (within its cap) and top-p without recompiling; they read the numbers from `Context.sampling`."""

    greedy: bool = True
    top_k_cap: int = 0
    use_top_p: bool = False
