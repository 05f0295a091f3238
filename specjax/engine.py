"""`generate`: prefill, then one jitted `lax.while_loop` of propose -> verify -> commit.

Autoregressive decoding is the same loop with a proposer that drafts nothing (K = 0), so every method
shares one code path and greedy speculative output equals greedy AR output by construction of the
verifier. The host sees only the final token buffer and the statistics.

Layout: prompts are right-padded; row b's history lives in `tokens[b, :lengths[b]]` and its KV cache
holds all of it but the last (pending) token, which is the first input of the next verify forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from specjax import adapt_memory, programs, sampling, sharding, step_trace
from specjax.config import ModelConfig, SamplingConfig
from specjax.drafting import Context, Draft, TreeTemplate, ancestor_mask, at, gather_rows, run_if, tree_depths
from specjax.models import cache as kv
from specjax.models import transformer
from specjax.models.cache import KVCache
from specjax.plan import Plan, bind_proposer, make_plan, prefill_parts
from specjax.proposers import make_proposer
from specjax.proposers.base import Proposer
from specjax.sampling import Sampling
from specjax.stats import GenerationStats
from specjax.step_trace import StepTrace
from specjax.verify import TreeVerifyResult, position_keys, verify_chain, verify_tree


@struct.dataclass
class Adapt:
    """The adaptive loop's online acceptance estimate and its record (see `decode`).

    `tried[s, c, i]` / `hit[s, c, i]`: decayed counts of draft position i (chain position or tree
    depth) being verified / accepted, given every earlier position was, for drafting source s
    (`Proposer.sources`) and confidence bucket c (`confidence_bucket`, split by whether the row's last
    drafted step was accepted whole: inside copied text a full acceptance predicts the next one far
    better than a match length does, and without the split the loop under-drafted long copy runs,
    predicting 81 tokens where 128 came). Counts with a Beta prior rather
    than a bare EMA: the prior keeps the first steps' decisions sane before anything is observed, and the
    decay (`DECAY` per step) lets the estimate follow text that starts or stops repeating. Drafts the
    decision cut are counted too, once the row has emitted the tokens they predicted (`_shadow`).
    """

    tried: Float[Array, "S C D"]  # C = 2 * NUM_BUCKETS: the confidence bucket, after a streak or not
    hit: Float[Array, "S C D"]
    streak: Int[Array, "B"]  # 1 where the row's last drafted step accepted its whole draft
    backoff: Int[Array, ""]  # steps to wait after the next step that does not pay (doubles up to `probe_interval`)
    wait: Int[Array, ""]  # steps left before proposing again (0: propose this step)
    saving: Float[Array, ""]  # moving average of the seconds a proposing step saved (`_settle`; inf: none yet)
    width_hist: Int[Array, "W"]  # steps run at each static verify width (`loop_widths`)
    predicted_tokens: Float[Array, ""]  # sum over steps of the expected tokens of the chosen width
    predicted_s: Float[Array, ""]  # sum over steps of the calibrated seconds of the chosen width (+ drafter)
    drafted_steps: Int[Array, ""]  # steps that ran the whole `propose` (not a `cheap_part` alone)
    # per row, a draft the width decision cut, scored against the tokens later steps emit (`_shadow`)
    shadow_tokens: Int[Array, "B K"]
    shadow_valid: Bool[Array, "B K"]  # its nodes; none: no shadow pending
    shadow_parents: Int[Array, "B K"]  # each node's parent node (-1: the pending token; a dynamic tree's own)
    shadow_start: Int[Array, "B"]  # the history length when it was drafted: depth i predicts position start + i - 1
    shadow_scored: Int[Array, "B"]  # its leading positions already counted
    shadow_row: Int[Array, "B"]  # its counts' row (source) and confidence bucket
    shadow_bucket: Int[Array, "B"]
    probing: Bool[Array, ""] = False  # this step probes after a backoff: `_settle` sets the backoff by its yield
    proposing: Bool[Array, ""] = False  # this step ran `propose`: `_settle` weighs what it saved
    # verified drafts fell short, or drafts that could gain were turned down: the next such draft probes
    probe_due: Bool[Array, ""] = False
    # seconds of probing the budget allows now (`probe_credit`): each step adds PROBE_SHARE of a 1-token step,
    # each probe spends its price, so probes of every kind cost at most that share of the time
    credit: Float[Array, ""] = float("inf")
    probed: Bool[Array, ""] = False  # this step verified a probe (of any kind): `_settle` counts it a miss or not
    # probes in a row that did not pay: each halves the share of time probing may take (`probe_credit`)
    probe_misses: Int[Array, ""] = 0
    # proposals in a row with nothing worth verifying: each halves the share of time such proposals take
    idle_misses: Int[Array, ""] = 0
    # the chosen width's expected progress of the batch (`_batch_worth`), known before the verify: what a
    # single row's saving is averaged on (`_settle`)
    expected: Float[Array, ""] = 1.0


NUM_BUCKETS = 6  # confidence buckets per source
PRIOR_MEAN, PRIOR_COUNT = 0.5, 2.0  # Beta prior of the first position's acceptance (deeper: the one before)
DECAY = 0.98  # forgetting of the counts per step that proposes or scores a shadow (a memory of ~50 such steps)
# share of decode time that probing may cost where drafts do not pay: a probe (proposing, then verifying at
# the widest width) is priced from the calibrated costs, and probes are spaced so they cost about this much.
# Fixed intervals ignored the price: a 16-wide tree probed every 16 steps took 9% of a best-of-8 run
PROBE_SHARE = 0.02
MAX_INTERVAL = 256  # most steps between probes, however dear a probe is
# probes that did not pay, in a row, after which the share stops halving (2% -> 0.25% of the time): where a
# drafter never pays (`recycling` in a sampled best-of-8 batch) its probes were most of its 4% over `ar`,
# while one paid probe (text that starts repeating) restores the full share at once
MAX_PROBE_MISSES = 3
# memory of the realised saving per proposing step (~10 proposals): a drafter keeps proposing through a few
# fruitless steps of text that repeats now and then, and stops where its drafts have stopped paying
SAVING_DECAY = 0.9
TIE_BREAK = 1e-3  # weight of the rows' mean expected tokens beside the batch's expected progress (`_batch_worth`)


def confidence_bucket(confidence: Float[Array, "B"] | None, kind: str | tuple[str, ...], batch: int,
                      source: Int[Array, "B"] | None = None) -> Int[Array, "B"]:
    """A draft's confidence as one of NUM_BUCKETS: log2 buckets of a count (match length, n-gram order),
    or equal-width buckets of a probability (a head's or a draft model's). `kind` per source (a tuple,
    indexed by `source`): a hybrid's suffix rows carry a match length, its head rows a probability."""
    if confidence is None:
        return jnp.zeros((batch,), jnp.int32)
    c = jnp.maximum(confidence.astype(jnp.float32), 0.0)
    if isinstance(kind, str):
        probability = jnp.asarray(kind == "probability")
    else:
        source = jnp.zeros((batch,), jnp.int32) if source is None else source
        probability = jnp.asarray([k == "probability" for k in kind])[source]
    b = jnp.where(probability, c * NUM_BUCKETS, jnp.log2(c + 1.0))
    return jnp.clip(jnp.floor(b), 0, NUM_BUCKETS - 1).astype(jnp.int32)


def init_adapt(proposer: Proposer, counts: tuple[Array, Array] | None = None, batch: int = 1) -> Adapt:
    shape = (len(proposer.sources) * _groups(proposer), 2 * NUM_BUCKETS, max(proposer.depth, 1))
    tried, hit = (jnp.zeros(shape, jnp.float32),) * 2 if counts is None else counts
    rows = jnp.zeros((batch,), jnp.int32)
    parents = _shadow_shape(proposer)[0]
    nodes = parents.shape[0]
    return Adapt(tried=tried, hit=hit, streak=rows, backoff=jnp.ones((), jnp.int32),
                 shadow_tokens=jnp.zeros((batch, nodes), jnp.int32), shadow_valid=jnp.zeros((batch, nodes), bool),
                 shadow_parents=jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (batch, nodes)),
                 shadow_start=rows, shadow_scored=rows, shadow_row=rows, shadow_bucket=rows,
                 wait=jnp.zeros((), jnp.int32), saving=jnp.full((), jnp.inf, jnp.float32),
                 width_hist=jnp.zeros((len(loop_widths(proposer)),), jnp.int32),
                 predicted_tokens=jnp.zeros((), jnp.float32), predicted_s=jnp.zeros((), jnp.float32),
                 drafted_steps=jnp.zeros((), jnp.int32), probing=jnp.zeros((), bool), proposing=jnp.zeros((), bool),
                 probe_due=jnp.zeros((), bool), credit=jnp.full((), jnp.inf, jnp.float32),
                 probed=jnp.zeros((), bool), probe_misses=jnp.zeros((), jnp.int32),
                 idle_misses=jnp.zeros((), jnp.int32), expected=jnp.ones((), jnp.float32))


def probe_price(costs: Float[Array, "W"], drafter_s: Float[Array, ""] | float = 0.0,
                width: Int[Array, ""] | int = -1) -> Float[Array, ""]:
    """What a probe at `width` (an index into the loop's widths; the widest by default) adds to a 1-token
    step: the drafter's cost plus that verify's cost over a 1-token step's (an upper bound: nothing of the
    draft is assumed accepted)."""
    return drafter_s + costs[width] - costs[0]


def probe_interval(costs: Float[Array, "W"], drafter_s: Float[Array, ""] | float = 0.0) -> Int[Array, ""]:
    """Steps between probes so that probing costs about `PROBE_SHARE` of the time: a probe's price is
    the drafter's cost plus the widest verify's cost over a 1-token step's (an upper bound: nothing of
    the draft is assumed accepted). Near-free verification (accelerators at small batch) probes every
    other step, a dear one (a wide tree on a CPU) seldom."""
    price = probe_price(costs, drafter_s)
    return jnp.clip(jnp.ceil(price / (PROBE_SHARE * costs[0])), 2, MAX_INTERVAL).astype(jnp.int32)


def probe_credit(credit: Float[Array, ""], costs: Float[Array, "W"], drafter_s: Float[Array, ""] | float = 0.0,
                 misses: Int[Array, ""] | int = 0) -> tuple[Float[Array, ""], Bool[Array, ""]]:
    """The probing budget at the start of a step, and whether it is full: `PROBE_SHARE` of a 1-token step
    (halved for each of the last `misses` probes in a row that did not pay) more than the last step left,
    at most one probe of the widest width (a long quiet stretch does not buy a burst of probes). A fresh
    loop (credit inf) starts with one probe of its narrowest drafting width: a drafter whose estimate
    turns down its first drafts has them tested soon, and a short generation is not charged a probe of
    the widest width up front (a 15-node tree at batch 8: 2% of a 128-token
    best-of-8 run). Probes after a backoff were not budgeted before: `recycling`, whose every proposal
    holds a draft that could gain, probed its 15-node tree about six times in a best-of-8 batch's first
    128 steps, each nearly two extra steps (0.89x `ar`)."""
    cap = probe_price(costs, drafter_s)
    start = probe_price(costs, drafter_s, min(1, costs.shape[0] - 1))
    share = PROBE_SHARE * 0.5 ** jnp.clip(misses, 0, MAX_PROBE_MISSES).astype(jnp.float32)
    credit = jnp.where(jnp.isinf(credit), jnp.minimum(start, cap), jnp.minimum(credit + share * costs[0], cap))
    return credit, credit >= cap


def idle_wait(costs: Float[Array, "W"], drafter_s: Float[Array, ""] | float = 0.0,
              misses: Int[Array, ""] | int = 0) -> Int[Array, ""]:
    """Steps to skip after a proposal that found nothing worth verifying (the step ran at width 1) and left
    the average saving short: such a proposal cost the drafter alone, so proposing once every this many
    steps plus one costs at most `PROBE_SHARE` of the time. An n-gram lookup at batch 1 (a few tenths of a
    millisecond) then proposes every step, and catches text that repeats after a stretch of fresh text,
    where doubling waits had left it proposing on 7% of steps (MAT 1.06 against 1.70 at fixed widths).
    A model drafter waits in proportion to its cost, and longer while its drafts keep finding nothing:
    the wait doubles for each of the `misses` proposals before it that found nothing either (at most
    `MAX_PROBE_MISSES` times), where an EAGLE head at batch 8, a quarter of a step per proposal, spent
    2% of the time on proposals that a sampled batch's slowest row never verified."""
    steps = jnp.floor(drafter_s / (PROBE_SHARE * costs[0]))
    steps = steps * 2.0 ** jnp.clip(misses, 0, MAX_PROBE_MISSES).astype(jnp.float32)
    return jnp.clip(steps, 0, probe_interval(costs, drafter_s)).astype(jnp.int32)


