"""The adaptive loop's width decision: which static verify width each step runs (cost-aware speculation).

Pure functions of the loop state, called by `engine.decode` inside the jitted loop: the online
acceptance estimate (`Adapt`: decayed counts per drafting source and confidence bucket, with a Beta
prior), the decision that picks the width with the most expected progress per calibrated second
(`choose_width`), when to keep proposing or back off (`settle`), the probes that test widths the
estimate turns down, and the shadows that score cut drafts against the tokens later steps emit. The
decision reads only what is known before the verify forward, so every method stays lossless.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from specjax.drafting import TreeTemplate, ancestor_mask, gather_rows, tree_depths
from specjax.proposers.base import Proposer


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


def subtree_of_width(template: TreeTemplate, width: int) -> tuple[int, ...]:
    return next(s for s in template.subtrees if len(s) == width)


def count_groups(proposer: Proposer) -> int:
    """Acceptance is counted apart per drafting sub-tree of a tree (a chain of 4 nodes is accepted less
    often than the 14-node tree around it); a chain's positions do not depend on the width."""
    return 1 if proposer.template is None else max(len(loop_widths(proposer)) - 1, 1)


def tree_members(proposer: Proposer) -> np.ndarray:
    """[W, K] bool: draft node j (template node j + 1) is in the sub-tree of loop width index w."""
    out = np.zeros((len(loop_widths(proposer)), proposer.width), bool)
    for w, width in enumerate(loop_widths(proposer)):
        out[w, [n - 1 for n in subtree_of_width(proposer.template, width)[1:]]] = True
    return out

@struct.dataclass
class Adapt:
    """The adaptive loop's online acceptance estimate and its record (see `engine.decode`).

    `tried[s, c, i]` / `hit[s, c, i]`: decayed counts of draft position i (chain position or tree
    depth) being verified / accepted, given every earlier position was, for drafting source s
    (`Proposer.sources`) and confidence bucket c (`confidence_bucket`, split by whether the row's last
    drafted step was accepted whole: inside copied text a full acceptance predicts the next one far
    better than a match length does, and without the split the loop under-drafted long copy runs,
    predicting 81 tokens where 128 came). Counts with a Beta prior rather
    than a bare EMA: the prior keeps the first steps' decisions sane before anything is observed, and the
    decay (`DECAY` per step) lets the estimate follow text that starts or stops repeating. Drafts the
    decision cut are counted too, once the row has emitted the tokens they predicted (`shadow`).
    """

    tried: Float[Array, "S C D"]  # C = 2 * NUM_BUCKETS: the confidence bucket, after a streak or not
    hit: Float[Array, "S C D"]
    streak: Int[Array, "B"]  # 1 where the row's last drafted step accepted its whole draft
    backoff: Int[Array, ""]  # steps to wait after the next step that does not pay (doubles up to `probe_interval`)
    wait: Int[Array, ""]  # steps left before proposing again (0: propose this step)
    saving: Float[Array, ""]  # moving average of the seconds a proposing step saved (`settle`; inf: none yet)
    width_hist: Int[Array, "W"]  # steps run at each static verify width (`loop_widths`)
    predicted_tokens: Float[Array, ""]  # sum over steps of the expected tokens of the chosen width
    predicted_s: Float[Array, ""]  # sum over steps of the calibrated seconds of the chosen width (+ drafter)
    drafted_steps: Int[Array, ""]  # steps that ran the whole `propose` (not a `cheap_part` alone)
    # per row, a draft the width decision cut, scored against the tokens later steps emit (`shadow`)
    shadow_tokens: Int[Array, "B K"]
    shadow_valid: Bool[Array, "B K"]  # its nodes; none: no shadow pending
    shadow_parents: Int[Array, "B K"]  # each node's parent node (-1: the pending token; a dynamic tree's own)
    shadow_start: Int[Array, "B"]  # the history length when it was drafted: depth i predicts position start + i - 1
    shadow_scored: Int[Array, "B"]  # its leading positions already counted
    shadow_row: Int[Array, "B"]  # its counts' row (source) and confidence bucket
    shadow_bucket: Int[Array, "B"]
    probing: Bool[Array, ""] = False  # this step probes after a backoff: `settle` sets the backoff by its yield
    proposing: Bool[Array, ""] = False  # this step ran `propose`: `settle` weighs what it saved
    # verified drafts fell short, or drafts that could gain were turned down: the next such draft probes
    probe_due: Bool[Array, ""] = False
    # seconds of probing the budget allows now (`probe_credit`): each step adds PROBE_SHARE of a 1-token step,
    # each probe spends its price, so probes of every kind cost at most that share of the time
    credit: Float[Array, ""] = float("inf")
    probed: Bool[Array, ""] = False  # this step verified a probe (of any kind): `settle` counts it a miss or not
    # probes in a row that did not pay: each halves the share of time probing may take (`probe_credit`)
    probe_misses: Int[Array, ""] = 0
    # proposals in a row with nothing worth verifying: each halves the share of time such proposals take
    idle_misses: Int[Array, ""] = 0
    # the chosen width's expected progress of the batch (`batch_worth`), known before the verify: what a
    # single row's saving is averaged on (`settle`)
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
TIE_BREAK = 1e-3  # weight of the rows' mean expected tokens beside the batch's expected progress (`batch_worth`)


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
    shape = (len(proposer.sources) * count_groups(proposer), 2 * NUM_BUCKETS, max(proposer.depth, 1))
    tried, hit = (jnp.zeros(shape, jnp.float32),) * 2 if counts is None else counts
    rows = jnp.zeros((batch,), jnp.int32)
    parents = shadow_shape(proposer)[0]
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

