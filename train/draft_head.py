"""`python -m train.draft_head`: self-distil draft heads (Medusa, EAGLE-3 style) for a target model.

    python -m train.draft_head --head medusa --steps 300 --out heads/medusa-smollm2
    python -m train.draft_head --head eagle --steps 600 --out heads/eagle-smollm2

1. Data: the target's own answers (greedy, or --samples-per-prompt sampled ones at --temperature) to
   prompts from any datasets the harness accepts, generated with specjax in resumable shards under
   OUT/data (`train.distill_data`: a kill loses at most one shard), with the target's greedy next token
   at every position as the label and, by default, its features (final hidden states for Medusa, fused
   low/middle/high layer outputs for EAGLE) stored float16 and read memory-mapped, so a step costs
   only the head (`--features recompute` recomputes them per batch instead).
2. Training: Flax heads on the frozen target's features. EAGLE trains with the training-time test:
   the head is unrolled --ttt-steps deep on its own outputs, as it drafts. Both use Optax AdamW with
   linear warmup, cosine decay and global-norm clipping; batches are a pure function of the step, so
   a resumed run sees exactly the batches an uninterrupted one would.
3. Checkpoints: Orbax CheckpointManager in OUT/checkpoints (every --save-every steps, keep the last
   --keep, atomic); a rerun with the same OUT resumes from the latest one. Losses go to
   OUT/metrics.jsonl, and every --eval-every steps the head is evaluated through the real generate
   loop on held-out prompts (accepted tokens per target forward, chain and tree): the learning curve,
   in metrics.jsonl and OUT/learning_curve.png.
4. Export: OUT/head.json + OUT/head.safetensors (bf16), loadable with
   `specjax.generate(..., method="medusa", head=OUT)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from train import distill_data

HEADS = ("medusa", "eagle")
DRAFT_VOCAB = 8192  # EAGLE draft vocabulary of a fresh head


def parse_args(argv):
    from eval.cli import Parser

    p = Parser(prog="python -m train.draft_head", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", required=True, help="medusa or eagle")
    p.add_argument("--out", required=True, help="folder: data cache, checkpoints, exported head")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dataset", default="arith",
                   help="any dataset the harness takes, or a comma list of them (interleaved; one that runs "
                        "out leaves the rest to the others)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out each dataset's first N questions (hold out what benchmarks run on)")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts to self-distil on")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="answers per prompt (sampled at --temperature; more diverse data from the same prompts)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the answers (0: greedy, one answer per prompt)")
    p.add_argument("--shard-size", type=int, default=32,
                   help="prompts per data shard (a kill during data generation loses at most one shard)")
    p.add_argument("--sample-matmul-dtype", default=None, choices=("bfloat16",),
                   help="sample the answers with bf16 matmuls (about 1.2x faster on CPUs with AMX); labels and "
                        "features still come from the float32 forward")
    p.add_argument("--extra-data", action="append", default=[], metavar="DIR",
                   help="also train on the data folder (OUT/data) of another run for the same model, --seq-len "
                        "and --features (repeatable): data generated once, mixed into later heads")
    p.add_argument("--features", default="disk", choices=("disk", "recompute"),
                   help="target features: stored with the data (float16, memory-mapped) or recomputed per batch")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=192, help="prompt + generation tokens per sequence")
    p.add_argument("--positions", type=int, default=32,
                   help="positions per sequence per step (random; the LM-head logits of all would dominate)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--num-heads", type=int, default=3, help="medusa: heads (tokens drafted per step)")
    p.add_argument("--ttt-steps", type=int, default=4, help="eagle: training-time-test depth (draft steps trained)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="eagle: draft vocabulary (most frequent tokens of the data; EAGLE-3's reduced LM head; "
                        f"default {DRAFT_VOCAB}, or the --init-head's)")
    p.add_argument("--init-head", default=None, metavar="DIR",
                   help="start from a trained head of the same kind (a folder, or 'default': the one shipped for "
                        "--model) instead of a fresh one: more data for a head without its training run; an "
                        "EAGLE head keeps its draft vocabulary. A run that resumes from its checkpoints ignores it")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step as if killed (time-boxed runs, resume tests); no export")
    p.add_argument("--eval-prompts", type=int, default=4,
                   help="held-out prompts of the generate evaluations (the first --skip questions when "
                        "--skip > 0, else questions past the training ones; 0: no evaluation)")
    p.add_argument("--eval-dataset", default=None,
                   help="the dataset(s) whose first --skip questions the evaluations take (default: --dataset)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps as well as at the end (the learning curve; 0: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=96, help="new tokens per prompt in the evaluations")
    p.add_argument("--eval-tree", default="16,5,3",
                   help="eagle: the tree evaluated beside the chain of --ttt-steps + 1, as total,depth,topk")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def _questions(args, first: int, count: int, stop: int | None = None) -> list:
    """`count` questions from the comma-listed datasets, each dataset's questions `first` to `stop`
    (default: as many as needed), interleaved (one of each in turn), so every prefix of the data, a
    shard or a run cut short, mixes them; once a dataset runs out the others go on. Fewer than `count`
    when all run out."""
    import itertools

    from specjax.tts.datasets import load_dataset

    names = [n for n in args.dataset.split(",") if n]
    end = first + count if stop is None else stop
    lists = [load_dataset(name, limit=end)[first:end] for name in names]
    return [q for q in itertools.chain(*itertools.zip_longest(*lists)) if q is not None][:count]


def training_questions(args) -> list:
    """--num-prompts questions interleaved over the datasets, each dataset's first --skip left out."""
    return _questions(args, args.skip, args.num_prompts)


