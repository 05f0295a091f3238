"""How far any draft-width rule could take a method on this machine: its fixed-width run's own drafts,
replayed under other widths and priced with the calibrated step costs (`specjax.analysis.width_ceiling`).

`python -m benchmarks.adaptive_ceiling [--cell multi-spectts] [--method hybrid] [--limit 10]
   [--max-new-tokens 128] [--out results/adaptive_ceiling.json]`

Per question, the method runs with adaptive widths and with its fixed widths, both with `trace=True`
(the adaptive run first: its stats carry the calibrated step costs). Per round it prints the measured
decode seconds of both runs, the cost model's seconds for the same steps (the model checked against
the clock), and the fixed run's steps under three ceilings: the best width per (source, confidence
bucket, streak) group, what the adaptive loop reads (fitted in hindsight on these steps, so optimistic);
the same if each group's features were known before proposing (a group may skip the proposal); and
hindsight (every step at the narrowest width holding what it accepted). Each is a speedup over the fixed
widths in decode time; the adaptive run's own figure is its measured one. Batch-1 cells only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.adaptive import CELLS as ALL_CELLS

# the greedy batch-1 cells of `benchmarks.adaptive` (a trace's ceilings replay one row)
CELLS = {name: cell for name, cell in ALL_CELLS.items() if cell["paradigm"] != "best_of_n"}


class _Collect:
    """A `RunRecords` stand-in for `eval.tts.run_method`: holds nothing, keeps every batch it is given."""

    def __init__(self):
        self.batches: list[dict] = []

    def get(self, _key):
        return None

    def add(self, _key, batch: dict) -> None:
        self.batches.append(batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cell", default="multi-spectts", choices=list(CELLS))
    p.add_argument("--method", default="hybrid")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="JSON of the figures")
    args = p.parse_args(argv)
    if args.limit < 1 or args.max_new_tokens < 1:
        p.error("--limit and --max-new-tokens must be at least 1")

    import jax.numpy as jnp
    import numpy as np

    import specjax
    from benchmarks.compile_cost import cpu_name
    from eval.tts import parse_args as tts_args
    from eval.tts import run_method, warm_up
    from specjax import adapt_memory
    from specjax.adaptive import confidence_bucket
    from specjax.analysis import width_ceiling as wc
    from specjax.config import SamplingConfig
    from specjax.engine import adaptive_default
    from specjax.plan import bind_proposer
    from specjax.proposers import make_proposer
    from specjax.tts.datasets import load_dataset

    proposer = make_proposer(args.method)  # checks the name before the model loads
    if not adaptive_default():
        p.error("SPECJAX_ADAPTIVE=0 turns the adaptive runs off; unset it: the ceilings need their step costs")
    paradigm, dataset = CELLS[args.cell]["paradigm"], CELLS[args.cell]["dataset"]
    model = specjax.load(args.model)
    run_args = tts_args(["--paradigm", paradigm, "--dataset", dataset, "--max-new-tokens", str(args.max_new_tokens),
                         "--temperature", "0", "--rounds", "2", "--limit", str(args.limit)])
    questions = load_dataset(dataset, limit=args.limit)
    print(f"{args.method} on {args.cell} ({len(questions)} questions), {args.model} (float32) on {cpu_name()}, "
          f"{args.max_new_tokens} new tokens, {time.strftime('%Y-%m-%d')}", flush=True)
    got = {"adaptive": _Collect(), "fixed": _Collect()}
    for fixed in (False, True):
        run_args.no_adaptive = fixed
        warm_up(model, args.method, run_args, questions, {"trace": True})
    for j, question in enumerate(questions):
        for name in ("adaptive", "fixed"):
            run_args.no_adaptive = name == "fixed"
            run_method(model, [question], args.method, run_args, options={"trace": True}, seed_offset=j,
                       records=got[name], warm=False, size_like=questions)
    adapt_memory.forget(model)

    bound = bind_proposer(model, proposer, SamplingConfig())[0]  # a hybrid's kinds name its head's
    kind = bound.confidence_kind
    cheap = tuple(i for i, s in enumerate(bound.sources) if s == "suffix") if bound.cheap_part else ()
    bucket = lambda conf, src: np.asarray(confidence_bucket(jnp.asarray(conf), kind, len(conf), jnp.asarray(src)))
    rounds = len(got["fixed"].batches[0]["stats"])
    rows = []
    print(f"{'round':<7}{'decode s ad/fx':>16}{'model s ad/fx':>16}{'adaptive':>10}{'features':>10}"
          f"{'+ known':>9}{'hindsight':>11}")
    for r in range(rounds):
        stats = {n: [b["stats"][r] for b in c.batches] for n, c in got.items()}
        row = dict(round=r + 1, **wc.ceilings(stats["adaptive"], stats["fixed"], bucket, cheap))
        rows.append(row)
        measured, model_s = row["decode_s"], row["model_s"]
        print(f"{r + 1:<7}{measured['adaptive']:>8.1f}/{measured['fixed']:.1f}"
              f"{model_s['adaptive']:>10.1f}/{model_s['fixed']:.1f}{row['adaptive']:>9.2f}x{row['features']:>9.2f}x"
              f"{row['features_known']:>8.2f}x{row['hindsight']:>10.2f}x", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
