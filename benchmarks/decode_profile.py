"""Where a plain decode step's time goes: a `jax.profiler` trace of the real decode loop, per op group.

`python -m benchmarks.decode_profile [--batch 1] [--new-tokens 128] [--method ar] [--temperature 0] [--top 0]
[--never-propose]`

Runs `specjax.generate` on the default model (float32, `eos_token_ids=()` so every step runs) once to
compile and once under `jax.profiler.trace` with XLA:CPU's per-op trace events on
(`--xla_cpu_enable_xprof_traceme`, set here before JAX starts), then sums each op's time per decode
step. Ops are named after the compiled decode loop's HLO (read from the same program), grouped by what
they compute: the matmuls by their output width (q/k/v, attention output and MLP down, gate/up, LM
head), attention over the cache, the cache write, whole-buffer copies, the rest. Profiling slows a step
by a few percent; the split, not the total, is the figure to read. `--temperature` profiles the sampled
loop (the verify's rejection sampling), `--top N` lists the N costliest ops by name after the groups.
`--never-propose` runs a drafting method that never drafts (`adaptive=False, speculate_max_rows=0`):
what the method adds to every step (its `update`, the features it keeps), its floor under `ar`'s.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a short story about a robot who learns to paint."


def op_shapes(hlo: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (result shape, opcode)} of an optimised HLO module's text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def group_of(name: str, shape: str, opcode: str, cfg, cache_shape: tuple[int, ...]) -> str:
    """The op group of one traced op, from its HLO result shape and opcode."""
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0].split("[", 1)[-1])] if "[" in shape else []
    if "Await" in name:
        return "thread-pool waits"
    if dims == list(cache_shape):
        return "whole KV-cache buffer copies" if opcode == "copy" else "KV-cache write"
    if "dynamic-update-slice" in name or "scatter" in name:
        return "KV-cache write"
    if opcode == "dot" or name.startswith("ynn_fusion"):
        if dims and dims[-1] in (cache_shape[2], cfg.head_dim):  # q.K over the slots, p.V per head
            return "attention over the cache (q.K, p.V)"
        return {cfg.qkv_size: "matmul q/k/v", cfg.hidden_size: "matmul attention out + MLP down",
                2 * cfg.intermediate_size: "matmul MLP gate/up",
                cfg.vocab_size: "matmul LM head"}.get(dims[-1] if dims else 0, "other dots")
    return "other fusions (norms, RoPE, softmax, sampling, bookkeeping)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--method", default="ar")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest ops by name")
    parser.add_argument("--never-propose", action="store_true",
                        help="the method never drafts: what it adds to every step")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

    import jax

    import specjax
    from specjax import engine, programs, xla_flags

    model = specjax.load(MODEL)
    prompts = [PROMPT] * args.batch
    never = dict(adaptive=False, speculate_max_rows=0) if args.never_propose else {}
    run = lambda: specjax.generate(model, prompts, args.method, max_new_tokens=args.new_tokens, eos_token_ids=(),
                                   temperature=args.temperature, **never)
    with programs.capture(engine.decode) as seen:
        run()
    cache_shape = tuple(seen["args"][1].cache.k[0].shape)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            out = run()
        trace = glob.glob(folder + "/**/*.trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(trace))["traceEvents"]
    shapes = op_shapes(seen["hlo"])
    steps = out.stats["decode_steps"]
    groups: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    per_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "end:")) or "Thunk" in name or "Pjit" in name or "PjRt" in name:
            continue
        shape, opcode = shapes.get(name, ("", ""))
        if not shape and "Await" not in name:
            continue  # host-side events (argument handling, the prefill's programs)
        g = groups[group_of(name, shape, opcode, model.config, cache_shape)]
        g[0] += e.get("dur", 0) / 1e3
        g[1] += 1
        per_op[name][0] += e.get("dur", 0) / 1e3
        per_op[name][1] += 1
    total = sum(g[0] for g in groups.values())
    wall_ms = 1e3 * out.stats["decode_s"] / steps
    never_note = " (never proposing)" if args.never_propose else ""
    print(f"{MODEL} float32, batch {args.batch}, method {args.method}{never_note}, temperature {args.temperature}, "
          f"cache {cache_shape} (B, KV heads, slots, head dim), jax {jax.__version__}; "
          f"XLA flags in force: {xla_flags.in_force}")
    print(f"{steps} decode steps, {wall_ms:.2f} ms per step under the profiler "
          f"({out.stats['decode_tokens_per_s']:.1f} tok/s); traced ops sum to {total / steps:.2f} ms per step\n")
    print(f"{'op group':<62}{'ms/step':>9}{'ops/step':>10}{'share':>8}")
    for key, (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"{key:<62}{ms / steps:>9.2f}{count / steps:>10.1f}{ms / total:>8.1%}")
    if args.top:
        print(f"\n{'op (HLO name, result shape)':<62}{'ms/step':>9}{'ops/step':>10}{'share':>8}")
        for name, (ms, count) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[: args.top]:
            label = f"{name} {shapes.get(name, ('', ''))[0]}"[:61]
            print(f"{label:<62}{ms / steps:>9.2f}{count / steps:>10.1f}{ms / total:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
