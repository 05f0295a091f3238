"""`generate`: prefill, then one jitted `lax.while_loop` of propose -> verify -> commit.

Autoregressive decoding is the same loop with a proposer that drafts nothing (K = 0), so every method
shares one code path and greedy speculative output equals greedy AR output by construction of the
verifier. The host sees only the final token buffer and the statistics.

Layout: prompts are right-padded; row b's history lives in `tokens[b, :lengths[b]]` and its KV cache
holds all of it but the last (pending) token, which is the first input of the next verify forward.
"""

from __future__ import annotations

import dataclasses
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

from specjax import sampling, sharding
from specjax.config import ModelConfig, SamplingConfig
from specjax.drafting import Context, TreeTemplate, at, gather_rows
from specjax.models import cache as kv
from specjax.models import transformer
from specjax.models.cache import KVCache
from specjax.plan import Plan, bind_proposer, make_plan
from specjax.proposers.base import Proposer
from specjax.sampling import Sampling
from specjax.stats import GenerationStats
from specjax.verify import verify_chain, verify_tree


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
    rng: jax.Array
    steps: Int[Array, ""]  # verify forwards run
    accept_hist: Int[Array, "K2"]  # accept_hist[n]: active row-steps that produced n tokens
    source_counts: Int[Array, "N"]  # active row-steps drafted by each proposer id


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


