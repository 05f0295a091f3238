"""`eagle`: a trained EAGLE-3 style head drafts a token tree from the target's fused features.

Per step, inside the jitted loop: the head's output at the last committed slot gives the depth-1
candidates (its top-k); for each further depth the head runs once on the nodes drafted so far (tree
attention over its own cache plus each node's ancestors). A tree of `total` nodes, `depth` deep, keeps
per row the likeliest paths that expanding each depth's `topk` likeliest nodes reaches (`dynamic`,
EAGLE-2's tree, `_propose_dynamic`), or fills `eagle_tree`'s static template with fixed ranks. After
verification the head absorbs the accepted tokens with the target features the verify forward
produced (`feature_layers`), so its cache matches the committed history whenever it drafts. While the
loop will not propose (an adaptive loop backing off), the features wait in a small buffer and are
absorbed in one forward before the next proposal: at batch 8 on a 2-core CPU absorbing every step
cost a step that drafted nothing 10 ms over plain decoding's 106. A wait longer than the buffer holds
(`forget`) keeps its newest positions and skips the older ones: their slots are masked out of the head's
attention instead of absorbed, since absorbing them in 20-position forwards still cost a best-of-8
step that drafted nothing 0.6 ms of its 50 on a 2-core CPU (the head ran on every token the target
committed). The target's features at the newest positions carry the whole context, so the head drafts
on after the gap; drafts are verified as ever, so outputs do not change.

`topk=1` (the default) drafts a chain of `depth` tokens instead; `min_prob` then stops the chain
where the head's path probability falls below it (a narrower verify forward, when a width is free). Drafts are the
head's top-k tokens (q one-hot), so sampling stays lossless through the tree/chain verifier.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specjax.config import ModelConfig
from specjax.drafting import Context, Draft, TreeTemplate, ancestor_mask, dynamic_tree_shape, eagle_tree, run_if
from specjax.heads.eagle import params_dtype
from specjax.models import transformer
from specjax.models.cache import KVCache
from specjax.proposers.base import Proposer, bound, option, register


@struct.dataclass
class EagleState:
    cache: KVCache  # the head's one-layer cache; slot j = pair (u_j, x_{j+1}); lengths = slots absorbed
    last: jax.Array  # [B, D] head output at the last committed slot: predicts the first draft token
    # [B, LAG_STEPS * (depth + 1), F]: target features of positions cache.lengths + i, not absorbed yet
    lag: jax.Array | None = None
    skipped: jax.Array | None = None  # [B, S] bool: slots of positions a long wait skipped (`Eagle.forget`)


LAG_STEPS = 4  # the lag buffer holds LAG_STEPS * (depth + 1) positions: a wait of as many 1-token steps


@register("eagle")
@dataclasses.dataclass(frozen=True)
class Eagle(Proposer):
    confidence_kind: ClassVar[str] = "probability"
    needs: ClassVar[str | None] = "head"
    paper: ClassVar[tuple[int, str] | None] = (2, "EAGLE-3")
    head: str = ""  # folder of a trained head (train.draft_head --head eagle --out DIR); '' = the shipped one
    # defaults measured on a 2-core CPU, where a 5-token verify costs 2.5x a 1-token step: a chain
    # of 4 beats trees of 6-12 nodes there (docs/benchmarks.md); on accelerators try topk=2-3, total=16-60
    total: int = option(8, min=1)  # draft tree nodes (verify width - 1); trees only (topk > 1)
    depth: int = option(4, min=1)  # most draft tokens per step
    topk: int = option(1, min=1)  # children per node at most; 1 = a chain of `depth` tokens
    min_prob: float = option(0.0, min=0)  # chain mode: draft only the leading guesses at least this sure
    # trees: the `total` likeliest paths the head's top-k expansion reaches, per row and step (EAGLE-2's
    # dynamic tree, `_propose_dynamic`); False: the fixed ranks of `eagle_tree` (EAGLE-1's static tree)
    dynamic: bool = True
    lazy: bool = True  # absorb accepted tokens only before a proposal (False: every step, as drafted)
    forget: bool = True  # a wait longer than the lag buffer skips its oldest positions (False: absorbs them)
    k: int = option(0, min=0)  # set by bind
    cfg: ModelConfig | None = bound(None)  # the head's one-layer config
    layers: tuple[int, ...] = bound(())  # target layers fused

    def __post_init__(self):
        if self.topk > 1 and self.dynamic:
            reach = self.topk + (self.depth - 1) * self.topk ** 2  # the paths the expansion scores
            if not self.depth <= self.total <= reach:
                raise ValueError(f"a dynamic tree of depth {self.depth} and topk {self.topk} holds {self.depth} to "
                                 f"{reach} nodes, got total={self.total}: set total in that range")
        elif self.topk > 1:
            eagle_tree(self.total, self.depth, self.topk)  # validates the budget
        elif self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    @property
    def template(self) -> TreeTemplate | None:
        if self.topk == 1:
            return None
        return dynamic_tree_shape(self.total, self.depth) if self.dynamic else eagle_tree(self.total, self.depth,
                                                                                          self.topk)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.layers

    def bind(self, model, sampling_cfg) -> tuple["Eagle", Any]:
        from specjax.heads.eagle import feature_layers, head_config
        from specjax.heads.io import head_for

        path, config, params = head_for(model, "eagle", self.head)
        cfg = model.config
        layers = tuple(config.get("feature_layers", feature_layers(cfg.num_layers)))
        bound = dataclasses.replace(self, head=path, k=self.depth if self.topk == 1 else self.total,
                                    cfg=head_config(cfg), layers=layers)
        dtype = transformer.compute_dtype(model.params)
        ids = jnp.asarray(params.pop("draft_vocab"), jnp.int32)
        target = {key: model.params[key] for key in ("lm_head", "embed") if key in model.params}
        return bound, {"head": jax.tree.map(lambda x: jnp.asarray(x, dtype), params),
                       "lm_draft": jnp.take(model.params["lm_head"], ids, axis=1), "ids": ids, "target": target}

    def _module(self):
        from specjax.heads.eagle import EagleHead

        if self.cfg is None:
            raise ValueError("the eagle proposer is unbound: generate() binds it to the model (call bind())")
        return EagleHead(self.cfg)

    def _run(self, w, method, *args):
        return self._module().apply({"params": w["head"]}, *args, method=method)

    def _step(self, w, cache: KVCache, tokens, u, offsets, tree_mask=None, skipped=None, write: bool = True):
        """Head forward on new pairs (u, tokens) [B, T] at slots cache.lengths + t, positions
        cache.lengths + offsets, seeing the cache's slots before them but the `skipped` ones; returns
        outputs [B, T, D] and the cache buffers with them written (`write=False`: outputs only, for a
        draft's nodes: a write that is thrown away made XLA copy the whole head cache at every depth)."""
        cfg = self.cfg
        b, t = tokens.shape
        start = cache.lengths
        rope = transformer.rope_tables(start[:, None] + offsets[None], transformer.rope_inv_freq(cfg))
        new_mask = transformer.new_token_mask(t, tree_mask, cfg.sliding_window)
        ctx_mask = transformer.context_mask(start, t, cache.max_len, cfg.sliding_window)
        if skipped is not None:
            chex.assert_shape(skipped, (b, cache.max_len))
            ctx_mask = ctx_mask & ~skipped[:, None, :]
        emb = transformer.embed(w["target"], cfg, tokens).astype(params_dtype(w["head"]))
        g, kv = self._run(w, lambda m, *a: m(*a, write=write), emb, u, rope, new_mask, ctx_mask,
                          (cache.k[0], cache.v[0]), start[:, None] + jnp.arange(t)[None])
        return g, cache.replace(k=(kv[0],), v=(kv[1],)) if write else cache

    def _absorb(self, state: EagleState, ctx: Context) -> EagleState:
        """Writes pairs (fused ctx.features[:, i], token at feature_start + 1 + i) for every committed
        position from feature_start on; the head cache then ends where the target's does."""
        from specjax.heads.eagle import EagleHead

        w = ctx.weights
        feats = ctx.features
        b, t = feats.shape[:2]
        start = ctx.feature_start
        chex.assert_shape(start, (b,))
        idx = jnp.clip(start[:, None] + 1 + jnp.arange(t)[None], 0, ctx.tokens.shape[1] - 1)
        tokens = jnp.take_along_axis(ctx.tokens, idx, axis=1)
        u = self._run(w, EagleHead.fuse, feats.astype(params_dtype(w["head"])))
        g, cache = self._step(w, state.cache.with_lengths(start), tokens, u, jnp.arange(t), skipped=state.skipped)
        last_i = ctx.lengths - 2 - start  # slot lengths - 2: the newest committed pair
        last = jnp.take_along_axis(g, jnp.clip(last_i, 0, t - 1)[:, None, None], axis=1)[:, 0]
        last = jnp.where((last_i >= 0)[:, None], last.astype(state.last.dtype), state.last)
        skipped = state.skipped
        if skipped is not None:  # the slots written now hold absorbed positions
            slots = jnp.arange(skipped.shape[1])[None]
            skipped = skipped & ~((slots >= start[:, None]) & (slots < start[:, None] + t))
        return state.replace(cache=cache.with_lengths(jnp.maximum(ctx.lengths - 1, start)), last=last,
                             skipped=skipped)

    def _forget(self, state: EagleState, upto: jax.Array) -> EagleState:
        """Skips each row's waiting positions before `upto` [B]: their slots are masked out of the head's
        attention from now on, never absorbed, and the lag buffer moves on to the newer ones."""
        absorbed = state.cache.lengths
        size = state.lag.shape[1]
        kept = jnp.maximum(absorbed, upto)
        slots = jnp.arange(state.skipped.shape[1])[None]
        skipped = state.skipped | ((slots >= absorbed[:, None]) & (slots < kept[:, None]))
        cols = jnp.clip(jnp.arange(size)[None] + (kept - absorbed)[:, None], 0, size - 1)
        lag = jnp.take_along_axis(state.lag, cols[:, :, None], axis=1)
        return state.replace(cache=state.cache.with_lengths(kept), lag=lag, skipped=skipped)

    def init(self, ctx: Context) -> EagleState:
        self._module()
        b = ctx.tokens.shape[0]
        cache = KVCache.init(self.cfg, b, ctx.tokens.shape[1], params_dtype(ctx.weights["head"]))
        lag = jnp.zeros((b, LAG_STEPS * (self.depth + 1), ctx.features.shape[-1]), ctx.features.dtype)
        state = EagleState(cache=cache, last=jnp.zeros((b, self.cfg.hidden_size), jnp.float32), lag=lag,
                           skipped=jnp.zeros((b, cache.max_len), bool))
        if ctx.prompt_rows is None or ctx.prompt_rows.shape[0] == b:
            return self._absorb(state, ctx)
        return self._absorb_shared(state, ctx)

    def _absorb_shared(self, state: EagleState, ctx: Context) -> EagleState:
        """`_absorb` for rows that share prompts (Best-of-N): every pair but the last holds prompt tokens
        only, so each prompt's are absorbed once and copied to its rows; then each row absorbs its last
        pair (the prompt's last features, the row's own first token). At batch 8 absorbing a 128-token
        prompt in every row cost 74 ms a call on a 2-core CPU (0.6 ms a step of a 128-token best-of-8
        run); absorbed once, 12 ms."""
        first, of = ctx.prompt_rows, ctx.prompt_of
        chex.assert_shape(of, (ctx.tokens.shape[0],))
        pick = lambda x: jnp.take(x, first, axis=0)
        once = EagleState(cache=KVCache.init(self.cfg, first.shape[0], state.cache.max_len, state.cache.k[0].dtype),
                          last=pick(state.last), skipped=pick(state.skipped))
        once = self._absorb(once, ctx.replace(tokens=pick(ctx.tokens), lengths=pick(ctx.lengths) - 1,
                                              features=pick(ctx.features), feature_start=pick(ctx.feature_start)))
        spread = jax.tree.map(lambda x: jnp.take(x, of, axis=0), once)
        last = ctx.lengths - 2  # each row's last pair: position lengths - 2, paired with the pending token
        feats = jnp.take_along_axis(ctx.features, jnp.clip(last - ctx.feature_start, 0, ctx.features.shape[1] - 1)
                                    [:, None, None], axis=1)
        state = state.replace(cache=spread.cache, skipped=spread.skipped)
        return self._absorb(state, ctx.replace(features=feats, feature_start=jnp.maximum(last, ctx.feature_start)))

    def catch_up(self, state: EagleState, ctx: Context) -> EagleState:
        """Absorbs whatever the lag buffer holds (nothing changes when it holds nothing): the head cache
        then ends where ctx's history does."""
        return self._absorb(state, ctx.replace(features=state.lag, feature_start=state.cache.lengths))

    @property
    def catches_up(self) -> bool:
        return self.lazy

    def waking(self, state: EagleState, ctx: Context) -> EagleState:
        """A full lag absorbed: the catch-up a proposal after a wait of `LAG_STEPS` or more steps runs."""
        if not self.lazy:
            return state
        size = state.lag.shape[1]
        return self.catch_up(state.replace(cache=state.cache.with_lengths(jnp.maximum(ctx.lengths - 1 - size, 0))), ctx)

    def resume(self, state: EagleState, ctx: Context, prev_state: EagleState, prev: Context) -> EagleState:
        """Next round: the previous head cache holds the shared prefix; redo only the new part on it."""
        return self._absorb(self.catch_up(prev_state, prev).replace(last=state.last), ctx)

    def update(self, state: EagleState, ctx: Context, prev_lengths: jax.Array) -> EagleState:
        """Absorbs the step's accepted tokens, or, while the loop will not propose, adds their features
        to the lag buffer (absorbed in one forward before the next proposal; when this step's would not
        fit behind what it holds, the oldest are skipped (`forget`) or absorbed first)."""
        if not self.lazy or ctx.proposes_next is None:
            return self._absorb(state, ctx)
        b, t = ctx.features.shape[:2]
        size = state.lag.shape[1]
        forget = self.forget and t <= size  # (a step's positions alone may not fit: absorbed, as below)
        if forget:  # the lag keeps the newest `size` positions waiting, this step's included
            state = self._forget(state, ctx.lengths - 1 - size)
        absorbed = state.cache.lengths
        cols = (ctx.feature_start - absorbed)[:, None] + jnp.arange(t)[None]
        lag = state.lag.at[jnp.arange(b)[:, None], cols].set(ctx.features.astype(state.lag.dtype), mode="drop")
        lagging = jnp.any(ctx.feature_start > absorbed)  # positions before this step's wait as well
        if forget:  # nothing overflows: wait in the lag, or absorb this step's positions (and the lag's first)
            lagged = state.replace(lag=lag)  # (the lag's content past what waits is never read)
            lagged = run_if(ctx.proposes_next & ~lagging, lambda st: self._absorb(st, ctx), lagged)
            return run_if(ctx.proposes_next & lagging, lambda st: self.catch_up(st, ctx), lagged)
        # absorbed only when this step's positions do not fit behind the lag: reserving room for a whole
        # draft ahead (the hybrid's 17 positions in a 20-position buffer) absorbed every 3-4 steps of a wait
        # instead of every 20 (2.4 ms of a 79 ms best-of-8 step); and a step that did not run the head may
        # still accept a whole draft (the hybrid's suffix match, `Proposer.cheap_part`)
        overflow = jnp.any(ctx.lengths - 1 - absorbed > size)

        def flushed() -> EagleState:  # the lag's positions, up to this step's first, absorbed
            return self._absorb(state, ctx.replace(features=state.lag, feature_start=absorbed,
                                                   lengths=ctx.feature_start + 1))

        def flushed_then_lag() -> EagleState:  # this step's positions then start an empty lag
            fresh = flushed()
            return fresh.replace(lag=fresh.lag.at[:, :t].set(ctx.features.astype(state.lag.dtype)))

        branches = {"lag": lambda: state.replace(lag=lag), "absorb": lambda: self._absorb(state, ctx),
                    "catch_up": lambda: self.catch_up(state.replace(lag=lag), ctx)}
        branches["flush_absorb"] = lambda: self._absorb(flushed(), ctx)  # a wait overflowed: flush it first
        if t <= size:  # (else a step's positions alone may not fit: absorbed at once after a flush)
            branches["flush_lag"] = flushed_then_lag
        at = {name: i for i, name in enumerate(branches)}
        index = jnp.where(ctx.proposes_next, jnp.where(lagging, at["catch_up"], at["absorb"]), at["lag"])
        flush = at.get("flush_lag", at["flush_absorb"])
        index = jnp.where(overflow, jnp.where(ctx.proposes_next, at["flush_absorb"], flush), index)
        return jax.lax.switch(index, list(branches.values()))

    def _propose_dynamic(self, state: EagleState, ctx: Context, cache: KVCache) -> Draft:
        """EAGLE-2's dynamic tree, per row: expand the `topk` likeliest nodes of each depth (a beam; the
        first-ranked chain always in it) by their `topk` likeliest children, one head forward per depth
        over every beam node so far, then keep the `total` likeliest paths of all that were scored (a
        path's probability is the product of the head's along it). Nodes 1..depth are the first-ranked
        chain (the tree's static chain sub-tree, `dynamic_tree_shape`), the rest by probability; a node's
        parent is likelier, or as likely and scored earlier, so every kept node's parent is kept."""
        from specjax.heads.eagle import EagleHead

        w, k, depth = ctx.weights, self.topk, self.depth
        b = ctx.tokens.shape[0]
        rows = jnp.arange(b)[:, None]
        top = lambda out: jax.lax.top_k(jax.nn.softmax(self._run(w, EagleHead.logits, out, w["lm_draft"]), -1), k)
        p, i = top(state.last[:, None])  # [B, 1, k]: depth 1, the root's children
        scores, tokens = [p[:, 0]], [jnp.take(w["ids"], i[:, 0])]  # per depth, [B, k] then [B, k * k]
        parents = [jnp.full((b, k), -1, jnp.int32)]  # each scored path's parent, as an index into all scored
        beam = jnp.broadcast_to(jnp.arange(k), (b, k))  # the depth's beam, as indices into its scored paths
        # the head's inputs so far: every beam node, with its parent's output and its position among them
        fed_tokens, fed_u = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0, state.last.shape[-1]), state.last.dtype)
        fed_parent = jnp.zeros((b, 0), jnp.int32)  # 0: the root; j: fed input j - 1
        beam_u = jnp.broadcast_to(state.last[:, None], (b, k, state.last.shape[-1]))
        beam_parent = jnp.zeros((b, k), jnp.int32)
        start = 0  # index of this depth's first scored path among all
        for level in range(2, depth + 1):
            n_fed = fed_tokens.shape[1]
            fed_tokens = jnp.concatenate([fed_tokens, jnp.take_along_axis(tokens[-1], beam, axis=1)], axis=1)
            fed_u = jnp.concatenate([fed_u, beam_u.astype(fed_u.dtype)], axis=1)
            fed_parent = jnp.concatenate([fed_parent, beam_parent], axis=1)
            mask = ancestor_mask(jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), fed_parent], axis=1),
                                 level)[:, 1:, 1:]
            offsets = jnp.repeat(jnp.arange(level - 1), k)  # a depth-d node sits d - 1 after the pending token
            g, _ = self._step(w, cache, fed_tokens, fed_u, offsets, mask, state.skipped, write=False)
            p, i = top(g[:, n_fed:])  # [B, k, k]: each beam node's likeliest children
            beam_score = jnp.take_along_axis(scores[-1], beam, axis=1)
            path_p = (beam_score[:, :, None] * p).reshape(b, k * k)
            tokens.append(jnp.take(w["ids"], i.reshape(b, k * k)))
            scores.append(path_p)
            parents.append(start + jnp.repeat(beam, k, axis=1))
            start += scores[-2].shape[1]
            if level < depth:  # the next beam: the likeliest children, the chain's next node first
                _, beam = jax.lax.top_k(path_p.at[:, 0].set(2.0), k)
                beam_u = jnp.take_along_axis(g[:, n_fed:], (beam // k)[:, :, None], axis=1)
                beam_parent = n_fed + 1 + beam // k
        scores, tokens, parents = (jnp.concatenate(x, axis=1) for x in (scores, tokens, parents))
        # the chain (candidate 0 of each depth: depth 1's first, then each chain node's first child) first,
        # in depth order; then the likeliest paths, ties to the one scored first (never a child before its parent)
        firsts = np.cumsum([0, k] + [k * k] * max(depth - 2, 0))[:depth]
        ranked = scores.at[:, firsts].set(3.0 - 0.01 * np.arange(depth))
        _, keep = jax.lax.top_k(ranked, self.total)  # [B, total] indices into the scored paths
        node_of = jnp.zeros(scores.shape, jnp.int32).at[rows, keep].set(jnp.arange(1, self.total + 1)[None])
        parent = jnp.take_along_axis(parents, keep, axis=1)
        node_parent = jnp.where(parent < 0, 0, jnp.take_along_axis(node_of, jnp.maximum(parent, 0), axis=1))
        num = jnp.where(ctx.active, self.total, 0).astype(jnp.int32)
        return Draft(tokens=jnp.take_along_axis(tokens, keep, axis=1), num=num, confidence=scores[:, 0],
                     valid=jnp.broadcast_to(ctx.active[:, None], (b, self.total)), parents=node_parent)

    def propose(self, state: EagleState, ctx: Context, rng: jax.Array) -> tuple[EagleState, Draft]:
        from specjax.heads.eagle import EagleHead

        self._module()
        w = ctx.weights
        b = ctx.tokens.shape[0]
        cache = state.cache.with_lengths(ctx.lengths - 1)
        if self.dynamic and self.topk > 1:
            return state, self._propose_dynamic(state, ctx, cache)
        tree = eagle_tree(self.total, self.depth, self.topk) if self.topk > 1 else eagle_tree(self.depth, self.depth, 1)
        size, depths, parents, ranks = tree.size, tree.depth, tree.parents, tuple(int(r) for r in tree.ranks)
        upto = [sum(1 for d in depths[1:] if d <= level) for level in range(self.depth + 1)]  # nodes 1..upto[d]
        tokens = jnp.zeros((b, size), jnp.int32)
        probs = jnp.ones((b, size), jnp.float32)
        outs = jnp.zeros((b, size, self.cfg.hidden_size), state.last.dtype).at[:, 0].set(state.last)
        frontier_logits = self._run(w, EagleHead.logits, state.last[:, None], w["lm_draft"])  # [B, 1, Vd]
        for level in range(1, self.depth + 1):
            lo, hi = upto[level - 1] + 1, upto[level] + 1  # nodes of this depth
            if lo == hi:
                break
            prev_lo = upto[level - 2] + 1 if level > 1 else 0  # nodes of the depth above (the root for level 1)
            top_p, top_i = jax.lax.top_k(jax.nn.softmax(frontier_logits, axis=-1), self.topk)  # [B, m, topk]
            par = jnp.asarray([parents[n] - prev_lo for n in range(lo, hi)])
            rk = jnp.asarray([ranks[n] for n in range(lo, hi)])
            tokens = tokens.at[:, lo:hi].set(jnp.take(w["ids"], top_i[:, par, rk]))
            probs = probs.at[:, lo:hi].set(top_p[:, par, rk] * probs[:, jnp.asarray(parents[lo:hi])])
            if level == self.depth or upto[level + 1] == upto[level]:
                break
            nodes = slice(1, hi)
            u = outs[:, jnp.asarray(parents[1:hi])]
            mask = jnp.asarray(tree.attention_mask[1:hi, 1:hi])
            g, _ = self._step(w, cache, tokens[:, nodes], u, jnp.asarray(depths[1:hi]) - 1, mask, state.skipped,
                              write=False)
            outs = outs.at[:, nodes].set(g.astype(outs.dtype))
            frontier_logits = self._run(w, EagleHead.logits, g[:, lo - 1 :], w["lm_draft"])
        draft_tokens, node_probs = tokens[:, 1:], probs[:, 1:]
        if self.topk == 1:
            sure = jnp.cumprod((node_probs >= self.min_prob).astype(jnp.int32), axis=1).sum(axis=1)
            num = jnp.where(ctx.active, sure, 0).astype(jnp.int32)
            draft_tokens = jnp.where(jnp.arange(self.depth) < num[:, None], draft_tokens, 0)
            return state, Draft(tokens=draft_tokens, num=num, confidence=node_probs[:, 0])
        valid = jnp.broadcast_to(ctx.active[:, None], draft_tokens.shape)
        num = jnp.where(ctx.active, draft_tokens.shape[1], 0).astype(jnp.int32)
        return state, Draft(tokens=draft_tokens, num=num, confidence=node_probs[:, 0], valid=valid)
