"""Trained EAGLE heads on held-out SpecTTS-Bench questions: accepted tokens per target forward and speed.

`python -m benchmarks.draft_head --heads NEW[,OLD] [--questions 10] [--max-new-tokens 256] [--chain 4]
[--tree 16,5,3] [--static-tree] [--multi-round] [--matmul-dtype bfloat16] [--json PATH]`

Round 1 of think twice (the question, "reason step by step ... \\boxed{}"), batch 1, greedy: `ar`, then
each head as a chain of `--chain` tokens and as the `--tree` (total,depth,topk), at fixed widths, so the
figures are the head's own acceptance rather than the adaptive loop's choice. The tree is dynamic (each
depth's nodes the head's likeliest paths, EAGLE-2); `--static-tree` adds the same template with fixed
ranks (EAGLE-1) beside it. `--multi-round` adds round
2 (review the round-1 answer): `ar` and the hybrid (suffix match, else the head) on each head, also at
fixed widths (on a CPU where the adaptive loop declines to draft, it would hide the heads' difference).
Reported per configuration: tokens, tok/s, speedup against `ar` in the same run, mean accepted tokens
per verify forward (`mean_accepted_tokens`, bonus included, weighted by steps) and whether the greedy
output equals `ar`'s, as it must. `default` in --heads names the head shipped for the model. Each
configuration is warmed up (compiled) on the first question before it is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.think_twice import ROUND1, ROUND2
from eval.cli import add_matmul_dtype_flag


def run(model, prompts: list[str], method: str, max_new: int, **options) -> dict:
    """One warm-up call on prompts[0], then one timed call per prompt: totals and outputs."""
    import specjax
    from specjax import adapt_memory

    specjax.generate(model, prompts[:1], method, max_new_tokens=max_new, **options)
    adapt_memory.forget(model)  # the timed calls start as a first call does, not from the warm-up's estimate
    tokens, steps, gained, wall, outputs = 0, 0, 0.0, 0.0, []
    for p in prompts:
        t0 = time.perf_counter()
        out = specjax.generate(model, [p], method, max_new_tokens=max_new, **options)
        wall += time.perf_counter() - t0
        tokens += len(out.tokens[0])
        steps += out.stats["decode_steps"]  # batch 1: a step is a row-step
        gained += out.stats["mean_accepted_tokens"] * out.stats["decode_steps"]
        outputs.append(out)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_accepted_tokens": gained / max(steps, 1), "outputs": outputs}


def table(rows: list[dict], ar: dict) -> str:
    head = f"{'config':34s} {'tokens':>6s} {'tok/s':>7s} {'vs ar':>6s} {'acc/fwd':>7s} {'== ar':>5s}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['config']:34s} {r['tokens']:6d} {r['tokens_per_s']:7.1f} "
                     f"{r['tokens_per_s'] / ar['tokens_per_s']:5.2f}x {r['mean_accepted_tokens']:7.2f} "
                     f"{'yes' if r['equals_ar'] else 'NO':>5s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.draft_head", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="default", help="comma list of head folders ('default': the shipped one)")
    p.add_argument("--questions", type=int, default=10, help="SpecTTS-Bench questions 1..N (held out in training)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--chain", type=int, default=4, help="chain length")
    p.add_argument("--tree", default="16,5,3", help="tree as total,depth,topk ('': no tree)")
    p.add_argument("--static-tree", action="store_true", help="also the tree with the template's fixed ranks")
    p.add_argument("--multi-round", action="store_true", help="also round 2 with the hybrid on each head")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--json", help="also write the figures to this file")
    add_matmul_dtype_flag(p)
    args = p.parse_args(argv)

    import specjax
    from specjax.heads.io import default_head
    from specjax.tts.datasets import load_dataset

    model = specjax.load(args.model, matmul_dtype=args.matmul_dtype)
    heads = [default_head(model, "eagle") if h == "default" else h for h in args.heads.split(",")]
    questions = load_dataset("spectts", limit=args.questions)
    configs = [("ar", "ar", {})]
    for i, head in enumerate(heads):
        configs.append((f"eagle chain {args.chain} (head{i + 1})", "eagle",
                        {"head": head, "topk": 1, "depth": args.chain, "adaptive": False}))
        if args.tree:
            total, depth, topk = (int(v) for v in args.tree.split(","))
            tree = {"head": head, "total": total, "depth": depth, "topk": topk, "adaptive": False}
            configs.append((f"eagle tree {args.tree} (head{i + 1})", "eagle", tree))
            if args.static_tree:
                configs.append((f"eagle static tree (head{i + 1})", "eagle", {**tree, "dynamic": False}))
    results = {"model": args.model, "matmul_dtype": args.matmul_dtype, "heads": heads, "rounds": {}}
    prompts = [ROUND1.format(q=q.question) for q in questions]
    ar = run_round(model, args, "round 1", prompts, configs, results)
    if args.multi_round:
        prompts = [ROUND2.format(q=q.question, a=o.texts[0]) for q, o in zip(questions, ar["outputs"])]
        hybrids = [("ar", "ar", {})] + [(f"hybrid (head{i + 1})", "hybrid",
                                         {"head": "eagle", "head_path": h, "adaptive": False})
                                        for i, h in enumerate(heads)]
        run_round(model, args, "round 2", prompts, hybrids, results)
    print("\nheads: " + ", ".join(f"head{i + 1} = {h}" for i, h in enumerate(heads)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def run_round(model, args, name: str, prompts: list[str], configs, results: dict) -> dict:
    """Every configuration on the round's prompts, `ar` first; prints the table, returns `ar`'s run."""
    rows = []
    for label, method, options in configs:
        r = run(model, prompts, method, max_new=args.max_new_tokens, **options)
        r.update(config=label, equals_ar=[o.tokens for o in r["outputs"]] == [o.tokens for o in rows[0]["outputs"]]
                 if rows else True)
        rows.append(r)
        print(f"{name}: {label}: {r['tokens_per_s']:.1f} tok/s, {r['mean_accepted_tokens']:.2f} tokens per forward",
              file=sys.stderr, flush=True)
    print(f"\n{name} ({len(prompts)} SpecTTS-Bench questions, batch 1, greedy, {args.max_new_tokens} new tokens, "
          f"matmul {args.matmul_dtype or 'float32'})")
    print(table(rows, rows[0]))
    results["rounds"][name] = [{k: v for k, v in r.items() if k != "outputs"} for r in rows]
    return rows[0]


if __name__ == "__main__":
    raise SystemExit(main())
