"""`python -m train.draft_head`: self-distil draft heads (Medusa, EAGLE-3 style) for a target model.

    python -m train.draft_head --head medusa --steps 300 --out heads/medusa-smollm2
    python -m train.draft_head --head eagle --steps 600 --out heads/eagle-smollm2

1. Data: the target's own greedy generations on prompts from any dataset the harness accepts,
   generated with specjax in large batches and cached in OUT/data.npz (reused when the model,
   dataset, prompt count and lengths match).
2. Training: Flax heads on the frozen target's features (final hidden states for Medusa, fused
   low/middle/high layer outputs for EAGLE; computed once with the data and cached with it, so a
   step costs only the head). EAGLE trains with the training-time test: the head is unrolled
   --ttt-steps deep on its own outputs, as it drafts. Both use
   Optax AdamW with linear warmup, cosine decay and global-norm clipping; batches are a pure function
   of the step, so a resumed run sees exactly the batches an uninterrupted one would.
3. Checkpoints: Orbax CheckpointManager in OUT/checkpoints (every --save-every steps, keep the last
   --keep, atomic); a rerun with the same OUT resumes from the latest one. Losses go to
   OUT/metrics.jsonl.
4. Export: OUT/head.json + OUT/head.safetensors (bf16), loadable with
   `specjax.generate(..., method="medusa", head=OUT)`, then a final evaluation through the real
   generate loop (mean accepted tokens vs ar).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

HEADS = ("medusa", "eagle")


def parse_args(argv):
    from eval.cli import Parser

    p = Parser(prog="python -m train.draft_head", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", required=True, help="medusa or eagle")
    p.add_argument("--out", required=True, help="folder: data cache, checkpoints, exported head")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dataset", default="arith",
                   help="any dataset the harness takes, or a comma list of them (prompts are split evenly)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out each dataset's first N questions (hold out what benchmarks run on)")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts to self-distil on")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=192, help="prompt + generation tokens per sequence")
    p.add_argument("--positions", type=int, default=32,
                   help="positions per sequence per step (random; the LM-head logits of all would dominate)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--num-heads", type=int, default=3, help="medusa: heads (tokens drafted per step)")
    p.add_argument("--ttt-steps", type=int, default=4, help="eagle: training-time-test depth (draft steps trained)")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="eagle: draft vocabulary (most frequent tokens of the data; EAGLE-3's reduced LM head)")
    p.add_argument("--gen-batch", type=int, default=32, help="prompts per generate call when building data")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step as if killed (time-boxed runs, resume tests); no export")
    p.add_argument("--eval-prompts", type=int, default=4, help="prompts of the final generate evaluation (0: skip)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def target_features(model, tokens: np.ndarray, layers: tuple[int, ...] = (), batch: int = 8) -> np.ndarray:
    """The frozen target's final hidden states [N, L, D] (layers=()) or its `layers` outputs
    concatenated [N, L, len(layers) * D], float16, computed once: training steps then cost only the
    head, not a target forward each."""
    import jax
    import jax.numpy as jnp

    from specjax.models import transformer

    def features(p, t):
        out = transformer.forward(p, model.config, t, hidden_layers=layers)
        return jnp.concatenate(out.layer_hidden, axis=-1) if layers else out.hidden

    run = jax.jit(features)
    parts = [np.asarray(run(model.params, tokens[i : i + batch]), np.float16) for i in range(0, len(tokens), batch)]
    return np.concatenate(parts)


def training_questions(args, extra: int = 0):
    """--num-prompts questions (plus `extra` more past them, for evaluation), split evenly over the
    comma-listed datasets, each dataset's first --skip left out."""
    from specjax.tts.datasets import load_dataset

    names = [n for n in args.dataset.split(",") if n]
    share = -(-args.num_prompts // len(names))
    train, held = [], []
    for name in names:
        qs = load_dataset(name, limit=args.skip + share + extra)[args.skip:]
        train += qs[:share]
        held += qs[share:]
    return train[: args.num_prompts] if not extra else held[:extra]


def build_data(model, args, folder: Path, layers: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [N, seq_len] (prompt + greedy generation, zero-padded), mask [N, seq_len] and the target's
    features (`target_features`) [N, seq_len, F]; cached in folder/data.npz."""
    import specjax
    from specjax.tts.paradigms import first_round_prompt

    key = {"model": args.model, "dataset": args.dataset, "num_prompts": args.num_prompts, "seq_len": args.seq_len}
    if args.skip:
        key["skip"] = args.skip
    if layers:
        key["features"] = list(layers)
    path = folder / "data.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if json.loads(str(f["key"])) == key:
                return f["tokens"], f["mask"], f["hidden"]
    questions = training_questions(args)
    tok = model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": first_round_prompt(q.question)}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in questions]
    prompts = [p[-(args.seq_len // 2):] for p in prompts]  # room for at least seq_len / 2 generated tokens
    tokens = np.zeros((len(prompts), args.seq_len), np.int32)
    mask = np.zeros((len(prompts), args.seq_len), bool)
    for i in range(0, len(prompts), args.gen_batch):
        chunk = prompts[i : i + args.gen_batch]
        budget = args.seq_len - min(len(p) for p in chunk)
        out = specjax.generate(model, chunk, "ar", max_new_tokens=budget, temperature=0.0)
        for j, (p, gen) in enumerate(zip(chunk, out.tokens)):
            row = (p + gen)[: args.seq_len]
            tokens[i + j, : len(row)] = row
            mask[i + j, : len(row)] = True
        print(f"data: {min(i + args.gen_batch, len(prompts))}/{len(prompts)} sequences", file=sys.stderr)
    hidden = target_features(model, tokens, layers)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, tokens=tokens, mask=mask, hidden=hidden, key=json.dumps(key))
    return tokens, mask, hidden


# ---------------------------------------------------------------- training


def make_optimizer(args):
    import optax

    warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def medusa_targets(tokens: np.ndarray, mask: np.ndarray, pos: np.ndarray, num_heads: int):
    """For positions pos [B, P] of rows tokens [B, L]: head i's target token t+2+i [B, P, K] and
    whether it exists (inside the sequence, not padding)."""
    length = tokens.shape[1]
    idx = pos[:, :, None] + 2 + np.arange(num_heads)  # head i predicts t + 2 + i
    inside = idx < length
    idx = np.minimum(idx, length - 1)
    rows = np.arange(len(tokens))[:, None, None]
    valid = inside & mask[rows, idx] & np.take_along_axis(mask, pos, axis=1)[:, :, None]
    return tokens[rows, idx], valid


def medusa_loss(head_params, heads, lm_head, hidden, target, valid):
    """Mean CE of head i's guess from h_t [B, P, D] against token t+2+i, and per-head top-1 accuracy."""
    import jax.numpy as jnp
    import optax

    feats = heads.apply({"params": head_params}, hidden.astype(lm_head.dtype))  # [B, P, K, D]
    logits = jnp.dot(feats, lm_head, preferred_element_type=jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    weight = valid.astype(jnp.float32)
    loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    hit = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32) * weight
    acc = jnp.sum(hit, axis=(0, 1)) / jnp.maximum(jnp.sum(weight, axis=(0, 1)), 1.0)
    return loss, acc


def batch_at(step: int, seed: int, n: int, batch: int, length: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [B] and positions [B, P] of step's batch: a pure function of (seed, step), so a resumed run
    replays exactly the batches of an uninterrupted one. P = length uses every position."""
    rng = np.random.default_rng([seed, step])
    rows = rng.choice(n, size=batch, replace=n < batch)
    if positions >= length:
        return rows, np.broadcast_to(np.arange(length), (batch, length)).copy()
    return rows, np.sort(np.stack([rng.choice(length, size=positions, replace=False) for _ in rows]), axis=1)


@dataclasses.dataclass
class HeadTask:
    """What differs between head kinds: initial params, the loss, its constant inputs, the batches and
    what the exported head carries besides the trained params."""

    params: Any
    loss: Callable  # (params, consts, batch) -> (loss, per-position top-1 accuracy)
    consts: Any  # frozen target arrays the loss reads (jit arguments, not baked-in constants)
    batch: Callable  # step -> tuple of arrays (a pure function of the step: exact replay on resume)
    metric: str  # name of the accuracy vector in the metrics
    config: dict  # extra head.json fields
    extra: dict  # extra exported arrays


def medusa_task(args, model, tokens, mask, hidden) -> HeadTask:
    import jax
    import jax.numpy as jnp

    from specjax.heads.medusa import MedusaHeads

    heads = MedusaHeads(args.num_heads, model.config.hidden_size)
    params = heads.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, model.config.hidden_size)))["params"]

    def batch(step):
        rows, pos = batch_at(step, args.seed, len(tokens), args.batch_size, tokens.shape[1], args.positions)
        target, valid = medusa_targets(tokens[rows], mask[rows], pos, args.num_heads)
        h = np.take_along_axis(hidden[rows], pos[:, :, None], axis=1)
        return jnp.asarray(h, jnp.float32), jnp.asarray(target), jnp.asarray(valid)

    return HeadTask(params=params, loss=lambda p, lm_head, b: medusa_loss(p, heads, lm_head, *b),
                    consts=model.params["lm_head"], batch=batch, metric="top1_per_head",
                    config={"num_heads": args.num_heads}, extra={})


def eagle_loss(params, module, consts, features, tokens, mask, anchors, steps: int):
    """Mean CE over the unrolled steps (step s weighted 0.8^(s-1), as EAGLE-3) of the head's
    draft-vocabulary logits at `anchors` against x_{anchor+s+1}; tokens outside the draft vocabulary
    and padding are left out. Also per-step top-1 accuracy."""
    import jax.numpy as jnp
    import optax

    from specjax.heads.eagle import unroll

    logits = unroll(module, params, consts["target"], features, tokens, anchors, steps, consts["lm_draft"])
    length = tokens.shape[1]
    idx = anchors[None] + 2 + jnp.arange(steps)[:, None, None]  # [S, B, P]
    inside = idx < length
    idx = jnp.minimum(idx, length - 1)
    gather = lambda x: jnp.take_along_axis(jnp.broadcast_to(x[None], (steps,) + x.shape), idx, axis=2)
    target = consts["t2d"][gather(tokens)]
    valid = inside & gather(mask) & jnp.take_along_axis(mask, anchors, axis=1)[None] & (target >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(target, 0))
    weight = valid.astype(jnp.float32) * (0.8 ** jnp.arange(steps))[:, None, None]
    loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    hit = ((jnp.argmax(logits, axis=-1) == target) & valid).astype(jnp.float32)
    acc = jnp.sum(hit, axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)
    return loss, acc


def eagle_task(args, model, tokens, mask, features) -> HeadTask:
    import jax
    import jax.numpy as jnp

    from specjax.heads.eagle import EagleHead, draft_vocab, feature_layers, head_config, init_head

    cfg = model.config
    ids = draft_vocab(tokens, mask, args.draft_vocab, cfg.vocab_size)
    t2d = np.full(cfg.vocab_size, -1, np.int32)
    t2d[ids] = np.arange(len(ids))
    module = EagleHead(head_config(cfg))
    consts = {"lm_draft": jnp.take(model.params["lm_head"], jnp.asarray(ids), axis=1), "t2d": jnp.asarray(t2d),
              "target": {k: model.params[k] for k in ("lm_head", "embed") if k in model.params}}

    def batch(step):
        rows, pos = batch_at(step, args.seed, len(tokens), args.batch_size, tokens.shape[1] - 2, args.positions)
        return (jnp.asarray(features[rows], jnp.float32), jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]),
                jnp.asarray(pos, jnp.int32))

    loss = lambda p, c, b: eagle_loss(p, module, c, *b, steps=args.ttt_steps)
    return HeadTask(params=init_head(model, jax.random.PRNGKey(args.seed)), loss=loss, consts=consts, batch=batch,
                    metric="top1_per_step",
                    config={"draft_vocab_size": len(ids), "feature_layers": list(feature_layers(cfg.num_layers)),
                            "ttt_steps": args.ttt_steps},
                    extra={"draft_vocab": ids})


def damaged_checkpoint(root: Path, step: int, steps: Any, error: Exception) -> str:
    """The message for a checkpoint that does not restore: the step, its folder and the file the error names,
    and what to delete. Only the error's type is kept of the library's message, whose text holds object reprs
    (`<bound method ...>`) that mean nothing to the user."""
    folder = root / str(step)
    bad = _damaged_file(folder, error)
    where = f"file {bad}" if bad else f"folder {folder}"
    earlier = sorted(s for s in steps if s < step)
    fix = (f"delete {folder} to resume from step {earlier[-1]}, or {root} to start over" if earlier
           else f"delete {root} to start over")
    return (f"checkpoint step {step} is corrupt or from another configuration ({type(error).__name__} reading "
            f"{where}): {fix}")


def _damaged_file(folder: Path, error: BaseException) -> Path | None:
    """The file of a checkpoint step that failed to restore: one the error (or an error it came from) names,
    else the first of the step's JSON metadata files that does not parse; None when neither shows it."""
    import re

    pattern = re.escape(str(folder.absolute())) + r"/[^\s'\"<>,;:)]+"
    while error is not None:
        named = [Path(n) for n in re.findall(pattern, str(error)) if Path(n).is_file()]
        if named:
            return named[0]
        error = error.__cause__ or error.__context__
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix == ".json" or path.name.endswith("METADATA")):
            try:
                json.loads(path.read_text())
            except (ValueError, OSError):
                return path
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the records of steps <= `step` (none: a fresh start). A run resumed from `step` writes the later
    steps again, which would otherwise appear twice, e.g. after a damaged checkpoint was deleted."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def train(args, task: HeadTask, folder: Path, log=print) -> tuple[Any, list[dict]]:
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    tx = make_optimizer(args)
    state = {"params": task.params, "opt_state": tx.init(task.params), "step": jnp.zeros((), jnp.int32)}

    @partial(jax.jit, donate_argnums=(0,))
    def train_step(state, consts, batch):  # consts an argument: a closure would bake them in as constants
        (loss, acc), grads = jax.value_and_grad(task.loss, has_aux=True)(state["params"], consts, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss, acc

    manager = ocp.CheckpointManager(
        (folder / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=args.keep, save_interval_steps=args.save_every,
                                             create=True))
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        absl, level = logging.getLogger("absl"), logging.getLogger("absl").level
        absl.setLevel(logging.CRITICAL)  # Orbax logs a damaged file on its own line before our message
        try:
            state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
            raise ValueError(damaged_checkpoint(folder / "checkpoints", latest, manager.all_steps(), e)) from None
        finally:
            absl.setLevel(level)
        start = int(state["step"])
        log(f"resuming from step {start} ({folder / 'checkpoints'})")
    history = []
    truncate_metrics(folder / "metrics.jsonl", start)  # the steps after `start` are about to be written again
    metrics = (folder / "metrics.jsonl").open("a")
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(f"train {args.head}", total=args.steps, completed=start, info="")
        for step in range(start, args.steps):
            state, loss, acc = train_step(state, task.consts, task.batch(step))
            record = {"step": step + 1, "loss": float(loss), task.metric: [round(float(a), 4) for a in acc]}
            history.append(record)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            progress.update(bar, advance=1, info=f"loss {record['loss']:.3f} top1 {record[task.metric]}")
            manager.save(step + 1, args=ocp.args.StandardSave(state))
            if args.stop_after is not None and step + 1 >= args.stop_after:
                break
    manager.wait_until_finished()
    manager.close()
    metrics.close()
    return state["params"], history


def main(argv: list[str] | None = None) -> int:
    from eval import cli

    return cli.run(parse_args, _main, argv)


def check_args(args) -> None:
    """Every flag, the datasets' files and the output folder, before the model loads and data is generated
    (tens of seconds that a bad --out would waste)."""
    from eval import cli
    from specjax import validation

    if args.head not in HEADS:
        raise ValueError(f"--head {args.head!r} is not available; use one of {', '.join(HEADS)}")
    cli.check_ints(args, 1, "steps", "batch_size", "num_heads", "save_every", "keep", "num_prompts", "positions",
                   "ttt_steps", "draft_vocab", "gen_batch", "stop_after")
    cli.check_ints(args, 0, "skip", "eval_prompts", "warmup", "seed")
    if args.seq_len < 8:
        raise ValueError(f"--seq-len must be >= 8, got {args.seq_len}")
    validation.number("--lr", args.lr, gt=0)
    names = args.dataset.split(",")
    if not all(n.strip() for n in names):
        raise ValueError(f"--dataset {args.dataset!r} has an empty name: pass names or paths, comma-separated")
    for name in names:  # a path that is not there fails now, not after the model has loaded
        path = Path(name).expanduser()
        if (path.suffix in (".jsonl", ".json") or name.startswith((".", "/", "~"))) and not path.is_file():
            raise ValueError(f"--dataset file {name!r} not found; pass a JSONL path, a built-in name (arith, "
                             "spectts) or a Hugging Face dataset id")
    cli.output_dir(args.out, "--out")


def _main(args) -> int:
    import jax

    import specjax
    from specjax.heads.io import save_head

    check_args(args)
    folder = Path(args.out)
    model = specjax.load(args.model)
    t0 = time.perf_counter()
    layers = ()
    if args.head == "eagle":
        from specjax.heads.eagle import feature_layers

        layers = feature_layers(model.config.num_layers)
    tokens, mask, features = build_data(model, args, folder, layers)
    print(f"data: {len(tokens)} sequences, {int(mask.sum())} tokens ({time.perf_counter() - t0:.1f}s)")
    task = (eagle_task if args.head == "eagle" else medusa_task)(args, model, tokens, mask, features)
    params, history = train(args, task, folder)
    if args.stop_after is not None and args.stop_after < args.steps:
        print(f"stopped after step {args.stop_after} of {args.steps}; rerun without --stop-after to resume")
        return 0
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, {task.metric.replace('_', ' ')} {last[task.metric]}")
    config = {"kind": args.head, "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
              "target": args.model, "steps": args.steps, "dataset": args.dataset,
              "final": history[-1] if history else None, **task.config}
    save_head(folder, config, {**jax.tree.map(np.asarray, dict(params)), **task.extra})
    print(f"head saved to {folder} ({(folder / 'head.safetensors').stat().st_size / 1e6:.1f} MB)")
    if args.eval_prompts:
        evaluate(model, args, folder)
    return 0


def evaluate(model, args, folder: Path) -> dict[str, float]:
    """Mean accepted tokens of the exported head through the real generate loop, greedy."""
    import specjax
    from specjax.tts.paradigms import first_round_prompt

    questions = training_questions(args, extra=args.eval_prompts)
    prompts = [first_round_prompt(q.question) for q in questions] or ["What is 12 * 13?"]
    run = lambda method, **kw: specjax.generate(model, prompts, method, max_new_tokens=64, **kw)
    run("ar"), run(args.head, head=str(folder))  # warm-up: compile outside the timed calls
    ar, out = run("ar"), run(args.head, head=str(folder))
    figures = {"mean_accepted_tokens": out.stats["mean_accepted_tokens"], "equals_ar": out.tokens == ar.tokens,
               "tokens_per_s": out.stats["tokens_per_s"], "ar_tokens_per_s": ar.stats["tokens_per_s"]}
    print(f"eval on {len(prompts)} held-out prompts: {figures['mean_accepted_tokens']:.2f} tokens per target "
          f"forward, {figures['tokens_per_s']:.1f} tok/s vs ar {figures['ar_tokens_per_s']:.1f}, "
          f"greedy output equals ar: {figures['equals_ar']}")
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
