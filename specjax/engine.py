"""`generate`: prefill, then one jitted `lax.while_loop` of propose -> verify -> commit.

Autoregressive decoding is the same loop with a proposer that drafts nothing (K = 0), so every method
shares one code path and greedy speculative output equals greedy AR output by construction of the
verifier. The host sees only the final token buffer and the statistics. Each step's verify width, under
`adaptive=True`, is decided by the pure functions of `specjax.adaptive`, called inside the loop.

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
from specjax.adaptive import (
    Adapt,
    batch_progress,
    choose_width,
    count_groups,
    drafted_depth,
    idle_decision,
    idle_observe,
    idle_wait,
    init_adapt,
    loop_widths,
    observe,
    settle,
    shadow,
    subtree_of_width,
)
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


def _prefill_layout(model, plan: Plan) -> tuple[np.ndarray, tuple[tuple[int, int], ...]] | None:
    """(order, parts) a prefill of `plan` runs in (`plan.prefill_parts`); None for one batch, which a
    continued session (only new tokens), a sharded model (rows split across devices) and a call padded
    on request (`pad_prompts_to`: shapes shared across calls) always are. The call and its step-cost
    calibration both ask here, so the calibration runs the call's own prefill program."""
    if plan.start is not None or sharding.mesh_of(model.params) is not None or plan.one_batch:
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
        nodes = None if template is None or width in (1, k1) else np.asarray(subtree_of_width(template, width))
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
        # deterministic drafts: what verification leaves of them is scored against later tokens (`shadow`)
        scored = draft.probs is None
        drafting_before = drafting
        # ... so a drafter that costs next to nothing neither probes nor backs off: its estimate sees every draft
        free = jnp.zeros((), bool) if not (adaptive and scored) else idle_wait(costs, woken_s) == 0
        if adaptive and lean:
            adapt, best = idle_decision(s.adapt, costs, woken_s, active), jnp.zeros((), jnp.int32)
        elif adaptive:
            draft, drafting, adapt, best, bucket = choose_width(
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
                s.trace, s.steps, proposed, drafted_depth(proposed, node_depth), drafted_depth(draft, node_depth),
                jnp.maximum(num_new - 1, 0), active, want & runs if split else runs, ran))
        if adaptive and lean:  # what `observe`, `settle` and `shadow` do on a step with no draft
            new = new.replace(adapt=idle_observe(adapt, new.lengths, scored))
        elif adaptive:
            new = new.replace(adapt=settle(
                observe(adapt, draft, drafting, res.num_accepted, bucket, node_depth,
                        jnp.maximum(best - 1, 0) if template is not None else 0, count_groups(proposer), ~idle(s)),
                batch_progress(s, new, num_new, max_new), jnp.sum(num_new) / jnp.maximum(jnp.sum(active), 1),
                best, costs, drafter_s, ~forced, free, woken_s, jnp.sum(active) <= 1))
            if scored:  # a draft cut short, or turned down, whose verified part was all accepted
                if template is None:
                    cut, verified = drafting & (res.num_accepted >= draft.num) & (proposed.num > draft.num), draft.num
                else:  # a tree turned down
                    cut = drafting_before & (best == 0) & jnp.any(proposed.valid, axis=1)
                    verified = jnp.zeros_like(draft.num)
                new = new.replace(adapt=shadow(new.adapt, proposer, proposed, cut, verified, s.lengths, bucket,
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
        layout = _prefill_layout(model, plan)
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

    what = f"{proposer.name}'s decode steps at batch {plan.batch}, {plan.cache_len}-slot cache"
    measured, spent = step_cost.cached_seconds(list(keys), measure, what)
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
    layout = _prefill_layout(model, plan)
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
