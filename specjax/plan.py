"""The host-side half of `generate`: prompts encoded, rows laid out, shapes chosen from fixed buckets.

A jitted function compiles once per distinct static shape, so every shape the device run sees comes
from a small fixed set of buckets: prompt widths from 64 up and cache lengths from 256 up, each
bucket either a power of two or 1.5 times one (64, 96, 128, 192, 256, 384, 512, 768, ...), capped
at the model's position limit. A run over many questions, budgets and temperatures therefore
compiles each function at most once per (bucket, batch, method), and a bucket wastes at most a third
of its length (the attention reads the whole static cache). Budgets and sampling values are traced
arguments of the device run, not part of the plan's shapes.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from specjax import validation
from specjax.config import ModelConfig, SamplingConfig
from specjax.proposers import make_proposer
from specjax.proposers.base import Proposer

PROMPT_FLOOR = 64  # the smallest prompt (and continued-feed) width
CACHE_FLOOR = 256  # the smallest cache length


def bucket(n: int, floor: int, limit: int | None = None) -> int:
    """The smallest of floor * {1, 1.5} * 2^i that holds n tokens, capped at `limit`."""
    size = floor
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3  # 2^i -> 1.5 * 2^i -> 2^(i+1)
    return size if limit is None else min(size, limit)


PART_ROWS = 4  # prefill parts hold a multiple of this many prompts (but the last): few distinct shapes
MAX_PARTS = 3
PART_GAIN = 0.6  # split only where the parts' padded tokens are at most this share of one padded batch


def prefill_parts(prompt_lengths: np.ndarray, width: int) -> tuple[np.ndarray, tuple[tuple[int, int], ...]] | None:
    """How a fresh prefill runs prompts of very different lengths: sorted shortest first, in up to
    `MAX_PARTS` parts of (count, width), each padded to the bucket of its longest prompt instead of
    every row to `width` (the first 64 SpecTTS-Bench questions, 45-869 tokens: 11,044 tokens, 65,536
    padded as one batch, 18,176 as three parts). Returns (order, parts), or None where splitting would
    save too little to be worth another compiled program."""
    q = len(prompt_lengths)
    if q < 2 * PART_ROWS:
        return None
    order = np.argsort(prompt_lengths, kind="stable").astype(np.int32)
    lengths = np.asarray(prompt_lengths)[order]
    cuts = list(range(PART_ROWS, q, PART_ROWS))
    cost = lambda a, b: (b - a) * min(bucket(int(lengths[b - 1]), PROMPT_FLOOR), width)
    layouts = [(0, q)] + [(0, i, q) for i in cuts]
    if MAX_PARTS > 2:
        layouts += [(0, i, j, q) for i in cuts for j in cuts if j > i]
    # the fewest padded tokens, then the fewest parts (programs)
    total, _, bounds = min((sum(cost(a, b) for a, b in zip(t, t[1:])), len(t), t) for t in layouts)
    if len(bounds) == 2 or total > PART_GAIN * q * width:
        return None
    parts = tuple((b - a, min(bucket(int(lengths[b - 1]), PROMPT_FLOOR), width)) for a, b in zip(bounds, bounds[1:]))
    return order, parts


def cache_length(need: int, cfg: ModelConfig) -> int:
    """The cache bucket for a row that needs `need` positions (prompt + budget + draft + 1)."""
    return bucket(need, CACHE_FLOOR, cfg.max_position_embeddings)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything `generate` decides before the device runs; reused by callers that size a run.

    Rows are prompt-major: row b continues prompt `rows[b]` (Best-of-N: N rows share one prompt).
    With a session, `start[q]` leading tokens of prompt q are already cached and only `feed[q]`
    (the rest, padded to a bucket) is prefilled.
    """

    ids: tuple[tuple[int, ...], ...]  # each prompt's token ids
    prompt: np.ndarray  # [Q, P] int32, right-padded to the prompt bucket P
    prompt_lengths: np.ndarray  # [Q] int32
    rows: np.ndarray  # [B] int32: the prompt of each row
    groups: np.ndarray  # [B] int32: rows of a group may draft from each other
    cache_len: int  # the cache bucket (static)
    max_new_tokens: int  # traced by the device run
    feed: np.ndarray | None = None  # [Q, F] int32: a continued session's uncached prompt parts
    start: np.ndarray | None = None  # [Q] int32: tokens of each prompt already in the session's cache
    # `pad_prompts_to` was asked for: the caller shares shapes across calls, so the prefill stays one
    # padded batch (parts fitted to each call's lengths would compile a program per call)
    one_batch: bool = False

    @property
    def num_prompts(self) -> int:
        return len(self.ids)

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def prompt_bucket(self) -> int:
        return int(self.prompt.shape[1])

    @property
    def row_prompt_lengths(self) -> np.ndarray:
        return self.prompt_lengths[self.rows]


def encode_prompts(tokenizer, prompts: Sequence[Any], chat: bool) -> list[list[int]]:
    """Strings through the tokenizer (its chat template when `chat`), token-id lists as they are."""
    if not prompts:
        raise ValueError("prompts is empty: pass a list of strings or of token-id lists")
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer: load the model with tokenizer=True")
            if chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = tokenizer(p)["input_ids"]
            if not ids:  # raw text ("" with chat=False) can encode to nothing; an empty row has no last token
                raise ValueError(f"prompts[{len(encoded)}] is empty after encoding ({p!r} with chat=False adds no "
                                 "template): pass some text, or use the chat template")
            encoded.append([int(i) for i in ids])
        else:
            ids = [int(i) for i in p]
            if not ids:
                raise ValueError("a token-id prompt is empty")
            encoded.append(ids)
    return encoded


