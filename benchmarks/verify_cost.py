"""What a verify forward of W tokens costs against a 1-token decode step, per weight precision.

`python -m benchmarks.verify_cost [--widths 1,2,4,8,16,32] [--batch-sizes 1,8] [--context 256] [--repeats 7]`

Speculation pays when verifying W tokens costs little more than decoding one; that holds on
accelerators, and on a CPU only if its matmuls stay memory-bound. For each precision (float32, and
float32 activations with bf16 matmul weights, `load(matmul_dtype="bfloat16")`) and each batch size
it times one jitted target forward of W tokens per row over a KV cache of --context tokens (median of
--repeats, after a compile call), in one process, and prints ms and the ratio to float32's 1-token step.
Where `load` chose to read the layer matrices as [out, in] from some number of rows on
(`specjax/models/weight_layout.py`), a "f32 [in,out]" row times the same weights read as [in, out] alone.
"""

from __future__ import annotations

import argparse
import dataclasses

from eval.cli import int_list


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--widths", default="1,2,4,8,16,32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    widths, batches = int_list(args.widths, "--widths"), int_list(args.batch_sizes, "--batch-sizes")
    widths = sorted(set(widths) | {1})  # the 1-token step is the yardstick

    import jax

    import specjax
    from eval.moe_sweep import forward_time
    from specjax.models import weight_layout

    f32 = specjax.load(args.model, tokenizer=False)
    models = {"float32": f32}
    if f32.config.transposed_from:  # the same weights read as [in, out] alone, for comparison
        models["f32 [in,out]"] = dataclasses.replace(
            f32, config=dataclasses.replace(f32.config, transposed_from=0), params=weight_layout.plain(f32.params))
    models["bf16 matmul"] = specjax.load(args.model, tokenizer=False, matmul_dtype="bfloat16")
    print(f"{args.model}, context {args.context}, jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"float32 reads layer matrices as [out, in] from {f32.config.transposed_from or 'no'} rows "
          f"(`{weight_layout.ENV}`)")
    print(f"{'precision':<13}{'batch':>6}{'width':>6}{'ms':>9}{'x f32 1-token':>15}")
    for b in batches:
        base = None
        for name, model in models.items():
            for w in widths:
                ms = 1e3 * forward_time(model.params, model.config, b, w, args.context, args.repeats)
                base = ms if base is None else base
                print(f"{name:<13}{b:>6}{w:>6}{ms:>9.1f}{ms / base:>14.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
