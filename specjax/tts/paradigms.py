"""Test-time-scaling paradigms as loops over `specjax.generate`.

* single      one answer per question.
* best_of_n   N branches per question in one batch: one prefill of the question, its cache copied to
              the N rows; the branches form one drafting group, so n-gram proposers draft from each other.
* multi_round "think twice": round r+1 sees the question and round r's answer and re-answers.

Every paradigm works with every method; each returns per-question outputs plus per-round statistics
that the harness aggregates. Prompts of a run are padded to one length, so each method compiles once
per round instead of once per prompt-length bucket.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from specjax.engine import generate
from specjax.plan import cache_length
from specjax.proposers import make_proposer
from specjax.stats import FINISH_REASONS
from specjax.tts.datasets import Question
from specjax.tts.grading import extract_answer, vote_settled

PARADIGMS = ("single", "best_of_n", "multi_round")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# the re-answer prompt of "Think Twice" (multi-round test-time thinking)
REANSWER = "The assistant's previous answer is: <answer>{previous}</answer>, and please re-answer."
REANSWER_SLACK = 16  # re-tokenising a decoded answer may take a few more tokens than generating it did
GENERATE_KW = ("max_new_tokens", "temperature", "top_k", "top_p", "speculate_max_rows", "adaptive", "trace")


def first_round_prompt(question: str) -> str:
    return f"{question}\n{INSTRUCTION}"


def next_round_prompt(question: str, previous: str) -> str:
    return f"{question}\n{INSTRUCTION}\n{REANSWER.format(previous=previous.strip())}"


@dataclasses.dataclass
class ParadigmResult:
    outputs: list[list[str]]  # per question: its samples (best_of_n) or its final-round answer
    rounds: list[dict[str, Any]]  # per round: aggregated generate stats
    history: list[list[str]] = dataclasses.field(default_factory=list)  # multi_round: answers per round


@dataclasses.dataclass
class BatchResult:
    """One batch of questions' share of a run: enough to skip the batch when a killed run resumes."""

    outputs: list[list[str]]  # per question of the batch: its samples or final answer
    stats: list[dict[str, Any]]  # per round: the batch's generate stats (`GenerationStats.to_dict()`)
    history: list[list[str]]  # per round: the batch's answers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def assemble(batches: Sequence[BatchResult]) -> ParadigmResult:
    """A run's result from its batches' shares, in order (per round: the batches' stats summed)."""
    rounds = len(batches[0].stats) if batches else 1
    return ParadigmResult(outputs=[o for b in batches for o in b.outputs],
                          rounds=[aggregate([b.stats[r] for b in batches]) for r in range(rounds)],
                          history=[[t for b in batches for t in b.history[r]] for r in range(rounds)])


