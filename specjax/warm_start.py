"""A new process's head start: the model's first call of last time replayed on a dummy prompt in `load`.

A stored program read back from disk (`specjax.programs`) still pays a setup on its first run: XLA:CPU's
YNNPACK fusions initialise themselves per executable and per verify width (0.15-0.35 s each for the
default model on a 2-core CPU), so a drafting method's first call in a warm process ran 1.4-1.7x its
steady time. `generate` records the shape of each call (`Recipe`: the method, the batch layout, the
prompt and cache buckets, the static switches, the programs it ran) under the cache folder, in order
of first use; `specjax.load` reads the first recipe's programs back while the weights load, then
replays it on the caller's thread while the tokenizer loads beside it: the same prefill, proposer start
and decode programs, on a repetitive dummy prompt that every drafter matches, with one decode step at
each verify width. The replay runs only programs the store already holds, never compiles, never
measures step costs, and its outputs are thrown away.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specjax import programs
from specjax.config import SamplingConfig
from specjax.proposers.base import Proposer

if TYPE_CHECKING:
    from specjax.plan import Plan

REMEMBERED = 4  # recipes kept per loaded model: the last process's in order of first use, then older ones
REPLAYED = 1  # of those, replayed by a load (each more adds about 1 s to it on a 2-core CPU)

_lock = threading.Lock()
_this_process: dict[str, list[Recipe]] = {}  # owner -> the recipes this process recorded, in order


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What fixes a `generate` call's programs; the prompt's text and the budget do not."""

    method: Proposer  # unbound, as `make_proposer` returns it
    temperature: float
    top_k: int
    top_p: float
    num_prompts: int
    num_samples: int
    prompt_bucket: int  # the padded prompt width (`plan.bucket`): prompts of any length inside it share it
    cache_len: int
    eos_ids: tuple[int, ...]
    speculate_max_rows: int | None
    adaptive: bool
    programs: tuple[str, ...]  # the stored programs it ran (`programs.recording`), in order of first use
    # (prompts, width) of each part its prefill ran in (`plan.prefill_parts`); () for one padded batch
    prefill_parts: tuple[tuple[int, int], ...] = ()


def _path() -> Path | None:
    folder = programs._folder()
    return None if folder is None else folder / "recipes.pkl"


def _table() -> dict[str, list[Recipe]]:
    path = _path()
    try:
        table = pickle.loads(path.read_bytes()) if path is not None and path.is_file() else {}
    except Exception:  # written by another specjax, or torn: start over
        return {}
    return table if isinstance(table, dict) else {}


def _current(entries: Any) -> list[Recipe]:
    """The entries that are recipes of this version of `Recipe` (an older specjax's have other fields)."""
    names = {f.name for f in dataclasses.fields(Recipe)}
    return [r for r in entries if isinstance(r, Recipe) and set(vars(r)) == names] if isinstance(entries, list) else []


def recipes(owner: str) -> list[Recipe]:
    """The recipes recorded for a loaded model (`Model.programs_key`), the next to replay first."""
    return _current(_table().get(owner, [])) if owner else []


def record(owner: str, recipe: Recipe) -> None:
    """Adds `recipe` to `owner`'s, in order of first use in this process and ahead of earlier processes'
    (a no-op when this process has recorded it, or without a cache folder): a new process most likely
    starts the way the last one did, so its first call is the one a load replays."""
    path = _path()
    if path is None or not owner:
        return
    with _lock:
        ours = _this_process.setdefault(owner, [])
        if recipe in ours:
            return
        ours.append(recipe)
        table = _table()
        table[owner] = (ours + [r for r in _current(table.get(owner, [])) if r not in ours])[:REMEMBERED]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".recipes.{os.getpid()}.tmp")
            tmp.write_bytes(pickle.dumps(table))
            os.replace(tmp, path)
        except (OSError, pickle.PicklingError, TypeError, AttributeError):  # an unpicklable proposer: not recorded
            pass


