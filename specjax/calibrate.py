"""`python -m specjax.calibrate`: measure this machine's step costs ahead of time for the adaptive loop.

    python -m specjax.calibrate [--model smollm2-135m-instruct] [--methods pld,suffix,hybrid]
        [--batch-sizes 1,8] [--max-new-tokens 256] [--force]

For each (method, batch size) it runs one short adaptive `generate` whose cache bucket is the one a run
of `--max-new-tokens` uses, which times the target's forward at every static verify width and the
method's `propose` on this machine and stores them in the specjax cache folder (`step_cost`). Without it
the first adaptive call of each shape measures them itself. `--force` drops this device's stored
timings first (e.g. ones taken while the machine was busy). Prints each width's cost as a multiple of a
1-token step.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specjax.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--matmul-dtype", default=None, choices=["bfloat16"])
    p.add_argument("--methods", default="pld,suffix,pool,recycling,eagle,hybrid")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--force", action="store_true", help="measure again, replacing this device's stored timings")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        if not batches or min(batches) < 1 or args.max_new_tokens < 1:
            raise ValueError
    except ValueError:
        print(f"error: --batch-sizes takes integers >= 1 (got {args.batch_sizes!r}) and --max-new-tokens an "
              f"integer >= 1", file=sys.stderr)
        return 2
    from specjax.proposers import registry

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in registry()]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; available: {', '.join(registry())}", file=sys.stderr)
        return 2

    import specjax
    from specjax import step_cost

    if args.force:
        print(f"dropped {step_cost.forget()} stored timings of {step_cost.device_name()}")
    model = specjax.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    prompt = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?"
    print(f"{args.model} on {step_cost.device_name()}")
    print(f"{'method':<11}{'batch':>6}{'measured s':>12}   verify width: cost / 1-token step   (propose: ms)")
    for method in methods:
        for batch in batches:
            out = specjax.generate(model, [prompt] * batch, method, max_new_tokens=args.max_new_tokens,
                                   adaptive=True, stop_rows=lambda g, f: [True] * len(g), check_every=1)
            s = out.stats
            if not s["adaptive"]:
                print(f"{method:<11}{batch:>6}{'-':>12}   plain decoding: nothing to calibrate")
                continue
            one = s["step_costs_s"][0]
            costs = "  ".join(f"{w}: {c / one:.2f}x" for w, c in zip(s["widths"], s["step_costs_s"]))
            print(f"{method:<11}{batch:>6}{s['calibration_s']:>12.1f}   {costs}   ({1e3 * s['propose_s']:.1f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