def drafted_depth(draft, node_depth: Int[Array, "K"] | None) -> Int[Array, "B"]:
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


def choose_width(draft, drafting, active, want, adapt: Adapt, costs, drafter_s, widths, node_depth, proposer,
                 step, remaining: Int[Array, "B"] | None = None, probes: Bool[Array, ""] | bool = True,
                 runs: Bool[Array, ""] | None = None, woken_s: Float[Array, ""] | float | None = None):
    """The adaptive decision of one step (see `engine.decode`): the width and the truncated draft; whether to
    keep proposing is `settle`'s, from what the step yields. `want`: the whole proposal ran (it is
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
    # a tree's sub-trees are counted apart (`count_groups`): rows source * G + g, g the drafting sub-tree
    groups = count_groups(proposer)
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
        length = jnp.minimum(drafted_depth(draft, None)[:, None], widths[None] - 1)  # [B, W]
        group_of = jnp.zeros(widths.shape, jnp.int32)
    else:  # a tree: the deepest valid node of each sub-tree
        members = jnp.asarray(tree_members(proposer))  # [W, K]
        length = jnp.max(jnp.where(draft.valid[:, None] & members[None], node_depth[None, None], 0), axis=2)
        group_of = jnp.maximum(jnp.arange(len(widths)) - 1, 0)
    # P(a row accepts at least i draft tokens) at each width: 0 past what the width keeps of its draft
    upto = jnp.arange(reach.shape[-1])[None, None] <= length[:, :, None]  # [B, W, D+1]
    survive = jnp.where(upto, reach[:, group_of], 0.0)
    expect = jnp.where(active[:, None], survive.sum(-1), 0.0)  # [B, W]: expected tokens (index 0: the sure one)
    worth = batch_worth(survive, active, remaining)  # [W]: the batch's expected progress
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
        best_case = batch_worth(upto.astype(jnp.float32), active, remaining, tie_break=0.0)
        gain = jnp.max(best_case[1:]) > batch_worth(survive[:, :1], active, remaining, tie_break=0.0)[0]
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


def idle_decision(adapt: Adapt, costs, drafter_s, active: Bool[Array, "B"]) -> Adapt:
    """`choose_width` on a step that does not propose (`want` False, no draft): width 1, no probe; the
    wait counts down, the probe credit grows, the record counts a 1-token step."""
    credit, _ = probe_credit(adapt.credit, costs, drafter_s, adapt.probe_misses)
    rows = jnp.sum(active).astype(jnp.float32)
    any_rows = rows > 0
    return adapt.replace(wait=adapt.wait - 1, width_hist=adapt.width_hist.at[0].add(any_rows.astype(jnp.int32)),
                         predicted_tokens=adapt.predicted_tokens + rows,
                         predicted_s=adapt.predicted_s + jnp.where(any_rows, costs[0], 0.0),
                         probing=jnp.zeros((), bool), proposing=jnp.zeros((), bool), credit=credit,
                         probed=jnp.zeros((), bool))


def idle_observe(adapt: Adapt, lengths: Int[Array, "B"], scored: bool) -> Adapt:
    """`observe`, `settle` and `shadow` after a step with no draft and no shadow pending: a deterministic
    drafter's (absent) shadow marks the positions since its start as seen. The counts hold: such a step
    observes nothing, and decaying them there let a drafter that waits 15-75 steps between proposals
    (EAGLE at batch 1, whose chain of 4 costs 2.2x a step) forget each proposal's evidence before the
    next, so its estimate stayed at the prior and turned down drafts a fixed chain ran at 1.19x `ar`."""
    if scored:
        seen = jnp.minimum(lengths - adapt.shadow_start, adapt.tried.shape[-1])
        adapt = adapt.replace(shadow_scored=jnp.maximum(adapt.shadow_scored, seen))
    return adapt


def batch_progress(before, after, num_new: Int[Array, "B"], max_new) -> Float[Array, ""]:
    """How far a step moved the batch towards its end: the drop in the most tokens any unfinished row
    has left (a static batch runs until that row is done), at most the step's largest yield (a row
    ending at EOS takes what it had left out of the count, which 1-token steps would remove too).
    `before`, `after`: the loop states (`engine.LoopState`) around the step."""
    left = lambda s: jnp.max(jnp.where(s.done, 0, max_new - (s.lengths - s.prompt_lengths)))
    return jnp.clip(left(before) - left(after), 0, jnp.max(num_new)).astype(jnp.float32)


def settle(adapt: Adapt, progress: Float[Array, ""], mean_tokens: Float[Array, ""], best: Int[Array, ""], costs,
           drafter_s, judge: Bool[Array, ""] | bool = True, free: Bool[Array, ""] | bool = False,
           woken_s: Float[Array, ""] | float | None = None, single: Bool[Array, ""] | bool = False) -> Adapt:
    """After a step that proposed: whether to keep proposing, from what it yielded. The step saved
    `progress` (`batch_progress`) one-token steps' worth of time less the verify it ran; proposing goes
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
    `PROBE_SHARE` of a step and its estimate sees every draft (`shadow`): it never waits, and the width
    decision alone says what is verified (waits after drafts that fell short left `pld` blind to the
    repeats that followed, 2 to 60 steps at a time). `woken_s` (default `drafter_s`) prices the waits:
    the proposal that ends one first catches up (`Proposer.waking`)."""
    # one row: the saving the estimate expected of the chosen width (`Adapt.expected`), not the one it got.
    # A verify of 5 at 2.2x a step saves -41 ms when nothing is accepted and +97 ms when all is: averaged,
    # realised savings of an EAGLE chain worth 1.18x `ar` dipped below its cost every few dozen steps, and
    # each dip doubled its wait. One row's estimate counts its own verifications; a batch's rows may accept
    # tokens that do not move it (`batch_progress`), so a batch averages what it got
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
    # after verified drafts fell short (or drafts were turned down: `choose_width` set the flag), the next draft
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


def batch_worth(survive: Float[Array, "B W J"], active: Bool[Array, "B"], remaining: Int[Array, "B"],
                tie_break: float = TIE_BREAK) -> Float[Array, "W"]:
    """What a step of each width is worth to a batch: the expected drop in the most tokens any active row
    has left (a static batch runs until that row is done, `batch_progress`), from each row's
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


