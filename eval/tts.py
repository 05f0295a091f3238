"""`python -m eval.tts`: a speculative method under a test-time-scaling paradigm, against AR in one run.

Every method is measured on the same questions in the same process as the `ar` baseline (unless
`--no-baseline`), so speedups are ratios from one run. Each method is warmed up (compiled, and its step
costs measured) on the longest question first; then the methods take turns batch by batch, `ar` among
them, in an order that rotates with the batch, so a machine whose speed drifts while the run goes on
(a busy neighbour on a shared host) slows every method alike instead of the ones that ran last.
Results follow the schema in docs/contract.md; with several methods the output path gets the method
name inserted (`results.json` -> `results.pld.json`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.cli import Parser, add_precision_flags, parse_options

DEFAULT_MODEL = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m eval.tts", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, .gguf, local folder or hub id")
    add_precision_flags(p)
    p.add_argument("--method", default="hybrid", help="a method, a comma list, or 'all'")
    p.add_argument("--paradigm", default="single", help="single, best_of_n or multi_round")
    p.add_argument("--n", type=int, default=8, help="best_of_n: branches per question")
    p.add_argument("--rounds", type=int, default=2, help="multi_round: rounds of thinking")
    p.add_argument("--dataset", default="arith", help="built-in name (arith, spectts), JSONL path or HF dataset id")
    p.add_argument("--split", default="test")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1, help="questions per batch (single, multi_round)")
    p.add_argument("--k", type=int, default=None, help="draft length of speculative methods")
    p.add_argument("--speculate-max-rows", type=int, default=None, metavar="R",
                   help="draft only in steps with at most R unfinished rows (best_of_n stragglers; "
                        "default: always)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="fixed draft widths (a paper's settings) instead of widths chosen per step from this "
                        "machine's measured step costs and the drafts' online acceptance")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. --option draft=self:8 --option threshold=4); "
                        "given to every method of the run that takes it")
    p.add_argument("--no-baseline", action="store_true", help="skip the ar baseline")
    p.add_argument("--output", default=None, help="results JSON path; finished questions are also appended, as "
                   "they finish, to OUTPUT's stem + .records.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its records file: finished questions are not run again")
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed: each process runs a block of the questions; process 0 writes the results")
    p.add_argument("--coordinator", default=None, help="--distributed: coordinator host:port (omit on a cluster "
                   "JAX detects, e.g. a TPU pod slice)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    from eval.cli import parse_with_config

    return parse_with_config(p, argv)


def expand_methods(spec: str) -> list[str]:
    from specjax.proposers import registry

    known = list(registry())
    methods = known if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or spec!r}; available: {', '.join(known)}, all")
    return methods


def select_methods(spec: str, model: str, option_items: list[str]) -> list[str]:
    """`expand_methods`, where 'all' keeps a method that needs an artifact (a trained head, a datastore)
    only when the run gives it (`--option KEY=...` or `METHOD.KEY=...`) or one ships for the model."""
    methods = expand_methods(spec)
    if spec != "all":
        return methods
    from specjax.heads.io import default_head
    from specjax.proposers import registry

    given = {item.partition("=")[0] for item in option_items}
    needs = {m: registry()[m].needs for m in methods}
    return [m for m in methods if needs[m] is None or {needs[m], f"{m}.{needs[m]}"} & given
            or default_head(model, m)]


def _grade(questions, result) -> tuple[list[dict[str, Any]], float]:
    from specjax.tts.grading import grade_samples

    samples, correct = [], 0
    for q, outs in zip(questions, result.outputs):
        g = grade_samples(outs, q.answer)
        correct += bool(g["correct"])
        samples.append({"id": q.id, "question": q.question, "answer": q.answer, "outputs": outs,
                        "predicted": g["predicted"], "correct": bool(g["correct"]),
                        "pass_at_n": bool(g["pass_at_n"]), "mean_accuracy": g["mean_accuracy"]})
    return samples, correct / max(len(questions), 1)


def accuracy_fields(samples: list[dict[str, Any]], paradigm: str) -> dict[str, float]:
    """accuracy (and for best_of_n maj@N, pass@N, mean sample accuracy) over graded samples."""
    mean = lambda key: sum(float(s[key]) for s in samples) / max(len(samples), 1)
    out = {"accuracy": mean("correct")}
    if paradigm == "best_of_n":
        out.update(maj_at_n=out["accuracy"], pass_at_n=mean("pass_at_n"), mean_sample_accuracy=mean("mean_accuracy"))
    return out


def outputs_equal(samples: list[dict], reference: list[dict]) -> float:
    """Share of questions whose outputs equal the reference run's (`ar`'s): 1 for a lossless greedy run
    and, with the same seeds, for a sampled run of a method whose drafts are deterministic (a draft
    model's real q gives other samples of the same distribution)."""
    pairs = list(zip(samples, reference))
    return sum(x["outputs"] == y["outputs"] for x, y in pairs) / max(len(pairs), 1)


def method_kwargs(method: str, args, options: dict[str, Any] | None = None, seed_offset: int = 0) -> dict[str, Any]:
    """`paradigms.run`'s keyword arguments for `method` under the CLI's `args`."""
    options = dict(options or {})
    if method != "ar" and args.k is not None:
        options["k"] = args.k
    return dict(n=args.n, rounds=args.rounds, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed + seed_offset,
                speculate_max_rows=args.speculate_max_rows, adaptive=False if args.no_adaptive else None, **options)


def warm_up(model, method: str, args, size_like, options: dict[str, Any] | None = None) -> None:
    """Runs the longest of `size_like` once, untimed, sized like a run over all of them: it compiles
    every program such a run uses (a later round whose prompts land in a new bucket still compiles
    once, timed)."""
    from specjax import adapt_memory
    from specjax.tts import paradigms

    longest = max(size_like, key=lambda q: len(q.question))
    paradigms.run(model, [longest], method, args.paradigm, size_like=size_like,
                  **method_kwargs(method, args, options))
    adapt_memory.forget(model)  # what the warm-up learned: the timed run starts as a first call does


def run_method(model, questions, method: str, args, progress=None, options: dict[str, Any] | None = None,
               seed_offset: int = 0, records=None, warm: bool = True,
               size_like=None) -> tuple[dict[str, Any], list, Any]:
    """Runs one method over `questions` (warmed up first unless `warm=False`); `seed_offset`: the index
    of the first batch in the whole run, so that a process running a block of the questions samples
    what one process would. `records` (a `RunRecords`): batches it holds are taken from it, every other
    batch is added to it. `size_like` (default `questions`): the questions that set the run's shapes, so
    that a run over a part of them uses the programs a run over all of them compiled."""
    from specjax.tts import paradigms

    kw = method_kwargs(method, args, options, seed_offset)
    step = 1 if args.paradigm == "best_of_n" else args.batch_size
    batches = -(-len(questions) // step)
    finished = {}
    if records is not None:
        finished = {i: paradigms.BatchResult(**v) for i in range(batches)
                    if (v := records.get(f"{method}/{i}")) is not None}
        kw.update(on_result=lambda i, b: records.add(f"{method}/{i}", b.to_dict()))
    size_like = questions if size_like is None else size_like
    if warm and len(finished) < batches:
        warm_up(model, method, args, size_like, options)
    result = paradigms.run(model, questions, method, args.paradigm, on_batch=progress, finished=finished,
                           size_like=size_like, **kw)
    samples, _ = _grade(questions, result)
    return summarize(method, args.paradigm, len(questions), result.rounds, samples), samples, result


def run_in_turns(model, questions, methods: list[str], args, options: dict[str, dict[str, Any]],
                 seed_offset: int = 0, records=None,
                 progress: Callable[[str, int], None] | None = None) -> dict[str, tuple[dict[str, Any], list]]:
    """{method: (summary, samples)} over `questions`: each method warmed up once, then every batch of
    questions run by each method in turn, the order rotating with the batch. Batch i of a method has the
    seed and shapes it has in a whole run of that method (`run_method`), so the outputs are the same;
    `records` (a `RunRecords`) hands back the batches it holds and keeps every new one."""
    from specjax.tts import paradigms

    step = 1 if args.paradigm == "best_of_n" else args.batch_size
    chunks = [questions[i : i + step] for i in range(0, len(questions), step)]
    finished = {m: {i: paradigms.BatchResult(**v) for i in range(len(chunks))
                    if records is not None and (v := records.get(f"{m}/{i}")) is not None} for m in methods}
    for m in methods:
        if len(finished[m]) < len(chunks):
            warm_up(model, m, args, questions, options.get(m))
    batches: dict[str, list] = {m: [] for m in methods}
    for i, chunk in enumerate(chunks):
        for m in methods[i % len(methods):] + methods[: i % len(methods)]:
            if (done := finished[m].get(i)) is None:
                got = []
                paradigms.run(model, chunk, m, args.paradigm, size_like=questions,
                              on_result=lambda _, b, got=got: got.append(b),
                              **method_kwargs(m, args, options.get(m), seed_offset + i))
                done = got[0]
                if records is not None:
                    records.add(f"{m}/{i}", done.to_dict())
            batches[m].append(done)
            if progress is not None:
                progress(m, len(chunk) * (args.rounds if args.paradigm == "multi_round" else 1))
    out = {}
    for m in methods:
        result = paradigms.assemble(batches[m])
        samples, _ = _grade(questions, result)
        out[m] = (summarize(m, args.paradigm, len(questions), result.rounds, samples), samples)
    return out


def summarize(method: str, paradigm: str, questions: int, rounds: list[dict[str, Any]],
              samples: list) -> dict[str, Any]:
    """A run's summary from its per-round stats (`ParadigmResult.rounds`, or their sums over runs)."""
    from specjax.tts import paradigms

    total = paradigms.aggregate(rounds)
    summary = {
        "method": method, "paradigm": paradigm, "questions": questions,
        **{key: total[key] for key in ("generated_tokens", "wall_s", "target_forwards", "tokens_per_s",
                                       "mean_accepted_tokens")},
        "accepted_hist": total["accepted_hist"], "finish_reasons": total["finish_reasons"],
        **{key: total[key] for key in ("widths", "width_hist", "drafted_share", "predicted_tokens",
                                       "predicted_decode_s") if key in total},
    }
    summary.update(accuracy_fields(samples, paradigm))
    summary["per_round"] = [{"round": i + 1, "tokens_per_s": x["tokens_per_s"], "wall_s": x["wall_s"],
                             "mean_accepted_tokens": x["mean_accepted_tokens"],
                             "generated_tokens": x["generated_tokens"], "finish_reasons": x["finish_reasons"]}
                            for i, x in enumerate(rounds)]
    return summary


def main(argv: list[str] | None = None) -> int:
    from eval import cli

    return cli.run(parse_args, _main, argv)


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from specjax.tts.paradigms import PARADIGMS

    if args.paradigm not in PARADIGMS:
        raise ValueError(f"unknown --paradigm {args.paradigm!r}; use one of {', '.join(PARADIGMS)}")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.speculate_max_rows is not None and args.speculate_max_rows < 0:
        raise ValueError(f"--speculate-max-rows must be >= 0 (0: never draft), got {args.speculate_max_rows}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.resume and not args.output:
        raise ValueError("--resume continues from the records beside --output: give the --output of the killed run")
    from eval import cli

    cli.check_ints(args, 1, "batch_size", "limit", "num_processes")
    cli.check_ints(args, 0, "process_id")
    cli.check_sampling(args)
    if args.output:
        cli.output_file(args.output, "--output")
    methods = select_methods(args.method, args.model, args.option)
    options = parse_options(args.option, methods)
    cli.check_methods(methods, options, args.k)  # --k and every option in range, each proposer buildable
    from specjax.tts.datasets import load_dataset

    questions = load_dataset(args.dataset, split=args.split, question_field=args.question_field,
                             answer_field=args.answer_field, limit=args.limit, shuffle=args.shuffle, seed=args.seed)
    import specjax
    from specjax import distributed

    if args.distributed:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    lead = jax.process_index() == 0
    step = 1 if args.paradigm == "best_of_n" else args.batch_size  # questions per generate call
    if len(questions) < jax.process_count():
        raise ValueError(f"{len(questions)} questions for {jax.process_count()} processes: use fewer processes")
    start, stop = distributed.block(len(questions), align=step)
    all_questions, questions = questions, questions[start:stop]
    console = Console(stderr=True, quiet=not lead)
    t0 = time.perf_counter()
    model = specjax.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    console.print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; {len(all_questions)} questions"
                  + (f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    baseline = "ar" in methods or not args.no_baseline
    order = (["ar"] if baseline else []) + [m for m in methods if m != "ar"]  # ar first on the first batch
    records = None
    if args.output:
        from eval.records import RunRecords, records_path

        path = records_path(args.output, ".records.jsonl" if jax.process_count() == 1
                            else f".records.p{jax.process_index()}.jsonl")
        records = RunRecords(path, {k: v for k, v in vars(args).items() if k != "resume"}, resume=args.resume)
        if args.resume:
            console.print(f"resuming from {path}: {records.resumed} finished batches of questions skipped")
    summaries: dict[str, dict[str, Any]] = {}
    samples_by: dict[str, list] = {}
    with Progress(console=console, transient=True) as progress:
        tasks = {m: progress.add_task(f"{m} / {args.paradigm}", total=len(questions) * (
            args.rounds if args.paradigm == "multi_round" else 1)) for m in order}
        results = run_in_turns(model, questions, order, args, options, seed_offset=start // step, records=records,
                               progress=lambda m, k: progress.advance(tasks[m], k))
    for method in order:
        summary, samples = results[method]
        parts = distributed.gather_json({"summary": summary, "samples": samples})
        samples = [s for p in parts for s in p["samples"]]
        summary = distributed.merge_stats([p["summary"] for p in parts])
        summary.update(accuracy_fields(samples, args.paradigm))
        summaries[method], samples_by[method] = summary, samples
    if not lead:
        return 0
    base = summaries.get("ar")
    for method, s in summaries.items():
        if base is not None:
            s["baseline"] = {"method": "ar", "tokens_per_s": base["tokens_per_s"], "wall_s": base["wall_s"]}
            s["speedup_vs_ar"] = s["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
            for pr, br in zip(s["per_round"], base["per_round"]):
                pr["speedup_vs_ar"] = pr["tokens_per_s"] / br["tokens_per_s"] if br["tokens_per_s"] else 0.0
            s["outputs_equal_ar"] = outputs_equal(samples_by[method], samples_by["ar"])
    unequal = {m: s["outputs_equal_ar"] for m, s in summaries.items()
               if args.temperature == 0 and s.get("outputs_equal_ar", 1.0) < 1.0}
    if unequal:
        console.print("[yellow]warning: greedy outputs differ from ar's for "
                      + ", ".join(f"{m} ({100 * (1 - f):.0f}% of questions)" for m, f in unequal.items())
                      + (": expected with --matmul-dtype (bf16 rounding of activations amplifies float32 noise; "
                         "see docs/cpu_precision.md)" if args.matmul_dtype else ": a losslessness bug, please report")
                      + "[/yellow]")

    table = Table(title=f"{args.paradigm} on {args.dataset} ({len(all_questions)} questions, {args.model})")
    paired = any("outputs_equal_ar" in s for s in summaries.values())
    for col in ("method", "accuracy", "tok/s", "speedup vs ar", "mean accepted", "target forwards", "per round tok/s"
                ) + (("== ar",) if paired else ()):
        table.add_column(col, justify="right" if col != "method" else "left")
    for method, s in summaries.items():
        table.add_row(method, f"{s['accuracy']:.3f}", f"{s['tokens_per_s']:.1f}",
                      f"{s.get('speedup_vs_ar', float('nan')):.2f}x", f"{s['mean_accepted_tokens']:.2f}",
                      str(s["target_forwards"]), " / ".join(f"{r['tokens_per_s']:.1f}" for r in s["per_round"]),
                      *((f"{100 * s.get('outputs_equal_ar', float('nan')):.0f}%",) if paired else ()))
    Console(width=max(Console().width, 140)).print(table)

    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        for method in methods:
            path = out if len(methods) == 1 else out.with_name(f"{out.stem}.{method}{out.suffix or '.json'}")
            config = {k: v for k, v in vars(args).items() if k != "resume"}  # a resumed run writes the same file
            path.write_text(json.dumps({"config": config, "summary": summaries[method],
                                        "samples": samples_by[method]}, indent=1))
            console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