@partial(jax.jit, static_argnames=("cfg", "max_len", "eos_ids", "feature_layers", "mesh"))
def prefill(params, prompt: Int[Array, "Q P"], prompt_lengths: Int[Array, "Q"], rows: Int[Array, "B"],
            seed: Int[Array, ""], sampling_cfg: Sampling, max_new: Int[Array, ""],
            feed: Int[Array, "Q F"] | None = None,
            start: Int[Array, "Q"] | None = None, cache: KVCache | None = None, *, cfg: ModelConfig, max_len: int,
            eos_ids: tuple[int, ...], feature_layers: tuple[int, ...] = (), mesh: Mesh | None = None):
    """Fills the cache with each distinct prompt once, copies it into its branches, samples first tokens.

    `rows[b]` is the prompt of branch b: Best-of-N prefills a question once and gives its N branches
    copies of the cache rows (cheap) instead of running the prompt N times (a full forward each).
    Continuing a `Session`: `cache` already holds each prompt's first `start[q]` tokens (the prefix it
    shares with the previous call's history), and only `feed[q] = prompt[q, start[q]:]` is run.
    Also returns the outputs of `feature_layers` at every fed position, [B, F, layers * D] (None without).
    `sampling_cfg` and the budget `max_new` are traced: one compile serves every temperature and budget.
    The seed's second key is returned for the decode loop (every per-call value is made in here, so
    a call runs this program, `start_proposer` and `decode`, and no small eager ones).
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
    out = transformer.forward(params, cfg, feed, cache, logit_positions=last, cache_is_empty=fresh,
                              hidden_layers=feature_layers)
    lengths = jnp.take(prompt_lengths, rows)
    first = sampling.sample(rng, jnp.take(out.logits[:, 0], rows, axis=0), sampling_cfg).astype(jnp.int32)
    b = rows.shape[0]
    tokens = jnp.zeros((b, max_len), jnp.int32).at[:, :p].set(jnp.take(prompt, rows, axis=0))
    tokens = tokens.at[jnp.arange(b), lengths].set(first)
    hidden = jnp.take_along_axis(out.hidden, last[:, :, None], axis=1)[:, 0]
    done = _eos_mask(first, eos_ids) | (max_new <= 1)
    cache = out.cache.with_lengths(prompt_lengths)
    if fresh:  # a continued session has one row per prompt already: no copy
        cache = cache.select_rows(rows)
    features = jnp.take(jnp.concatenate(out.layer_hidden, axis=-1), rows, axis=0) if feature_layers else None
    hidden = jnp.take(hidden, rows, axis=0).astype(jnp.float32)
    tokens, lengths, hidden, done, features = sharding.constrain_rows(
        (tokens, lengths + 1, hidden, done, features), mesh)
    return tokens, lengths, sharding.constrain_cache(cache, mesh), hidden, done, features, rng_decode


def verify_widths(k: int) -> tuple[int, ...]:
    """Static forward widths the loop picks from: 1 (no draft anywhere), 2^i + 1 from 5 up, and K+1."""
    return tuple(sorted({1, k + 1} | {2**i + 1 for i in range(2, 8) if 2**i < k}))


def _verify_forward(params, cfg: ModelConfig, inputs: Int[Array, "B K1"], cache: KVCache, longest: jax.Array,
                    template: TreeTemplate | None = None, hidden_layers: tuple[int, ...] = ()):
    """Runs the target on just enough of the K+1 inputs for the longest draft in the batch.

    A verify forward of T tokens costs far more than one token on CPUs (3-4x for T=9 here): when no
    row has a draft, or only short ones, a narrower static forward is chosen with `lax.switch`.
    A tree (`template`) runs all its nodes with the tree's attention mask and depths as positions.
    Outputs are padded back to K+1 positions; the padding lies past every row's draft and is unused.
    """
    k1 = inputs.shape[1]
    widths = verify_widths(k1 - 1) if template is None else (1, k1)  # a tree: all nodes or the root alone
    tree = {} if template is None else {"tree_mask": jnp.asarray(template.attention_mask),
                                        "pos_offsets": jnp.asarray(template.depth, jnp.int32)}

    def branch(width: int):
        def run(inputs, cache):
            opts = tree if width == k1 and template is not None else {}
            out = transformer.forward(params, cfg, inputs[:, :width], cache, hidden_layers=hidden_layers, **opts)
            pad = lambda x: jnp.pad(x, ((0, 0), (0, k1 - width)) + ((0, 0),) * (x.ndim - 2))
            return out.replace(logits=pad(out.logits), hidden=pad(out.hidden),
                               layer_hidden=tuple(map(pad, out.layer_hidden)))
        return run

    index = jnp.searchsorted(jnp.asarray(widths), longest + 1)
    return jax.lax.switch(index, [branch(w) for w in widths], inputs, cache)


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


@partial(jax.jit, static_argnames=("proposer",), donate_argnums=(0,))
def start_proposer(prefilled: tuple, prompt_lengths: Int[Array, "B"], group: Int[Array, "B"], weights: Any = None,
                   feature_start: Any = None, prev_state: Any = None, prev: Context | None = None,
                   sampling_cfg: Sampling | None = None, *, proposer: Proposer) -> LoopState:
    """The loop's initial state from `prefill`'s outputs, with the proposer's own state.

    The prefill's features [B, F, .] (positions from `feature_start`) are what it computed of
    `proposer.feature_layers`, for `init`. `prev_state`/`prev`: the same proposer's state and history
    from a continued Session.
    """
    tokens, lengths, cache, hidden, done, features, rng = prefilled
    batch = tokens.shape[0]
    state = LoopState(
        tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths, done=done, cache=cache, hidden=hidden,
        proposer_state=(), rng=rng, steps=jnp.zeros((), jnp.int32),
        features=None if features is None else jnp.zeros((batch, proposer.depth + 1) + features.shape[2:],
                                                          features.dtype),
        accept_hist=jnp.zeros((proposer.depth + 2,), jnp.int32),
        source_counts=jnp.zeros((len(proposer.sources),), jnp.int32))
    ctx = _context(state, group, weights, sampling_cfg).replace(features=features, feature_start=feature_start)
    pstate = proposer.init(ctx)
    if prev is not None:
        pstate = proposer.resume(pstate, ctx, prev_state, prev)
    return state.replace(proposer_state=pstate)


@partial(jax.jit, static_argnames=("cfg", "proposer", "eos_ids", "mesh", "gated"), donate_argnums=(1,))
def decode(params, state: LoopState, group: Int[Array, "B"], step_limit: Int[Array, ""], sampling_cfg: Sampling,
           max_new: Int[Array, ""], speculate_max_rows: Int[Array, ""], weights: Any = None, *, cfg: ModelConfig,
           proposer: Proposer, eos_ids: tuple[int, ...], mesh: Mesh | None = None, gated: bool = False) -> LoopState:
    """The whole decode: one while loop, three reasons to stop (budget, all rows done, no cache room).

    `state` comes from `start_proposer`. The loop also pauses once `state.steps` reaches `step_limit`
    (a traced value, so a caller checking rows on the host every C steps compiles this once); calling
    again with the returned state resumes exactly where it paused. `gated`: steps with more unfinished
    rows than `speculate_max_rows` skip `propose` and verify no draft (a 1-token forward); the
    proposer still absorbs every step's tokens (`update`). The budget `max_new`, the row cut-off and
    `sampling_cfg`'s numbers are traced, so one compile serves every call of the same shapes.
    """
    layers = proposer.feature_layers
    k, depth, template = proposer.width, proposer.depth, proposer.template

    def context(s: LoopState) -> Context:
        return _context(s, group, weights, sampling_cfg)

    def cond(s: LoopState):
        budget_left = (s.steps < max_new) & (s.steps < step_limit)
        room_left = jnp.max(jnp.where(s.done, 0, s.lengths)) + k < s.tokens.shape[1]
        return budget_left & jnp.any(~s.done) & room_left

    def body(s: LoopState) -> LoopState:
        rng, r_prop, r_ver = jax.random.split(s.rng, 3)
        ctx = context(s)
        active = ~s.done
        propose = lambda: proposer.propose(s.proposer_state, ctx, r_prop)
        if not gated:
            pstate, draft = propose()
            drafting = active
        else:  # a wide batch, where verify width costs more than drafts win back: no draft, no drafting cost
            gate_open = jnp.sum(active) <= speculate_max_rows
            no_draft = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(propose)[1])
            pstate, draft = jax.lax.cond(gate_open, propose, lambda: (s.proposer_state, no_draft))
            drafting = active & gate_open
        draft = draft.replace(num=jnp.where(drafting, draft.num, 0))
        pending = at(s.tokens, s.lengths - 1).astype(jnp.int32)
        inputs = jnp.concatenate([pending[:, None], draft.tokens.astype(jnp.int32)], axis=1)  # [B, K+1]
        out = _verify_forward(params, cfg, inputs, s.cache, jnp.max(draft.num), template, layers)
        cache = out.cache
        if template is None:
            res = verify_chain(out.logits, draft, sampling_cfg, r_ver)
            node_of_depth = jnp.broadcast_to(jnp.arange(k + 1), (inputs.shape[0], k + 1))
            fed = (jnp.arange(k + 1)[None] <= draft.num[:, None]) & active[:, None]
        else:
            valid = jnp.concatenate([jnp.ones_like(active)[:, None], draft.valid & drafting[:, None]], axis=1)
            fed = valid & active[:, None]
            res = verify_tree(out.logits, inputs, valid, template, sampling_cfg, r_ver)
            node_of_depth = jnp.concatenate([jnp.zeros_like(res.path[:, :1]), res.path], axis=1)
            if any(len(c) > 1 for c in template.children):  # a real tree: move the accepted path's keys/values
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
        hidden = at(out.hidden, at(node_of_depth, jnp.clip(num_new - 1, 0, depth))).astype(jnp.float32)
        features = None
        if layers:  # the accepted path's features: position lengths - 1 + i is node node_of_depth[:, i]
            features = gather_rows(jnp.concatenate(out.layer_hidden, axis=-1), node_of_depth)
        new = s.replace(
            tokens=sharding.constrain_rows(_commit(s, res.tokens, num_new), mesh),
            lengths=lengths,
            done=done,
            cache=sharding.constrain_cache(cache.with_lengths(jnp.where(active, lengths - 1, s.cache.lengths)), mesh),
            hidden=jnp.where(active[:, None], hidden, s.hidden),
            features=features,
            rng=rng,
            steps=s.steps + 1,
            accept_hist=s.accept_hist.at[num_new].add(active.astype(jnp.int32)),
            source_counts=s.source_counts.at[
                jnp.zeros_like(num_new) if draft.source is None else draft.source
            ].add(active.astype(jnp.int32)),
        )
        ctx_new = context(new).replace(features=features, feature_start=s.lengths - 1)
        if proposer.logit_topk:
            # the barrier keeps XLA:CPU from fusing a consumer's slice of the top-k back into the LM-head
            # dot, which it then ran as a naive loop (lookahead's window update: 200 vs 80 ms a step)
            topk = jax.lax.optimization_barrier(jax.lax.top_k(out.logits, proposer.logit_topk)[1])
            ctx_new = ctx_new.replace(verified=inputs, verified_topk=topk, verified_valid=fed)
        return new.replace(proposer_state=proposer.update(pstate, ctx_new, s.lengths))

    return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class _DeviceRun:
    state: LoopState
    stopped: np.ndarray  # [B] rows `stop_rows` ended
    prefill_s: float
    decode_s: float


def _run(model, plan: Plan, proposer: Proposer, weights: Any, sampling_cfg: SamplingConfig, seed: int,
         eos_ids: tuple[int, ...], session: Session | None, stop_rows, check_every: int,
         speculate_max_rows: int | None) -> _DeviceRun:
    """The device half: prefill, the proposer's start, the decode loop and its early-stop pauses."""
    cfg: ModelConfig = model.config
    traced = sampling.traced(sampling_cfg)  # numpy leaves: passed as they are, no eager conversion
    max_new = np.int32(plan.max_new_tokens)
    rows, batch = plan.rows, plan.batch
    mesh = sharding.mesh_of(model.params)  # sharded params: the whole generate runs under their mesh
    t0 = time.perf_counter()
    prefilled = prefill(
        model.params, plan.prompt, plan.prompt_lengths, rows, np.int32(seed), traced, max_new, plan.feed, plan.start,
        None if session is None else session.cache, cfg=cfg, max_len=plan.cache_len, eos_ids=eos_ids,
        feature_layers=proposer.feature_layers, mesh=mesh)
    jax.block_until_ready(prefilled[0])
    t1 = time.perf_counter()
    carry = session is not None and session.proposer == proposer
    feature_start = (plan.start if plan.start is not None else np.zeros(plan.num_prompts, np.int32))[rows]
    state = start_proposer(prefilled, plan.row_prompt_lengths, plan.groups, weights, feature_start,
                           session.proposer_state if carry else None, session.context if carry else None,
                           traced, proposer=proposer)
    gate = np.int32(batch if speculate_max_rows is None else speculate_max_rows)
    run = partial(decode, model.params, cfg=cfg, proposer=proposer, eos_ids=eos_ids, mesh=mesh,
                  gated=speculate_max_rows is not None)
    stopped = np.zeros(batch, bool)
    if stop_rows is None:
        state = run(state, plan.groups, max_new, traced, max_new, gate, weights)
    else:  # pause every `check_every` steps: one host sync per pause, never per token
        limit = 0
        row_starts = plan.row_prompt_lengths
        while True:
            limit += check_every
            state = run(state, plan.groups, np.int32(limit), traced, max_new, gate, weights)
            toks, lens, done, steps = jax.device_get((state.tokens, state.lengths, state.done, state.steps))
            if steps < limit or done.all():  # stopped for a reason of its own: budget, all done, cache full
                break
            gen = [toks[b, row_starts[b] : lens[b]].tolist() for b in range(batch)]
            stop = np.asarray(stop_rows(gen, done & ~stopped), bool) & ~done
            if stop.any():
                stopped |= stop
                state = state.replace(done=state.done | jnp.asarray(stop))
    jax.block_until_ready(state.tokens)
    return _DeviceRun(state=state, stopped=stopped, prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)


