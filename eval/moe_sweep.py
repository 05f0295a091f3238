"""`python -m eval.moe_sweep`: where does speculative decoding pay for a sparse MoE target, and does
MoESD's model predict it? (arXiv 2505.19645)

    python -m eval.moe_sweep --model MOE_DIR --dense DENSE_DIR --batch-sizes 1,2,4,8,16,32,64 \
        --gamma 1,2,3,4 --alpha 0.8 --out results/moe_sweep
    python -m eval.moe_sweep --make-tiny checkpoints/synthetic   # writes a random MoE and a dense model
                                                               # of about the same active size

For each model and batch size B (prompts of --context random tokens per row, --new-tokens each):
  T_T(B, 1)        an AR decode step in the loop (decode time / steps of a plain `ar` run),
  T_T(B, gamma+1)  a speculative step verifying gamma drafts per row, in the same loop: the oracle
                   drafter at alpha = 0 (every draft rejected, so each step costs the full verify),
  T_D              the draft's forward per drafted token (--draft; self:L: the target's first L layers),
  alpha            the acceptance rate: the oracle drafter's (--alpha, a number: acceptance under
                   control on any weights; its drafts cost nothing, T_D = 0), or measured from the
                   real draft (--alpha draft, through sigma),
  speedup          measured: decode tokens/s of the speculative run over the AR run (greedy, equal
                   outputs checked); predicted: MoESD's sigma / (gamma T_D/T_T(B,1) + T_T(B,gamma+1)/T_T(B,1)),
                   with sigma taken for a static batch, which steps until its slowest row is done
                   (moesd.batch_tokens_per_step; the per-sequence sigma's prediction is in the JSON too),
plus the bare target forwards at 1 and gamma+1 tokens per row, on which the hardware terms of
T_T are fitted (specjax.analysis.moesd.StepTimeFit: a constant, bytes read with N(t) experts per
sparse layer, FLOPs) to give the roofline's prediction too. Prints a table; PNG plot and JSON go to
--out. CPU, GPU and TPU alike: nothing in it is device-specific.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np

from eval.cli import Parser, int_list


def parse_args(argv):
    p = Parser(prog="python -m eval.moe_sweep", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the sparse MoE target (anything specjax.load takes)")
    p.add_argument("--dense", default="", help="a dense target of similar active size, measured side by side")
    p.add_argument("--draft", default="self:1", help="draft model for T_D and --alpha draft (anything load takes, "
                   "or self:L)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--gamma", default="1,2,3,4", help="draft lengths")
    p.add_argument("--alpha", default="0.8", help="oracle acceptance rate, or 'draft' to measure the real draft's")
    p.add_argument("--context", type=int, default=64, help="prompt tokens per row (random ids)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per row for the measured speedup")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per forward and per generate run (median)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/moe_sweep")
    p.add_argument("--make-tiny", metavar="DIR", help="write a random MoE (DIR/moe) and dense (DIR/dense) model and "
                   "exit; --tiny-size picks their size")
    p.add_argument("--tiny-size", choices=("tiny", "small"), default="small")
    return p.parse_args(argv)


def make_tiny(folder: Path, size: str = "small", seed: int = 0) -> tuple[Path, Path]:
    """A random Qwen2-MoE-style model (E=16, K=2) and a dense Qwen2 whose MLP matches its active width."""
    import torch
    import transformers as tf

    d, layers, f = (64, 2, 32) if size == "tiny" else (256, 4, 256)
    common = dict(vocab_size=512, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
    configs = {"moe": tf.Qwen2MoeConfig(**common, intermediate_size=2 * f, moe_intermediate_size=f, num_experts=16,
                                        num_experts_per_tok=2, shared_expert_intermediate_size=f, norm_topk_prob=True),
               "dense": tf.Qwen2Config(**common, intermediate_size=3 * f)}  # active MLP: 2 experts + shared
    out = []
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder / name)
        out.append(folder / name)
    return out[0], out[1]


def interleaved_runs(runs: dict, repeats: int) -> dict:
    """Each run's output of median decode time among `repeats`, the runs taken round-robin (after one
    untimed compile run each) so that a slow spell of a shared machine falls on all of them alike."""
    for fn in runs.values():
        fn()
    outs = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            outs[key].append(fn())
    return {key: sorted(v, key=lambda o: o.stats["decode_s"])[len(v) // 2] for key, v in outs.items()}


def forward_time(params, cfg, batch: int, width: int, context: int, repeats: int, seed: int = 0) -> float:
    """Seconds of one forward of `width` tokens per row over a cache of `context` tokens per row."""
    import jax
    import jax.numpy as jnp

    from specjax.models import transformer
    from specjax.models.cache import KVCache

    rng = np.random.default_rng(seed)
    cache = KVCache.init(cfg, batch, context + width + 1, transformer.compute_dtype(params))
    cache = transformer.forward(params, cfg, jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, context))), cache,
                                cache_is_empty=True).cache.with_lengths(jnp.full((batch,), context, jnp.int32))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, width)), jnp.int32)
    run = jax.jit(partial(transformer.forward, cfg=cfg))
    from specjax.step_cost import timed_seconds

    return timed_seconds(lambda: run(params, tokens=tokens, cache=cache).logits, repeats, percentile=50)


def measure_model(name: str, args, log=print) -> dict:
    """Every (batch, gamma) row of one model; see the module docstring for what each figure is."""
    import specjax
    from specjax.analysis import moesd
    from specjax.analysis.oracle import Oracle
    from specjax.proposers.draft_model import resolve_draft

    model = specjax.load(name, dtype=args.dtype, tokenizer=False)
    cfg = model.config
    draft_cfg, draft_params, _ = resolve_draft(model, args.draft)
    batches, gammas = int_list(args.batch_sizes, "--batch-sizes"), int_list(args.gamma, "--gamma")
    rng = np.random.default_rng(args.seed)
    step_time = lambda out: out.stats["decode_s"] / max(out.stats["decode_steps"], 1)
    rows = []
    for b in batches:
        t1 = forward_time(model.params, cfg, b, 1, args.context, args.repeats)
        t_draft = forward_time(draft_params, draft_cfg, b, 1, args.context, args.repeats)
        prompts = [rng.integers(3, cfg.vocab_size, args.context).tolist() for _ in range(b)]
        gen = partial(specjax.generate, model, prompts, max_new_tokens=args.new_tokens, eos_token_ids=(), chat=False)

        # every run of this batch size (ar, and per gamma: all drafts rejected, and the oracle), timed
        # round-robin: loop steps last 2-3 ms on small models, the order of a shared machine's hiccups,
        # so drift must hit all of them alike; each keeps its run of median decode time
        reference = gen("ar").tokens  # what the oracles draft from
        configs = {"ar": ("ar", {})}
        for g in gammas:
            configs[("rejected", g)] = (Oracle.for_outputs(prompts, reference, alpha=0.0, k=g), {})
            configs[("spec", g)] = (("draft", {"k": g, "draft": args.draft}) if args.alpha == "draft" else
                                    (Oracle.for_outputs(prompts, reference, alpha=float(args.alpha), k=g), {}))
        runs = interleaved_runs({key: partial(gen, method, **opts) for key, (method, opts) in configs.items()},
                                args.repeats)
        ar = runs["ar"]
        for g in gammas:
            tg = forward_time(model.params, cfg, b, g + 1, args.context, args.repeats)
            verify_step = step_time(runs[("rejected", g)])  # the cost of one speculative step in the loop
            spec = runs[("spec", g)]
            # greedy equality with ar; a random router can hold an exact float32 tie (top-k gap ~1e-8),
            # which a forward of another width may round the other way: count, and say so, do not fail
            same = sum(x == y for x, y in zip(spec.tokens, ar.tokens)) / b
            if same < 1:
                log(f"warning: {Path(name).name} B={b} gamma={g}: {100 * (1 - same):.0f}% of rows differ from ar "
                    "(float32 ties in random routing flip with the forward's width; the oracle drafts ar's tokens)")
            acc = spec.stats["mean_accepted_tokens"]
            alpha = moesd.estimate_alpha(acc, g) if args.alpha == "draft" else float(args.alpha)
            t_d = t_draft if args.alpha == "draft" else 0.0  # the oracle drafts for free
            ar_step = step_time(ar)
            # the batch steps until its slowest row is done (the first token comes from the prefill)
            per_step = moesd.batch_tokens_per_step(alpha, g, b, args.new_tokens - 1, seed=args.seed)
            row = {"batch": b, "gamma": g, "t_forward_1_s": t1, "t_forward_g_s": tg, "t_ar_step_s": ar_step,
                   "t_verify_step_s": verify_step, "t_draft_s": t_draft, "alpha": alpha, "mean_accepted_tokens": acc,
                   "sigma": float(moesd.expected_tokens(alpha, g)),
                   "efficiency": float(moesd.target_efficiency(ar_step, verify_step)),
                   "forward_efficiency": float(moesd.target_efficiency(t1, tg)),
                   "batch_tokens_per_step": per_step,
                   "sigma_predicted_speedup": float(moesd.speedup(alpha, g, ar_step, verify_step, t_d)),
                   "predicted_speedup": float(moesd.speedup(alpha, g, ar_step, verify_step, t_d,
                                                            tokens_per_step=per_step)),
                   "measured_speedup": spec.stats["decode_tokens_per_s"] / ar.stats["decode_tokens_per_s"],
                   "draft_cost_s": t_d, "rows_equal_to_ar": same}
            row["error"] = row["predicted_speedup"] / row["measured_speedup"] - 1
            rows.append(row)
            log(f"{Path(name).name:<10} B={b:<3} gamma={g}  step(B,1)={1e3 * ar_step:7.2f} ms  "
                f"step(B,{g + 1})={1e3 * verify_step:7.2f} ms  eff={row['efficiency']:.2f}  alpha={alpha:.2f}  "
                f"predicted {row['predicted_speedup']:.2f}x  measured {row['measured_speedup']:.2f}x")
    profile = moesd.WeightProfile.of(cfg, bytes_per_param=2 if args.dtype in ("bfloat16", "float16") else 4)
    tokens = [r["batch"] for r in rows] + [r["batch"] * (r["gamma"] + 1) for r in rows]
    seconds = [r["t_forward_1_s"] for r in rows] + [r["t_forward_g_s"] for r in rows]
    fit = moesd.StepTimeFit.fit(profile, tokens, seconds)
    for r in rows:  # the roofline's view: forward times from the fitted hardware terms, plus the loop's own cost
        overhead = max(r["t_ar_step_s"] - r["t_forward_1_s"], 0.0)  # below 0 is timing noise, not a cost
        f1, fg = fit(r["batch"]) + overhead, fit(r["batch"] * (r["gamma"] + 1)) + overhead
        r["fit_efficiency"] = float(f1 / fg)
        r["fit_predicted_speedup"] = float(moesd.speedup(r["alpha"], r["gamma"], f1, fg, r["draft_cost_s"],
                                                         tokens_per_step=r["batch_tokens_per_step"]))
    return {"model": name, "moe": cfg.is_moe, "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
            "fit": {"c0_s": fit.c0, "c_bytes_s": fit.c_w, "c_flops_s": fit.c_f}, "rows": rows}


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    gammas = sorted({r["gamma"] for res in results for r in res["rows"]})
    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), squeeze=False)
    for col, res in enumerate(results):
        label = f"{Path(res['model']).name} ({'MoE' if res['moe'] else 'dense'})"
        for g in gammas:
            rows = [r for r in res["rows"] if r["gamma"] == g]
            b = [r["batch"] for r in rows]
            line = axes[0, col].plot(b, [r["measured_speedup"] for r in rows], "o-", label=f"measured, γ={g}")[0]
            axes[0, col].plot(b, [r["predicted_speedup"] for r in rows], "--", color=line.get_color(),
                              label=f"predicted, γ={g}")
            axes[1, col].plot(b, [r["efficiency"] for r in rows], "o-", color=line.get_color(),
                              label=f"measured, γ={g}")
            axes[1, col].plot(b, [r["fit_efficiency"] for r in rows], ":", color=line.get_color(),
                              label=f"roofline fit, γ={g}")
        for ax, title in ((axes[0, col], "speedup over AR"), (axes[1, col], "target efficiency T(B,1)/T(B,γ+1)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size B")
            ax.set_title(f"{label}: {title}")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "moe_sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    from eval import cli

    return cli.run(parse_args, _main, argv)


def _check_alpha(text: str) -> None:
    if text == "draft":
        return
    try:
        alpha = float(text)
    except ValueError:
        raise ValueError(f"--alpha takes a rate in [0, 1] or 'draft', got {text!r}") from None
    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise ValueError(f"--alpha takes a rate in [0, 1] or 'draft', got {text}")


def _main(args: argparse.Namespace) -> int:
    from eval import cli
    from specjax.models.loading import DTYPES

    cli.check_ints(args, 0, "seed")
    if args.make_tiny:
        moe_dir, dense_dir = make_tiny(cli.output_dir(args.make_tiny, "--make-tiny"), args.tiny_size, args.seed)
        print(f"wrote {moe_dir} and {dense_dir}")
        return 0
    if not args.model:
        raise ValueError("--model is required (or --make-tiny DIR to write synthetic models first)")
    int_list(args.batch_sizes, "--batch-sizes"), int_list(args.gamma, "--gamma")
    _check_alpha(args.alpha)
    cli.check_ints(args, 1, "context", "repeats")
    cli.check_ints(args, 2, "new_tokens")  # the first token comes from the prefill: the loop decodes the rest
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not available; use one of {', '.join(DTYPES)}")
    out = cli.output_dir(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    results = [measure_model(m, args) for m in (args.model, args.dense) if m]
    print(f"\n{'model':<12}{'B':>4}{'γ':>3}{'eff':>7}{'fit eff':>9}{'alpha':>7}{'pred':>8}{'fit pred':>10}"
          f"{'measured':>10}{'error':>8}")
    for res in results:
        for r in res["rows"]:
            print(f"{Path(res['model']).name[:11]:<12}{r['batch']:>4}{r['gamma']:>3}{r['efficiency']:>7.2f}"
                  f"{r['fit_efficiency']:>9.2f}{r['alpha']:>7.2f}{r['predicted_speedup']:>7.2f}x"
                  f"{r['fit_predicted_speedup']:>9.2f}x{r['measured_speedup']:>9.2f}x{100 * r['error']:>7.1f}%")
        worst = max(abs(r["error"]) for r in res["rows"])
        print(f"{Path(res['model']).name}: largest |predicted / measured - 1| = {100 * worst:.1f}%")
    (out / "moe_sweep.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    for path in plot(results, out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