def held_out_questions(args) -> list:
    """--eval-prompts questions no training step sees: the skipped ones (what benchmarks run on), else
    each dataset's questions from --num-prompts on; of --eval-dataset when given."""
    if args.eval_dataset:  # e.g. reasoning questions, while this run's own data are arithmetic
        args = argparse.Namespace(**{**vars(args), "dataset": args.eval_dataset})
    if args.skip:
        return _questions(args, 0, args.eval_prompts, stop=args.skip)
    return _questions(args, args.num_prompts, args.eval_prompts)  # no dataset gave training more than that


def check_question_count(args) -> list:
    """The training questions, refused when the datasets hold fewer than --num-prompts past --skip (the
    data would silently be smaller than asked, and its last shard empty)."""
    questions = training_questions(args)
    if len(questions) < args.num_prompts:
        raise ValueError(f"--num-prompts {args.num_prompts} but --dataset {args.dataset!r} holds only "
                         f"{len(questions)} questions past --skip {args.skip}: pass --num-prompts "
                         f"{len(questions)} or less, add a dataset, or raise --samples-per-prompt for more data")
    return questions


def data_spec(args, layers: tuple[int, ...]) -> distill_data.DataSpec:
    return distill_data.DataSpec(
        model=args.model, dataset=args.dataset, skip=args.skip, num_prompts=args.num_prompts,
        samples_per_prompt=args.samples_per_prompt, temperature=args.temperature, seq_len=args.seq_len,
        shard_size=args.shard_size, seed=args.seed, feature_layers=layers, store_features=args.features == "disk",
        sample_matmul_dtype=args.sample_matmul_dtype)


def build_data(model, args, folder: Path, layers: tuple[int, ...] = (), after_shard=None,
               questions: list | None = None) -> distill_data.ArrayData:
    """The self-distillation data of `args` in folder/data: the shards not there yet are generated
    (`questions`: `check_question_count(args)` when the caller has it already), the answers by a bf16-matmul
    copy of the model under --sample-matmul-dtype, loaded only when a shard is missing."""
    import specjax

    questions = check_question_count(args) if questions is None else questions
    spec = data_spec(args, layers)
    low = spec.sample_matmul_dtype
    make_sampler = None if low is None else lambda: specjax.load(args.model, matmul_dtype=low)
    return distill_data.build_shards(model, spec, questions, folder / "data", log=distill_data.progress,
                                     after_shard=after_shard, make_sampler=make_sampler)


# ---------------------------------------------------------------- training


def make_optimizer(args):
    import optax

    warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def medusa_targets(labels: np.ndarray, mask: np.ndarray, pos: np.ndarray, num_heads: int):
    """For positions pos [B, P] of rows with labels [B, L] (the target's greedy next token at each
    position): head i's target, the token at t+2+i [B, P, K], and whether that token exists (inside the
    sequence, not padding)."""
    length = labels.shape[1]
    idx = pos[:, :, None] + 2 + np.arange(num_heads)  # head i predicts t + 2 + i ...
    inside = idx < length
    idx = np.minimum(idx, length - 1)
    rows = np.arange(len(labels))[:, None, None]
    valid = inside & mask[rows, idx] & np.take_along_axis(mask, pos, axis=1)[:, :, None]
    return labels[rows, idx - 1], valid  # ... which the target predicted at t + 1 + i


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