def _finish(model, plan: Plan, proposer: Proposer, weights: Any, run: _DeviceRun, eos_ids: tuple[int, ...],
            speculate_max_rows: int | None, keep_session: bool) -> GenerateOutput:
    """The host half after the device: trim each row at EOS, decode texts, count, keep the session."""
    state = run.state
    out_tokens, out_lengths, hist, steps, sources = jax.device_get(
        (state.tokens, state.lengths, state.accept_hist, state.steps, state.source_counts))
    starts, batch = plan.row_prompt_lengths, plan.batch
    eos = set(eos_ids)
    generated = []
    for b in range(batch):
        gen = out_tokens[b, starts[b] : out_lengths[b]].tolist()
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
        reused_prefix_tokens=0 if plan.start is None else int(np.sum(plan.start)),
        prompt_bucket=plan.prompt_bucket, cache_len=plan.cache_len)
    kept = None
    if keep_session:
        kept = Session(proposer=proposer, cache=state.cache, proposer_state=state.proposer_state,
                       context=Context(tokens=state.tokens, lengths=state.lengths, group=plan.groups,
                                       active=np.zeros((batch,), bool), hidden=state.hidden, weights=weights,
                                       cache=state.cache))
    return GenerateOutput(tokens=generated, texts=texts, stats=stats, session=kept)


