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
from typing import Any, Callable, Sequence

import numpy as np

from specjax.engine import generate
from specjax.tts.datasets import Question

PARADIGMS = ("single", "best_of_n", "multi_round")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# the re-answer prompt of "Think Twice" (multi-round test-time thinking)
REANSWER = "The assistant's previous answer is: <answer>{previous}</answer>, and please re-answer."


def first_round_prompt(question: str) -> str:
    return f"{question}\n{INSTRUCTION}"


def next_round_prompt(question: str, previous: str) -> str:
    return f"{question}\n{INSTRUCTION}\n{REANSWER.format(previous=previous.strip())}"


@dataclasses.dataclass
class ParadigmResult:
    outputs: list[list[str]]  # per question: its samples (best_of_n) or its final-round answer
    rounds: list[dict[str, Any]]  # per round: aggregated generate stats
    history: list[list[str]] = dataclasses.field(default_factory=list)  # multi_round: answers per round


def aggregate(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sums counts and times over calls; recomputes the rates from the sums."""
    keys = ("generated_tokens", "emitted_tokens", "target_forwards", "decode_steps", "prefill_s", "decode_s",
            "wall_s", "prefilled_rows", "batch")
    total = {k: sum(s[k] for s in stats) for k in keys}
    width = max(len(s["accepted_hist"]) for s in stats)
    hist = np.zeros(width, np.int64)
    for s in stats:
        hist[: len(s["accepted_hist"])] += s["accepted_hist"]
    total["accepted_hist"] = hist.tolist()
    total["mean_accepted_tokens"] = float((hist * np.arange(width)).sum() / max(hist.sum(), 1))
    total["tokens_per_s"] = total["emitted_tokens"] / total["wall_s"] if total["wall_s"] else 0.0
    sources = np.sum([s["proposer_steps"] for s in stats], axis=0)
    total["proposer_steps"] = sources.tolist()
    return total


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _prompt_length(model, prompts: Sequence[str]) -> int:
    tok = model.tokenizer
    return max(len(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True)["input_ids"]) for p in prompts)


def run(model, questions: Sequence[Question], method: str, paradigm: str, *, n: int = 1, rounds: int = 2,
        batch_size: int = 1, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, on_batch: Callable[[int], None] | None = None,
        **method_options) -> ParadigmResult:
    """Runs `paradigm` with `method` over `questions`; `on_batch(k)` reports k questions done."""
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
    num_rounds = rounds if paradigm == "multi_round" else 1
    samples = n if paradigm == "best_of_n" else 1
    step = 1 if paradigm == "best_of_n" else batch_size  # best_of_n's batch is the N branches
    previous: list[str] = []
    history, round_stats = [], []
    for r in range(num_rounds):
        prompts = [first_round_prompt(q.question) if r == 0 else next_round_prompt(q.question, prev)
                   for q, prev in zip(questions, previous or [""] * len(questions))]
        pad = _prompt_length(model, prompts)
        texts: list[list[str]] = []
        stats = []
        for i, chunk in enumerate(_batches(prompts, step)):
            out = generate(model, list(chunk), method, num_samples=samples, seed=seed + i, pad_prompts_to=pad, **kw)
            stats.append(out.stats)
            texts.extend(out.texts[j * samples : (j + 1) * samples] for j in range(len(chunk)))
            if on_batch is not None:
                on_batch(len(chunk))
        round_stats.append(aggregate(stats))
        previous = [t[0] for t in texts]
        history.append(previous)
        outputs = texts
    return ParadigmResult(outputs=outputs, rounds=round_stats, history=history)