@struct.dataclass
class LoopState:
    tokens: Int[Array, "B S"]  # prompt + generated, right-padded
    lengths: Int[Array, "B"]  # valid tokens per row, the pending token included
    prompt_lengths: Int[Array, "B"]
    done: Bool[Array, "B"]  # hit EOS or max_new_tokens
    cache: KVCache  # lengths == self.lengths - 1
    hidden: Float[Array, "B D"]  # target hidden state that produced the pending token
    features: Float[Array, "B D1 F"] | None  # proposer.feature_layers outputs along the last accepted path
    proposer_state: Any
    rng: jax.Array  # the run's key, fixed: drafts fold in the step, verification each row and position
    steps: Int[Array, ""]  # verify forwards run
    accept_hist: Int[Array, "K2"]  # accept_hist[n]: active row-steps that produced n tokens
    verify_hist: Int[Array, "W"]  # steps whose verify forward ran each static width (`loop_widths`)
    source_counts: Int[Array, "N"]  # active row-steps drafted by each proposer id
    adapt: Adapt
    trace: StepTrace | None = None  # generate(trace=True): what each step drafted, verified and accepted


@dataclasses.dataclass
class Session:
    """What a later `generate(..., session=)` continues from (multi-round thinking).

    The next call reuses each row's KV cache for the prefix its new prompt shares with this history
    (only the rest is prefilled), and the drafter's persistent state (suffix store, n-gram pool) when
    the method is the same, so drafts can copy from every earlier round.
    """

    proposer: Proposer
    cache: KVCache  # holds context.tokens[b, :context.lengths[b] - 1]
    proposer_state: Any
    context: Context  # the final history, on device
    acceptance: tuple[Any, Any] | None = None  # the adaptive loop's (tried, hit) counts, carried on

    @property
    def batch(self) -> int:
        return int(self.context.lengths.shape[0])

    def host_history(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [B, S], lengths [B]) on the host: what the next prompts are matched against."""
        return jax.device_get((self.context.tokens, self.context.lengths))


@dataclasses.dataclass
class GenerateOutput:
    tokens: list[list[int]]  # generated ids per row, prompt and EOS excluded
    texts: list[str]
    stats: GenerationStats  # read like a dict; `to_dict()` for a results file
    session: Session | None = None  # set when generate(..., keep_session=True)


def _eos_mask(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype)) if eos_ids else jnp.zeros(tokens.shape, bool)


@partial(jax.jit, static_argnames=("cfg", "max_len", "eos_ids", "feature_layers", "mesh", "parts"))
def prefill(params, prompt: Int[Array, "Q P"], prompt_lengths: Int[Array, "Q"], rows: Int[Array, "B"],
            seed: Int[Array, ""], sampling_cfg: Sampling, max_new: Int[Array, ""],
            feed: Int[Array, "Q F"] | None = None,
            start: Int[Array, "Q"] | None = None, cache: KVCache | None = None, order: Int[Array, "Q"] | None = None,
            *, cfg: ModelConfig, max_len: int, eos_ids: tuple[int, ...], feature_layers: tuple[int, ...] = (),
            mesh: Mesh | None = None, parts: tuple[tuple[int, int], ...] | None = None):
    """Fills the cache with each distinct prompt once, copies it into its branches, samples first tokens.

    `rows[b]` is the prompt of branch b: Best-of-N prefills a question once and gives its N branches
    copies of the cache rows (cheap) instead of running the prompt N times (a full forward each).
    Continuing a `Session`: `cache` already holds each prompt's first `start[q]` tokens (the prefix it
    shares with the previous call's history), and only `feed[q] = prompt[q, start[q]:]` is run.
    Also returns the outputs of `feature_layers` at every fed position, [B, F, layers * D] (None without).
    `sampling_cfg` and the budget `max_new` are traced: one compile serves every temperature and budget.
    The seed's second key is returned for the decode loop (every per-call value is made in here, so
    a call runs this program, `start_proposer` and `decode`, and no small eager ones).
    `parts` (with `order`, from `plan.prefill_parts`): a fresh cache's prompts, taken in `order`, run
    as parts of (count, width) each, every part padded only to its own width: a batch of short prompts
    and a few long ones no longer pays the longest prompt's width on every row.
    """
    rng, rng_decode = jax.random.split(jax.random.PRNGKey(seed))
    q, p = prompt.shape
    chex.assert_shape(prompt_lengths, (q,))
    if cache is None:
        cache = KVCache.init(cfg, q, max_len, transformer.compute_dtype(params))
        feed, start, fresh = prompt, jnp.zeros((q,), jnp.int32), True
    else:
        chex.assert_shape(start, (q,))
        chex.assert_equal(cache.max_len, max_len)
        cache, fresh = cache.with_lengths(start), False
    last = (prompt_lengths - start - 1)[:, None]
    if parts and fresh:
        logits, hidden, cache, layer_hidden = _prefill_parts(params, cfg, prompt, last, cache, order, parts,
                                                             feature_layers)
    else:
        out = transformer.forward(params, cfg, feed, cache, logit_positions=last, cache_is_empty=fresh,
                                  hidden_layers=feature_layers)
        logits, cache, layer_hidden = out.logits[:, 0], out.cache, out.layer_hidden
        hidden = jnp.take_along_axis(out.hidden, last[:, :, None], axis=1)[:, 0]
    lengths = jnp.take(prompt_lengths, rows)
    first = sampling.sample(rng, jnp.take(logits, rows, axis=0), sampling_cfg).astype(jnp.int32)
    b = rows.shape[0]
    tokens = jnp.zeros((b, max_len), jnp.int32).at[:, :p].set(jnp.take(prompt, rows, axis=0))
    tokens = tokens.at[jnp.arange(b), lengths].set(first)
    done = _eos_mask(first, eos_ids) | (max_new <= 1)
    cache = cache.with_lengths(prompt_lengths)
    if fresh:  # a continued session has one row per prompt already: no copy
        cache = cache.select_rows(rows)
    features = jnp.take(jnp.concatenate(layer_hidden, axis=-1), rows, axis=0) if feature_layers else None
    hidden = jnp.take(hidden, rows, axis=0).astype(jnp.float32)
    tokens, lengths, hidden, done, features = sharding.constrain_rows(
        (tokens, lengths + 1, hidden, done, features), mesh)
    return tokens, lengths, sharding.constrain_cache(cache, mesh), hidden, done, features, rng_decode


def _prefill_layout(plan: Plan, mesh: Mesh | None = None) -> tuple[np.ndarray, tuple[tuple[int, int], ...]] | None:
    """(order, parts) a prefill of `plan` runs in (`plan.prefill_parts`); None for one batch, which a
    continued session (only new tokens), a sharded model (rows split across devices) and a call padded
    on request (`pad_prompts_to`: shapes shared across calls) always are."""
    if plan.start is not None or mesh is not None or plan.one_batch:
        return None
    return prefill_parts(plan.prompt_lengths, plan.prompt_bucket)


def _prefill_parts(params, cfg: ModelConfig, prompt: Int[Array, "Q P"], last: Int[Array, "Q 1"], cache: KVCache,
                   order: Int[Array, "Q"], parts: tuple[tuple[int, int], ...], feature_layers: tuple[int, ...]):
    """`prefill`'s forward over a fresh cache, part by part: the prompts in `order` (shortest first),
    `count` of them at a time over their first `width` tokens, each part's keys and values written
    into its own rows of `cache`. Returns what one forward over all of them gives: the logits at
    `last` [Q, V], the final hidden state there [Q, D], the cache, and the feature layers' outputs
    [Q, P, D] (zero past a part's width, which is past its prompts)."""
    q, p = prompt.shape
    chex.assert_shape(order, (q,))
    chex.assert_equal(sum(count for count, _ in parts), q)
    k, v = list(cache.k), list(cache.v)
    logits, hidden, layer_hidden = [], [], []
    first = 0
    for count, width in parts:
        rows = order[first:first + count]
        at = last[rows]
        out = transformer.forward(params, cfg, prompt[rows, :width], KVCache.init(cfg, count, width, k[0].dtype),
                                  logit_positions=at, cache_is_empty=True, hidden_layers=feature_layers)
        for i in range(len(k)):  # this part's rows, first `width` slots; the rest stays as it was
            k[i] = k[i].at[rows, :, :width].set(out.cache.k[i])
            v[i] = v[i].at[rows, :, :width].set(out.cache.v[i])
        logits.append(out.logits[:, 0])
        hidden.append(jnp.take_along_axis(out.hidden, at[:, :, None], axis=1)[:, 0])
        layer_hidden.append(tuple(jnp.pad(h, ((0, 0), (0, p - width), (0, 0))) for h in out.layer_hidden))
        first += count
    back = jnp.argsort(order)  # sorted position of each prompt
    gather = lambda xs: jnp.take(jnp.concatenate(xs, axis=0), back, axis=0)
    feats = tuple(gather([part[j] for part in layer_hidden]) for j in range(len(feature_layers)))
    return gather(logits), gather(hidden), cache.replace(k=tuple(k), v=tuple(v)), feats


def verify_widths(k: int, narrow: bool = True) -> tuple[int, ...]:
    """Static forward widths the loop picks from: 1 (no draft anywhere), 2^i + 1 from 5 up (from 3 when
    `narrow`), and K+1. The adaptive loop cuts drafts to the width it chooses, and on a CPU where a
    verify of 5 costs 2x a 1-token step two drafted tokens at width 3 (about 1.35x) pay where four do
    not; a fixed-width loop verifies whole drafts and would rarely use it, so it does not compile it
    (each width is one more forward in the compiled loop)."""
    return tuple(sorted({1, k + 1} | {2**i + 1 for i in range(1 if narrow else 2, 8) if 2**i < k}))


def loop_widths(proposer: Proposer, adaptive: bool = True) -> tuple[int, ...]:
    """The static verify widths of a proposer's steps: a chain's `verify_widths`; a tree's sub-trees
    (`TreeTemplate.subtrees`: root, first-ranked chain, whole) when adaptive, else its root or all."""
    if proposer.template is None:
        return verify_widths(proposer.width, adaptive)
    return tuple(map(len, proposer.template.subtrees)) if adaptive else (1, proposer.width + 1)


def _subtree_of_width(template: TreeTemplate, width: int) -> tuple[int, ...]:
    return next(s for s in template.subtrees if len(s) == width)


def _groups(proposer: Proposer) -> int:
    """Acceptance is counted apart per drafting sub-tree of a tree (a chain of 4 nodes is accepted less
    often than the 14-node tree around it); a chain's positions do not depend on the width."""
    return 1 if proposer.template is None else max(len(loop_widths(proposer)) - 1, 1)


def _tree_members(proposer: Proposer) -> np.ndarray:
    """[W, K] bool: draft node j (template node j + 1) is in the sub-tree of loop width index w."""
    out = np.zeros((len(loop_widths(proposer)), proposer.width), bool)
    for w, width in enumerate(loop_widths(proposer)):
        out[w, [n - 1 for n in _subtree_of_width(proposer.template, width)[1:]]] = True
    return out


def _verify(params, cfg: ModelConfig, inputs: Int[Array, "B K1"], draft: Draft, valid: Bool[Array, "B K1"] | None,
            cache: KVCache, longest: jax.Array, sampling_cfg: Sampling, rng: jax.Array, widths: tuple[int, ...],
            template: TreeTemplate | None = None, hidden_layers: tuple[int, ...] = (), topk: int = 0,
            index: jax.Array | None = None):
    """The target forward and the verification of a step, on just enough inputs for the longest draft.

    A verify forward of T tokens costs far more than one token on CPUs (3-4x for T=9 here): when no
    row has a draft, or only short ones, a narrower static width runs: one `lax.while_loop` per width,
    run once for the chosen one and skipped for the others. Each width's branch writes its new keys
    and values into the cache in place and verifies at its own width, returning only the small
    results: verifying the K+1 positions' logits after every forward (an argmax or a softmax over the
    vocabulary per position) cost a 1-token step at batch 8 as much as its LM head. A chain is cut to
    the branch's width (every row's draft fits: the width covers `longest`); a tree runs the root
    alone, one of its sub-trees (`index`, the adaptive loop's choice: the draft is already cut to it)
    or all its nodes, with the (sub-)tree's attention mask and depths as positions (a dynamic tree's
    own, per row: `Draft.parents`), its nodes' keys/values at their whole-tree slots. Outputs are
    padded back to K+1 positions (a sub-tree's at its nodes' places); the rest lies outside every
    row's draft and is unused. Returns (verification, hidden [B, K+1, D], the `hidden_layers`
    outputs, the cache with the new keys/values, the top-`topk` token ids of each position's logits
    or None, the index of the width that ran).
    """
    k1 = inputs.shape[1]
    static_tree = {} if template is None else {"tree_mask": jnp.asarray(template.attention_mask),
                                               "pos_offsets": jnp.asarray(template.depth, jnp.int32)}
    pad = lambda x: jnp.pad(x, ((0, 0), (0, k1 - x.shape[1])) + ((0, 0),) * (x.ndim - 2))

    def branch(width: int):
        nodes = None if template is None or width in (1, k1) else np.asarray(_subtree_of_width(template, width))
        if nodes is not None:
            sub = template.subtree(tuple(nodes.tolist()))
            place = lambda x: jnp.zeros(x.shape[:1] + (k1,) + x.shape[2:], x.dtype).at[:, nodes].set(x)

            def run(inputs, cache, draft, valid, rng):  # a sub-tree: its nodes gathered, results put back
                out = transformer.forward(params, cfg, inputs[:, nodes], cache, hidden_layers=hidden_layers,
                                          write_cache=False, tree_mask=jnp.asarray(sub.attention_mask),
                                          pos_offsets=jnp.asarray(sub.depth, jnp.int32))
                logits = jax.lax.optimization_barrier(out.logits)
                res = verify_tree(logits, inputs[:, nodes], valid[:, nodes], sub, sampling_cfg, rng)
                deep = template.max_depth - sub.max_depth
                as_full = jnp.asarray(nodes, jnp.int32)
                res = TreeVerifyResult(tokens=jnp.pad(res.tokens, ((0, 0), (0, deep))),
                                       num_accepted=res.num_accepted,
                                       path=as_full[jnp.pad(res.path, ((0, 0), (0, deep)))],
                                       last_node=as_full[res.last_node])
                top = place(jax.lax.optimization_barrier(jax.lax.top_k(logits, topk)[1])) if topk else None
                # the sub-tree's nodes go to their places in the whole tree (what compact reads)
                cache = kv.write_layers(cache, out.new_kv, cache.lengths[:, None] + jnp.asarray(nodes, jnp.int32)[None])
                return cache, (res, place(out.hidden), tuple(map(place, out.layer_hidden)), top)
            return run

        def run(inputs, cache, draft, valid, rng):
            whole_tree = template is not None and width == k1
            parents = None
            if whole_tree and draft.parents is not None:  # a dynamic tree: its own parents in every row
                parents = jnp.concatenate([jnp.full_like(draft.parents[:, :1], -1), draft.parents], axis=1)
                mask = ancestor_mask(parents, template.max_depth)
                tree = {"tree_mask": mask, "pos_offsets": tree_depths(mask)}
            else:
                tree = static_tree
            out = transformer.forward(params, cfg, inputs[:, :width], cache, hidden_layers=hidden_layers,
                                      write_cache=False, **(tree if whole_tree else {}))
            # the barrier keeps XLA:CPU from fusing the verification's slices and gathers of the logits
            # into the LM-head dot, which it then runs as a naive loop (batch 8, width 9, sampling: the
            # head took 41 instead of 17 ms a step); top-k's consumers did the same (lookahead's window)
            logits = jax.lax.optimization_barrier(out.logits)
            if whole_tree:
                res = verify_tree(logits, inputs, valid, template, sampling_cfg, rng, parents)
            else:
                cut = draft.replace(tokens=draft.tokens[:, :width - 1], num=jnp.minimum(draft.num, width - 1),
                                    probs=None if draft.probs is None else draft.probs[:, :width - 1],
                                    valid=None)
                res = verify_chain(logits, cut, sampling_cfg, rng)
                res = res.replace(tokens=pad(res.tokens))
                if template is not None:  # the root alone: the tree's result with an empty path
                    res = TreeVerifyResult(tokens=res.tokens[:, :template.max_depth + 1],
                                           num_accepted=res.num_accepted,
                                           path=jnp.zeros((inputs.shape[0], template.max_depth), jnp.int32),
                                           last_node=jnp.zeros_like(res.num_accepted))
            # (the barrier on top-k's output: lookahead's window update ran 200 instead of 80 ms a step)
            top = pad(jax.lax.optimization_barrier(jax.lax.top_k(logits, topk)[1])) if topk else None
            cache = kv.write_layers(cache, out.new_kv, cache.lengths[:, None] + jnp.arange(width)[None])
            return cache, (res, pad(out.hidden), tuple(map(pad, out.layer_hidden)), top)
        return run

    fits = jnp.searchsorted(jnp.asarray(widths), longest + 1)
    index = fits if index is None else jnp.maximum(index, fits)
    # One while loop per width, run once or not at all, instead of a `lax.switch`: each branch writes its
    # new keys/values into the cache it carries, in place. A conditional that carried the cache made
    # XLA:CPU copy every cache buffer in its wide branches; a switch that only read it had to hand the
    # new keys/values out padded to K+1 and write them after it (a pad and a layout copy per layer: a
    # drafting method's batch-8 1-token step cost 1.5-3% more than `ar`'s; now 0-1.3%).
    runs = [branch(w) for w in widths]
    if len(runs) == 1:
        cache, outs = runs[0](inputs, cache, draft, valid, rng)
    else:
        shapes = jax.eval_shape(runs[-1], inputs, cache, draft, valid, rng)[1]
        outs = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        for i, run in enumerate(runs):
            def once(carry, run=run):
                return run(inputs, carry[0], draft, valid, rng) + (jnp.bool_(False),)
            cache, outs, _ = jax.lax.while_loop(lambda carry: carry[2], once, (cache, outs, index == i))
    res, hidden, layer_hidden, top = outs
    return res, hidden, layer_hidden, cache, top, index


def _commit(state: LoopState, new_tokens: Int[Array, "B K1"], num_new: Int[Array, "B"]) -> Int[Array, "B S"]:
    """Appends new_tokens[b, :num_new[b]] at row b's end."""
    b, k1 = new_tokens.shape
    cols = state.lengths[:, None] + jnp.arange(k1)[None]
    # static-size masked scatter for a dynamic count: entries past num_new go out of range and are dropped
    cols = jnp.where(jnp.arange(k1)[None] < num_new[:, None], cols, state.tokens.shape[1])
    return state.tokens.at[jnp.arange(b)[:, None], cols].set(new_tokens, mode="drop")


def _context(s: LoopState, group: Int[Array, "B"], weights: Any, sampling_cfg: Sampling | None = None) -> Context:
    return Context(tokens=s.tokens, lengths=s.lengths, group=group, active=~s.done, hidden=s.hidden,
                   weights=weights, cache=s.cache, sampling=sampling_cfg)


@partial(jax.jit, static_argnames=("proposer", "trace_steps"), donate_argnums=(0,))
def start_proposer(prefilled: tuple, features: Any, prompt_lengths: Int[Array, "B"], group: Int[Array, "B"],
                   weights: Any = None, feature_start: Any = None, prev_state: Any = None, prev: Context | None = None,
                   sampling_cfg: Sampling | None = None, acceptance: tuple[Any, Any] | None = None,
                   prompt_of: Int[Array, "B"] | None = None, prompt_rows: Int[Array, "Q"] | None = None, *,
                   proposer: Proposer, trace_steps: int = 0) -> LoopState:
    """The loop's initial state from `prefill`'s outputs, with the proposer's own state.

    `prefilled`: `prefill`'s outputs less its features, donated. The features [B, F, .] (positions
    from `feature_start`, or None) are what it computed of `proposer.feature_layers`, for `init`; they
    come apart, undonated: nothing in the state has their shape, so XLA would warn that it could not
    reuse them. `prev_state`/`prev`: the same proposer's state and history from a continued Session.
    `prompt_of` / `prompt_rows` (Best-of-N: rows share prompts): `init` sees them in its context
    (`Context.prompt_of`). `trace_steps` > 0: the state carries a `StepTrace` of that many steps
    (`generate(trace=True)`).
    """
    tokens, lengths, cache, hidden, done, rng = prefilled
    batch = tokens.shape[0]
    state = LoopState(
        tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths, done=done, cache=cache, hidden=hidden,
        proposer_state=(), rng=rng, steps=jnp.zeros((), jnp.int32),
        features=None if features is None else jnp.zeros((batch, proposer.depth + 1) + features.shape[2:],
                                                          features.dtype),
        accept_hist=jnp.zeros((proposer.depth + 2,), jnp.int32),
        verify_hist=jnp.zeros((len(loop_widths(proposer)),), jnp.int32),
        source_counts=jnp.zeros((len(proposer.sources),), jnp.int32), adapt=init_adapt(proposer, acceptance, batch),
        trace=step_trace.empty(batch, trace_steps) if trace_steps else None)
    ctx = _context(state, group, weights, sampling_cfg).replace(features=features, feature_start=feature_start,
                                                                 prompt_of=prompt_of, prompt_rows=prompt_rows)
    pstate = proposer.init(ctx)
    if prev is not None:
        pstate = proposer.resume(pstate, ctx, prev_state, prev)
    return state.replace(proposer_state=pstate)


@partial(jax.jit, static_argnames=("cfg", "proposer", "eos_ids", "mesh", "gated", "adaptive", "lean_steps"),
         donate_argnums=(1,))
def decode(params, state: LoopState, group: Int[Array, "B"], step_limit: Int[Array, ""], sampling_cfg: Sampling,
           max_new: Int[Array, ""], speculate_max_rows: Int[Array, ""], weights: Any = None,
           costs: Float[Array, "W"] | None = None, drafter_s: Float[Array, ""] | None = None,
           verify_floor: Int[Array, ""] | None = None, cheap_s: Float[Array, ""] | None = None,
           wake_s: Float[Array, ""] | None = None, *, cfg: ModelConfig,
           proposer: Proposer, eos_ids: tuple[int, ...], mesh: Mesh | None = None, gated: bool = False,
           adaptive: bool = False, lean_steps: bool = True) -> LoopState:
    """The whole decode: one while loop, three reasons to stop (budget, all rows done, no cache room).

    `state` comes from `start_proposer`. The loop also pauses once `state.steps` reaches `step_limit`
    (a traced value, so a caller checking rows on the host every C steps compiles this once); calling
    again with the returned state resumes exactly where it paused. `gated`: steps with more unfinished
    rows than `speculate_max_rows` skip `propose` and verify no draft (a 1-token forward); the
    proposer still absorbs every step's tokens (`update`). The budget `max_new`, the row cut-off and
    `sampling_cfg`'s numbers are traced, so one compile serves every call of the same shapes.

    `adaptive`: each step picks the static verify width (`loop_widths`, 1 = no draft) that maximises
    expected tokens per second over the active rows, from `costs` (the calibrated seconds of each width,
    `step_cost`) and the online acceptance estimate (`Adapt`); drafts are truncated to it, which is
    lossless (any prefix of a draft verifies exactly). A drafter whose proposals stop saving more than
    its own `drafter_s` (a moving average of what each proposing step saved) backs off: `propose` is
    skipped for 2, 4, 8, ... steps up to `probe_interval` after verified drafts that fell short (then
    probed again, when the probe credit covers it: probes cost at most 2% of the time), and for
    `idle_wait` steps (its cost over 2% of a step) after drafts not worth verifying. A proposer with a
    `cheap_part` (the hybrid's suffix match) proposes that part on every step while the rest backs off,
    and its drafts go through the same width decision, as long as its own `cheap_s` (calibrated) is
    under 2% of a step; a dearer one backs off with the rest. Probes and the waits after fruitless
    proposals are priced at `drafter_s` plus `wake_s`, what a proposal after a wait first catches up on
    (a lazy EAGLE head's lag: at batch 8 on a 2-core CPU 14 ms on top of a 16 ms proposal, which priced
    alone had probes take twice their share). The width decision reads only what is known
    before the verify forward; the backoff, what the verify yielded. A step that does not propose and has
    no cut draft left to score (`idle`) runs a lean body (`lean_steps`): a 1-token forward, the
    proposer's `update`, and the few counters such a step moves, so a backed-off drafter's steps cost
    about what `ar`'s do instead of carrying the decision and the wider verify forwards they skip.

    `verify_floor` (-1 or None in a real run; traced): the verify forward covers at least this many
    draft positions, whatever the drafts' lengths, so that the calibration (`step_costs`) and the
    warm-up (`specjax.warm_start`) run the width they name; such a run (a floor of 0 or more) neither
    probes nor backs off. Positions past a row's draft are never accepted.
    """
    layers = proposer.feature_layers
    k, depth, template = proposer.width, proposer.depth, proposer.template
    widths = jnp.asarray(loop_widths(proposer), jnp.int32)
    run_widths = loop_widths(proposer, adaptive)  # what the verify switch compiles (`verify_widths`)
    node_depth = None if template is None else jnp.asarray(template.depth[1:], jnp.int32)

    def context(s: LoopState) -> Context:
        return _context(s, group, weights, sampling_cfg)

    def cond(s: LoopState):
        budget_left = (s.steps < max_new) & (s.steps < step_limit)
        room_left = jnp.max(jnp.where(s.done, 0, s.lengths)) + k < s.tokens.shape[1]
        return budget_left & jnp.any(~s.done) & room_left

    def gate_open(s: LoopState) -> Bool[Array, ""]:
        """Not in a wide batch (speculate_max_rows)."""
        return jnp.ones((), bool) if not gated else jnp.sum(~s.done) <= speculate_max_rows

    def will_propose(s: LoopState) -> Bool[Array, ""]:
        """Not in a wide batch, nor while an adaptive loop backs off: no draft, no drafting cost."""
        return gate_open(s) & (s.adapt.wait <= 0) if adaptive else gate_open(s)

    # a proposer with a cheap part proposes it on every step the gate allows, the rest only when it is due;
    # a cheap part that costs 2% of a step or more (as calibrated, `cheap_s`) is due with the rest
    split = adaptive and proposer.cheap_part
    cheap_pays = jnp.ones((), bool) if cheap_s is None or not split else idle_wait(costs, cheap_s) == 0

    # what a proposal after a wait costs: the proposal and what it first catches up on (`Proposer.waking`)
    woken_s = drafter_s if wake_s is None or drafter_s is None else drafter_s + wake_s

    # a calibration or warm-up run (`verify_floor` >= 0): the forced costs name the width; no probe, no backoff
    forced = jnp.zeros((), bool) if verify_floor is None else verify_floor >= 0

    def proposal_runs(s: LoopState) -> Bool[Array, ""]:
        """Whether `propose` runs at all this step (`split`: its cheap part)."""
        return gate_open(s) & (cheap_pays | will_propose(s)) if split else will_propose(s)

    def idle(s: LoopState) -> Bool[Array, ""]:
        """A step with no proposal and nothing to score: a backed-off or gated loop's usual step. (A forced
        width, `verify_floor` > 0, is a calibration's drafting step.)"""
        no_floor = jnp.ones((), bool) if verify_floor is None else verify_floor <= 0
        return ~proposal_runs(s) & ~jnp.any(s.adapt.shadow_valid) & no_floor

    def step(s: LoopState, lean: bool = False) -> LoopState:
        """One decode step. `lean` (static): a step on which `propose` does not run and nothing is left to
        score (`idle`), traced without what such a step would compute only to discard: the drafter's call,
        the width decision, the verify's wider forwards, the acceptance bookkeeping. It leaves the state
        the full step would (cache slots past the committed lengths aside, which no step reads)."""
        # drafts draw from the step's key; verification from each row's position keys (`position_keys`)
        r_prop = jax.random.fold_in(jax.random.fold_in(s.rng, 0), s.steps)
        r_ver = position_keys(jax.random.fold_in(s.rng, 1), s.lengths, depth + 1)
        ctx = context(s)
        active = ~s.done
        want = will_propose(s)
        runs = proposal_runs(s)
        p_ctx = ctx.replace(full_draft=want) if split else ctx
        propose = lambda: proposer.propose(s.proposer_state, p_ctx, r_prop)
        no_draft = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(propose)[1])
        if lean:
            pstate, draft = s.proposer_state, no_draft()
        elif not gated and (not adaptive or split):
            pstate, draft = propose()
        else:  # (a loop run once or not at all carries a head's cache in place, where `lax.cond` copied it)
            pstate, draft = run_if(runs, lambda c: proposer.propose(c[0], p_ctx, r_prop),
                                   (s.proposer_state, no_draft()))
        drafting = active & runs
        draft = draft.replace(num=jnp.where(drafting, draft.num, 0))
        adapt = s.adapt
        proposed = draft
        # deterministic drafts: what verification leaves of them is scored against later tokens (`_shadow`)
        scored = draft.probs is None
        drafting_before = drafting
        # ... so a drafter that costs next to nothing neither probes nor backs off: its estimate sees every draft
        free = jnp.zeros((), bool) if not (adaptive and scored) else idle_wait(costs, woken_s) == 0
        if adaptive and lean:
            adapt, best = _idle_decision(s.adapt, costs, woken_s, active), jnp.zeros((), jnp.int32)
        elif adaptive:
            draft, drafting, adapt, best, bucket = _choose_width(
                draft, drafting, active, want, s.adapt, costs, drafter_s, widths, node_depth, proposer, s.steps,
                max_new - (s.lengths - s.prompt_lengths), ~forced & ~free, runs, woken_s)
        pending = at(s.tokens, s.lengths - 1).astype(jnp.int32)
        inputs = jnp.concatenate([pending[:, None], draft.tokens.astype(jnp.int32)], axis=1)  # [B, K+1]
        longest = jnp.max(draft.num) if verify_floor is None else jnp.maximum(jnp.max(draft.num), verify_floor)
        valid = None
        if template is not None:
            valid = jnp.concatenate([jnp.ones_like(active)[:, None], draft.valid & drafting[:, None]], axis=1)
        step_widths = (1,) if lean else run_widths  # a lean step has no draft: the 1-token forward alone
        res, out_hidden, layer_hidden, cache, topk, ran = _verify(
            params, cfg, inputs, draft, valid, s.cache, longest, sampling_cfg, r_ver, step_widths, template,
            layers, proposer.logit_topk, best if adaptive and template is not None and not lean else None)
        ran = jnp.asarray([loop_widths(proposer).index(w) for w in step_widths], jnp.int32)[ran]
        if template is None:
            node_of_depth = jnp.broadcast_to(jnp.arange(k + 1), (inputs.shape[0], k + 1))
            fed = (jnp.arange(k + 1)[None] <= draft.num[:, None]) & active[:, None]
        else:
            fed = valid & active[:, None]
            node_of_depth = jnp.concatenate([jnp.zeros_like(res.path[:, :1]), res.path], axis=1)
            # a real tree: move the accepted path's keys/values (a lean step's root alone has none)
            if any(len(c) > 1 for c in template.children) and not lean:
                cache = kv.compact(cache, s.cache.lengths, res.path)
        num_new = res.num_accepted + 1
        # stop at the first EOS and at the token budget
        is_eos = _eos_mask(res.tokens, eos_ids) & (jnp.arange(depth + 1)[None] < num_new[:, None])
        first_eos = jnp.argmax(is_eos, axis=1)
        hit_eos = jnp.any(is_eos, axis=1)
        num_new = jnp.where(hit_eos, first_eos + 1, num_new)
        budget = max_new - (s.lengths - s.prompt_lengths)
        num_new = jnp.where(active, jnp.minimum(num_new, budget), 0)
        lengths = s.lengths + num_new
        done = s.done | hit_eos | (lengths - s.prompt_lengths >= max_new)
        hidden = at(out_hidden, at(node_of_depth, jnp.clip(num_new - 1, 0, depth))).astype(jnp.float32)
        features = None
        if layers:  # the accepted path's features: position lengths - 1 + i is node node_of_depth[:, i]
            features = gather_rows(jnp.concatenate(layer_hidden, axis=-1), node_of_depth)
        new = s.replace(
            tokens=sharding.constrain_rows(_commit(s, res.tokens, num_new), mesh),
            lengths=lengths,
            done=done,
            cache=sharding.constrain_cache(cache.with_lengths(jnp.where(active, lengths - 1, s.cache.lengths)), mesh),
            hidden=jnp.where(active[:, None], hidden, s.hidden),
            features=features,
            steps=s.steps + 1,
            accept_hist=s.accept_hist.at[num_new].add(active.astype(jnp.int32)),
            verify_hist=s.verify_hist.at[ran].add(1),
            source_counts=s.source_counts.at[
                jnp.zeros_like(num_new) if draft.source is None else draft.source
            ].add(active.astype(jnp.int32)),
            adapt=adapt,
        )
        if s.trace is not None:
            new = new.replace(trace=step_trace.record(
                s.trace, s.steps, proposed, _drafted_depth(proposed, node_depth), _drafted_depth(draft, node_depth),
                jnp.maximum(num_new - 1, 0), active, want & runs if split else runs, ran))
        if adaptive and lean:  # what `_observe`, `_settle` and `_shadow` do on a step with no draft
            new = new.replace(adapt=_idle_observe(adapt, new.lengths, scored))
        elif adaptive:
            new = new.replace(adapt=_settle(
                _observe(adapt, draft, drafting, res.num_accepted, bucket, node_depth,
                         jnp.maximum(best - 1, 0) if template is not None else 0, _groups(proposer), ~idle(s)),
                _batch_progress(s, new, num_new, max_new), jnp.sum(num_new) / jnp.maximum(jnp.sum(active), 1),
                best, costs, drafter_s, ~forced, free, woken_s, jnp.sum(active) <= 1))
            if scored:  # a draft cut short, or turned down, whose verified part was all accepted
                if template is None:
                    cut, verified = drafting & (res.num_accepted >= draft.num) & (proposed.num > draft.num), draft.num
                else:  # a tree turned down
                    cut = drafting_before & (best == 0) & jnp.any(proposed.valid, axis=1)
                    verified = jnp.zeros_like(draft.num)
                new = new.replace(adapt=_shadow(new.adapt, proposer, proposed, cut, verified, s.lengths, bucket,
                                                new.tokens, new.lengths, new.done))
        ctx_new = context(new).replace(features=features, feature_start=s.lengths - 1,
                                       proposes_next=will_propose(new) if gated or adaptive else None)
        if proposer.logit_topk:
            ctx_new = ctx_new.replace(verified=inputs, verified_topk=topk, verified_valid=fed)
        return new.replace(proposer_state=proposer.update(pstate, ctx_new, s.lengths))

    if not (adaptive or gated) or not lean_steps:  # `propose` runs on every step (or `step` serves all)
        return jax.lax.while_loop(cond, step, state)

    def body(s: LoopState) -> LoopState:
        # each step kind in a while loop run once or not at all (not a `lax.cond`): a loop carries the
        # state, KV cache included, in place, where a conditional made XLA:CPU copy it (`_verify`)
        once = lambda lean: lambda c: (step(c[0], lean), jnp.bool_(False))
        lean = idle(s)
        s = jax.lax.while_loop(lambda c: c[1], once(True), (s, lean))[0]
        return jax.lax.while_loop(lambda c: c[1], once(False), (s, ~lean))[0]

    return jax.lax.while_loop(cond, body, state)


