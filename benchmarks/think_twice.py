"""SpecTTS-Bench "think twice" at batch 1, greedy: how much do drafting methods speed up a second round?

`python -m benchmarks.think_twice [--questions 3] [--dataset spectts|arith|PATH]
[--methods ar,pld,suffix,pool,draft,medusa,eagle,hybrid] [--max-new-tokens 256] [--k K] [--draft self:8]
[--all-rounds]`

Round 1 answers each question (chat template, "reason step by step ... \\boxed{}") with `ar`. Round 2 shows
the question and the round-1 answer and asks to review it: the answer to review is in the prompt, so the
new answer repeats much of it, which is what n-gram drafters (prompt lookup, suffix match, n-gram pool)
exploit (a trained head drafts either round). Every method then runs round 2 on the same prompts and we
report, per method: emitted tokens,
tokens/s (emitted tokens / wall over all questions, prefill included), speedup against `ar` (ratio of
tokens/s measured in this same run), mean accepted tokens (tokens per target forward, weighted by steps)
and whether the greedy outputs equal `ar`'s, as they must. Round-1 figures are shown for `ar` and for the
method with the best round-2 speedup (every method with `--all-rounds`, and then both rounds together).

Compilation is kept out of the timings: within a round all calls, of every method, share one cache size
(`max_len`, room for the longest prompt + budget + draft) and prompts are padded to the round's longest
(`pad_prompts_to`), so each method compiles once, in an untimed warm-up call on the first question.
"""

from __future__ import annotations

import argparse
import json
import sys

from eval.cli import add_matmul_dtype_flag

ROUND1 = "{q}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
ROUND2 = ("{q}\n\n{a}\n\nReview the solution above step by step, check each step, "
          "and give the final answer in \\boxed{{}}.")
BUCKET = 64
MAX_K = 32  # every method gets the same cache size (attention cost grows with it): room for drafts up to this


def round_up(n: int, m: int = BUCKET) -> int:
    return -(-n // m) * m


def run_round(model, prompts: list[str], method: str, max_new: int, k: int | None, draft: str = "self:8") -> dict:
    """Warm-up on prompts[0], then one timed call per prompt; returns totals and the outputs."""
    import specjax
    from specjax import adapt_memory
    from specjax.proposers import make_proposer

    options = {} if method == "ar" or k is None else {"k": k}
    if method in ("draft", "hybrid"):
        options["draft"] = draft
    if make_proposer(method, **options).width > MAX_K:
        raise ValueError(f"draft width above {MAX_K}: raise MAX_K")
    chat = lambda p: [{"role": "user", "content": p}]
    pad = round_up(max(len(model.tokenizer.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=True,
                                                               return_dict=False)) for p in prompts))
    call = lambda p: specjax.generate(model, [p], method, max_new_tokens=max_new, temperature=0.0, chat=True,
                                      max_len=round_up(pad + max_new + MAX_K + 1), pad_prompts_to=pad, **options)
    call(prompts[0])
    adapt_memory.forget(model)  # the timed calls start as a first call does, not from the warm-up's estimate
    outs = [call(p) for p in prompts]
    tokens = sum(o.stats["emitted_tokens"] for o in outs)
    wall = sum(o.stats["wall_s"] for o in outs)
    steps = sum(o.stats["decode_steps"] for o in outs)
    accepted = sum(o.stats["mean_accepted_tokens"] * o.stats["decode_steps"] for o in outs)
    return {"method": method, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "decode_steps": steps, "mean_accepted_tokens": accepted / max(steps, 1),
            "calls": [o.stats.to_dict() for o in outs], "outputs": [o.tokens[0] for o in outs],
            "texts": [o.texts[0] for o in outs]}


def compare(results: dict, ar: dict) -> None:
    for r in results.values():
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
        r["equals_ar"] = r["outputs"] == ar["outputs"]


