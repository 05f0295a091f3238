"""Self-distillation data for draft heads: the target's own answers, in resumable shards on disk.

A shard holds the answers to `shard_size` prompts (`samples_per_prompt` each) as .npy files: tokens,
mask, labels (the target's greedy next token at each position) and, when stored, the target features
a head trains on (float16). It is written into a temporary folder, renamed into place when complete
and then listed in `manifest.json`, so a kill loses at most the shard being written; a rerun continues
with the next one, and because each shard's sampling seed is a function of its index, the result
equals an uninterrupted run's. The data grow with the prompt count: a later run with more prompts
keeps the shards there and adds the rest. Training reads the shards memory-mapped (`ShardedData`), so
the data may exceed memory.

Labels are the target's own argmax at each position rather than the next token of the text: with
sampled answers (for diversity) the head still learns what greedy verification accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ARRAYS = ("tokens", "mask", "labels", "features")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the data are a function of: a folder built for another spec is refused, not mixed in."""

    model: str
    dataset: str
    skip: int
    num_prompts: int
    samples_per_prompt: int
    temperature: float
    seq_len: int
    shard_size: int  # prompts per shard
    seed: int
    # target layers fused (EAGLE); () = the final hidden state (Medusa); None: not known yet (`extra_data`)
    feature_layers: tuple[int, ...] | None
    store_features: bool  # False: training recomputes them from the tokens
    # the answers are sampled with this matmul precision (None: the model's own); labels and features
    # always come from the full-precision forward, so only which answers are drawn depends on it
    sample_matmul_dtype: str | None = None

    def key(self) -> dict[str, Any]:
        """Every field but num_prompts: shard i holds prompts [i * shard_size, (i + 1) * shard_size) of a
        fixed question order, so a run with more prompts extends the data and one with fewer reads a prefix.
        sample_matmul_dtype only when set, so folders written before it existed keep their key."""
        layers = None if self.feature_layers is None else list(self.feature_layers)
        key = {**dataclasses.asdict(self), "feature_layers": layers}
        del key["num_prompts"]
        if key["sample_matmul_dtype"] is None:
            del key["sample_matmul_dtype"]
        return key

    @property
    def num_shards(self) -> int:
        return -(-self.num_prompts // self.shard_size)

    def shard_prompts(self, shard: int) -> int:
        return min(self.shard_size, self.num_prompts - shard * self.shard_size)


def feature_fn(model, layers: tuple[int, ...]) -> Callable:
    """jitted (params, tokens [B, L]) -> (features [B, L, F], labels [B, L]): the target's final hidden
    states (layers=()) or its `layers` outputs concatenated, and its argmax next token per position."""
    import jax
    import jax.numpy as jnp

    from specjax.models import transformer

    def run(p, t):
        out = transformer.forward(p, model.config, t, hidden_layers=layers)
        feats = jnp.concatenate(out.layer_hidden, axis=-1) if layers else out.hidden
        return feats, jnp.argmax(out.logits, axis=-1).astype(jnp.int32)

    return jax.jit(run)


def target_outputs(model, tokens: np.ndarray, layers: tuple[int, ...], batch: int = 4,
                   run: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`feature_fn` over `tokens` in batches: features float16 [N, L, F] and labels int32 [N, L]."""
    run = run or feature_fn(model, layers)
    feats, labels = [], []
    for i in range(0, len(tokens), batch):
        f, lab = run(model.params, tokens[i : i + batch])
        feats.append(np.asarray(f, np.float16))
        labels.append(np.asarray(lab, np.int32))
    return np.concatenate(feats), np.concatenate(labels)


def encode_prompts(model, questions: Sequence[Any], seq_len: int) -> list[list[int]]:
    """Round-1 prompts through the chat template, each cut to its last seq_len / 2 tokens (room for at
    least as many generated ones)."""
    from specjax.tts.paradigms import first_round_prompt

    tok = model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": first_round_prompt(q.question)}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in questions]
    return [list(p[-(seq_len // 2):]) for p in prompts]


def generate_rows(model, prompts: list[list[int]], spec: DataSpec, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [R, seq_len] (prompt + answer, zero-padded) and mask for one shard's prompts: R =
    prompts x samples, prompt-major. Greedy at temperature 0; otherwise sampled with a seed of
    (spec.seed, shard), so a rerun of the shard gives the same rows."""
    import specjax

    budget = spec.seq_len - min(len(p) for p in prompts)
    out = specjax.generate(model, prompts, "ar", max_new_tokens=budget, temperature=spec.temperature,
                           seed=spec.seed * 100_003 + shard, num_samples=spec.samples_per_prompt)
    rows = [p + gen for p, gen in zip([p for p in prompts for _ in range(spec.samples_per_prompt)], out.tokens)]
    tokens = np.zeros((len(rows), spec.seq_len), np.int32)
    mask = np.zeros((len(rows), spec.seq_len), bool)
    for i, row in enumerate(rows):
        row = row[: spec.seq_len]
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = True
    return tokens, mask


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # atomic: a kill leaves the old manifest or the new one


def read_manifest(folder: Path, spec: DataSpec | None = None) -> dict[str, Any]:
    """The manifest of a data folder ({'key', 'shards'}); with `spec`, one for another spec is an error
    that names the fix."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"key": None, "shards": []}
    if spec is not None and manifest["key"] not in (None, spec.key()):
        theirs, ours = manifest["key"], spec.key()
        diff = ", ".join(f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                         if theirs.get(k) != ours.get(k))
        raise ValueError(f"{folder} holds data of other settings ({diff}): pass another --out, or delete "
                         f"{folder} to rebuild it")
    return manifest


def build_shards(model, spec: DataSpec, questions: Sequence[Any], folder: Path, log=print,
                 after_shard: Callable[[int], None] | None = None,
                 make_sampler: Callable[[], Any] | None = None) -> "ShardedData":
    """Generates the shards of `spec` not yet in `folder` (`after_shard(i)` runs after shard i is
    committed: progress, tests that kill the run) and returns the whole data set, memory-mapped.
    `make_sampler()`: the model the answers are generated with (the same weights at
    `spec.sample_matmul_dtype`; default `model`), called only when a shard is missing; labels and
    features always come from `model`."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder, spec)
    manifest["key"] = spec.key()
    done = 0  # shards already there with the prompts this spec puts in them (a short last one is redone)
    while (done < min(spec.num_shards, len(manifest["shards"]))
           and manifest["shards"][done].get("prompts") == spec.shard_prompts(done)):
        done += 1
    if done < spec.num_shards:  # the shards from `done` on are (re)generated
        manifest["shards"] = manifest["shards"][:done]
    for stale in folder.glob("*.partial"):  # the shard a kill interrupted
        shutil.rmtree(stale)
    if done < spec.num_shards:
        prompts = encode_prompts(model, questions, spec.seq_len)
        sampler = model if make_sampler is None else make_sampler()
        run = feature_fn(model, spec.feature_layers)
        t0 = time.perf_counter()
        for shard in range(done, spec.num_shards):
            chunk = prompts[shard * spec.shard_size : (shard + 1) * spec.shard_size]
            started = time.perf_counter()
            tokens, mask = generate_rows(sampler, chunk, spec, shard)
            sampled = time.perf_counter()
            feats, labels = target_outputs(model, tokens, spec.feature_layers, run=run)
            labelled = time.perf_counter()
            name = f"shard-{shard:05d}"
            tmp = folder / f"{name}.partial"
            tmp.mkdir()
            arrays = {"tokens": tokens, "mask": mask, "labels": labels}
            if spec.store_features:
                arrays["features"] = feats
            for key, value in arrays.items():
                np.save(tmp / f"{key}.npy", value)
            if (folder / name).exists():  # a short last shard of a smaller run, now regenerated in full
                shutil.rmtree(folder / name)
            os.replace(tmp, folder / name)
            manifest["shards"].append({"name": name, "prompts": len(chunk), "rows": len(tokens),
                                       "tokens": int(mask.sum()),  # seconds: where a recipe's time goes
                                       "sample_s": round(sampled - started, 2),
                                       "label_s": round(labelled - sampled, 2)})
            _write_json(folder / "manifest.json", manifest)
            total = sum(s["tokens"] for s in manifest["shards"])
            rate = sum(s["tokens"] for s in manifest["shards"][done:]) / (time.perf_counter() - t0)
            log(f"data: shard {shard + 1}/{spec.num_shards}, {total} tokens ({rate:.0f} tok/s)")
            if after_shard is not None:
                after_shard(shard)
    _write_json(folder / "manifest.json", manifest)
    return ShardedData(folder, spec.num_shards)


class ArrayData:
    """Training data in memory: rows of tokens, mask, labels [N, L] and features [N, L, F] (or None:
    recomputed per batch). `take(rows)` is what a training step reads."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, labels: np.ndarray, features: np.ndarray | None):
        self.tokens, self.mask, self.labels, self.features = tokens, mask, labels, features

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray | None]:
        return {k: None if getattr(self, k) is None else np.asarray(getattr(self, k)[rows]) for k in ARRAYS}

    def token_counts(self, vocab_size: int) -> np.ndarray:
        return np.bincount(self.tokens[self.mask].ravel(), minlength=vocab_size)


class ConcatData(ArrayData):
    """Several data sets as one: rows numbered across the parts in order, and `take` reads only the rows
    a batch needs from each part (a data folder's shards; `--extra-data`: a run's own shards and those
    another run generated, without generating them again)."""

    def __init__(self, parts: Sequence[ArrayData]):
        self.parts = list(parts)
        lens = {part.seq_len for part in self.parts}
        if len(lens) > 1:
            raise ValueError(f"data sets of different sequence lengths {sorted(lens)} cannot be mixed: "
                             "build them with the same --seq-len")
        self.starts = np.concatenate([[0], np.cumsum([part.num_rows for part in self.parts])])
        self.tokens = None  # there is no whole-data array: see take()

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def seq_len(self) -> int:
        return self.parts[0].seq_len

    @property
    def num_tokens(self) -> int:
        return sum(part.num_tokens for part in self.parts)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray | None]:
        rows = np.asarray(rows)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        pieces = [self.parts[i].take(rows[part == i] - self.starts[i]) for i in np.unique(part)]
        order = np.argsort(np.argsort(part, kind="stable"), kind="stable")  # back to the order of `rows`
        return {key: None if pieces[0][key] is None else np.concatenate([p[key] for p in pieces])[order]
                for key in ARRAYS}

    def token_counts(self, vocab_size: int) -> np.ndarray:
        return sum(part.token_counts(vocab_size) for part in self.parts)

    def in_memory(self) -> ArrayData:
        """Every part concatenated into one `ArrayData` (small data sets, tests)."""
        return ArrayData(**self.take(np.arange(self.num_rows)))


class ShardedData(ConcatData):
    """The shards of a data folder, memory-mapped, as one data set (`key`: the manifest's)."""

    def __init__(self, folder: Path, num_shards: int | None = None):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if not manifest["shards"]:
            raise ValueError(f"{self.folder} holds no data shards: run `python -m train.draft_head` to build them")
        self.key = manifest["key"]
        super().__init__([ArrayData(**{k: self._open(s["name"], k) for k in ARRAYS})
                          for s in manifest["shards"][:num_shards]])

    def _open(self, name: str, key: str) -> np.ndarray | None:
        path = self.folder / name / f"{key}.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None


def extra_data(folder: Path, spec: DataSpec) -> ShardedData:
    """Another run's data folder, refused unless a training step could read it beside `spec`'s: the same
    target model, sequence length and stored features (the same target layers; not checked while
    `spec.feature_layers` is None, before the model has loaded)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest["shards"]:
        raise ValueError(f"--extra-data {folder} holds no data shards: pass the data folder of a finished "
                         "run (its OUT/data)")
    theirs, ours = manifest["key"], spec.key()
    for field in ("model", "seq_len", "store_features", "feature_layers"):
        if ours[field] is not None and theirs.get(field) != ours[field]:
            raise ValueError(f"--extra-data {folder} was built with {field}={theirs.get(field)!r}, this run "
                             f"uses {ours[field]!r}: pass data built for the same model, --seq-len and --features")
    return ShardedData(folder)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