def _drafted_depth(draft, node_depth: Int[Array, "K"] | None) -> Int[Array, "B"]:
    """How deep each row's draft reaches: a chain's count, a tree's deepest valid node."""
    if node_depth is None:
        return draft.num
    return jnp.max(jnp.where(draft.valid, node_depth[None], 0), axis=1)


def acceptance_estimate(tried: Float[Array, "... D"], hit: Float[Array, "... D"],
                        first_prior: Float[Array, "..."] | None = None) -> Float[Array, "... D"]:
    """Posterior mean acceptance of each draft position from its (decayed) counts. Position 0 shrinks
    towards `first_prior` (PRIOR_MEAN when None), each deeper one towards the estimate of the position
    before it: deep positions are tried only when every earlier one was accepted, so they have few
    observations, and a fixed prior of 0.5 there would cut long drafts exactly where acceptance is
    highest (copied text)."""
    out = []
    prior = jnp.full(tried.shape[:-1], PRIOR_MEAN, jnp.float32) if first_prior is None else first_prior
    for i in range(tried.shape[-1]):
        prior = (hit[..., i] + PRIOR_COUNT * prior) / (tried[..., i] + PRIOR_COUNT)
        out.append(prior)
    return jnp.stack(out, axis=-1)


def confidence_prior(first: Float[Array, "... C"]) -> Float[Array, "... C"]:
    """Each confidence bucket's prior for its first draft position where that beats the source's pooled
    rate: the best estimate among it and the buckets below it (`first`, one per bucket), and for a
    bucket after an accepted streak, at least the same bucket's without one. A longer match (a likelier
    head token) is accepted at least as often as a shorter one, so a long match seldom seen (the copied
    text of a second round) starts from the rate of the shorter ones instead of the pooled rate that the
    many short matches of fresh text hold down; its own verifications still outweigh the prior
    (PRIOR_COUNT)."""
    low, after_streak = jnp.split(first, 2, axis=-1)
    low = jax.lax.cummax(low, axis=low.ndim - 1)
    after_streak = jax.lax.cummax(jnp.maximum(after_streak, low), axis=low.ndim - 1)
    return jnp.concatenate([low, after_streak], axis=-1)