def batch_features(data: distill_data.ArrayData, model, layers: tuple[int, ...]) -> Callable:
    """rows' arrays -> their target features float32: the stored ones, or (data built with --features
    recompute) a target forward over the rows' tokens."""
    import jax.numpy as jnp

    if data.take(np.zeros(1, np.int64))["features"] is not None:
        return lambda arrays: jnp.asarray(arrays["features"], jnp.float32)
    run = distill_data.feature_fn(model, layers)
    return lambda arrays: run(model.params, jnp.asarray(arrays["tokens"]))[0].astype(jnp.float32)


def medusa_task(args, model, data: distill_data.ArrayData, warm: tuple[str, dict, dict] | None = None) -> HeadTask:
    import jax
    import jax.numpy as jnp

    from specjax.heads.medusa import MedusaHeads

    heads = MedusaHeads(args.num_heads, model.config.hidden_size)
    params = heads.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, model.config.hidden_size)))["params"]
    if warm is not None:
        params = _warm_params(params, warm[2], warm[0])
    features = batch_features(data, model, ())

    def batch(step):
        rows, pos = batch_at(step, args.seed, data.num_rows, args.batch_size, data.seq_len, args.positions)
        arrays = data.take(rows)
        target, valid = medusa_targets(arrays["labels"], arrays["mask"], pos, args.num_heads)
        h = jnp.take_along_axis(features(arrays), jnp.asarray(pos)[:, :, None], axis=1)
        return h, jnp.asarray(target), jnp.asarray(valid)

    return HeadTask(params=params, loss=lambda p, lm_head, b: medusa_loss(p, heads, lm_head, *b),
                    consts=model.params["lm_head"], batch=batch, metric="top1_per_head",
                    config={"num_heads": args.num_heads}, extra={})


def eagle_loss(params, module, consts, features, tokens, mask, labels, anchors, steps: int):
    """Mean CE over the unrolled steps (step s weighted 0.8^(s-1), as EAGLE-3) of the head's
    draft-vocabulary logits at `anchors` against the target's greedy choice of x_{anchor+s+1} (`labels`
    at anchor+s); tokens outside the draft vocabulary and padding are left out. Also per-step top-1
    accuracy."""
    import jax.numpy as jnp
    import optax

    from specjax.heads.eagle import unroll

    logits = unroll(module, params, consts["target"], features, tokens, anchors, steps, consts["lm_draft"])
    length = tokens.shape[1]
    idx = anchors[None] + 2 + jnp.arange(steps)[:, None, None]  # [S, B, P]
    inside = idx < length
    idx = jnp.minimum(idx, length - 1)
    gather = lambda x: jnp.take_along_axis(jnp.broadcast_to(x[None], (steps,) + x.shape), idx, axis=2)
    target = consts["t2d"][gather(jnp.concatenate([labels[:, :1], labels[:, :-1]], axis=1))]  # labels at idx - 1
    valid = inside & gather(mask) & jnp.take_along_axis(mask, anchors, axis=1)[None] & (target >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(target, 0))
    weight = valid.astype(jnp.float32) * (0.8 ** jnp.arange(steps))[:, None, None]
    loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    hit = ((jnp.argmax(logits, axis=-1) == target) & valid).astype(jnp.float32)
    acc = jnp.sum(hit, axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)
    return loss, acc


