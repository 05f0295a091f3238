"""Best-of-N batched vs sequential: what one batch of N branches buys over N batch-1 runs.

`python -m benchmarks.best_of_n [--questions 2] [--n 8] [--methods ar,suffix] [--max-new-tokens 128]`

For each method and question: N samples (temperature 0.7) generated as one batch (one prefill of the
question, its cache copied to the N rows, the rows drafting from each other), against the same N
samples generated one at a time at batch 1. Prints tokens/s of both and their ratio, measured in the
same run; every call shape is compiled in an untimed warm-up first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.cli import add_matmul_dtype_flag

DATA = Path(__file__).resolve().parents[2] / "shared/data/spectts_bench_math.jsonl"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--methods", default="ar,suffix")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    add_matmul_dtype_flag(parser)
    args = parser.parse_args(argv)

    import specjax
    from specjax import adapt_memory

    model = specjax.load(args.model, matmul_dtype=args.matmul_dtype)
    questions = [json.loads(line)["question"] for line in DATA.read_text().splitlines() if line.strip()]
    prompts = [f"{q}\n{INSTRUCTION}" for q in questions[: args.questions]]
    pad = 64 * -(-max(len(model.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                               add_generation_prompt=True)) for p in prompts) // 64)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, pad_prompts_to=pad,
              eos_token_ids=())  # fixed-length samples: both sides generate exactly the same token count
    print(f"best-of-{args.n}: {len(prompts)} questions, {args.max_new_tokens} tokens per sample, "
          f"temperature {args.temperature}, {args.model}")
    print(f"{'method':<8}{'batched tok/s':>15}{'sequential tok/s':>18}{'ratio':>8}{'acc/fwd batched':>17}")
    for method in args.methods.split(","):
        specjax.generate(model, prompts[:1], method, num_samples=args.n, **kw)  # warm-up: batch N
        specjax.generate(model, prompts[:1], method, **kw)  # and batch 1
        adapt_memory.forget(model)  # the timed calls start as a first call does, not from the warm-ups' estimate
        batched = [specjax.generate(model, [p], method, num_samples=args.n, seed=i, **kw).stats
                   for i, p in enumerate(prompts)]
        seq = [specjax.generate(model, [p], method, seed=100 * i + j, **kw).stats
               for i, p in enumerate(prompts) for j in range(args.n)]
        rate = lambda stats: sum(s["emitted_tokens"] for s in stats) / sum(s["wall_s"] for s in stats)
        acc = sum(s["mean_accepted_tokens"] for s in batched) / len(batched)
        print(f"{method:<8}{rate(batched):>15.1f}{rate(seq):>18.1f}{rate(batched) / rate(seq):>7.2f}x{acc:>17.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
