"""Plain decode speed of the default model: specjax vs transformers vs the memory-bandwidth bound.

`python -m benchmarks.decode_speed [--new-tokens 128] [--batch-sizes 1,8] [--repeats 1] [--skip-transformers]
[--json PATH]`

All figures come from one process, so that ratios are comparable on a noisy shared machine:
  * specjax AR decode tokens/s: `stats["decode_tokens_per_s"]` (prefill excluded) of the second, warmed-up
    call (`--repeats R`: the best of R calls after the first), with `eos_token_ids=()` so every row emits
    exactly `--new-tokens` tokens. "1st call +s" (compile time) is the first call's wall minus the second's.
  * transformers `generate` on the same GGUF weights in float32 (greedy, `min_new_tokens` forcing the
    length, left padding for batches), timed around `generate` only. Its decode rate is
    B*(N-1) / (wall(N tokens) - wall(1 token)), the prefill excluded as in specjax's figure.
  * the bandwidth bound: at batch 1 decode streams every weight once per token, so no implementation beats
    (read bandwidth) / (weight bytes). Weight bytes are the params pytree's bytes without an untied input
    embedding (a gather of B rows, not a stream; a tied table is read once, as lm_head). The bandwidth is
    measured here: the best of 10 jitted `jnp.sum` over a 512 MiB float32 array, at the start and at the end
    (numpy copy bandwidth, counting read + write bytes, is shown for reference). At batch B one weight stream
    yields B tokens, so the bound is B times higher, and on a CPU compute binds first. KV-cache reads are
    left out of the bound (a few MB per row here, against ~538 MB of weights).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works to a ten-year-old.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for a simple vegetable soup.",
    "Describe the water cycle in a few paragraphs.",
    "Why is the sky blue? Explain in detail.",
    "List some tips for learning a new language and explain each one.",
    "Write a letter to a friend about a trip to the mountains.",
]
MODEL = "smollm2-135m-instruct"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_bandwidth(mbytes: int = 512, repeats: int = 10) -> dict:
    n = mbytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()  # compile
    read_s = best_of(lambda: total(x).block_until_ready(), repeats)
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    np.copyto(dst, src)  # touch the pages
    copy_s = best_of(lambda: np.copyto(dst, src), repeats)
    del x
    return {"array_bytes": 4 * n, "jit_sum_read_GBps": 4 * n / read_s / 1e9,
            "numpy_copy_GBps": 2 * 4 * n / copy_s / 1e9}


def weight_bytes(params) -> int:
    """A step's weight bytes: a layer that holds a matrix in both layouts (`ModelConfig.transposed_from`)
    reads one of them."""
    streamed = {k: v for k, v in params.items() if k not in ("embed", "layers")}
    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(streamed))
    for lp in params.get("layers", ()):
        total += sum(leaf.nbytes for k, v in lp.items() if not (k.endswith("_t") and k[:-2] in lp)
                     for leaf in jax.tree_util.tree_leaves(v))
    return int(total)


def bench_specjax(model, batch: int, new_tokens: int, repeats: int) -> dict:
    import specjax

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    walls, runs = [], []
    for _ in range(1 + repeats):  # the first call compiles
        t0 = time.perf_counter()
        out = specjax.generate(model, prompts, "ar", max_new_tokens=new_tokens, temperature=0.0, eos_token_ids=())
        walls.append(time.perf_counter() - t0)
        runs.append(out.stats)
        assert all(len(r) == new_tokens for r in out.tokens), "a row stopped early"
    best = max(runs[1:], key=lambda st: st["decode_tokens_per_s"])
    return {"decode_tokens_per_s": best["decode_tokens_per_s"], "tokens_per_s": best["tokens_per_s"],
            "compile_s": walls[0] - min(walls[1:]), "first_wall_s": walls[0], "wall_s": min(walls[1:])}


def load_transformers():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specjax.models.loading import resolve

    transformers.utils.logging.disable_progress_bar()
    _, path = resolve(MODEL)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return hf, tok


def bench_transformers(hf, tok, batch: int, new_tokens: int, repeats: int) -> dict:
    import torch

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch)]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run(n: int) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = hf.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=tok.pad_token_id)
            wall = time.perf_counter() - t0
        assert out.shape[1] - enc["input_ids"].shape[1] == n
        return wall

    first = run(new_tokens)
    wall = min(run(new_tokens) for _ in range(repeats))
    prefill = min(run(1) for _ in range(3))
    return {"decode_tokens_per_s": batch * (new_tokens - 1) / (wall - prefill),
            "tokens_per_s": batch * new_tokens / wall, "compile_s": first - wall, "first_wall_s": first,
            "wall_s": wall, "prefill_s": prefill,
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first; the best one counts")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    import specjax

    bw = measure_bandwidth()
    model = specjax.load(MODEL, dtype="float32")
    wbytes = weight_bytes(model.params)
    hf = None if args.skip_transformers else load_transformers()
    rows = []
    for b in batches:
        rows.append({"impl": "specjax", "batch": b, **bench_specjax(model, b, args.new_tokens, args.repeats)})
        if not args.skip_transformers:
            hf_row = bench_transformers(*hf, b, args.new_tokens, args.repeats)
            rows.append({"impl": "transformers", "batch": b, **hf_row})
    later = measure_bandwidth()  # again at the end: the machine is shared, keep the best of both
    bw = {key: max(bw[key], later[key]) for key in bw}
    bound_1 = bw["jit_sum_read_GBps"] * 1e9 / wbytes
    for r in rows:
        r["bound_tokens_per_s"] = r["batch"] * bound_1
        r["fraction_of_bound"] = r["decode_tokens_per_s"] / r["bound_tokens_per_s"]

    print(f"model {MODEL} float32, {args.new_tokens} new tokens per row, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"weights streamed per decode step: {wbytes / 1e6:.1f} MB")
    print(f"bandwidth: jitted jnp.sum read {bw['jit_sum_read_GBps']:.1f} GB/s, "
          f"numpy copy {bw['numpy_copy_GBps']:.1f} GB/s (read+write; "
          f"best of 2x10 runs over {bw['array_bytes'] / 2**20:.0f} MiB)")
    print(f"bandwidth bound at batch 1: {bound_1:.1f} tok/s (jnp.sum read / weight bytes; batch B: B times that)\n")
    head = (f"{'impl':<13}{'batch':>6}{'decode tok/s':>14}{'e2e tok/s':>11}{'1st call +s':>13}"
            f"{'bound tok/s':>13}{'of bound':>10}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['impl']:<13}{r['batch']:>6}{r['decode_tokens_per_s']:>14.1f}{r['tokens_per_s']:>11.1f}"
              f"{r['compile_s']:>13.2f}{r['bound_tokens_per_s']:>13.1f}{r['fraction_of_bound']:>10.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "model": MODEL, "weight_bytes": wbytes, "bandwidth": bw,
                       "bound_tokens_per_s_batch1": bound_1, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