def counted(shape: tuple[int, ...], rows: Int[Array, "B G"], bucket: Int[Array, "B"],
            x: Float[Array, "B G D"]) -> Float[Array, "S C D"]:
    """Each row's per-position indicators `x` summed into the counts' layout (`Adapt.tried`): row b's
    g-th indicator goes to counts row `rows[b, g]` (source, or source x sub-tree), bucket `bucket[b]`."""
    where = jax.nn.one_hot(rows, shape[0])[..., None] * jax.nn.one_hot(bucket, shape[1])[:, None, None]
    return jnp.einsum("bgsc,bgd->scd", where, x)


def observe(adapt: Adapt, draft, drafting, accepted, bucket, node_depth, group: Int[Array, ""] | int = 0,
            groups: int = 1, decay: Bool[Array, ""] | bool = True) -> Adapt:
    """Adds one verification to the acceptance counts: position i of a row's draft was tried if every
    earlier one was accepted, and accepted if the row accepted more than i tokens. `group`: the tree's
    drafting sub-tree that ran, of `groups` (`count_groups`). `decay` False: the step observed nothing (it
    neither proposed nor scored a shadow, `idle_observe`), and the counts hold."""
    batch, d = draft.num.shape[0], adapt.tried.shape[-1]
    source = jnp.zeros((batch,), jnp.int32) if draft.source is None else draft.source
    source = source * groups + group
    pos = jnp.arange(d)[None]
    reach = drafted_depth(draft, node_depth)[:, None]
    on = drafting[:, None]
    tried = (on & (pos < reach) & (pos <= accepted[:, None])).astype(jnp.float32)
    hit = (on & (pos < accepted[:, None])).astype(jnp.float32)
    add = lambda x: counted(adapt.tried.shape, source[:, None], bucket, x[:, None])
    drafted = on[:, 0] & (reach[:, 0] > 0)
    streak = jnp.where(drafted, (accepted >= reach[:, 0]).astype(jnp.int32), adapt.streak)
    keep = jnp.where(decay, DECAY, 1.0)
    return adapt.replace(tried=keep * adapt.tried + add(tried), hit=keep * adapt.hit + add(hit), streak=streak)