def shared_prefix(prompt: Sequence[int], cached: np.ndarray) -> int:
    """How many leading prompt tokens equal the cached history; at least one token is left to run."""
    n = min(len(prompt) - 1, len(cached))
    diff = np.nonzero(np.asarray(prompt[:n]) != cached[:n])[0]
    return int(diff[0]) if diff.size else n


def make_plan(model, prompts: Sequence[Any], proposer: Proposer, *, max_new_tokens: int, chat: bool = True,
              num_samples: int = 1, group: Sequence[int] | None = None, max_len: int | None = None,
              pad_prompts_to: int = 0, session=None, pad_new_to: int = 0) -> Plan:
    """Encodes and lays out one `generate` call; every size check happens here, before the device."""
    validation.plan_args(model, prompts, max_new_tokens=max_new_tokens, chat=chat, num_samples=num_samples,
                         group=group, max_len=max_len, pad_prompts_to=pad_prompts_to, session=session,
                         pad_new_to=pad_new_to)
    cfg: ModelConfig = model.config
    ids = encode_prompts(model.tokenizer, prompts, chat)
    validation.encoded_prompts(ids, cfg.vocab_size)  # a tokenizer whose ids the model does not have
    num_prompts = len(ids)
    rows = np.repeat(np.arange(num_prompts, dtype=np.int32), num_samples)
    batch = len(rows)
    longest = max(len(x) for x in ids)
    limit = cfg.max_position_embeddings
    p_bucket = bucket(max(longest, pad_prompts_to), PROMPT_FLOOR, limit)
    tail = max_new_tokens + proposer.width + 1
    need = longest + tail
    # the cache bucket is sized for the padded prompt: calls padded alike share every program. Sized for the
    # real prompt, a run over SpecTTS-Bench questions crossed a cache bucket every few questions and
    # compiled there, timed (2.2-2.8 s each, 11% of `ar`'s time over 10 questions)
    cache_len = cache_length(max(max(longest, pad_prompts_to) + tail, p_bucket), cfg) if max_len is None else max_len
    if session is not None:
        if num_samples != 1 or batch != session.batch:
            raise ValueError(f"a session continues row by row: pass {session.batch} prompts (one per row of the "
                             f"previous call) and num_samples=1, got {num_prompts} prompts x {num_samples}")
        if max_len is not None and max_len != session.cache.max_len:
            raise ValueError(f"max_len={max_len} differs from the session's cache ({session.cache.max_len}): "
                             "drop max_len, or size the first call's max_len for every round")
        cache_len = session.cache.max_len
    if need > cache_len or cache_len > limit:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} + draft {proposer.width} does not fit the "
            f"cache of {min(cache_len, limit)} positions (model limit {limit}): shorten the prompt or lower "
            "max_new_tokens" + ("" if max_len is None else f", or raise max_len={max_len}")
        )
    p_bucket = min(p_bucket, cache_len)
    prompt = np.zeros((num_prompts, p_bucket), np.int32)
    for i, x in enumerate(ids):
        prompt[i, : len(x)] = x
    prompt_lengths = np.asarray([len(x) for x in ids], np.int32)
    groups = rows if group is None else np.asarray(group, np.int32)
    if groups.shape != (batch,):
        raise ValueError(f"group must have one entry per prompt ({batch}), got shape {groups.shape}")
    feed = start = None
    if session is not None:
        history, hist_lengths = session.host_history()
        start = np.asarray([shared_prefix(x, history[b, : hist_lengths[b] - 1]) for b, x in enumerate(ids)], np.int32)
        width = bucket(max(int(np.max(prompt_lengths - start)), pad_new_to), PROMPT_FLOOR, cache_len)
        feed = np.zeros((num_prompts, width), np.int32)
        for i, x in enumerate(ids):
            feed[i, : len(x) - start[i]] = x[start[i]:]
    return Plan(ids=tuple(map(tuple, ids)), prompt=prompt, prompt_lengths=prompt_lengths, rows=rows, groups=groups,
                cache_len=int(cache_len), max_new_tokens=int(max_new_tokens), feed=feed, start=start,
                one_batch=pad_prompts_to > 0)


_BOUND: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_BOUND_PER_MODEL = 8


def _head_stamps(proposer: Proposer) -> tuple:
    """(field, mtime, size) of each trained head a proposer names by folder, so that a head saved again
    at the same path (a training run's evaluations, a user retraining) is read again, not reused."""
    from specjax.heads.io import WEIGHTS

    stamps = []
    for field in dataclasses.fields(proposer):
        value = getattr(proposer, field.name)
        if isinstance(value, str) and value and (Path(value) / WEIGHTS).is_file():
            st = (Path(value) / WEIGHTS).stat()
            stamps.append((field.name, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def bind_proposer(model, method: "str | Proposer", sampling_cfg: SamplingConfig, **options) -> tuple[Proposer, Any]:
    """`make_proposer(...).bind(model, mode)`, once per (model, proposer, sampling mode).

    The bound proposer is a static argument of the jitted loop and holds only the sampling *mode*, so
    calls that differ in temperature or budget reuse it (and its compiled programs); binding also reads
    trained heads from disk, which a run over many questions does once instead of once per call, and
    again when a head's files change.
    """
    proposer = make_proposer(method, **options)
    key = (proposer, sampling_cfg.mode, _head_stamps(proposer) if dataclasses.is_dataclass(proposer) else ())
    try:
        per_model = _BOUND.setdefault(model, {})
    except TypeError:  # a model object that cannot be weakly referenced: bind every time
        return proposer.bind(model, sampling_cfg.mode)
    if key not in per_model:
        if len(per_model) >= _BOUND_PER_MODEL:
            per_model.pop(next(iter(per_model)))
        per_model[key] = proposer.bind(model, sampling_cfg.mode)
    return per_model[key]
