"""Adaptive vs fixed draft widths, against `ar` in the same run, per test-time-scaling cell.

`python -m benchmarks.adaptive [--cells single-arith,single-spectts,multi-spectts,bon-arith] [--limit 10]
   [--methods pld,suffix,pool,recycling,eagle,hybrid] [--max-new-tokens 128] [--out results/adaptive.json]`

Each cell loads its questions once. For every method, `ar`, the method with `adaptive=True` (the
default) and with `adaptive=False` (its fixed widths) are each warmed up once (`eval.tts.warm_up`),
then run question by question, the three in turn, the order rotating with the question: a machine
whose speed drifts (a busy neighbour: `ar` moved by 15% within one cell on a 2-core AMD EPYC) moves all
three alike, where whole runs one after the other would credit the drift to whichever ran in the fast
part. Each question runs with the seed and shapes it has in a whole run (`seed_offset`, `size_like`),
so the outputs are the whole run's; the sums over the questions give the speedups, with the
multi-round cell's rounds apart. The cell's `ar` drift compares its first and last method's `ar`.
Each adaptive call starts from what the previous question's adaptive call learned, as calls of one
kind do in a process (`specjax.adapt_memory`), the first from nothing (the warm-up's estimate is
forgotten); `--fresh` adds adaptive calls that each start afresh, a fourth in the rotation.
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
    p.add_argument("--fresh", action="store_true",
                   help="also run each adaptive call from a fresh estimate (`specjax.adapt_memory` forgotten)")
    p.add_argument("--out", default=None, help="JSON of every row")
    args = p.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        p.error(f"unknown cell(s) {', '.join(unknown)}; cells: {', '.join(CELLS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    import specjax
    from benchmarks.compile_cost import cpu_name
    from eval.tts import outputs_equal
    from eval.tts import parse_args as tts_args
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
        print(f"\n{cell} ({len(questions)} questions)", flush=True)
        print(f"{'method':<11}{'adaptive':>10}{'fixed':>8}{'time ad/fx':>13}{'MAT ad/fx':>12}   ar tok/s   "
              "per round (adaptive / fixed)   outputs as ar's (adaptive / fixed)")
        first_ar = last_ar = None
        for method in methods:
            got = interleaved(model, questions, method, run_args, args.fresh)
            ar, ar_samples = got.pop("ar")
            same = {m: outputs_equal(samples, ar_samples) for m, (_, samples) in got.items()}
            ratio = {m: got[m][0]["tokens_per_s"] / ar["tokens_per_s"] for m in got}
            timed = {m: ar["wall_s"] / got[m][0]["wall_s"] for m in got}
            rounds = [f"{a['tokens_per_s'] / r['tokens_per_s']:.2f}/{f['tokens_per_s'] / r['tokens_per_s']:.2f}"
                      for a, f, r in zip(got["adaptive"][0]["per_round"], got["fixed"][0]["per_round"],
                                         ar["per_round"])]
            mat = {m: got[m][0]["mean_accepted_tokens"] for m in got}
            print(f"{method:<11}{ratio['adaptive']:>9.2f}x{ratio['fixed']:>7.2f}x"
                  f"{timed['adaptive']:>8.2f}/{timed['fixed']:.2f}{mat['adaptive']:>6.2f}/{mat['fixed']:.2f}"
                  f"   {ar['tokens_per_s']:>7.1f}    {'  '.join(rounds)}"
                  f"   same as ar {same['adaptive']:.0%}/{same['fixed']:.0%}"
                  + (f"   fresh {ratio['fresh']:.2f}x ({timed['fresh']:.2f} time, same as ar {same['fresh']:.0%})"
                     if "fresh" in got else ""), flush=True)
            rows.append({"cell": cell, "method": method, "ar_tokens_per_s": ar["tokens_per_s"],
                         "ar_per_round_tokens_per_s": [r["tokens_per_s"] for r in ar["per_round"]],
                         **{f"{m}_speedup": ratio[m] for m in ratio},
                         **{f"{m}_time_speedup": timed[m] for m in timed},
                         **{f"{m}_outputs_equal_ar": same[m] for m in same},
                         **{f"{m}_summary": got[m][0] for m in got}})
            if args.out:  # after every method: a run killed later keeps what it measured
                _write(args.out, rows)
            first_ar = first_ar or ar["tokens_per_s"]
            last_ar = ar["tokens_per_s"]
        if first_ar:
            print(f"ar drift over the cell: {first_ar:.1f} -> {last_ar:.1f} tok/s ({last_ar / first_ar - 1:+.1%})",
                  flush=True)
    return 0


def interleaved(model, questions, method: str, run_args, fresh: bool = False) -> dict[str, tuple[dict, list]]:
    """{"ar" | "adaptive" | "fixed" [| "fresh"]: (summary, samples)} over `questions`: each warmed up once,
    then every question run by each in turn, in an order that rotates with the question. The adaptive
    calls start from what the previous question's adaptive call learned (`specjax.adapt_memory`), the first
    from nothing; `fresh`: also adaptive calls that each start afresh."""
    from eval.tts import run_method, summarize, warm_up
    from specjax import adapt_memory, programs
    from specjax.tts import paradigms

    if run_args.paradigm != "best_of_n" and run_args.batch_size != 1:
        raise ValueError("question by question needs one question per batch (--batch-size 1)")
    configs = {"ar": ("ar", False), "adaptive": (method, False), "fixed": (method, True)}
    if fresh:
        configs["fresh"] = (method, False)
    for meth, fixed in configs.values():
        run_args.no_adaptive = fixed
        warm_up(model, meth, run_args, questions)
    results: dict[str, list] = {name: [] for name in configs}
    samples: dict[str, list] = {name: [] for name in configs}
    names = list(configs)
    learned = None  # what the last "adaptive" call learned; a "fresh" call must not overwrite it
    for j, question in enumerate(questions):
        for name in names[j % len(names):] + names[: j % len(names)]:
            meth, fixed = configs[name]
            run_args.no_adaptive = fixed
            adapt_memory.forget(model)
            if name == "adaptive" and learned is not None:
                adapt_memory.restore(model, learned)
            _, got, result = run_method(model, [question], meth, run_args, seed_offset=j, warm=False,
                                        size_like=questions)
            if name == "adaptive":
                learned = adapt_memory.snapshot(model)
            results[name].append(result)
            samples[name].extend(got)
    run_args.no_adaptive = False
    programs.free_all()  # one process compiling every method twice ran out of code mappings
    out = {}
    for name, runs in results.items():
        rounds = [paradigms.aggregate([r.rounds[i] for r in runs]) for i in range(len(runs[0].rounds))]
        out[name] = (summarize(configs[name][0], run_args.paradigm, len(questions), rounds, samples[name]),
                     samples[name])
    return out


def _write(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
