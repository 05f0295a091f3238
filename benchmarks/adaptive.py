"""Adaptive vs fixed draft widths, against `ar` in the same run, per test-time-scaling cell.

`python -m benchmarks.adaptive [--cells single-arith,single-spectts,multi-spectts,bon-arith] [--limit 10]
   [--methods pld,suffix,pool,recycling,eagle,hybrid] [--max-new-tokens 128] [--out results/adaptive.json]`

Each cell loads its questions once and runs `ar`, then every method twice (`adaptive=True`, the default,
and `adaptive=False`, the methods' fixed widths) through `eval.tts.run_method` (warm-up included, as
eval.tts does), and prints speedups over `ar` of the same run, with the multi-round cell's rounds apart;
`ar` runs again after every method, and each method's speedups are against the mean of the two `ar`
runs around it (a machine whose speed drifts during the cell moves both alike); the cell's `ar` drift
says how far the machine's speed moved.
Speedups are ratios of tokens per second, and (`time ad/fx`) of wall time over the same questions. They
agree where outputs equal `ar`'s (greedy); in a sampled cell a lossless method's answers are other draws
from the same distribution, and a batch whose samples stop early by chance emits fewer tokens in about
the same time (a static batch runs until its longest sample is done), which moves the token ratio by a
few percent either way and the time ratio far less.
Cells: single paradigm on `arith` and on SpecTTS-Bench, multi_round (2 rounds) on SpecTTS-Bench,
best_of_n (N=8, T=0.7) on `arith`. The header names the machine; figures hold for that machine only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CELLS = {
    "single-arith": dict(paradigm="single", dataset="arith", temperature=0.0),
    "single-spectts": dict(paradigm="single", dataset="spectts", temperature=0.0),
    "multi-spectts": dict(paradigm="multi_round", dataset="spectts", temperature=0.0),
    "bon-arith": dict(paradigm="best_of_n", dataset="arith", temperature=0.7, n=8),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--methods", default="pld,suffix,pool,recycling,eagle,hybrid")
    p.add_argument("--limit", type=int, default=10, help="questions per cell (best_of_n: --bon-limit)")
    p.add_argument("--bon-limit", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--matmul-dtype", default=None, choices=["bfloat16"],
                   help="bf16 matmul weights (cheap wide verifies on CPUs with AMX, and on some without)")
    p.add_argument("--out", default=None, help="JSON of every row")
    args = p.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        p.error(f"unknown cell(s) {', '.join(unknown)}; cells: {', '.join(CELLS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    import specjax
    from benchmarks.compile_cost import cpu_name
    from eval.tts import outputs_equal, run_method
    from eval.tts import parse_args as tts_args
    from specjax import programs
    from specjax.tts.datasets import load_dataset

    model = specjax.load(args.model, matmul_dtype=args.matmul_dtype)
    print(f"{args.model} ({args.matmul_dtype or 'float32'} matmuls) on {cpu_name()}, {args.max_new_tokens} new "
          f"tokens, {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    for cell in cells:
        spec = CELLS[cell]
        limit = args.bon_limit if spec["paradigm"] == "best_of_n" else args.limit
        run_args = tts_args(["--paradigm", spec["paradigm"], "--dataset", spec["dataset"], "--max-new-tokens",
                             str(args.max_new_tokens), "--temperature", str(spec["temperature"]),
                             "--n", str(spec.get("n", 8)), "--rounds", "2", "--limit", str(limit)])
        questions = load_dataset(spec["dataset"], limit=limit)
        base, ar_samples, _ = run_method(model, questions, "ar", run_args)
        first = base
        print(f"\n{cell} ({len(questions)} questions): ar {base['tokens_per_s']:.1f} tok/s "
              "(rounds: " + " / ".join(f"{r['tokens_per_s']:.1f}" for r in base["per_round"]) + ")", flush=True)
        print(f"{'method':<11}{'adaptive':>10}{'fixed':>8}{'time ad/fx':>13}{'MAT ad/fx':>12}   ar before/after   "
              "per round (adaptive / fixed)   outputs as ar's (adaptive / fixed)")
        for method in methods:
            got, same = {}, {}
            for mode in ("adaptive", "fixed"):
                run_args.no_adaptive = mode == "fixed"
                got[mode], samples, _ = run_method(model, questions, method, run_args)
                same[mode] = outputs_equal(samples, ar_samples)  # 1: tokens/s compares the same tokens
            run_args.no_adaptive = False
            programs.free_all()  # one process compiling every method twice ran out of code mappings
            # `ar` again after every method, and each method against the mean of the two `ar` runs around
            # it: a machine whose speed drifts during the cell (a busy neighbour) moves both alike
            after, _, _ = run_method(model, questions, "ar", run_args)
            ref = (base["tokens_per_s"] + after["tokens_per_s"]) / 2
            ref_rounds = [(x["tokens_per_s"] + y["tokens_per_s"]) / 2
                          for x, y in zip(base["per_round"], after["per_round"])]
            ratio = {m: got[m]["tokens_per_s"] / ref for m in got}
            timed = {m: (base["wall_s"] + after["wall_s"]) / 2 / got[m]["wall_s"] for m in got}
            rounds = [f"{a['tokens_per_s'] / r:.2f}/{f['tokens_per_s'] / r:.2f}"
                      for a, f, r in zip(got["adaptive"]["per_round"], got["fixed"]["per_round"], ref_rounds)]
            print(f"{method:<11}{ratio['adaptive']:>9.2f}x{ratio['fixed']:>7.2f}x"
                  f"{timed['adaptive']:>8.2f}/{timed['fixed']:.2f}"
                  f"{got['adaptive']['mean_accepted_tokens']:>6.2f}/{got['fixed']['mean_accepted_tokens']:.2f}"
                  f"   {base['tokens_per_s']:>6.1f}/{after['tokens_per_s']:<6.1f}    {'  '.join(rounds)}"
                  f"   same as ar {same['adaptive']:.0%}/{same['fixed']:.0%}", flush=True)
            rows.append({"cell": cell, "method": method, "ar_tokens_per_s": ref,
                         "ar_before_tokens_per_s": base["tokens_per_s"], "ar_after_tokens_per_s": after["tokens_per_s"],
                         **{f"{m}_speedup": ratio[m] for m in ratio},
                         **{f"{m}_time_speedup": timed[m] for m in timed},
                         **{f"{m}_outputs_equal_ar": same[m] for m in same},
                         **{f"{m}_summary": got[m] for m in got}})
            if args.out:  # after every method: a run killed later keeps what it measured
                _write(args.out, rows)
            base = after
        drift = base["tokens_per_s"] / first["tokens_per_s"] - 1
        print(f"ar drift over the cell: {first['tokens_per_s']:.1f} -> {base['tokens_per_s']:.1f} tok/s ({drift:+.1%})",
              flush=True)
    return 0


def _write(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
