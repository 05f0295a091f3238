"""`python -m specjax "question"`: answer a prompt with the embedded default and report the speed."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from eval.cli import Parser, add_precision_flags

    parser = Parser(prog="python -m specjax", description=__doc__)
    parser.add_argument("prompt", nargs="+", help="the prompt (several words are joined)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, .gguf, folder or hub id")
    parser.add_argument("--method", default="ar", help="ar, pld, suffix, pool, ...")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_precision_flags(parser)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of --method, repeatable (e.g. --option k=8; python -m eval.tts takes the same)")
    parser.add_argument("--no-adaptive", action="store_true",
                        help="the method's fixed draft widths instead of widths chosen per step on this machine")
    parser.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from eval import cli

    return cli.run(parse_args, _main, argv)


def compiled_note(before: int) -> str:
    """Whether the call compiled (a first run on this machine, or new shapes) or read its programs from
    the cache folder, so its seconds read right: a compiling call is no measure of decoding speed."""
    from specjax import programs

    n = programs.counts().get("compiled", 0) - before
    return f"{n} program{'s' * (n != 1)} compiled in the call" if n else "programs read from the cache"


def _main(args: argparse.Namespace) -> int:
    from eval import cli

    cli.check_sampling(args)  # every flag checked before the model loads (seconds)
    cli.check_methods([args.method])  # an unknown method is named before its options are read
    options = cli.parse_options(args.option, [args.method])
    cli.check_methods([args.method], options)
    prompt = " ".join(args.prompt)
    if args.no_chat and not prompt:
        raise ValueError("the prompt is empty: --no-chat feeds the text as it is, and empty text has no tokens")

    import specjax
    from specjax import programs

    model = specjax.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    before = programs.counts().get("compiled", 0)
    out = specjax.generate(model, [prompt], args.method, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           chat=not args.no_chat, adaptive=False if args.no_adaptive else None,
                           **options.get(args.method, {}))
    s = out.stats
    print(out.texts[0])
    print(f"\n[{s['method']}] {s['emitted_tokens']} tokens in {s['wall_s']:.2f}s "
          f"(prefill {s['prefill_s']:.2f}s, decode {s['decode_s']:.2f}s, {compiled_note(before)}); "
          f"{s['tokens_per_s']:.1f} tok/s, {s['mean_accepted_tokens']:.2f} tokens per target forward",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