def dummy_prompt(length: int, vocab_size: int) -> list[int]:
    """A prompt that repeats a short phrase, so that every n-gram drafter finds a match and drafts. The
    target need not continue it (it accepts 1-1.5 tokens a step here): the loop's `verify_floor` is what
    makes each width run."""
    phrase = [1300, 2450, 3001, 977, 4120, 655, 2789]
    return [3 + phrase[i % len(phrase)] % max(vocab_size - 3, 1) for i in range(length)]


def _lengths_of(prompt_bucket: int, limit: int) -> tuple[int, int]:
    """The shortest and longest prompt lengths that `make_plan` pads to `prompt_bucket`."""
    from specjax.plan import PROMPT_FLOOR, bucket

    if prompt_bucket <= PROMPT_FLOOR:
        return 1, prompt_bucket
    size = PROMPT_FLOOR
    while bucket(size + 1, PROMPT_FLOOR, limit) < prompt_bucket:
        size = bucket(size + 1, PROMPT_FLOOR, limit)
    return size + 1, prompt_bucket


def dummy_plan(model: Any, proposer: Proposer, *, num_prompts: int, num_samples: int, prompt_bucket: int,
               cache_len: int, tokens: int, group: Sequence[int] | None = None,
               parts: Sequence[tuple[int, int]] = ()) -> Plan | None:
    """A plan of `dummy_prompt`s with a real call's programs (its batch layout, prompt bucket, cache
    length and prefill `parts`: each part's prompts as long as its width allows) and room for about
    `tokens` new ones; None when the cache leaves no room at all."""
    from specjax.plan import make_plan

    limit = model.config.max_position_embeddings

    def length_in(width: int) -> int:
        shortest, longest = _lengths_of(width, limit)
        return max(shortest, min(longest, cache_len - proposer.width - 1 - tokens))

    sizes = [(count, length_in(width)) for count, width in parts] or [(num_prompts, length_in(prompt_bucket))]
    budget = min(tokens, cache_len - max(length for _, length in sizes) - proposer.width - 1)
    if budget < 1:
        return None
    prompts = [dummy_prompt(length, model.config.vocab_size) for count, length in sizes for _ in range(count)]
    return make_plan(model, prompts, proposer, max_new_tokens=budget, chat=False, num_samples=num_samples,
                     max_len=cache_len, group=group)


def replay(model: Any, recipe: Recipe) -> None:
    """Runs `recipe`'s programs once on a dummy prompt, one decode step per verify width."""
    from specjax import adaptive, engine
    from specjax.plan import bind_proposer

    sampling_cfg = SamplingConfig(temperature=recipe.temperature, top_k=recipe.top_k, top_p=recipe.top_p)
    proposer, weights = bind_proposer(model, recipe.method, sampling_cfg)
    plan = dummy_plan(model, proposer, num_prompts=recipe.num_prompts, num_samples=recipe.num_samples,
                      prompt_bucket=recipe.prompt_bucket, cache_len=recipe.cache_len,
                      tokens=sum(adaptive.loop_widths(proposer)) + 1,  # one step at each width
                      parts=getattr(recipe, "prefill_parts", ()))  # (recipes recorded before parts had none)
    if plan is not None:
        engine._run(model, plan, proposer, weights, sampling_cfg, 0, recipe.eos_ids, None, None, 32,
                    recipe.speculate_max_rows, adaptive=recipe.adaptive, warm_up="all")


def prefetch(owner: str) -> threading.Thread | None:
    """Starts reading the programs of `owner`'s first `REPLAYED` recipes, in the order a replay runs them."""
    keys = [k for recipe in recipes(owner)[:REPLAYED] for k in recipe.programs]
    return programs.prefetch(keys) if keys else None


def replay_last(model: Any) -> int:
    """Replays `model`'s first `REPLAYED` recipes on this thread; returns how many ran. Only stored
    programs run (`programs.stored_only`: a call waits for the one `prefetch` is reading); anything else
    ends a replay quietly."""
    done = 0
    with programs.stored_only():
        for recipe in recipes(getattr(model, "programs_key", ""))[:REPLAYED]:
            try:
                replay(model, recipe)
            except Exception:  # programs gone, a head that moved: the real call will tell the user
                continue
            done += 1
    return done
