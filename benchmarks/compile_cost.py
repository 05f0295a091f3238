"""What compilation costs a user: backend compiles over a varied workload, and a warm process's first call.

`python -m benchmarks.compile_cost [--methods ar,suffix,hybrid,eagle] [--model ...]`

Per method, two fresh processes share one empty cache folder (`SPECJAX_CACHE_DIR`, a temporary one
unless --cache-dir is given). The cold process runs 9 `generate` calls (3 prompt lengths inside one
prompt bucket x 3 values of max_new_tokens) and counts the XLA compiles (`jax.monitoring` backend-compile
events that were not disk-cache hits) and their seconds. The warm process loads the model (its
seconds are printed: `load` reads the stored programs back and warms them meanwhile,
`specjax.programs`), makes the first of those calls and then the same call again: the ratio of the
two is the first-call overhead a user sees in a new process once the cache is warm. Figures depend on
the machine; the header prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
import jax.monitoring as mon
events = {"compile": [], "hit": 0}
def _dur(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
        events["compile"].append(secs)
def _ev(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        events["hit"] += 1
mon.register_event_duration_secs_listener(_dur)
mon.register_event_listener(_ev)
import specjax
cfg = json.loads(sys.argv[1])
t_load = time.perf_counter()
model = specjax.load(cfg["model"])
load_s = time.perf_counter() - t_load
question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
prompts = [question, question + "How many clips did she sell?", question + "How many clips did Natalia sell "
           "altogether in April and May? Think step by step."]
def call(prompt, budget):
    t0 = time.perf_counter()
    out = specjax.generate(model, [prompt], cfg["method"], max_new_tokens=budget)
    return time.perf_counter() - t0, out.stats["prompt_bucket"]
events["compile"].clear(); events["hit"] = 0
report = {}
if cfg["phase"] == "cold":
    t0 = time.perf_counter()
    buckets = {call(p, b)[1] for p in prompts for b in (32, 64, 96)}
    report.update(calls=9, seconds=time.perf_counter() - t0, buckets=sorted(buckets))
else:
    report["first_s"], _ = call(prompts[0], 64)
    report["steady_s"] = min(call(prompts[0], 64)[0] for _ in range(3))
report.update(compiles=len(events["compile"]) - events["hit"], hits=events["hit"],
              compile_s=sum(events["compile"]), load_s=load_s, programs=specjax.programs.counts())
print("REPORT " + json.dumps(report))
"""


def _child(model: str, method: str, phase: str, cache: str) -> dict:
    env = {**os.environ, "SPECJAX_CACHE_DIR": cache}
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps({"model": model, "method": method, "phase": phase})],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{method} ({phase}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.split("REPORT ", 1)[1])


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--methods", default="ar,suffix,hybrid,eagle")
    p.add_argument("--cache-dir", default=None, help="cache folder to fill (default: a new temporary one)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from specjax.proposers import registry

    unknown = [m for m in methods if m not in registry()]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; available: {', '.join(registry())}", file=sys.stderr)
        return 2
    print(f"{args.model} on {cpu_name()} ({os.cpu_count()} cores); 9 calls = 3 prompt lengths x max_new_tokens "
          "32/64/96")
    print(f"{'method':<8}{'cold: compiles':>15}{'compile s':>11}{'9 calls s':>11}{'warm: compiles':>16}"
          f"{'load s':>8}{'first call s':>14}{'steady s':>10}{'first/steady':>14}   warm process's programs")
    for method in methods:
        with tempfile.TemporaryDirectory() as tmp:
            cache = args.cache_dir or tmp
            cold = _child(args.model, method, "cold", cache)
            warm = _child(args.model, method, "warm", cache)
        print(f"{method:<8}{cold['compiles']:>15}{cold['compile_s']:>11.1f}{cold['seconds']:>11.1f}"
              f"{warm['compiles']:>16}{warm['load_s']:>8.1f}{warm['first_s']:>14.2f}{warm['steady_s']:>10.2f}"
              f"{warm['first_s'] / warm['steady_s']:>13.2f}x   "
              + ", ".join(f"{k} {v}" for k, v in warm["programs"].items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