def aggregate(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sums counts and times over calls; recomputes the rates from the sums."""
    keys = ("generated_tokens", "emitted_tokens", "target_forwards", "decode_steps", "prefill_s", "decode_s",
            "wall_s", "prefilled_rows", "batch")
    total = {k: sum(s[k] for s in stats) for k in keys}
    total["reused_prefix_tokens"] = sum(s.get("reused_prefix_tokens", 0) for s in stats)
    width = max(len(s["accepted_hist"]) for s in stats)
    hist = np.zeros(width, np.int64)
    for s in stats:
        hist[: len(s["accepted_hist"])] += s["accepted_hist"]
    total["accepted_hist"] = hist.tolist()
    total["mean_accepted_tokens"] = float((hist * np.arange(width)).sum() / max(hist.sum(), 1))
    total["tokens_per_s"] = total["emitted_tokens"] / total["wall_s"] if total["wall_s"] else 0.0
    sources = np.sum([s["proposer_steps"] for s in stats], axis=0)
    total["proposer_steps"] = sources.tolist()
    # rows per finish reason (records written before the field existed count nothing)
    def reasons(s: dict[str, Any]) -> dict[str, int]:  # per-row list (one call) or counts (an aggregate)
        got = s.get("finish_reasons", [])
        return got if isinstance(got, dict) else {r: list(got).count(r) for r in FINISH_REASONS}

    total["finish_reasons"] = {r: sum(reasons(s).get(r, 0) for s in stats) for r in FINISH_REASONS}
    adaptive = [s for s in stats if s.get("width_hist")]  # the adaptive loop's widths (one method: one set)
    if adaptive:
        total["widths"] = adaptive[0]["widths"]
        total["width_hist"] = np.sum([s["width_hist"] for s in adaptive], axis=0).tolist()
        if all(s.get("verified_hist") for s in adaptive):
            total["verified_hist"] = np.sum([s["verified_hist"] for s in adaptive], axis=0).tolist()
        steps = sum(s["decode_steps"] for s in adaptive)
        total["drafted_share"] = sum(s["drafted_share"] * s["decode_steps"] for s in adaptive) / max(steps, 1)
        for key in ("predicted_tokens", "predicted_decode_s", "calibration_s"):
            total[key] = float(sum(s.get(key, 0.0) for s in adaptive))
    return total


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# each prompt's chat-templated length, per model: `eval.tts` runs every method batch by batch, and each
# batch's call sizes its shapes from all the run's questions (0.4 ms of tokenising a prompt, asked again
# per batch and method, would add 20 minutes to 13 methods in turns over 500 questions)
_LENGTHS: "weakref.WeakKeyDictionary[Any, dict[str, int]]" = weakref.WeakKeyDictionary()


def chat_prompt_length(model, prompts: Sequence[str]) -> int:
    """The longest chat-templated prompt in tokens: what a run pads its prompts to (one compile)."""
    known = _LENGTHS.setdefault(model, {})
    for p in prompts:
        if p not in known:
            known[p] = len(model.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                               add_generation_prompt=True, tokenize=True)["input_ids"])
    return max(known[p] for p in prompts)


class SettledVote:
    """`generate(stop_rows=...)` for Best-of-N: stops a question's running branches once the vote of
    its finished ones is settled. Rows are prompt-major, `samples` per question."""

    def __init__(self, tokenizer, samples: int):
        self.tokenizer, self.samples = tokenizer, samples
        self.answers: dict[int, str | None] = {}  # finished row -> its extracted answer (decoded once)

    def __call__(self, generated: list[list[int]], finished: np.ndarray) -> np.ndarray:
        stop = np.zeros(len(generated), bool)
        for b in np.flatnonzero(finished):
            if b not in self.answers:
                self.answers[b] = extract_answer(self.tokenizer.decode(generated[b], skip_special_tokens=True))
        for q in range(0, len(generated), self.samples):
            rows = range(q, q + self.samples)
            done = [self.answers[b] for b in rows if finished[b]]
            running = [b for b in rows if not finished[b]]
            if running and vote_settled(done, len(running)):
                stop[running] = True
        return stop


def run(model, questions: Sequence[Question], method: str, paradigm: str, *, n: int = 1, rounds: int = 2,
        batch_size: int = 1, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, on_batch: Callable[[int], None] | None = None,
        early_stop: bool = False, check_every: int = 32, finished: Mapping[int, BatchResult] | None = None,
        on_result: Callable[[int, BatchResult], None] | None = None, size_like: Sequence[Question] | None = None,
        **method_options) -> ParadigmResult:
    """Runs `paradigm` with `method` over `questions`; `on_batch(k)` reports k questions done.

    `size_like` (default `questions`): the questions whose longest prompts set every shape of the run
    (prompt pads, cache size), so that a warm-up on one question compiles exactly the programs a run over
    all of them uses; sized by itself, a warm-up question left the timed run to compile (2.2-2.8 s).

    Resuming: batch i of `finished` is taken as it is instead of run (its seed and shapes are those
    of batch i, so the other batches run as they would have); `on_result(i, batch)` gets each batch
    the moment it is done, to be recorded.

    `early_stop` (best_of_n): every `check_every` decode steps, a question whose vote among its
    finished branches is settled (`vote_settled`) stops its remaining branches; its outputs then hold
    only the finished branches, whose majority is the one all N would have given.
    """
    if paradigm not in PARADIGMS:
        raise ValueError(f"unknown paradigm {paradigm!r}; use one of {', '.join(PARADIGMS)}")
    if n < 1:
        raise ValueError(f"--n must be >= 1 (branches per question), got {n}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if paradigm == "best_of_n" and temperature == 0.0 and n > 1:
        warnings.warn("best_of_n with temperature 0 gives N identical branches; use --temperature > 0",
                      stacklevel=2)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, **method_options)
    size_like = questions if size_like is None else size_like
    if paradigm == "multi_round":
        return _multi_round(model, questions, method, rounds, batch_size, seed, on_batch, kw, finished or {},
                            on_result, size_like)
    samples = n if paradigm == "best_of_n" else 1
    step = 1 if paradigm == "best_of_n" else batch_size  # best_of_n's batch is the N branches
    prompts = [first_round_prompt(q.question) for q in questions]
    pad = chat_prompt_length(model, [first_round_prompt(q.question) for q in size_like])
    batches = []
    for i, chunk in enumerate(_batches(prompts, step)):
        if (done := (finished or {}).get(i)) is None:
            stop = {}
            if early_stop and paradigm == "best_of_n":
                stop = dict(stop_rows=SettledVote(model.tokenizer, samples), check_every=check_every)
            out = generate(model, list(chunk), method, num_samples=samples, seed=seed + i, pad_prompts_to=pad,
                           **stop, **kw)
            kept = [t for t, s in zip(out.texts, out.stats["stopped_rows"]) if not s]
            texts = [kept[j * samples : (j + 1) * samples] for j in range(len(chunk))]
            done = BatchResult(outputs=texts, stats=[out.stats.to_dict()], history=[[t[0] for t in texts]])
            if on_result is not None:
                on_result(i, done)
        batches.append(done)
        if on_batch is not None:
            on_batch(len(chunk))
    return assemble(batches)


def _multi_round(model, questions: Sequence[Question], method: str, rounds: int, batch_size: int, seed: int,
                 on_batch: Callable[[int], None] | None, kw: dict[str, Any], finished: Mapping[int, BatchResult],
                 on_result: Callable[[int, BatchResult], None] | None,
                 size_like: Sequence[Question]) -> ParadigmResult:
    """Each batch of questions goes through all its rounds before the next batch starts, so the
    rounds chain through one `Session`: round r+1 reuses the cache of the prefix it shares with round
    r's history (chat header, question, instruction) and drafts from a store holding every round.
    Shapes are fixed up front (prompt pads and one cache size for all rounds: a re-answer prompt holds
    at most max_new_tokens of answer), so each round compiles once for the whole run.
    """
    max_new = kw["max_new_tokens"]
    proposer = make_proposer(method, **{o: v for o, v in kw.items() if o not in GENERATE_KW})
    kw = {o: v for o, v in kw.items() if o in GENERATE_KW}
    pad1 = chat_prompt_length(model, [first_round_prompt(q.question) for q in size_like])
    # a re-answer prompt: its template around an answer of at most max_new tokens (+ slack for re-tokenising)
    template_pad = chat_prompt_length(model, [next_round_prompt(q.question, "") for q in size_like])
    pad_next = template_pad + max_new + REANSWER_SLACK
    new_part = pad_next - pad1 + REANSWER_SLACK  # what a later round prefills beyond the shared prefix
    max_len = cache_length(pad_next + max_new + proposer.width + 1, model.config)
    batches = []
    for i, chunk in enumerate(_batches(list(questions), batch_size)):
        if (done := finished.get(i)) is None:
            session, previous = None, [""] * len(chunk)
            stats, history = [], []
            for r in range(rounds):
                prompts = [first_round_prompt(q.question) if r == 0 else next_round_prompt(q.question, prev)
                           for q, prev in zip(chunk, previous)]
                out = generate(model, prompts, proposer, seed=seed + i, pad_prompts_to=pad1 if r == 0 else pad_next,
                               max_len=max_len, session=session, keep_session=r + 1 < rounds,
                               pad_new_to=new_part, **kw)
                session, previous = out.session, out.texts
                stats.append(out.stats.to_dict())
                history.append(list(out.texts))
            done = BatchResult(outputs=[[t] for t in history[-1]], stats=stats, history=history)
            if on_result is not None:
                on_result(i, done)
        batches.append(done)
        if on_batch is not None:
            on_batch(len(chunk))
    return assemble(batches)