def _choose_width(draft, drafting, active, want, adapt: Adapt, costs, drafter_s, widths, node_depth, proposer,
                  step, remaining: Int[Array, "B"] | None = None, probes: Bool[Array, ""] | bool = True,
                  runs: Bool[Array, ""] | None = None, woken_s: Float[Array, ""] | float | None = None):
    """The adaptive decision of one step (see `decode`): the width and the truncated draft; whether to
    keep proposing is `_settle`'s, from what the step yields. `want`: the whole proposal ran (it is
    judged, may probe, and pays the drafter's cost); `runs` (default `want`): some of it ran (a
    proposer's `cheap_part` alone), so its drafts may be verified. `remaining`: each row's tokens left
    in its budget (None: the same for every row). `probes` False: no probe overrides the decision (a
    calibration or warm-up run, whose forced costs name the width it times). `woken_s` (default
    `drafter_s`): a proposal's price after a wait, what probes are paid at."""
    runs = want if runs is None else runs
    woken_s = drafter_s if woken_s is None else woken_s
    batch = draft.num.shape[0]
    remaining = jnp.ones((batch,), jnp.int32) if remaining is None else remaining
    source = jnp.zeros((batch,), jnp.int32) if draft.source is None else draft.source
    credit, full = probe_credit(adapt.credit, costs, woken_s, adapt.probe_misses)
    bucket = (confidence_bucket(draft.confidence, proposer.confidence_kind, batch, source)
              + NUM_BUCKETS * adapt.streak)
    # a bucket starts from its source's rate over all its buckets (or a lower bucket's, if better:
    # `confidence_prior`), not from PRIOR_MEAN: a confidence level seldom seen (a long match, a high head
    # probability) would otherwise start at 0.5, which on a dear verify says "do not draft", and then be
    # tried only on probe steps
    # a tree's sub-trees are counted apart (`_groups`): rows source * G + g, g the drafting sub-tree
    groups = _groups(proposer)
    rows_g = source[:, None] * groups + jnp.arange(groups)[None]  # [B, G]
    pooled = acceptance_estimate(adapt.tried[rows_g].sum((1, 2)), adapt.hit[rows_g].sum((1, 2)))[:, 0]  # [B]
    first = acceptance_estimate(adapt.tried[rows_g, :, :1], adapt.hit[rows_g, :, :1], pooled[:, None, None])
    prior = jnp.maximum(pooled[:, None, None], confidence_prior(first[..., 0]))  # never below the pool
    prior = jnp.take_along_axis(prior, bucket[:, None, None], axis=2)  # [B, G, 1]
    p = acceptance_estimate(adapt.tried[rows_g, bucket[:, None]], adapt.hit[rows_g, bucket[:, None]],
                            prior[..., 0])  # [B, G, D]
    # sub-trees are nested (root, chain, whole): a wider one accepts at least what a narrower one does
    p = jax.lax.cummax(p, axis=1)
    reach = jnp.concatenate([jnp.ones(p.shape[:2] + (1,)), jnp.cumprod(p, axis=2)], axis=2)  # [B, G, D+1]
    if node_depth is None:  # a chain cut to width w keeps w - 1 tokens
        length = jnp.minimum(_drafted_depth(draft, None)[:, None], widths[None] - 1)  # [B, W]
        group_of = jnp.zeros(widths.shape, jnp.int32)
    else:  # a tree: the deepest valid node of each sub-tree
        members = jnp.asarray(_tree_members(proposer))  # [W, K]
        length = jnp.max(jnp.where(draft.valid[:, None] & members[None], node_depth[None, None], 0), axis=2)
        group_of = jnp.maximum(jnp.arange(len(widths)) - 1, 0)
    # P(a row accepts at least i draft tokens) at each width: 0 past what the width keeps of its draft
    upto = jnp.arange(reach.shape[-1])[None, None] <= length[:, :, None]  # [B, W, D+1]
    survive = jnp.where(upto, reach[:, group_of], 0.0)
    expect = jnp.where(active[:, None], survive.sum(-1), 0.0)  # [B, W]: expected tokens (index 0: the sure one)
    worth = _batch_worth(survive, active, remaining)  # [W]: the batch's expected progress
    rate = worth / costs
    # ties: the narrowest chain width (the verify runs what the drafts fill anyway), a tree's widest
    # sub-tree (it runs what is chosen, and holds every narrower one)
    best = jnp.argmax(rate) if node_depth is None else len(widths) - 1 - jnp.argmax(rate[::-1])
    if len(widths) > 1:  # a probe: estimates of widths never chosen would otherwise never be updated
        # when the probe credit is full (every `probe_interval` steps), and on the first draft after a backoff
        # that the credit covers (`probe_due`: verified drafts fell short, or the estimate turned down drafts
        # that could gain; a proposal with no such draft neither sets nor spends it): a drafter that backs off
        # proposes only after waiting, and an estimate that says "no draft" then would never be tested
        # (EAGLE: 1.00 tokens a step where its fixed chain of 4 accepted 2.62). Only when the drafts could
        # gain if every token were accepted: in a batch whose slowest row has no draft a probe only costs
        best_case = _batch_worth(upto.astype(jnp.float32), active, remaining, tie_break=0.0)
        gain = jnp.max(best_case[1:]) > _batch_worth(survive[:, :1], active, remaining, tie_break=0.0)[0]
        # a tree's probes alternate between its best-rated sub-tree and the whole tree: the nested
        # estimates never let a wider sub-tree beat the narrower one it holds without evidence of its
        # own, and a narrow one seldom chosen needs some too
        probed = 1 + jnp.argmax(rate[1:])
        if node_depth is not None:
            probed = jnp.where(step % 2 == 0, len(widths) - 1, probed)
        # every probe is paid from the credit (`probe_credit`), so that probes cost at most PROBE_SHARE
        price = probe_price(costs, woken_s, probed)
        after_backoff = adapt.probe_due & gain & (credit >= price)
        probe = (full & gain | after_backoff) & probes & want
        best = jnp.where(probe, probed, best)
        credit = credit - jnp.where(probe, price, 0.0)
    else:
        after_backoff = gain = probe = jnp.zeros((), bool)
    best = jnp.where(runs, best, 0).astype(jnp.int32)
    # drafts that could gain, turned down by the estimate: the estimate itself is what a probe must test (a
    # pessimistic prior would otherwise turn down drafts accepted at 0.95 until a periodic probe)
    rejected = want & gain & (best == 0) & probes
    rows = jnp.sum(active).astype(jnp.float32)
    if node_depth is None:
        draft = draft.replace(num=jnp.minimum(draft.num, widths[best] - 1))
    else:  # the chosen sub-tree's nodes
        drafting = drafting & (best > 0)
        valid = draft.valid & drafting[:, None] & members[best][None]
        draft = draft.replace(num=jnp.sum(valid, axis=1).astype(jnp.int32), valid=valid)
    any_rows = rows > 0
    adapt = adapt.replace(
        wait=jnp.where(want, adapt.wait, adapt.wait - 1),
        width_hist=adapt.width_hist.at[best].add(any_rows.astype(jnp.int32)),
        predicted_tokens=adapt.predicted_tokens + jnp.where(best > 0, expect[:, best].sum(), rows),
        predicted_s=adapt.predicted_s + jnp.where(any_rows, costs[best] + jnp.where(want, drafter_s, 0.0), 0.0),
        drafted_steps=adapt.drafted_steps + want.astype(jnp.int32), probing=want & after_backoff & probes,
        proposing=want, probe_due=adapt.probe_due | rejected, credit=credit, probed=probe, expected=worth[best])
    return draft, drafting, adapt, best, bucket


