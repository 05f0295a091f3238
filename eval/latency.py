"""`python -m eval.latency`: split a per-question latency budget between branches and speculation.

1. Calibrate (or load `--calibration FILE`): time the target's forward T(B, k) on a grid, run every
   (method, N) of `--methods` x `--n-values` as Best-of-N on `--calibration-questions` questions,
   keep each sample's length and answer (see `specjax.analysis.latency`).
2. Plan: for each `--budget` (seconds per question), pick the configuration with the best predicted
   maj@N accuracy whose predicted latency fits; also the best branch-only (ar, N samples) and the best
   speculation-only (one sample) plan.
3. Run each picked plan on `--limit` held-out questions (those after the calibration ones) and
   report measured latency per question (mean, p90) and accuracy against the predictions.
`--sweep` plots the predicted accuracy-latency frontier of each family with the measured points (PNG).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval.cli import Parser, add_precision_flags

DEFAULT_MODEL = "smollm2-135m-instruct"


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma list of seconds, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} needs positive seconds, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m eval.latency", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, .gguf, local folder or hub id")
    add_precision_flags(p)
    p.add_argument("--budget", default="5,10,20", help="seconds per question, a comma list")
    p.add_argument("--dataset", default="arith", help="built-in name, JSONL path or HF dataset id")
    p.add_argument("--split", default="test")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--methods", default="ar,pld,suffix,hybrid", help="comma list; ar is always included")
    p.add_argument("--n-values", default="1,2,4,8", help="branch counts to calibrate and plan over")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="load this calibration if it exists, else calibrate and save it here")
    p.add_argument("--calibration-questions", type=int, default=8)
    p.add_argument("--limit", "--questions", dest="limit", type=int, default=10,
                   help="held-out questions each plan runs on (--questions: its old name)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=None, help="draft length of speculative methods")
    p.add_argument("--early-stop", action="store_true",
                   help="also plan configurations that stop a question's branches once its vote is settled")
    p.add_argument("--check-every", type=int, default=32, help="early stop: decode steps between vote checks")
    p.add_argument("--no-compare", action="store_true",
                   help="run only the chosen plan, not the best branch-only and speculation-only ones")
    p.add_argument("--sweep", action="store_true", help="plot the accuracy-latency frontier (PNG)")
    p.add_argument("--out", default="results/latency", help="folder for latency.json and the plot")
    p.add_argument("--resume", action="store_true", help="continue a killed calibration from OUT/calibration."
                   "records.jsonl (each configuration is recorded there as it finishes)")
    return p.parse_args(argv)


def _questions(args):
    from specjax.tts.datasets import load_dataset

    want = args.calibration_questions + args.limit
    questions = load_dataset(args.dataset, split=args.split, question_field=args.question_field,
                             answer_field=args.answer_field, limit=want)
    if len(questions) < want:
        raise ValueError(f"--dataset {args.dataset} has {len(questions)} questions; --calibration-questions "
                         f"{args.calibration_questions} + --limit {args.limit} need {want}")
    return questions[: args.calibration_questions], questions[args.calibration_questions:]


def measure_forward(model, batch: int, width: int, context: int, repeats: int = 5) -> float:
    """T(B, k): seconds of one jitted target forward of `width` tokens per row over a cache of `context`."""
    import jax
    import jax.numpy as jnp

    from specjax.models import transformer
    from specjax.models.cache import KVCache

    cfg = model.config
    cache = KVCache.init(cfg, batch, context + width, transformer.compute_dtype(model.params))
    cache = cache.with_lengths(jnp.full((batch,), context, jnp.int32))
    tokens = jnp.ones((batch, width), jnp.int32)
    fwd = jax.jit(lambda params, x, c: transformer.forward(params, cfg, x, c).logits)
    from specjax.step_cost import timed_seconds

    return timed_seconds(lambda: fwd(model.params, tokens, cache), repeats, percentile=50)


def _generate_question(model, question, method: str, n: int, args, pad: int, options: dict[str, Any], seed: int,
                       early_stop: bool = False):
    """One Best-of-N question, timed end to end (tokenise, prefill, decode, detokenise)."""
    import specjax
    from specjax.tts.paradigms import SettledVote, first_round_prompt

    stop = dict(stop_rows=SettledVote(model.tokenizer, n), check_every=args.check_every) if early_stop else {}
    t0 = time.perf_counter()
    out = specjax.generate(model, [first_round_prompt(question.question)], method, num_samples=n,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=seed, pad_prompts_to=pad, **stop, **options)
    return out, time.perf_counter() - t0


def calibrate(model, questions, methods: list[str], n_values: list[int], args, options, pad: int,
              progress=None, records=None):
    """Times the forward grid and every (method, N) on the calibration questions. `records` (a
    `RunRecords`): configurations it holds are read from it, the others recorded as they finish."""
    import jax

    from specjax.analysis.latency import Calibration, ConfigTiming, QuestionSamples
    from specjax.proposers import make_proposer
    from specjax.tts.grading import answer_classes, extract_answer, is_equivalent

    widths = sorted({1} | {make_proposer(m, **options[m]).width + 1 for m in methods})
    context = pad + args.max_new_tokens // 2
    grid = records.get("forward") if records is not None else None
    if grid is None:
        grid = [[b, w, measure_forward(model, b, w, context)] for b in n_values for w in widths]
        if records is not None:
            records.add("forward", grid)
    forward_s = {(b, w): t for b, w, t in grid}
    timings, answers, lengths = [], [[] for _ in questions], [[] for _ in questions]
    for method in methods:
        for n in n_values:
            done = records.get(f"{method}/{n}") if records is not None else None
            if done is None:
                _generate_question(model, questions[0], method, n, args, pad, options[method], seed=10**6)  # compile
                done = {"rows": [], "answers": [], "lengths": []}
                for i, q in enumerate(questions):
                    out, wall = _generate_question(model, q, method, n, args, pad, options[method],
                                                   seed=args.seed + i)
                    s = out.stats
                    emitted = [min(len(t) + 1, args.max_new_tokens) for t in out.tokens]  # + EOS, as decoded
                    row_steps = sum(s["accepted_hist"])
                    done["rows"].append((wall, s["prefill_s"], s["decode_s"], s["decode_steps"], max(emitted),
                                         s["mean_accepted_tokens"] * row_steps, row_steps))
                    done["answers"].append([extract_answer(t) for t in out.texts])
                    done["lengths"].append(emitted)
                    if progress is not None:
                        progress()
                if records is not None:
                    records.add(f"{method}/{n}", done)
            elif progress is not None:
                progress(len(questions))
            rows = done["rows"]
            for i in range(len(questions)):
                answers[i] += done["answers"][i]
                lengths[i] += done["lengths"][i]
            wall, pre, dec, steps, longest, accepted, row_steps = np.asarray(rows, np.float64).sum(axis=0)
            width = make_proposer(method, **options[method]).width
            timings.append(ConfigTiming(
                method=method, n=n, width=width, step_s=dec / max(steps, 1), steps_per_token=steps / longest,
                prefill_s=pre / len(rows), host_s=(wall - pre - dec) / len(rows),
                mean_accepted_tokens=float(accepted / max(row_steps, 1))))
    samples = []
    for q, ans, lens in zip(questions, answers, lengths):
        ids, reps = answer_classes(ans)
        correct = next((i for i, r in enumerate(reps) if is_equivalent(r, q.answer)), -1)
        samples.append(QuestionSamples(lengths=tuple(lens), classes=tuple(ids), correct_class=correct))
    meta = {"model": args.model, "dtype": args.dtype, "matmul_dtype": args.matmul_dtype,
            "device": str(jax.devices()[0].device_kind),
            "dataset": args.dataset, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "methods": methods, "n_values": n_values, "context": context,
            "questions": [q.id for q in questions], "options": options}
    return Calibration(meta=meta, forward_s=forward_s, timings=timings, questions=samples)


def run_plan(model, plan, questions, args, pad: int, options) -> dict[str, Any]:
    """Measured latency per question and maj@N accuracy of `plan` on the held-out questions."""
    from specjax.tts.grading import grade_samples

    _generate_question(model, questions[0], plan.method, plan.n, args, pad, options, seed=10**6,
                       early_stop=plan.early_stop)  # compile
    walls, correct, stopped = [], 0, 0
    for i, q in enumerate(questions):
        out, wall = _generate_question(model, q, plan.method, plan.n, args, pad, options,
                                       seed=args.seed + 1000 + i, early_stop=plan.early_stop)
        kept = [t for t, s in zip(out.texts, out.stats["stopped_rows"]) if not s]
        stopped += plan.n - len(kept)
        walls.append(wall)
        correct += bool(grade_samples(kept, q.answer)["correct"])
    walls = np.asarray(walls)
    return {"plan": plan.name, "family": plan.family, "method": plan.method, "n": plan.n,
            "early_stop": plan.early_stop, "predicted_s": plan.predicted_s,
            "predicted_accuracy": plan.predicted_accuracy, "mean_s": float(walls.mean()),
            "p90_s": float(np.percentile(walls, 90)), "accuracy": correct / len(questions),
            "latency_error": float(walls.mean() / plan.predicted_s - 1.0), "stopped_branches": stopped,
            "latencies_s": walls.tolist()}


def plot_sweep(plans, measured: list[dict[str, Any]], budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from specjax.analysis.latency import frontier

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"branch": ("tab:blue", "branch only (ar, N samples)"),
              "speculation": ("tab:orange", "speculation only (N = 1)"),
              "combined": ("tab:green", "combined (any method, any N)")}
    for fam, (color, label) in styles.items():
        members = plans if fam == "combined" else [p for p in plans
                                                    if p.family == fam or (p.method == "ar" and p.n == 1)]
        front = frontier(members)
        ax.step([p.predicted_s for p in front], [p.predicted_accuracy for p in front], where="post", color=color,
                label=label, lw=4 if fam == "combined" else 1.5, alpha=0.4 if fam == "combined" else 1.0,
                zorder=1 if fam == "combined" else 2)
        own = [p for p in plans if p.family == fam]
        ax.scatter([p.predicted_s for p in own], [p.predicted_accuracy for p in own], color=color, s=12, alpha=0.5)
    for m in measured:
        ax.scatter(m["mean_s"], m["accuracy"], marker="x", color=styles[m["family"]][0], s=60)
    for b in budgets:
        ax.axvline(b, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("latency per question (s)")
    ax.set_ylabel("maj@N accuracy")
    ax.set_title("Predicted accuracy-latency frontier (dots: plans, x: measured runs)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from eval import cli

    return cli.run(parse_args, _main, argv)


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from eval import cli
    from eval.tts import expand_methods

    budgets = _floats(args.budget, "--budget")
    n_values = sorted(set(cli.int_list(args.n_values, "--n-values")))
    methods = expand_methods(args.methods)
    methods = ["ar"] + [m for m in methods if m != "ar"]
    for flag in ("calibration_questions", "limit", "max_new_tokens", "check_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    cli.check_sampling(args)
    cli.check_methods(methods, k=args.k)
    cli.output_dir(args.out, "--out")
    options = {m: ({"k": args.k} if args.k is not None and m != "ar" else {}) for m in methods}
    calib_q, held_out = _questions(args)

    import specjax
    from specjax.analysis.latency import Calibration, CostModel, SampleModel, choose, enumerate_plans
    from specjax.analysis.moesd import StepTimeFit, WeightProfile
    from specjax.tts.paradigms import chat_prompt_length, first_round_prompt

    console = Console(stderr=True)
    cal_path = Path(args.calibration) if args.calibration else None
    cal = None
    if cal_path is not None:
        cli.output_file(cal_path, "--calibration")  # read from there, or calibrated and saved there
    if cal_path is not None and cal_path.exists():  # read and matched to this run before the model loads
        cal = Calibration.load(cal_path)
        for key in ("model", "dtype", "matmul_dtype", "dataset", "max_new_tokens", "temperature", "top_p"):
            if cal.meta.get(key) != getattr(args, key):
                raise ValueError(f"{cal_path} was calibrated with --{key.replace('_', '-')} {cal.meta.get(key)}, this "
                                 f"run asks for {getattr(args, key)}: use the same setting or a new --calibration file")
        missing = [(m, n) for m in methods for n in n_values if (m, n) not in {(t.method, t.n) for t in cal.timings}]
        if missing:
            raise ValueError(f"{cal_path} has no timings for {missing[:3]}...: drop --calibration or recalibrate "
                             "to a new file with these --methods/--n-values")
    model = specjax.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    pad = chat_prompt_length(model, [first_round_prompt(q.question) for q in calib_q + held_out])
    if cal is not None:
        console.print(f"loaded calibration {cal_path}")
    else:
        total = len(methods) * len(n_values) * len(calib_q)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("calibrating", total=total)
            t0 = time.perf_counter()
            from eval.records import RunRecords

            records = RunRecords(Path(args.out) / "calibration.records.jsonl",
                                 {k: v for k, v in vars(args).items() if k not in (
                                     "resume", "budget", "sweep", "no_compare", "limit", "calibration")},
                                 resume=args.resume)
            if args.resume:
                console.print(f"resuming the calibration: {records.resumed} finished units skipped")
            cal = calibrate(model, calib_q, methods, n_values, args, options, pad,
                            lambda k=1: progress.advance(task, k), records)
        console.print(f"calibrated {len(cal.timings)} configurations in {time.perf_counter() - t0:.0f}s")
        if cal_path is not None:
            cal.save(cal_path)
            console.print(f"wrote {cal_path}")
    tokens = [b * k for b, k in cal.forward_s]
    fit = StepTimeFit.fit(WeightProfile.of(model.config), tokens, list(cal.forward_s.values()))
    cost = CostModel(cal.forward_s, cal.timings, fit)
    samples = SampleModel(cal.questions, seed=args.seed)
    plans = enumerate_plans(cost, samples, methods, n_values, (False, True) if args.early_stop else (False,),
                            args.check_every)

    families = {"combined": ("combined",), "branch": ("branch",), "speculation": ("speculation",)}
    results, measured = [], {}
    with Progress(console=console, transient=True) as progress:
        for budget in budgets:
            row: dict[str, Any] = {"budget_s": budget}
            for label, fams in families.items():
                if label != "combined" and args.no_compare:
                    continue
                plan = choose(plans, budget, fams)
                if plan is None:
                    row[label] = None
                    continue
                if plan.name not in measured:
                    task = progress.add_task(f"{budget:g}s: {plan.name}", total=None)
                    measured[plan.name] = run_plan(model, plan, held_out, args, pad, options[plan.method])
                    progress.remove_task(task)
                row[label] = measured[plan.name]
            results.append(row)

    table = Table(title=f"latency-aware TTS on {args.dataset} ({len(held_out)} held-out questions, {args.model})")
    for col in ("budget", "family", "plan", "pred s", "mean s", "p90 s", "error", "pred acc", "acc"):
        table.add_column(col, justify="left" if col in ("family", "plan") else "right")
    for row in results:
        for label in families:
            m = row.get(label)
            if m is None:
                if label in row:
                    table.add_row(f"{row['budget_s']:g}", label, "nothing fits", *[""] * 6)
                continue
            table.add_row(f"{row['budget_s']:g}", label, m["plan"], f"{m['predicted_s']:.2f}", f"{m['mean_s']:.2f}",
                          f"{m['p90_s']:.2f}", f"{100 * m['latency_error']:+.0f}%", f"{m['predicted_accuracy']:.3f}",
                          f"{m['accuracy']:.3f}")
    Console(width=max(Console().width, 130)).print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing_rows = [{"method": t.method, "n": t.n, "step_s": cost.timing(t.method, t.n).step_s,
                    "overhead_s": cost.overhead(t.method, t.n), "steps_per_token": t.steps_per_token,
                    "mean_accepted_tokens": t.mean_accepted_tokens, "prefill_s": t.prefill_s} for t in cal.timings]
    (out / "latency.json").write_text(json.dumps({
        "config": vars(args), "calibration_meta": cal.meta,
        "forward_s": [[b, k, t] for (b, k), t in sorted(cal.forward_s.items())], "timings": timing_rows,
        "plans": [{"plan": p.name, "family": p.family, "predicted_s": p.predicted_s,
                   "predicted_accuracy": p.predicted_accuracy} for p in plans],
        "budgets": results}, indent=1))
    console.print(f"wrote {out / 'latency.json'}")
    if args.sweep:
        plot_sweep(plans, list(measured.values()), budgets, out / "latency_frontier.png")
        console.print(f"wrote {out / 'latency_frontier.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