def generate(model, prompts: Sequence[Any], method: "str | Proposer" = "ar", *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = True,
             num_samples: int = 1, group: Sequence[int] | None = None, max_len: int | None = None,
             eos_token_ids: Sequence[int] | None = None, pad_prompts_to: int = 0,
             session: Session | None = None, keep_session: bool = False, pad_new_to: int = 0,
             stop_rows: Callable[[list[list[int]], np.ndarray], Any] | None = None, check_every: int = 32,
             speculate_max_rows: int | None = None, **method_options) -> GenerateOutput:
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
    rows are unfinished, e.g. only the last stragglers of a Best-of-N batch on hardware where a wide
    batch's verify forward is compute-bound; None (default) always drafts, 0 never does.
    """
    gate = speculate_max_rows
    if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, np.integer)) or gate < 0):
        raise ValueError(f"speculate_max_rows must be None or an integer >= 0, got {speculate_max_rows!r}")
    if stop_rows is not None and check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    sampling_cfg = SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    proposer, weights = bind_proposer(model, method, sampling_cfg, **method_options)
    the_plan = make_plan(model, prompts, proposer, max_new_tokens=max_new_tokens, chat=chat, num_samples=num_samples,
                         group=group, max_len=max_len, pad_prompts_to=pad_prompts_to, session=session,
                         pad_new_to=pad_new_to)
    eos_ids = tuple(model.eos_token_ids if eos_token_ids is None else (int(i) for i in eos_token_ids))
    gate = None if gate is None else int(gate)
    run = _run(model, the_plan, proposer, weights, sampling_cfg, seed, eos_ids, session, stop_rows, check_every, gate)
    return _finish(model, the_plan, proposer, weights, run, eos_ids, gate, keep_session)