def print_table(title: str, results: dict) -> None:
    print(f"\n{title}")
    head = f"{'method':<8}{'tokens':>8}{'wall s':>9}{'tok/s':>8}{'speedup':>9}{'acc/fwd':>9}{'== ar':>7}"
    print(head + "\n" + "-" * len(head))
    for r in results.values():
        print(f"{r['method']:<8}{r['tokens']:>8}{r['wall_s']:>9.2f}{r['tokens_per_s']:>8.1f}"
              f"{r['speedup_vs_ar']:>8.2f}x{r['mean_accepted_tokens']:>9.2f}{'yes' if r['equals_ar'] else 'NO':>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--dataset", default="spectts", help="any dataset eval.tts takes (spectts, arith, a path)")
    parser.add_argument("--methods", default="ar,pld,suffix,pool,draft,medusa,eagle,hybrid")
    parser.add_argument("--all-rounds", action="store_true", help="time round 1 for every method too")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=None, help="draft length of the non-ar methods (default: each "
                        "method's own)")
    parser.add_argument("--draft", default="self:8", help="the draft of the draft and hybrid methods")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    add_matmul_dtype_flag(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if "ar" not in methods:
        methods.insert(0, "ar")

    import specjax
    from specjax.tts.datasets import load_dataset

    try:
        questions = [{"id": q.id, "question": q.question, "answer": q.answer}
                     for q in load_dataset(args.dataset, limit=args.questions)]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = specjax.load(args.model, dtype="float32", matmul_dtype=args.matmul_dtype)
    k = args.k
    r1_prompts = [ROUND1.format(q=q["question"]) for q in questions]
    r1 = {"ar": run_round(model, r1_prompts, "ar", args.max_new_tokens, k)}
    r2_prompts = [ROUND2.format(q=q["question"], a=a) for q, a in zip(questions, r1["ar"]["texts"])]
    r2 = {m: run_round(model, r2_prompts, m, args.max_new_tokens, k, args.draft) for m in methods}
    ar = r2["ar"]
    best = max((m for m in methods if m != "ar"), key=lambda m: r2[m]["tokens_per_s"], default="ar")
    for m in (methods if args.all_rounds else [best]):
        if m != "ar":
            r1[m] = run_round(model, r1_prompts, m, args.max_new_tokens, k, args.draft)

    compare(r1, r1["ar"])
    compare(r2, ar)

    print(f"think twice: {len(questions)} {args.dataset} questions, batch 1, greedy, "
          f"max_new_tokens={args.max_new_tokens}, k={k or 'method default'}, model {args.model} float32")
    print_table("round 2 (review the round-1 answer)", r2)
    print_table("round 1 " + ("" if args.all_rounds else f"(ar and the best round-2 method, {best})"), r1)
    if args.all_rounds:
        both = {m: {key: r1[m][key] + r2[m][key] for key in ("tokens", "wall_s", "decode_steps")} for m in methods}
        for m, r in both.items():
            r.update(method=m, tokens_per_s=r["tokens"] / r["wall_s"], outputs=r1[m]["outputs"] + r2[m]["outputs"],
                     mean_accepted_tokens=(r1[m]["mean_accepted_tokens"] * r1[m]["decode_steps"] +
                                           r2[m]["mean_accepted_tokens"] * r2[m]["decode_steps"])
                                       / max(r["decode_steps"], 1))
        compare(both, both["ar"])
        print_table("both rounds (multi_round total)", both)
    if args.json:
        figures = lambda results: {m: {key: v for key, v in r.items() if key not in ("outputs", "texts")}
                                   for m, r in results.items()}
        samples = [{"id": q["id"], "question": q["question"], "answer": q["answer"], "round1": a1, "round2_ar": a2}
                   for q, a1, a2 in zip(questions, r1["ar"]["texts"], ar["texts"])]
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "best_method": best, "round1": figures(r1), "round2": figures(r2),
                       "samples": samples}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