def _idle_decision(adapt: Adapt, costs, drafter_s, active: Bool[Array, "B"]) -> Adapt:
    """`_choose_width` on a step that does not propose (`want` False, no draft): width 1, no probe; the
    wait counts down, the probe credit grows, the record counts a 1-token step."""
    credit, _ = probe_credit(adapt.credit, costs, drafter_s, adapt.probe_misses)
    rows = jnp.sum(active).astype(jnp.float32)
    any_rows = rows > 0
    return adapt.replace(wait=adapt.wait - 1, width_hist=adapt.width_hist.at[0].add(any_rows.astype(jnp.int32)),
                         predicted_tokens=adapt.predicted_tokens + rows,
                         predicted_s=adapt.predicted_s + jnp.where(any_rows, costs[0], 0.0),
                         probing=jnp.zeros((), bool), proposing=jnp.zeros((), bool), credit=credit,
                         probed=jnp.zeros((), bool))


def _idle_observe(adapt: Adapt, lengths: Int[Array, "B"], scored: bool) -> Adapt:
    """`_observe`, `_settle` and `_shadow` after a step with no draft and no shadow pending: a deterministic
    drafter's (absent) shadow marks the positions since its start as seen. The counts hold: such a step
    observes nothing, and decaying them there let a drafter that waits 15-75 steps between proposals
    (EAGLE at batch 1, whose chain of 4 costs 2.2x a step) forget each proposal's evidence before the
    next, so its estimate stayed at the prior and turned down drafts a fixed chain ran at 1.19x `ar`."""
    if scored:
        seen = jnp.minimum(lengths - adapt.shadow_start, adapt.tried.shape[-1])
        adapt = adapt.replace(shadow_scored=jnp.maximum(adapt.shadow_scored, seen))
    return adapt


def _batch_progress(before: LoopState, after: LoopState, num_new: Int[Array, "B"], max_new) -> Float[Array, ""]:
    """How far a step moved the batch towards its end: the drop in the most tokens any unfinished row
    has left (a static batch runs until that row is done), at most the step's largest yield (a row
    ending at EOS takes what it had left out of the count, which 1-token steps would remove too)."""
    left = lambda s: jnp.max(jnp.where(s.done, 0, max_new - (s.lengths - s.prompt_lengths)))
    return jnp.clip(left(before) - left(after), 0, jnp.max(num_new)).astype(jnp.float32)


def _settle(adapt: Adapt, progress: Float[Array, ""], mean_tokens: Float[Array, ""], best: Int[Array, ""], costs,
            drafter_s, judge: Bool[Array, ""] | bool = True, free: Bool[Array, ""] | bool = False,
            woken_s: Float[Array, ""] | float | None = None, single: Bool[Array, ""] | bool = False) -> Adapt:
    """After a step that proposed: whether to keep proposing, from what it yielded. The step saved
    `progress` (`_batch_progress`) one-token steps' worth of time less the verify it ran; proposing goes
    on while the moving average of that saving (`SAVING_DECAY`) stays above the drafter's own cost, else it
    backs off: for 2, 4, 8, ... steps up to `probe_interval` after verified drafts that fell short, for
    `idle_wait` steps after a proposal with nothing worth verifying (it cost the drafter alone; doubling
    waits there left n-gram lookups at batch 1 proposing on 7% of steps, 0.94x `ar` where fixed widths
    ran 1.14x). Realised, not expected, savings: a drafter whose verified drafts do not shorten the
    batch (EAGLE in a best-of-8 batch) stops verifying them, whatever the acceptance estimate says.
    The batch's progress, not the rows' mean tokens: extra tokens in rows ahead of the slowest one do
    not end the batch sooner, and EAGLE averaging 1.62 tokens a forward over a best-of-8 batch ran 0.93x
    `ar` with a mean-based rule. A probe after a backoff decides alone, on the rows' `mean_tokens`:
    proposing resumes at once if that paid, since the average before it is what the probe is there to
    test; one step's progress is too noisy for that (8 sampled rows level with each other progress by
    their minimum, almost always one token). The average then restarts level with the drafter's cost,
    so the next proposal's progress decides whether proposing goes on. `judge` False: the
    step only clears its flags (a calibration run proposes every step). `free`: the drafter costs under
    `PROBE_SHARE` of a step and its estimate sees every draft (`_shadow`): it never waits, and the width
    decision alone says what is verified (waits after drafts that fell short left `pld` blind to the
    repeats that followed, 2 to 60 steps at a time). `woken_s` (default `drafter_s`) prices the waits:
    the proposal that ends one first catches up (`Proposer.waking`)."""
    # one row: the saving the estimate expected of the chosen width (`Adapt.expected`), not the one it got.
    # A verify of 5 at 2.2x a step saves -41 ms when nothing is accepted and +97 ms when all is: averaged,
    # realised savings of an EAGLE chain worth 1.18x `ar` dipped below its cost every few dozen steps, and
    # each dip doubled its wait. One row's estimate counts its own verifications; a batch's rows may accept
    # tokens that do not move it (`_batch_progress`), so a batch averages what it got
    saved_by = lambda tokens: tokens * costs[0] - costs[best]  # one-token steps' time a step saved
    saved = saved_by(jnp.where(single & ~adapt.probing, adapt.expected, progress))
    prev = jnp.where(jnp.isfinite(adapt.saving), adapt.saving, drafter_s)  # first: neither paid nor not
    saving = SAVING_DECAY * prev + (1.0 - SAVING_DECAY) * saved
    paid = saved_by(mean_tokens) > drafter_s
    # a paid probe restarts the average level with the drafter's cost: the next proposals' progress decides
    saving = jnp.where(adapt.probing & paid, drafter_s, saving)
    # strictly more: a cheap drafter whose calibrated cost rounds to 0 (the paired difference of two
    # nearly equal steps) and that saves nothing proposed every step of a best-of-8 batch
    pays = jnp.where(adapt.probing, paid, saving > drafter_s)
    # whether the step moved the batch by more than it cost (its slowest row's tokens, not the rows' mean)
    moved = saved_by(progress) > drafter_s
    # a probe that paid on the mean alone resumes proposing but keeps its wait: only the average, or a probe
    # that moved the batch, restores short waits. Resetting them at every paid probe let a drafter that pays
    # on the rows' mean and not on the batch's progress (EAGLE at batch 8) cycle probe, a few proposals, a
    # wait of 2, and propose on 64% of steps at 0.81x `ar`; keeping them after a probe that moved a single
    # row let an EAGLE chain at batch 1 whose average dipped below its cost a few times (a verify of 5 at
    # 2.2x a step leaves a thin margin) wait 64 steps at a time, through text its fixed chain ran at 1.18x
    woken_s = drafter_s if woken_s is None else woken_s  # waits are priced at a proposal after a wait
    longer = jnp.minimum(2 * adapt.backoff, probe_interval(costs, woken_s))
    # a proposal whose drafts were not worth verifying lost the drafter's cost only, and says nothing of
    # whether verified drafts pay: it keeps the backoff and waits as long as the drafter's cost allows
    idle = (best == 0) & ~adapt.probing
    backoff = jnp.where(pays, jnp.where(adapt.probing & ~moved, adapt.backoff, 1),
                        jnp.where(idle, adapt.backoff, longer))
    wait = jnp.where(pays | free, 0, jnp.where(idle, idle_wait(costs, woken_s, adapt.idle_misses), backoff))
    # after verified drafts fell short (or drafts were turned down: `_choose_width` set the flag), the next draft
    # that could gain is a probe; a proposal with nothing worth verifying leaves the flag as it was
    due = jnp.where(pays, False, jnp.where(idle, adapt.probe_due, True))
    # a probe that did not move the batch by its price halves the probing share (`probe_credit`); one that
    # did, or proposals whose average pays, restore it. The batch's progress here, not the rows' mean that
    # decides whether proposing resumes: EAGLE in a sampled best-of-8 batch passed nearly every probe on the
    # mean, its estimate then turned the next drafts down, and probing kept its full 2% of the time
    misses = jnp.where(adapt.probed & ~moved, jnp.minimum(adapt.probe_misses + 1, MAX_PROBE_MISSES),
                       jnp.where(adapt.probed | pays & ~idle, 0, adapt.probe_misses))
    # a wait after a fruitless proposal halves the share of such proposals for the next one; a verified
    # draft restores it
    idle_misses = jnp.where(idle & ~pays, jnp.minimum(adapt.idle_misses + 1, MAX_PROBE_MISSES),
                            jnp.where(best > 0, 0, adapt.idle_misses))
    on = adapt.proposing & judge
    return adapt.replace(backoff=jnp.where(on, backoff, adapt.backoff), saving=jnp.where(on, saving, adapt.saving),
                         wait=jnp.where(on, wait, adapt.wait), probe_due=jnp.where(on, due, adapt.probe_due),
                         probe_misses=jnp.where(on, misses, adapt.probe_misses),
                         idle_misses=jnp.where(on, idle_misses, adapt.idle_misses),
                         probing=jnp.zeros((), bool), proposing=jnp.zeros((), bool), probed=jnp.zeros((), bool))


