"""The MoESD model (Huang et al., "MoESD: Unveil Speculative Decoding's Potential for Accelerating
Sparse MoE", arXiv 2505.19645) as tested functions, plus a hardware fit of the target's step time.

Notation: B batch rows, gamma draft tokens per row, alpha per-token acceptance rate, E experts of
which K are routed per token, T_T(B, g) the target's forward time verifying g tokens per row
(g = 1 is plain decoding), T_D the draft's time per drafted token, T_rej the rejection sampler's.

  N(t)      = E * (1 - ((E - K) / E)^t)                       expected distinct experts for t tokens
  sigma     = (1 - alpha^(gamma + 1)) / (1 - alpha)            expected tokens per speculative step
  speedup   = sigma / (gamma * T_D / T_T(B,1) + T_T(B,gamma+1) / T_T(B,1) + T_rej / T_T(B,1))
  efficiency = T_T(B,1) / T_T(B,gamma+1)                       target efficiency

A static batch ends with its slowest row, so its tokens per step fall below sigma as B grows:
`batch_tokens_per_step` gives that figure, which may stand for sigma in the speedup.

The speedup is the paper's ratio of AR time per token, T_T(B,1), to speculative time per token: one
speculative step costs gamma draft steps, one target forward over gamma + 1 tokens per row and a
rejection step, and yields sigma tokens per row. We write the verify forward as T_T(B, gamma + 1)
(its real width: the pending token plus gamma drafts); the paper's T_T(B, gamma) denotes the same
forward. Target efficiency is the paper's T_T(B,1) / T_T(B,gamma) with that forward.

The hardware fit models one target forward over t = B * g tokens as a roofline sum
    T_T(B, g) = c0 + c_w * W(t) + c_f * F(t)
with W(t) the parameter bytes it must read (dense weights once, plus N(t) of the E experts per sparse
layer) and F(t) its FLOPs (2 * active params * t), fitted by non-negative least squares on measured
timings: memory-bound at small t (cost follows N(t)), compute-bound at large t.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from specjax.config import ModelConfig


def expected_experts(num_experts: int, top_k: int, tokens) -> np.ndarray:
    """N(t) = E (1 - ((E - K) / E)^t): distinct experts t tokens activate under uniform random routing."""
    t = np.asarray(tokens, np.float64)
    return num_experts * (1.0 - ((num_experts - top_k) / num_experts) ** t)


def expected_tokens(alpha, gamma: int) -> np.ndarray:
    """sigma(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha): mean tokens per step (gamma + 1 at alpha 1)."""
    a = np.asarray(alpha, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (1.0 - a ** (gamma + 1)) / (1.0 - a)
    return np.where(np.isclose(a, 1.0), gamma + 1.0, s)


def batch_tokens_per_step(alpha: float, gamma: int, batch: int, new_tokens: int, samples: int = 4000,
                          seed: int = 0) -> float:
    """Tokens per row per loop step of a static batch that runs until its slowest row has `new_tokens`.

    sigma is one sequence's mean; a batch of B rows, each accepting independently, steps until its
    last row is done, so it makes new_tokens / E[max_b steps_b] tokens per row per step: sigma for
    B = 1 and long outputs, less as B grows (stragglers), 1 at alpha = 0 and gamma + 1 at alpha = 1.
    E[max] is estimated by simulating `samples` batches (each step a row gains 1 + the run of
    accepted drafts, at most gamma, each accepted with probability alpha; the last step is cut at
    new_tokens). Continuous batching, which refills finished rows, would see sigma instead.
    """
    if new_tokens < 1 or batch < 1:
        raise ValueError(f"need batch >= 1 and new_tokens >= 1, got {batch} and {new_tokens}")
    rng = np.random.default_rng(seed)
    done = np.zeros((samples, batch), np.int64)
    steps = np.zeros((samples, batch), np.int64)
    while (done < new_tokens).any():
        hits = rng.random((samples, batch, gamma)) < alpha
        gained = 1 + np.cumprod(hits, axis=-1).sum(axis=-1)  # the bonus token + accepted drafts
        live = done < new_tokens
        done = np.where(live, done + gained, done)
        steps += live
    return float(new_tokens / steps.max(axis=1).mean())


def target_efficiency(t_ar, t_verify) -> np.ndarray:
    """T_T(B, 1) / T_T(B, gamma + 1)."""
    return np.asarray(t_ar, np.float64) / np.asarray(t_verify, np.float64)


def speedup(alpha, gamma: int, t_ar, t_verify, t_draft=0.0, t_reject=0.0, tokens_per_step=None) -> np.ndarray:
    """sigma / (gamma T_D / T_T(B,1) + T_T(B,gamma+1) / T_T(B,1) + T_rej / T_T(B,1)); `tokens_per_step`
    replaces sigma (e.g. `batch_tokens_per_step` for a static batch)."""
    t_ar = np.asarray(t_ar, np.float64)
    cost = gamma * np.asarray(t_draft) / t_ar + np.asarray(t_verify) / t_ar + np.asarray(t_reject) / t_ar
    sigma = expected_tokens(alpha, gamma) if tokens_per_step is None else np.asarray(tokens_per_step, np.float64)
    return sigma / cost


def estimate_alpha(mean_accepted_tokens: float, gamma: int) -> float:
    """The alpha whose sigma(alpha, gamma) equals a measured mean of tokens per step (bisection)."""
    target = float(np.clip(mean_accepted_tokens, 1.0, gamma + 1.0))
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, gamma) < target else (lo, mid)
    return (lo + hi) / 2


@dataclasses.dataclass(frozen=True)
class WeightProfile:
    """Parameter counts of a target, split into what every token reads and what its experts read."""

    dense_params: int  # attention, norms, dense MLPs, embeddings/LM head rows used, shared experts
    expert_params: int  # one routed expert of one sparse layer
    sparse_layers: int
    num_experts: int
    top_k: int
    bytes_per_param: int = 4

    @classmethod
    def of(cls, cfg: ModelConfig, bytes_per_param: int = 4) -> "WeightProfile":
        d, hd = cfg.hidden_size, cfg.head_dim
        attn = d * cfg.qkv_size + cfg.num_heads * hd * d + 2 * d
        dense_mlp = 3 * d * cfg.intermediate_size
        expert = 3 * d * cfg.moe_intermediate_size
        shared = 3 * d * cfg.shared_expert_intermediate_size + d + d * cfg.num_experts  # + gate, router
        sparse = len(cfg.moe_layers)
        dense = cfg.num_layers * attn + (cfg.num_layers - sparse) * dense_mlp + sparse * shared + 2 * d * cfg.vocab_size
        return cls(dense_params=dense, expert_params=expert, sparse_layers=sparse,
                   num_experts=max(cfg.num_experts, 1), top_k=max(cfg.num_experts_per_tok, 1),
                   bytes_per_param=bytes_per_param)

    def bytes_read(self, tokens) -> np.ndarray:
        """W(t): parameter bytes one forward over t tokens reads."""
        t = np.asarray(tokens, np.float64)
        experts = expected_experts(self.num_experts, self.top_k, t) if self.sparse_layers else np.zeros_like(t)
        return self.bytes_per_param * (self.dense_params + self.sparse_layers * self.expert_params * experts)

    def flops(self, tokens) -> np.ndarray:
        """F(t) = 2 * active params * t."""
        active = self.dense_params + self.sparse_layers * self.expert_params * self.top_k
        return 2.0 * active * np.asarray(tokens, np.float64)


@dataclasses.dataclass(frozen=True)
class StepTimeFit:
    """T_T(t tokens) = c0 + c_w * W(t) + c_f * F(t), non-negative coefficients."""

    profile: WeightProfile
    c0: float
    c_w: float
    c_f: float

    @classmethod
    def fit(cls, profile: WeightProfile, tokens, seconds) -> "StepTimeFit":
        from scipy.optimize import nnls

        t = np.asarray(tokens, np.float64)
        y = np.asarray(seconds, np.float64)
        cols = [np.ones_like(t), profile.bytes_read(t), profile.flops(t)]
        scale = np.asarray([np.max(np.abs(c)) or 1.0 for c in cols])
        coef, _ = nnls(np.stack(cols, axis=1) / scale, y)
        c0, c_w, c_f = coef / scale
        return cls(profile=profile, c0=float(c0), c_w=float(c_w), c_f=float(c_f))

    def __call__(self, tokens) -> np.ndarray:
        return self.c0 + self.c_w * self.profile.bytes_read(tokens) + self.c_f * self.profile.flops(tokens)
