"""`python -m eval.build_datastore`: build the datastore the `rest` drafter retrieves from.

`--source generate` (default) stores the model's own greedy, chat-formatted answers to the dataset's
questions (REST's datastore of model outputs: what the model writes is what it will write again);
`--source text` stores each item's question and answer text, tokenized, as two documents.
Writes `OUT.npz` (tokens, suffix array) and `OUT.json` (meta), then prints one summary line. Use it:
`specjax.generate(model, prompts, "rest", datastore="OUT.npz")` or `eval.tts --method rest --option
datastore=OUT.npz`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

DEFAULT_MODEL = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from eval.cli import Parser
    from specjax.datastore import DEFAULT_WINDOW

    p = Parser(prog="python -m eval.build_datastore", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, .gguf, local folder or hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--dataset", required=True, help="built-in name (arith, spectts), JSONL path or HF dataset id")
    p.add_argument("--split", default="test")
    p.add_argument("--question-field", default="question")
    p.add_argument("--field", default="answer", help="the answer field (--source text stores its text)")
    p.add_argument("--limit", type=int, default=None, help="N items only (after --skip)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N items (e.g. the questions a benchmark then runs on)")
    p.add_argument("--out", required=True, help="datastore path: writes OUT.npz and OUT.json")
    p.add_argument("--source", default="generate", choices=["generate", "text"])
    p.add_argument("--max-new-tokens", type=int, default=256, help="--source generate: tokens per answer")
    p.add_argument("--batch-size", type=int, default=8, help="--source generate: questions per generate call")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="suffix sort length (>= rest's max_key)")
    p.add_argument("--resume", action="store_true", help="--source generate: continue a killed run from "
                   "OUT.records.jsonl (answers are recorded there batch by batch)")
    return p.parse_args(argv)


def model_answers(model, questions: Sequence[str], max_new_tokens: int, batch_size: int,
                  records=None) -> list[list[int]]:
    """The model's greedy chat answers (token ids, EOS excluded), `batch_size` questions per call.

    Every batch pads its prompts to the longest question's length, so all of them share one compile.
    `records` (a `RunRecords`): batches it holds are read from it, the others recorded as they finish.
    """
    import specjax
    from specjax.plan import encode_prompts

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    longest = max(len(x) for x in encode_prompts(model.tokenizer, list(questions), True))
    answers: list[list[int]] = []
    for i in range(0, len(questions), batch_size):
        key = f"answers/{i // batch_size}"
        if records is None or (tokens := records.get(key)) is None:
            tokens = specjax.generate(model, list(questions[i : i + batch_size]), "ar", max_new_tokens=max_new_tokens,
                                      pad_prompts_to=longest).tokens
            if records is not None:
                records.add(key, tokens)
        answers.extend(tokens)
    return answers


def text_documents(tokenizer, questions) -> list[list[int]]:
    """Question and answer text of each item, tokenized as plain text (no special tokens)."""
    docs = []
    for q in questions:
        for text in (q.question, q.answer):
            docs.append([int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]])
    return docs


def main(argv: list[str] | None = None) -> int:
    from eval import cli

    return cli.run(parse_args, _main, argv)


def _main(args: argparse.Namespace) -> int:
    import specjax
    from specjax.datastore import build_datastore, datastore_paths, save_datastore
    from specjax.tts.datasets import load_dataset

    if args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    if args.skip < 0:
        raise ValueError(f"--skip must be >= 0, got {args.skip}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError(f"--max-new-tokens and --batch-size must be >= 1, got {args.max_new_tokens}, "
                         f"{args.batch_size}")
    from eval import cli

    cli.check_ints(args, 1, "limit")
    for path in datastore_paths(args.out):  # OUT.npz and OUT.json
        cli.output_file(path, "--out")
    t0 = time.perf_counter()
    questions = load_dataset(args.dataset, split=args.split, question_field=args.question_field,
                             answer_field=args.field,
                             limit=None if args.limit is None else args.skip + args.limit)[args.skip:]
    if not questions:
        raise ValueError(f"--skip {args.skip} leaves no items of {args.dataset}: lower --skip")
    model = specjax.load(args.model, dtype=args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer: a datastore is built from text, pass a model "
                         "folder or name that ships one")
    if args.source == "text":
        docs = text_documents(model.tokenizer, questions)
    else:
        from eval.records import RunRecords, records_path

        records = RunRecords(records_path(args.out), {k: v for k, v in vars(args).items() if k != "resume"},
                             resume=args.resume)
        if args.resume:
            print(f"resuming from {records.path}: {records.resumed} finished batches skipped")
        docs = model_answers(model, [q.question for q in questions], args.max_new_tokens, args.batch_size, records)
    store = build_datastore(docs, vocab_size=model.config.vocab_size, window=args.window, model=args.model,
                            tokenizer=str(getattr(model.tokenizer, "name_or_path", "")), source=args.source,
                            dataset=args.dataset, items=len(questions))
    npz, meta = save_datastore(store, args.out)
    size = npz.stat().st_size + meta.stat().st_size
    print(f"datastore {datastore_paths(args.out)[0]}: {store.meta['documents']} documents, {store.meta['tokens']} "
          f"tokens, {size / 1024:.1f} KiB on disk, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