def _batch_worth(survive: Float[Array, "B W J"], active: Bool[Array, "B"], remaining: Int[Array, "B"],
                 tie_break: float = TIE_BREAK) -> Float[Array, "W"]:
    """What a step of each width is worth to a batch: the expected drop in the most tokens any active row
    has left (a static batch runs until that row is done, `_batch_progress`), from each row's
    `survive[b, w, j]`, the chance it gets at least j + 1 tokens (j = 0: the one every step gives).

    Rows are taken as independent: the batch drops by at least j when every row r does by at least
    j - (L_max - L_r), L its tokens left, so E[drop] = sum_j prod_r P(...). The expectation of the
    minimum, not the minimum of the rows' expectations: 8 sampled rows each accepting half their drafts
    expect 1.9 tokens apiece, yet almost every step one of them accepts nothing, and a width-5 verify at
    1.9x a step that the older rule admitted there moved the batch by one token (`recycling`, best-of-8,
    0.94x `ar`). Ties (no width moves the batch) go to the rows' mean expected tokens: with free
    verification the other rows' drafts still ride along. One row: its expected tokens."""
    chex.assert_rank(survive, 3)
    depth = survive.shape[-1]
    left = jnp.where(active, remaining, 0)
    shift = jnp.max(left) - left  # [B]: how far each row is from the one the batch waits for
    need = jnp.arange(depth)[None] - shift[:, None]  # [B, J]: tokens row b must gain for a drop of j + 1
    at_need = jnp.take_along_axis(survive, jnp.broadcast_to(jnp.clip(need, 0, depth - 1)[:, None], survive.shape),
                                  axis=2)
    at_need = jnp.where((need < 0)[:, None] | ~active[:, None, None], 1.0, at_need)
    drop = jnp.prod(at_need, axis=0).sum(-1)  # [W]
    mean = jnp.sum(jnp.where(active[:, None], survive.sum(-1), 0.0), axis=0) / jnp.maximum(jnp.sum(active), 1)
    return jnp.where(jnp.any(active), drop, 0.0) + tie_break * mean


def _counted(shape: tuple[int, ...], rows: Int[Array, "B G"], bucket: Int[Array, "B"],
             x: Float[Array, "B G D"]) -> Float[Array, "S C D"]:
    """Each row's per-position indicators `x` summed into the counts' layout (`Adapt.tried`): row b's
    g-th indicator goes to counts row `rows[b, g]` (source, or source x sub-tree), bucket `bucket[b]`."""
    where = jax.nn.one_hot(rows, shape[0])[..., None] * jax.nn.one_hot(bucket, shape[1])[:, None, None]
    return jnp.einsum("bgsc,bgd->scd", where, x)


def _observe(adapt: Adapt, draft, drafting, accepted, bucket, node_depth, group: Int[Array, ""] | int = 0,
             groups: int = 1, decay: Bool[Array, ""] | bool = True) -> Adapt:
    """Adds one verification to the acceptance counts: position i of a row's draft was tried if every
    earlier one was accepted, and accepted if the row accepted more than i tokens. `group`: the tree's
    drafting sub-tree that ran, of `groups` (`_groups`). `decay` False: the step observed nothing (it
    neither proposed nor scored a shadow, `_idle_observe`), and the counts hold."""
    batch, d = draft.num.shape[0], adapt.tried.shape[-1]
    source = jnp.zeros((batch,), jnp.int32) if draft.source is None else draft.source
    source = source * groups + group
    pos = jnp.arange(d)[None]
    reach = _drafted_depth(draft, node_depth)[:, None]
    on = drafting[:, None]
    tried = (on & (pos < reach) & (pos <= accepted[:, None])).astype(jnp.float32)
    hit = (on & (pos < accepted[:, None])).astype(jnp.float32)
    add = lambda x: _counted(adapt.tried.shape, source[:, None], bucket, x[:, None])
    drafted = on[:, 0] & (reach[:, 0] > 0)
    streak = jnp.where(drafted, (accepted >= reach[:, 0]).astype(jnp.int32), adapt.streak)
    keep = jnp.where(decay, DECAY, 1.0)
    return adapt.replace(tried=keep * adapt.tried + add(tried), hit=keep * adapt.hit + add(hit), streak=streak)