def shadow_shape(proposer: Proposer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A draft's static shape as a tree of draft nodes: each node's parent (-1: the pending token), its
    depth, and which nodes each counted sub-tree holds ([G, K], `count_groups`). A chain is one path."""
    if proposer.template is None:
        k = max(proposer.depth, 1)
        return np.arange(k) - 1, np.arange(1, k + 1), np.ones((1, k), bool)
    parents = np.asarray(proposer.template.parents[1:]) - 1
    return parents, np.asarray(proposer.template.depth[1:]), tree_members(proposer)[1:]


def shadow_score(adapt: Adapt, proposer: Proposer, tokens: Int[Array, "B S"], lengths: Int[Array, "B"],
                 done: Bool[Array, "B"]) -> Adapt:
    """Counts each pending shadow's newly known positions, as `observe` counts a verified draft: draft
    position i (a tree's depth i + 1) is tried if every earlier one was accepted, and accepted if the draft
    holds, under the accepted path, the token the row emitted there. Exact for deterministic drafts:
    greedy verification accepts a token iff it is the target's choice, and sampled verification iff it
    is the target's own draw for that position (`position_keys`), which is what the row emitted. A
    shadow ends at its first miss, at its deepest node, or when its row is done."""
    _, _, members = shadow_shape(proposer)
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
    add = lambda x: counted(adapt.tried.shape, rows, adapt.shadow_bucket, x)
    ended = jnp.all((a < known) | (a >= reach), axis=1) | done  # nothing deeper can be accepted, or nothing known
    valid = valid & ~ended[:, None]
    return adapt.replace(tried=adapt.tried + add(tried), hit=adapt.hit + add(hit), shadow_valid=valid,
                         shadow_scored=jnp.maximum(scored, jnp.minimum(known[:, 0], d)))


def shadow(adapt: Adapt, proposer: Proposer, proposed, cut: Bool[Array, "B"], verified: Int[Array, "B"],
           start: Int[Array, "B"], bucket: Int[Array, "B"], tokens: Int[Array, "B S"], lengths: Int[Array, "B"],
           done: Bool[Array, "B"]) -> Adapt:
    """Scores the part of each draft that the width decision cut off (all of it, for a turned-down draft)
    against the tokens the row emits afterwards, so that an estimate that turns down good drafts learns so
    without a probe. Counting verified drafts alone, with the counts decaying, a match-length bucket held
    below the price of a verify turned down text the model was repeating word for word, 18 steps in a row
    (every draft would have been accepted whole). `cut`: rows whose first `verified` positions were
    verified and all accepted (0: turned down) and whose draft went on. A row keeps one shadow until it
    ends (a new one is taken only then); a step's decision reads only tokens emitted before it."""
    adapt = shadow_score(adapt, proposer, tokens, lengths, done)
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
    return shadow_score(adapt, proposer, tokens, lengths, done)  # the step's own last token scores the first cut one
