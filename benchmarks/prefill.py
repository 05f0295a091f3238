"""Prefill of many prompts of different lengths: one batch padded to the longest, against parts.

`python -m benchmarks.prefill [--batch-sizes 8,32,64] [--dataset spectts] [--repeats 2]`

Padded to one width, a few long questions among many short ones make every row pay the longest one's
width (and its attention, quadratic in it), so `generate` prefills such a batch in up to three parts,
each padded to its own longest prompt's bucket (`specjax.plan.prefill_parts`).
For the first N questions of --dataset (chat template on, 1 new token, greedy) this prints the padded
tokens and the prefill seconds both ways (median of --repeats, after a warm-up call of each), and
whether the first tokens agree.
"""

from __future__ import annotations

import argparse
import statistics

from eval.cli import int_list


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dataset", default="spectts")
    parser.add_argument("--batch-sizes", default="8,32,64")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    batches = int_list(args.batch_sizes, "--batch-sizes")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    import numpy as np

    import specjax
    from benchmarks.compile_cost import cpu_name
    from specjax import plan
    from specjax.tts.datasets import load_dataset

    questions = [q.question for q in load_dataset(args.dataset, limit=max(batches))]
    if len(questions) < max(batches):
        parser.error(f"--dataset {args.dataset} holds {len(questions)} questions: lower --batch-sizes")
    model = specjax.load(args.model)

    def timed(prompts: list[str], pad_to: int) -> tuple[float, list]:
        # `pad_prompts_to` (the public way to share shapes across calls) keeps one padded batch
        out = specjax.generate(model, prompts, "ar", max_new_tokens=1, pad_prompts_to=pad_to)
        return out.stats["prefill_s"], out.tokens

    print(f"{args.model} on {cpu_name()}, {args.dataset}, prefill of N fresh prompts (median of {args.repeats})")
    print(f"{'N':>4} {'tokens':>7} {'padded, one batch':>18} {'padded, parts':>14} {'one batch s':>12} "
          f"{'parts s':>8} {'speedup':>8}  parts (count x width)  same first tokens")
    for n in batches:
        prompts = questions[:n]
        lengths = np.array([len(x) for x in plan.encode_prompts(model.tokenizer, prompts, True)])
        width = plan.bucket(int(lengths.max()), plan.PROMPT_FLOOR)
        layout = plan.prefill_parts(lengths, width)
        padded = n * width if layout is None else sum(c * w for c, w in layout[1])
        ways = {"parts": 0, "one batch": width}
        tokens = {way: timed(prompts, pad)[1] for way, pad in ways.items()}  # warm-up: compiles
        runs = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, pad in ways.items():
                runs[way].append(timed(prompts, pad)[0])
        whole, parted = statistics.median(runs["one batch"]), statistics.median(runs["parts"])
        shape = "one batch" if layout is None else " + ".join(f"{c}x{w}" for c, w in layout[1])
        print(f"{n:>4} {int(lengths.sum()):>7} {n * width:>18} {padded:>14} {whole:>12.2f} {parted:>8.2f} "
              f"{whole / parted:>7.2f}x  {shape:<22} {tokens['parts'] == tokens['one batch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