def eagle_task(args, model, data: distill_data.ArrayData, warm: tuple[str, dict, dict] | None = None) -> HeadTask:
    import jax
    import jax.numpy as jnp

    from specjax.heads.eagle import EagleHead, draft_vocab, feature_layers, head_config, init_head

    cfg = model.config
    params = init_head(model, jax.random.PRNGKey(args.seed))
    if warm is None:
        ids = draft_vocab(data.token_counts(cfg.vocab_size), args.draft_vocab or DRAFT_VOCAB)
    else:  # the head's own vocabulary: its LM-head rows stand for those ids
        loaded = dict(warm[2])
        ids = np.asarray(loaded.pop("draft_vocab"), np.int32)
        params = _warm_params(params, loaded, warm[0])
    t2d = np.full(cfg.vocab_size, -1, np.int32)
    t2d[ids] = np.arange(len(ids))
    module = EagleHead(head_config(cfg))
    consts = {"lm_draft": jnp.take(model.params["lm_head"], jnp.asarray(ids), axis=1), "t2d": jnp.asarray(t2d),
              "target": {k: model.params[k] for k in ("lm_head", "embed") if k in model.params}}
    layers = feature_layers(cfg.num_layers)
    features = batch_features(data, model, layers)

    def batch(step):
        rows, pos = batch_at(step, args.seed, data.num_rows, args.batch_size, data.seq_len - 2, args.positions)
        arrays = data.take(rows)
        return (features(arrays), jnp.asarray(arrays["tokens"]), jnp.asarray(arrays["mask"]),
                jnp.asarray(arrays["labels"]), jnp.asarray(pos, jnp.int32))

    loss = lambda p, c, b: eagle_loss(p, module, c, *b, steps=args.ttt_steps)
    return HeadTask(params=params, loss=loss, consts=consts, batch=batch,
                    metric="top1_per_step",
                    config={"draft_vocab_size": len(ids), "feature_layers": list(layers),
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


def elapsed_at(metrics_path: Path, step: int) -> float:
    """Training seconds (evaluations and checkpoints included) up to `step` of earlier runs of this
    folder, from its step record (0 without one): a resumed run's `elapsed_s` goes on from there."""
    if step == 0 or not metrics_path.is_file():
        return 0.0
    for line in reversed(metrics_path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step") == step and "elapsed_s" in record:
            return float(record["elapsed_s"])
    return 0.0


def train(args, task: HeadTask, folder: Path, log=print,
          on_eval: Callable[[int, Any], dict] | None = None) -> tuple[Any, list[dict]]:
    """Runs (or resumes) the optimisation; `on_eval(step, params)` every --eval-every steps gives the
    learning-curve record of that step (run before the step's checkpoint, so a kill never skips one)."""
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
    began = time.perf_counter() - elapsed_at(folder / "metrics.jsonl", start)
    metrics = (folder / "metrics.jsonl").open("a")
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(f"train {args.head}", total=args.steps, completed=start, info="")
        for step in range(start, args.steps):
            state, loss, acc = train_step(state, task.consts, task.batch(step))
            record = {"step": step + 1, "loss": float(loss), task.metric: [round(float(a), 4) for a in acc],
                      "elapsed_s": round(time.perf_counter() - began, 2)}
            history.append(record)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            progress.update(bar, advance=1, info=f"loss {record['loss']:.3f} top1 {record[task.metric]}")
            every = getattr(args, "eval_every", 0)
            if on_eval is not None and every and (step + 1) % every == 0 and step + 1 < args.steps:
                metrics.write(json.dumps({"step": step + 1, "eval": on_eval(step + 1, state["params"])}) + "\n")
                metrics.flush()
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


def check_args(args) -> tuple[str, dict, dict] | None:
    """Every flag, the datasets' files and the output folder, before the model loads and data is generated
    (tens of seconds that a bad --out would waste). Returns the --init-head, loaded while checking it."""
    from eval import cli
    from specjax import validation

    if args.head not in HEADS:
        raise ValueError(f"--head {args.head!r} is not available; use one of {', '.join(HEADS)}")
    cli.check_ints(args, 1, "steps", "batch_size", "num_heads", "save_every", "keep", "num_prompts", "positions",
                   "ttt_steps", "draft_vocab", "samples_per_prompt", "shard_size", "eval_tokens", "stop_after")
    cli.check_ints(args, 0, "skip", "eval_prompts", "eval_every", "warmup", "seed")
    validation.number("--temperature", args.temperature, min=0)
    if args.samples_per_prompt > 1 and args.temperature == 0:
        raise ValueError(f"--samples-per-prompt {args.samples_per_prompt} at --temperature 0 gives identical "
                         "answers: pass --temperature > 0 (e.g. 0.7), or --samples-per-prompt 1")
    eval_tree(args)
    if args.seq_len < 8:
        raise ValueError(f"--seq-len must be >= 8, got {args.seq_len}")
    validation.number("--lr", args.lr, gt=0)
    for flag, value in (("--dataset", args.dataset), ("--eval-dataset", args.eval_dataset or args.dataset)):
        names = value.split(",")
        if not all(n.strip() for n in names):
            raise ValueError(f"{flag} {value!r} has an empty name: pass names or paths, comma-separated")
        for name in names:  # a path that is not there fails now, not after the model has loaded
            path = Path(name).expanduser()
            if (path.suffix in (".jsonl", ".json") or name.startswith((".", "/", "~"))) and not path.is_file():
                raise ValueError(f"{flag} file {name!r} not found; pass a JSONL path, a built-in name (arith, "
                                 "spectts) or a Hugging Face dataset id")
    cli.output_dir(args.out, "--out")
    warm = warm_start(args)
    for folder in args.extra_data:  # the target layers are checked once the model has loaded
        distill_data.extra_data(Path(folder), data_spec(args, None))
    return warm


def eval_tree(args) -> dict[str, int]:
    """--eval-tree 'total,depth,topk' as eagle options, checked."""
    try:
        total, depth, topk = (int(v) for v in args.eval_tree.split(","))
    except ValueError:
        raise ValueError(f"--eval-tree {args.eval_tree!r} must be three integers total,depth,topk, "
                         "e.g. 16,5,3") from None
    from specjax.proposers.eagle import Eagle

    Eagle(total=total, depth=depth, topk=topk)  # a tree that cannot be built fails here, not after the training
    return {"total": total, "depth": depth, "topk": topk}


def eval_configs(args) -> dict[str, dict]:
    """The drafting shapes the evaluations measure: EAGLE as a chain --ttt-steps deep (as trained) and as
    --eval-tree; Medusa with its trained heads."""
    if args.head == "eagle":
        return {"chain": {"topk": 1, "depth": args.ttt_steps}, "tree": eval_tree(args)}
    return {"heads": {}}


def warm_start(args) -> tuple[str, dict, dict] | None:
    """(folder, config, params) of --init-head, checked against the other flags before the model loads, or
    None for a fresh head."""
    if not args.init_head:
        return None
    from specjax.heads.io import default_head, load_head

    folder = args.init_head
    if folder == "default":
        folder = default_head(Path(args.model).name if Path(args.model).is_dir() else args.model, args.head)
        if not folder:
            raise ValueError(f"--init-head default: no {args.head} head ships for {args.model!r}; pass a head "
                             "folder, or leave --init-head out to train a fresh head")
    config, params = load_head(folder, kind=args.head)  # a missing folder or another kind of head fails here
    if args.head == "medusa" and config["num_heads"] != args.num_heads:
        raise ValueError(f"--init-head {folder} has {config['num_heads']} Medusa heads: pass --num-heads "
                         f"{config['num_heads']}")
    if args.head == "eagle" and args.draft_vocab not in (None, config["draft_vocab_size"]):
        raise ValueError(f"--init-head {folder} drafts from {config['draft_vocab_size']} tokens: pass --draft-vocab "
                         f"{config['draft_vocab_size']} or leave it out (the head keeps its vocabulary)")
    return str(folder), config, params


def _warm_params(fresh, loaded, folder: str):
    """The loaded head's weights as float32 arrays shaped like a fresh head's, or an error naming the head."""
    import jax
    import jax.numpy as jnp

    shapes = lambda tree: {jax.tree_util.keystr(k, simple=True, separator="/"): np.shape(a)
                           for k, a in jax.tree_util.tree_leaves_with_path(tree)}
    if shapes(fresh) != shapes(loaded):
        raise ValueError(f"--init-head {folder} does not fit this model and head (its weights are shaped "
                         f"differently): pass a head trained for this --model, or leave --init-head out")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dict(loaded))


def _main(args) -> int:
    import jax

    import specjax
    from specjax.heads.io import save_head

    warm = check_args(args)
    folder = Path(args.out)
    distill_data.read_manifest(folder / "data")  # unreadable folders fail before the model loads
    questions = check_question_count(args)  # before the model loads: a count that cannot be met fails now
    model = specjax.load(args.model)
    t0 = time.perf_counter()
    layers = ()
    if args.head == "eagle":
        from specjax.heads.eagle import feature_layers

        layers = feature_layers(model.config.num_layers)
    data = build_data(model, args, folder, layers, questions=questions)
    if args.extra_data:
        spec = data_spec(args, layers)
        data = distill_data.ConcatData([data] + [distill_data.extra_data(Path(d), spec) for d in args.extra_data])
    print(f"data: {data.num_rows} sequences, {data.num_tokens} tokens ({time.perf_counter() - t0:.1f}s)")
    task = (eagle_task if args.head == "eagle" else medusa_task)(args, model, data, warm)
    config = {"kind": args.head, "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
              "target": args.model, "steps": args.steps, "dataset": args.dataset, "data_tokens": data.num_tokens,
              "extra_data": [{**{k: part.key[k] for k in ("dataset", "skip", "samples_per_prompt", "temperature")},
                              "tokens": part.num_tokens} for part in data.parts[1:]] if args.extra_data else [],
              **task.config}
    if warm is not None:  # what the head had learnt before this run
        config["init_head"] = {"path": args.init_head,  # as given: 'default' names the shipped head
                               **{k: warm[1].get(k) for k in ("steps", "data_tokens", "init_head")}}
    export = lambda where, params, **extra: save_head(where, {**config, **extra},
                                                      {**jax.tree.map(np.asarray, dict(params)), **task.extra})
    prompts = [q.question for q in held_out_questions(args)] if args.eval_prompts else []
    evaluator = Evaluator(model, args, prompts) if prompts else None

    def on_eval(step, params):
        export(folder / "eval_head", params)
        record = {"tokens_seen": tokens_seen(args, step), **evaluator(folder / "eval_head")}
        plot_learning_curve(folder / "metrics.jsonl", folder / "learning_curve.png", extra=(step, record))
        return record

    params, history = train(args, task, folder, on_eval=on_eval if evaluator else None)
    if args.stop_after is not None and args.stop_after < args.steps:
        print(f"stopped after step {args.stop_after} of {args.steps}; rerun without --stop-after to resume")
        return 0
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, {task.metric.replace('_', ' ')} {last[task.metric]}")
    export(folder, params, final=history[-1] if history else None)
    print(f"head saved to {folder} ({(folder / 'head.safetensors').stat().st_size / 1e6:.1f} MB)")
    if evaluator is not None:
        record = {"step": args.steps, "eval": {"tokens_seen": tokens_seen(args, args.steps), **evaluator(folder)}}
        with (folder / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        plot_learning_curve(folder / "metrics.jsonl", folder / "learning_curve.png")
        figures = record["eval"]
        mats = ", ".join(f"{name} {v['mean_accepted_tokens']:.2f}" for name, v in figures["configs"].items())
        print(f"eval on {len(prompts)} held-out prompts: tokens per target forward {mats}; ar "
              f"{figures['ar_tokens_per_s']:.1f} tok/s; greedy output equals ar: {figures['equals_ar']}")
    return 0


def tokens_seen(args, step: int) -> int:
    """Training positions the loss has read after `step` steps (the learning curve's x axis)."""
    return step * args.batch_size * min(args.positions, args.seq_len)


class Evaluator:
    """The head at a folder through the real generate loop on held-out prompts, greedy, batch of all the
    prompts, fixed widths (the head's own acceptance, not the adaptive loop's choice): accepted tokens
    per target forward and tok/s for each of `eval_configs`, and whether the output equals `ar`'s."""

    def __init__(self, model, args, questions: list[str]):
        from specjax.tts.paradigms import first_round_prompt

        self.model, self.args = model, args
        self.prompts = [first_round_prompt(q) for q in questions]
        self.ar = None

    def run(self, method: str, **options):
        import specjax

        return specjax.generate(self.model, self.prompts, method, max_new_tokens=self.args.eval_tokens,
                                adaptive=False, **options)

    def __call__(self, head_dir: Path) -> dict[str, Any]:
        if self.ar is None:
            self.run("ar")  # warm-up: compile outside the timed call
            self.ar = self.run("ar")
        configs, equal = {}, True
        for name, options in eval_configs(self.args).items():
            out = self.run(self.args.head, head=str(head_dir), **options)
            equal &= out.tokens == self.ar.tokens
            configs[name] = {"mean_accepted_tokens": round(out.stats["mean_accepted_tokens"], 4),
                             "tokens_per_s": round(out.stats["tokens_per_s"], 2)}
        return {"configs": configs, "ar_tokens_per_s": round(self.ar.stats["tokens_per_s"], 2), "equals_ar": equal}


def learning_curve(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(tokens seen, accepted tokens per forward) per evaluated config, from metrics.jsonl's eval records."""
    curves: dict[str, list[tuple[int, float]]] = {}
    if not metrics_path.is_file():
        return curves
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for name, v in record.get("eval", {}).get("configs", {}).items():
            curves.setdefault(name, []).append((record["eval"]["tokens_seen"], v["mean_accepted_tokens"]))
    return curves


def plot_learning_curve(metrics_path: Path, png: Path, extra: tuple[int, dict] | None = None) -> None:
    """Accepted tokens per target forward against training tokens seen (`extra`: a record not yet in the file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = learning_curve(metrics_path)
    if extra is not None:
        for name, v in extra[1]["configs"].items():
            curves.setdefault(name, []).append((extra[1]["tokens_seen"], v["mean_accepted_tokens"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("training positions seen")
    ax.set_ylabel("accepted tokens per target forward")
    ax.set_title("draft head learning curve (held-out prompts, greedy)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