def _shadow_shape(proposer: Proposer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A draft's static shape as a tree of draft nodes: each node's parent (-1: the pending token), its
    depth, and which nodes each counted sub-tree holds ([G, K], `_groups`). A chain is one path."""
    if proposer.template is None:
        k = max(proposer.depth, 1)
        return np.arange(k) - 1, np.arange(1, k + 1), np.ones((1, k), bool)
    parents = np.asarray(proposer.template.parents[1:]) - 1
    return parents, np.asarray(proposer.template.depth[1:]), _tree_members(proposer)[1:]


def _shadow_score(adapt: Adapt, proposer: Proposer, tokens: Int[Array, "B S"], lengths: Int[Array, "B"],
                  done: Bool[Array, "B"]) -> Adapt:
    """Counts each pending shadow's newly known positions, as `_observe` counts a verified draft: draft
    position i (a tree's depth i + 1) is tried if every earlier one was accepted, and accepted if the draft
    holds, under the accepted path, the token the row emitted there. Exact for deterministic drafts:
    greedy verification accepts a token iff it is the target's choice, and sampled verification iff it
    is the target's own draw for that position (`position_keys`), which is what the row emitted. A
    shadow ends at its first miss, at its deepest node, or when its row is done."""
    _, _, members = _shadow_shape(proposer)
    valid, start, scored = adapt.shadow_valid, adapt.shadow_start, adapt.shadow_scored
    parents = jnp.maximum(adapt.shadow_parents, 0)
    d = adapt.tried.shape[-1]
    # [B, K]: each node's depth, from its row's parents (a dynamic tree's own); as tree nodes, the root first
    as_tree = jnp.concatenate([jnp.full_like(parents[:, :1], -1), adapt.shadow_parents + 1], axis=1)
    node_depth = tree_depths(ancestor_mask(as_tree, d))[:, 1:]
    known = (lengths - start)[:, None]  # tokens emitted since: positions 0 .. known - 1
    emitted = gather_rows(tokens, start[:, None] + jnp.arange(d)[None])  # [B, D]
    matched = jnp.zeros(valid.shape, bool)
    for depth in range(1, d + 1):  # a node is on the accepted path if its token was emitted under its parent
        parent_ok = jnp.ones_like(matched) if depth == 1 else jnp.take_along_axis(matched, parents, axis=1)
        here = (node_depth == depth) & (depth <= known)
        matched = matched | (here & valid & parent_ok & (adapt.shadow_tokens == emitted[:, depth - 1:depth]))
    sub = jnp.asarray(members)[None]  # [1, G, K]
    a = jnp.max(jnp.where(matched[:, None] & sub, node_depth[:, None], 0), axis=2)  # [B, G] accepted depth
    reach = jnp.max(jnp.where(valid[:, None] & sub, node_depth[:, None], 0), axis=2)  # [B, G] drafted depth
    pos = jnp.arange(d)[None, None]
    on = pos >= scored[:, None, None]
    tried = (on & (pos < known[:, :, None]) & (pos <= a[..., None]) & (pos < reach[..., None])).astype(jnp.float32)
    hit = (on & (pos < a[..., None])).astype(jnp.float32)
    rows = adapt.shadow_row[:, None] * members.shape[0] + jnp.arange(members.shape[0])[None]  # every sub-tree
    add = lambda x: _counted(adapt.tried.shape, rows, adapt.shadow_bucket, x)
    ended = jnp.all((a < known) | (a >= reach), axis=1) | done  # nothing deeper can be accepted, or nothing known
    valid = valid & ~ended[:, None]
    return adapt.replace(tried=adapt.tried + add(tried), hit=adapt.hit + add(hit), shadow_valid=valid,
                         shadow_scored=jnp.maximum(scored, jnp.minimum(known[:, 0], d)))


def _shadow(adapt: Adapt, proposer: Proposer, proposed, cut: Bool[Array, "B"], verified: Int[Array, "B"],
            start: Int[Array, "B"], bucket: Int[Array, "B"], tokens: Int[Array, "B S"], lengths: Int[Array, "B"],
            done: Bool[Array, "B"]) -> Adapt:
    """Scores the part of each draft that the width decision cut off (all of it, for a turned-down draft)
    against the tokens the row emits afterwards, so that an estimate that turns down good drafts learns so
    without a probe. Counting verified drafts alone, with the counts decaying, a match-length bucket held
    below the price of a verify turned down text the model was repeating word for word, 18 steps in a row
    (every draft would have been accepted whole). `cut`: rows whose first `verified` positions were
    verified and all accepted (0: turned down) and whose draft went on. A row keeps one shadow until it
    ends (a new one is taken only then); a step's decision reads only tokens emitted before it."""
    adapt = _shadow_score(adapt, proposer, tokens, lengths, done)
    take = cut & ~jnp.any(adapt.shadow_valid, axis=1) & ~done
    k = adapt.shadow_tokens.shape[1]
    fit = lambda x: jnp.pad(x[:, :k], ((0, 0), (0, max(k - x.shape[1], 0))))  # a draft narrower than its depth
    valid = fit(jnp.arange(proposed.tokens.shape[1])[None] < proposed.num[:, None] if proposed.valid is None
                else proposed.valid)
    drafted = fit(proposed.tokens.astype(jnp.int32))
    parents = adapt.shadow_parents if proposed.parents is None else fit(proposed.parents.astype(jnp.int32) - 1)
    source = jnp.zeros_like(start) if proposed.source is None else proposed.source
    pick = lambda new, old: jnp.where(take.reshape(take.shape + (1,) * (old.ndim - 1)), new, old)
    adapt = adapt.replace(shadow_tokens=pick(drafted, adapt.shadow_tokens),
                          shadow_valid=pick(valid, adapt.shadow_valid),
                          shadow_parents=pick(parents, adapt.shadow_parents),
                          shadow_start=pick(start, adapt.shadow_start),
                          shadow_scored=pick(verified, adapt.shadow_scored),
                          shadow_row=pick(source, adapt.shadow_row), shadow_bucket=pick(bucket, adapt.shadow_bucket))
    return _shadow_score(adapt, proposer, tokens, lengths, done)  # the step's own last token scores the first cut one


@dataclasses.dataclass
class _DeviceRun:
    state: LoopState
    stopped: np.ndarray  # [B] rows `stop_rows` ended
    prefill_s: float
    decode_s: float
    calibration_s: float = 0.0  # measuring this machine's step costs (first use of these shapes only)
    costs: np.ndarray | None = None  # seconds of each static verify width (adaptive runs)
    drafter_s: float = 0.0  # seconds of one propose (adaptive runs)
    cheap_s: float = 0.0  # seconds of the proposer's `cheap_part` alone (adaptive runs of such proposers)
    wake_s: float = 0.0  # seconds a proposal after a wait first spends catching up (`Proposer.waking`)
    learned: bool = False  # the loop started from an earlier call's estimate and backoff (`adapt_memory`)
    prefill_parts: tuple[tuple[int, int], ...] = ()  # (prompts, width) of each prefill part; () one batch


# steps that neither propose nor have a draft to score run a lean body (`decode`): a backed-off drafter's
# step then costs about what `ar`'s does. False traces every step in full (the tests' reference)
LEAN_STEPS = True
CALIBRATION_STEPS = 4  # decode steps per timed run of the calibration
# timed rounds (after one untimed) of every width: with 3, two calibrations of `suffix` on a shared 2-core
# CPU priced its proposal at -1.5 and 4.75 ms (18% of a step), and the second had it wait where it paid
CALIBRATION_REPEATS = 5
PROPOSE_REPEATS = 15  # timed runs of the proposal alone (a millisecond or two each: noise averages out cheaply)
SKIP = -1  # the calibration's configuration that proposes nothing (an adaptive loop backing off)
PROPOSE = -2  # not a configuration: the seconds one `propose` adds to a step (width 1 with it, less SKIP)
CHEAP = -3  # not a configuration: the seconds of a proposer's `cheap_part` alone, as a program of its own
WAKE = -4  # not a configuration: the seconds of a proposer's catch-up after a wait (`Proposer.waking`)


def step_costs(model, plan: Plan, proposer: Proposer, weights: Any, sampling_cfg: SamplingConfig,
               eos_ids: tuple[int, ...] = (), speculate_max_rows: int | None = None
               ) -> tuple[np.ndarray, np.float32, np.float32, np.float32, float]:
    """This machine's seconds for a decode step at each of the proposer's static verify widths, for one
    `propose`, for its `cheap_part` alone (0 without one), and for what a proposal after a wait first
    catches up on (`Proposer.waking`; 0 for proposers that keep up on every step), on the run's own
    shapes: measured the first time, then read back (`step_cost`).

    They are measured in the decode loop itself, the program the run is about to use: on a dummy prompt
    that every drafter matches (`warm_start.dummy_plan`), `CALIBRATION_STEPS` steps at a time with the
    width forced, in interleaved rounds, and once with `propose` skipped. A step at width w then costs
    costs[w] + the drafter's seconds, a skipped step costs[0]: what the loop's decision assumes. Timing
    the loop rather than a standalone forward compiles nothing more and counts each method's own
    proposal and update as the loop pays them. Returns the seconds of the widths, of `propose`, of the
    cheap part, of the catch-up, and the seconds spent measuring."""
    from specjax import step_cost, warm_start

    widths = loop_widths(proposer)
    shape = dict(model=step_cost.model_key(model.config, model.params), batch=plan.batch, cache_len=plan.cache_len)
    # the specjax source and the sampling mode are part of what is timed: a changed loop body, or a sampled
    # verify (a softmax and a draw per position) where a greedy one was timed, must not meet old seconds
    detail = hashlib.sha1(repr((proposer, eos_ids, speculate_max_rows is not None, sampling_cfg.mode,
                                programs.source_digest())).encode()).hexdigest()[:16]
    wakes = proposer.catches_up
    names = {SKIP: "skip", PROPOSE: "propose", **({CHEAP: "cheap"} if proposer.cheap_part else {}),
             **({WAKE: "wake"} if wakes else {}), **{i: f"w{w}" for i, w in enumerate(widths)}}
    keys = {step_cost.step_key("loop", detail=f"{detail}:{name}", **shape): i for i, name in names.items()}

    def measure(_: list[str]) -> dict[str, float]:
        programs.settle()  # a load's prefetch still running would inflate the first timings
        layout = _prefill_layout(plan)
        dummy = warm_start.dummy_plan(
            model, proposer, num_prompts=plan.num_prompts, num_samples=plan.batch // plan.num_prompts,
            prompt_bucket=plan.prompt_bucket, cache_len=plan.cache_len,
            tokens=CALIBRATION_STEPS * max(widths) + 1, group=[int(g) for g in plan.groups],
            parts=() if layout is None else layout[1])  # the call's own prefill program, not one more
        if dummy is None:  # no room in the cache to measure: every width costs the same
            return {k: 0.0 if i in (PROPOSE, CHEAP, WAKE) else 1.0 for k, i in keys.items()}
        seconds = _run(model, dummy, proposer, weights, sampling_cfg, 0, eos_ids, None, None, 32, speculate_max_rows,
                       adaptive=True, warm_up="measure")
        return {k: seconds[i][0] for k, i in keys.items()}

    measured, spent = step_cost.cached_seconds(list(keys), measure)
    cheap = measured.pop(2) if proposer.cheap_part else 0.0
    wake = measured.pop(2) if wakes else 0.0
    skip, drafter, chosen = measured[0], max(measured[1], 0.0), np.asarray(measured[2:])
    costs = np.maximum(chosen - drafter, 1e-9)
    costs[0] = skip
    # a wider step does all that a narrower one does, and other work on the machine only ever adds time:
    # a narrower width timed dearer than a wider one was slowed, and costs at most what the wider one did
    # (a 3-token verify timed at 2.0x a 1-token step, a 5-token one at 1.9x, on a shared 2-core CPU)
    costs = np.minimum.accumulate(costs[::-1])[::-1]
    return (costs.astype(np.float32), np.float32(drafter), np.float32(max(cheap, 0.0)), np.float32(max(wake, 0.0)),
            spent)


@jax.jit
def _copy(state: LoopState) -> LoopState:
    """A fresh copy of every buffer of `state` (one program; `decode` donates the state it is given)."""
    return jax.tree.map(jnp.copy, state)


def _time_widths(run: Callable, state: LoopState, widths: tuple[int, ...],
                 propose_alone: Callable[[LoopState], Any] | None = None,
                 cheap_alone: Callable[[LoopState], Any] | None = None,
                 wake_alone: Callable[[LoopState], Any] | None = None) -> dict[int, tuple[float, list, int]]:
    """Seconds per decode step of each forced width (and of `SKIP`), each run from a copy of `state`,
    with the widths its verify forwards ran (`LoopState.verify_hist`, relative to `state`) and how many
    steps proposed: what the timing really measured. `PROPOSE`: the median over rounds of width 1's
    seconds less SKIP's of the same round. The difference of two separately taken quartiles was noise
    for a drafter that costs a fifth of a step (EAGLE at batch 8: 2 ms in one calibration, 21 in the
    next, where paired rounds gave 37), and a drafter that looks free proposes every step. The paired
    median is floored at `propose_alone(state)`'s own seconds (the proposal as a program of its own,
    lower quartile of `PROPOSE_REPEATS` runs): on a shared 2-core CPU the paired rounds of `suffix` at
    batch 8 came out at -3.8 to +2.4 ms in three calibrations, one priced it at -0.1 ms, and it proposed
    on every step (0.94x `ar`), where its proposal alone takes about 1.4 ms, over 2% of a step.
    `CHEAP`: `cheap_alone(state)`'s seconds, timed the same way (a proposer's `cheap_part`); `WAKE`:
    `wake_alone(state)`'s (`Proposer.waking`)."""
    from specjax import step_cost

    alone = 0.0 if propose_alone is None else step_cost.timed_seconds(lambda: propose_alone(state), PROPOSE_REPEATS)
    n = len(widths)
    copies = {}
    before = np.asarray(jax.device_get(state.verify_hist))

    def fresh(i: int) -> LoopState:
        s = _copy(state)
        return s.replace(adapt=s.adapt.replace(wait=jnp.int32(1 << 30))) if i == SKIP else s

    def forced(i: int) -> np.ndarray:
        return np.where(np.arange(n) == max(i, 0), np.float32(1e-6), np.float32(1)).astype(np.float32)

    def timed(i: int):
        def go(s: LoopState) -> LoopState:
            copies[i] = run(s, np.int32(CALIBRATION_STEPS), forced(i), np.int32(0 if i == SKIP else widths[i] - 1))
            return copies[i].tokens
        return go

    configs = [SKIP, *range(n)]
    times = step_cost.interleaved_times({i: timed(i) for i in configs}, repeats=CALIBRATION_REPEATS,
                                        inputs={i: partial(fresh, i) for i in configs})
    out, per_step = {}, {}
    for i in configs:
        adapt, verified = jax.device_get((copies[i].adapt, copies[i].verify_hist))
        steps = max(int(copies[i].steps) - int(state.steps), 1)
        per_step[i] = np.asarray(times[i]) / steps
        out[i] = (float(np.percentile(per_step[i], 25)), (verified - before).tolist(), int(adapt.drafted_steps))
    out[PROPOSE] = (max(float(np.median(per_step[0] - per_step[SKIP])), alone), [], 0)
    if cheap_alone is not None:
        out[CHEAP] = (step_cost.timed_seconds(lambda: cheap_alone(state), PROPOSE_REPEATS), [], 0)
    if wake_alone is not None:
        out[WAKE] = (step_cost.timed_seconds(lambda: wake_alone(state), PROPOSE_REPEATS), [], 0)
    return out


def _run(model, plan: Plan, proposer: Proposer, weights: Any, sampling_cfg: SamplingConfig, seed: int,
         eos_ids: tuple[int, ...], session: Session | None, stop_rows, check_every: int,
         speculate_max_rows: int | None, adaptive: bool = False, warm_up: str = "", trace: bool = False) -> Any:
    """The device half: prefill, the proposer's start, the decode loop and its early-stop pauses.

    `warm_up` (`specjax.warm_start`): "all" runs the prefill, the proposer's start and, without
    calibrating, one decode step at each verify width (forced by the costs it is given), so that each
    width's first-run setup is paid now, and returns None. "measure" (`step_costs`) returns the seconds
    per decode step of each forced width instead (`_time_widths`). `trace`: the loop records a `StepTrace`
    (as long as the cache: a run has fewer steps than its cache has slots)."""
    cfg: ModelConfig = model.config
    traced = sampling.traced(sampling_cfg)  # numpy leaves: passed as they are, no eager conversion
    max_new = np.int32(plan.max_new_tokens)
    rows, batch = plan.rows, plan.batch
    mesh = sharding.mesh_of(model.params)  # sharded params: the whole generate runs under their mesh
    t0 = time.perf_counter()
    layout = _prefill_layout(plan, mesh)
    prefilled = programs.call(
        prefill, (model.params, plan.prompt, plan.prompt_lengths, rows, np.int32(seed), traced, max_new, plan.feed,
                  plan.start, None if session is None else session.cache, None if layout is None else layout[0]),
        dict(cfg=cfg, max_len=plan.cache_len, eos_ids=eos_ids, feature_layers=proposer.feature_layers, mesh=mesh,
             parts=None if layout is None else layout[1]))
    jax.block_until_ready(prefilled[0])
    t1 = time.perf_counter()
    carry = session is not None and session.proposer == proposer
    feature_start = (plan.start if plan.start is not None else np.zeros(plan.num_prompts, np.int32))[rows]
    firsts = np.unique(np.asarray(rows), return_index=True)[1].astype(np.int32)
    shared = len(firsts) < batch and not carry  # Best-of-N: a proposer may start each prompt once (`init`)
    state = programs.call(
        start_proposer, (prefilled[:5] + prefilled[6:], prefilled[5], plan.row_prompt_lengths, plan.groups,
                         weights, feature_start,
                         session.proposer_state if carry else None, session.context if carry else None,
                         traced, session.acceptance if carry else None,
                         np.asarray(rows, np.int32) if shared else None, firsts if shared else None),
        dict(proposer=proposer, trace_steps=plan.cache_len if trace and not warm_up else 0))
    gate = np.int32(batch if speculate_max_rows is None else speculate_max_rows)
    adaptive = adaptive and proposer.width > 0 and proposer.adaptive_widths
    # a call of the same kind as an earlier one starts from what that one learned (`adapt_memory`); a
    # continued Session carries its own estimate instead
    memory_key = adapt_memory.key(proposer, sampling_cfg.temperature, sampling_cfg.top_k, sampling_cfg.top_p,
                                  batch, plan.cache_len)
    learned = adapt_memory.recall(model, memory_key) if adaptive and not warm_up and not carry else None
    if learned is not None:  # copies: the loop donates its state, and the memory keeps its own
        state = state.replace(adapt=state.adapt.replace(**jax.tree.map(jnp.copy, learned)))
    costs, drafter_s, cheap_s, wake_s = np.ones(1, np.float32), np.float32(0), np.float32(0), np.float32(0)
    calibration_s, setup_s = 0.0, 0.0
    if adaptive and warm_up:
        costs = np.ones(len(loop_widths(proposer)), np.float32)
    elif adaptive:
        t_cal = time.perf_counter()
        costs, drafter_s, cheap_s, wake_s, calibration_s = step_costs(model, plan, proposer, weights, sampling_cfg,
                                                              eos_ids, speculate_max_rows)
        setup_s = time.perf_counter() - t_cal
    static = dict(cfg=cfg, proposer=proposer, eos_ids=eos_ids, mesh=mesh, gated=speculate_max_rows is not None,
                  adaptive=adaptive, lean_steps=LEAN_STEPS)

    def run(*args):
        return programs.call(decode, (model.params, *args), static)

    stopped = np.zeros(batch, bool)
    if warm_up == "measure":
        def forced_run(s, limit, forced, floor):
            return run(s, plan.groups, limit, traced, max_new, gate, weights, forced, np.float32(0), floor,
                       np.float32(0), np.float32(0))

        propose = jax.jit(lambda p_state, ctx: proposer.propose(p_state, ctx, jax.random.PRNGKey(0)))
        alone = lambda s: propose(s.proposer_state, _context(s, plan.groups, weights, traced))
        cheap = None
        if proposer.cheap_part:  # the cheap part alone: what a step that backs off from the rest runs
            cheap = lambda s: propose(s.proposer_state, _context(s, plan.groups, weights, traced).replace(
                full_draft=jnp.zeros((), bool)))
        wake = None
        if proposer.catches_up:  # a full catch-up alone: what a proposal after a wait runs first
            waking = jax.jit(proposer.waking)
            wake = lambda s: waking(s.proposer_state, _context(s, plan.groups, weights, traced))
        return _time_widths(forced_run, state, loop_widths(proposer), alone, cheap, wake)
    if warm_up:  # one step at each verify width: the floor makes it, forced costs make an adaptive loop pick it
        for i, width in enumerate(loop_widths(proposer)):
            forced = np.where(np.arange(len(costs)) == min(i, len(costs) - 1), np.float32(1e-6), costs)
            state = run(state, plan.groups, np.int32(i + 1), traced, max_new, gate, weights, forced.astype(np.float32),
                        drafter_s, np.int32(width - 1), cheap_s, wake_s)
        jax.block_until_ready(state.tokens)
        return None
    if stop_rows is None:
        state = run(state, plan.groups, max_new, traced, max_new, gate, weights, costs, drafter_s, np.int32(-1),
                    cheap_s, wake_s)
    else:  # pause every `check_every` steps: one host sync per pause, never per token
        limit = 0
        row_starts = plan.row_prompt_lengths
        while True:
            limit += check_every
            state = run(state, plan.groups, np.int32(limit), traced, max_new, gate, weights, costs, drafter_s,
                        np.int32(-1), cheap_s, wake_s)
            toks, lens, done, steps = jax.device_get((state.tokens, state.lengths, state.done, state.steps))
            if steps < limit or done.all():  # stopped for a reason of its own: budget, all done, cache full
                break
            gen = [toks[b, row_starts[b] : lens[b]].tolist() for b in range(batch)]
            stop = np.asarray(stop_rows(gen, done & ~stopped), bool) & ~done
            if stop.any():
                stopped |= stop
                state = state.replace(done=state.done | jnp.asarray(stop))
    jax.block_until_ready(state.tokens)
    if adaptive:
        adapt_memory.remember(model, memory_key, state.adapt)
    return _DeviceRun(state=state, stopped=stopped, prefill_s=t1 - t0,  # measuring step costs is not decoding
                      decode_s=time.perf_counter() - t1 - setup_s, calibration_s=calibration_s,
                      costs=costs if adaptive else None, drafter_s=float(drafter_s), cheap_s=float(cheap_s),
                      wake_s=float(wake_s), learned=learned is not None,
                      prefill_parts=() if layout is None else layout[1])


def _adaptive_stats(proposer: Proposer, run: _DeviceRun, adapt: Adapt, steps: int) -> dict[str, Any]:
    if run.costs is None:
        return {}
    return dict(adaptive=True, widths=list(loop_widths(proposer)), width_hist=adapt.width_hist.tolist(),
                step_costs_s=[float(c) for c in run.costs], propose_s=run.drafter_s,
                cheap_part_s=run.cheap_s, wake_s=run.wake_s,
                predicted_tokens=float(adapt.predicted_tokens),
                predicted_decode_s=float(adapt.predicted_s), drafted_share=int(adapt.drafted_steps) / max(steps, 1),
                calibration_s=run.calibration_s, from_earlier_call=run.learned)


def _finish(model, plan: Plan, proposer: Proposer, weights: Any, run: _DeviceRun, eos_ids: tuple[int, ...],
            speculate_max_rows: int | None, keep_session: bool) -> GenerateOutput:
    """The host half after the device: trim each row at EOS, decode texts, count, keep the session."""
    from specjax import validation
    from specjax.stats import finish_reason

    state = run.state
    out_tokens, out_lengths, hist, steps, sources, adapt, verified, trace = jax.device_get(
        (state.tokens, state.lengths, state.accept_hist, state.steps, state.source_counts, state.adapt,
         state.verify_hist, state.trace))
    starts, batch = plan.row_prompt_lengths, plan.batch
    eos = set(eos_ids)
    generated, reasons = [], []
    for b in range(batch):
        gen = out_tokens[b, starts[b] : out_lengths[b]].tolist()
        reasons.append(finish_reason(len(gen), bool(gen) and gen[-1] in eos, bool(run.stopped[b]),
                                     plan.max_new_tokens))
        if gen and gen[-1] in eos:
            gen = gen[:-1]
        generated.append(gen)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in generated] if model.tokenizer else []
    emitted = int(np.sum(out_lengths - starts))
    row_steps = int(hist.sum())
    wall = run.prefill_s + run.decode_s
    stats = GenerationStats(
        method=proposer.name, batch=batch, prefilled_rows=plan.num_prompts,
        generated_tokens=int(sum(len(r) for r in generated)), emitted_tokens=emitted,
        target_forwards=int(steps) + 1, decode_steps=int(steps),
        mean_accepted_tokens=float((hist * np.arange(len(hist))).sum() / max(row_steps, 1)),
        accepted_hist=hist.tolist(), proposer_steps=sources.tolist(), prefill_s=run.prefill_s,
        decode_s=run.decode_s, wall_s=wall, tokens_per_s=emitted / wall if wall > 0 else 0.0,
        decode_tokens_per_s=(emitted - batch) / run.decode_s if run.decode_s > 0 else 0.0,
        draft_k=proposer.width, speculate_max_rows=speculate_max_rows, stopped_rows=run.stopped.tolist(),
        finish_reasons=reasons,
        reused_prefix_tokens=0 if plan.start is None else int(np.sum(plan.start)),
        prompt_bucket=plan.prompt_bucket, cache_len=plan.cache_len, verified_hist=verified.tolist(),
        prefill_parts=[list(part) for part in run.prefill_parts],
        **_adaptive_stats(proposer, run, adapt, int(steps)),
        **({} if trace is None else {"step_trace": step_trace.as_dict(trace, loop_widths(proposer), int(steps))}))
    kept = None
    if keep_session:
        kept = Session(proposer=proposer, cache=state.cache, proposer_state=state.proposer_state,
                       context=Context(tokens=state.tokens, lengths=state.lengths, group=plan.groups,
                                       active=np.zeros((batch,), bool), hidden=state.hidden, weights=weights,
                                       cache=state.cache), acceptance=(state.adapt.tried, state.adapt.hit))
        validation.mark_session(kept, model)  # a later call refuses it on another model
    return GenerateOutput(tokens=generated, texts=texts, stats=stats, session=kept)


def _record(model, method: Proposer, sampling_cfg: SamplingConfig, plan: Plan, num_samples: int,
            eos_ids: tuple[int, ...], gate: int | None, adaptive: bool, used: tuple[str, ...],
            parts: tuple[tuple[int, int], ...]) -> None:
    from specjax import warm_start

    if not programs._ours(method):  # a user's proposer: its code may change under the same name
        return
    warm_start.record(model.programs_key, warm_start.Recipe(
        method=method, temperature=sampling_cfg.temperature, top_k=sampling_cfg.top_k, top_p=sampling_cfg.top_p,
        num_prompts=plan.num_prompts, num_samples=num_samples, prompt_bucket=plan.prompt_bucket,
        cache_len=plan.cache_len, eos_ids=eos_ids, speculate_max_rows=gate, adaptive=adaptive, programs=used,
        prefill_parts=parts))


def adaptive_default() -> bool:
    """`generate(adaptive=None)`: on, unless `SPECJAX_ADAPTIVE` is 0 / false / off (fixed widths everywhere)."""
    return os.environ.get("SPECJAX_ADAPTIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def generate(model, prompts: Sequence[Any], method: "str | Proposer" = "ar", *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = True,
             num_samples: int = 1, group: Sequence[int] | None = None, max_len: int | None = None,
             eos_token_ids: Sequence[int] | None = None, pad_prompts_to: int = 0,
             session: Session | None = None, keep_session: bool = False, pad_new_to: int = 0,
             stop_rows: Callable[[list[list[int]], np.ndarray], Any] | None = None, check_every: int = 32,
             speculate_max_rows: int | None = None, adaptive: bool | None = None, trace: bool = False,
             **method_options) -> GenerateOutput:
    """Generates for a batch of prompts with any method (a name or a `Proposer`); see docs/contract.md.

    Three parts: `plan.make_plan` (host: encode, lay out rows, pick shape buckets), `_run` (device:
    prefill, then the one decode loop) and `_finish` (host: trim, texts, statistics). Budgets and
    sampling values are traced, prompt and cache sizes come from fixed buckets (`specjax.plan`), so a
    run over many prompts, budgets and temperatures compiles each program once per bucket.

    `num_samples` branches per prompt share one prefill (Best-of-N); rows come out prompt-major
    (prompt 0's branches first). `group[b]` marks rows that may draft from each other; default: the
    branches of one prompt form a group. `max_len` fixes the cache size (default: the bucket holding
    prompt + budget + draft). `eos_token_ids` overrides the model's stop tokens (`()`: never stop
    early, e.g. for benchmarks). `pad_prompts_to` pads prompts to at least this length (a bucket is
    still picked above it).
    `keep_session=True` returns `output.session`; passing it as `session=` to the next call (one prompt
    per row, same batch) reuses each row's cache for the prefix shared with its history and carries the
    drafter's store across calls: multi-round thinking prefills only what is new and drafts from every
    earlier round. `pad_new_to` pads the part of the prompts not yet cached (what a continued call
    prefills) to at least this length, for the same reason as `pad_prompts_to`.
    `stop_rows(generated, finished)` (early stopping, e.g. once a Best-of-N vote is settled): the loop
    pauses every `check_every` steps and the callback gets each row's tokens so far and which rows
    finished on their own; rows it returns True for stop (`stats["stopped_rows"]`).
    `speculate_max_rows` (vLLM's disable-by-batch-size): a step drafts only while at most this many
    rows are unfinished (None, the default: no such cap; 0: never draft). The adaptive loop makes it
    unnecessary, and it remains as a hard cap on top of it.
    `adaptive` (default: True, unless the environment sets `SPECJAX_ADAPTIVE=0`): each step's verify
    width is chosen in the loop from this machine's measured step costs and the online acceptance of the
    drafts (`decode`), so a method that does not
    pay drafts less, or not at all; `adaptive=False` keeps the fixed widths of the method's options
    (to reproduce a paper's settings). Greedy outputs are the same either way.
    `trace=True` adds `stats["step_trace"]`: per decode step, each row's drafting source, confidence,
    proposed and verified draft depths and accepted tokens, and the step's verify width (`StepTrace`),
    to replay or bound a width rule offline (`specjax.analysis.width_ceiling`). It compiles a loop of its
    own; outputs are unchanged.
    """
    from specjax import validation

    # every argument checked on the host before anything binds, loads or compiles (method options: make_proposer)
    validation.generate_args(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        chat=chat, num_samples=num_samples, group=group, max_len=max_len, eos_token_ids=eos_token_ids,
        pad_prompts_to=pad_prompts_to, session=session, keep_session=keep_session, pad_new_to=pad_new_to,
        stop_rows=stop_rows, check_every=check_every, speculate_max_rows=speculate_max_rows)
    if adaptive is not None:  # None: adaptive_default()
        validation.boolean("adaptive", adaptive)
    validation.boolean("trace", trace)
    gate = speculate_max_rows
    sampling_cfg = SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    proposer, weights = bind_proposer(model, method, sampling_cfg, **method_options)
    the_plan = make_plan(model, prompts, proposer, max_new_tokens=max_new_tokens, chat=chat, num_samples=num_samples,
                         group=group, max_len=max_len, pad_prompts_to=pad_prompts_to, session=session,
                         pad_new_to=pad_new_to)
    eos_ids = tuple(model.eos_token_ids if eos_token_ids is None else (int(i) for i in eos_token_ids))
    gate = None if gate is None else int(gate)
    if adaptive is None:
        adaptive = adaptive_default()
    with programs.recording() as used:
        run = _run(model, the_plan, proposer, weights, sampling_cfg, seed, eos_ids, session, stop_rows, check_every,
                   gate, adaptive=bool(adaptive), trace=trace)
    # what the next load replays (`warm_start`): not a traced loop, which only an analysis runs
    if session is None and used and not trace and getattr(model, "programs_key", ""):
        _record(model, make_proposer(method, **method_options), sampling_cfg, the_plan, num_samples, eos_ids, gate,
                bool(adaptive), tuple(used), run.prefill_parts)
    return _finish(model, the_plan, proposer, weights, run, eos_ids, gate, keep_session)
