"""Compile once per bucket: traced budgets and sampling values, shape buckets, the persistent cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.monitoring
import pytest

import specjax
from specjax import plan as plan_mod
from specjax.cache_folder import root

_COMPILES: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _COMPILES.append(secs) if name == "/jax/core/compile/backend_compile_duration" else None)


def test_buckets_are_fixed_and_capped():
    assert [plan_mod.bucket(n, 64) for n in (1, 64, 65, 96, 97, 129, 200, 300)] == [64, 64, 96, 96, 128, 192,
                                                                                       256, 384]
    assert plan_mod.bucket(5000, 256, 4096) == 4096
    assert {plan_mod.bucket(n, 256) for n in range(1, 2049)} == {256, 384, 512, 768, 1024, 1536, 2048}


def test_prompts_padded_alike_share_the_cache_bucket(tiny_model):
    """A run pads its prompts to its longest (`pad_prompts_to`, as `tts.paradigms` does): the cache bucket
    follows the padded length, so a 100-token and a 130-token prompt with 128 new tokens share one
    (sized for the real length they straddle 256 and compile each program twice)."""
    from specjax.proposers import make_proposer

    prop = make_proposer("pld", k=4)
    short, long = [[5] * 100], [[6] * 130]
    alone = [plan_mod.make_plan(tiny_model, p, prop, max_new_tokens=128) for p in (short, long)]
    assert [p.cache_len for p in alone] == [256, 384]
    padded = [plan_mod.make_plan(tiny_model, p, prop, max_new_tokens=128, pad_prompts_to=130) for p in (short, long)]
    assert [(p.cache_len, p.prompt_bucket) for p in padded] == [(384, 192)] * 2


@pytest.mark.parametrize("paradigm", ["single", "multi_round"])
def test_a_warm_up_sized_like_the_run_compiles_what_the_run_uses(tiny_chat_model, paradigm):
    """`eval.tts` warms a method up on one question sized like the whole run (`size_like`): the run over
    questions of other lengths then needs no program the warm-up did not load (none compiled, none read
    from the store's disk)."""
    from specjax import programs
    from specjax.tts import paradigms
    from specjax.tts.datasets import Question

    questions = [Question("a", "What is 2 + 3?", "5"),
                 Question("b", "A train leaves at noon and travels " + "very " * 40 + "far. When?", "1")]
    kw = dict(max_new_tokens=8, rounds=2)
    programs.free_all()  # nothing held from earlier tests: the warm-up alone loads what the run may use
    paradigms.run(tiny_chat_model, questions[:1], "pld", paradigm, size_like=questions, **kw)
    _COMPILES.clear()
    before = programs.counts()
    paradigms.run(tiny_chat_model, questions, "pld", paradigm, **kw)
    after = programs.counts()
    loaded = sum(after[k] - before[k] for k in ("compiled", "from_disk"))
    assert (_COMPILES, loaded) == ([], 0), f"{len(_COMPILES)} backend compiles, {loaded} programs loaded"


@pytest.mark.parametrize("method, adaptive", [("ar", False), ("pld", False), ("suffix", True)])
def test_no_compile_across_prompt_lengths_budgets_and_temperatures(tiny_model, method, adaptive):
    """After one warm-up per sampling switch, 3 prompt lengths x 3 budgets x 2 temperatures compile nothing."""
    prompts = [[5, 6, 7, 8, 5, 6] * 2, [9, 10, 11] * 5, [3, 4] * 10]  # 12, 15, 20 tokens: one prompt bucket
    for temperature, top_p in ((0.0, 1.0), (0.7, 1.0), (0.7, 0.9)):  # greedy / sampling / nucleus: static switches
        specjax.generate(tiny_model, [prompts[0]], method, max_new_tokens=8, temperature=temperature, top_p=top_p,
                         adaptive=adaptive)
    _COMPILES.clear()
    for p in prompts:
        for budget in (8, 16, 40):
            for temperature in (0.5, 1.3):
                out = specjax.generate(tiny_model, [p], method, max_new_tokens=budget, temperature=temperature,
                                       top_p=0.9 if temperature > 1 else 1.0, seed=budget, adaptive=adaptive)
                assert out.stats["generated_tokens"] <= budget
            specjax.generate(tiny_model, [p], method, max_new_tokens=budget, temperature=0.0, adaptive=adaptive)
    assert _COMPILES == [], f"{len(_COMPILES)} backend compiles after warm-up"


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_greedy_budget_is_a_prefix(tiny_model, method):
    """A traced budget cuts the same greedy sequence: 16 tokens are the first 16 of 40."""
    long = specjax.generate(tiny_model, [[5, 6, 7, 8] * 3], method, max_new_tokens=40, eos_token_ids=())
    short = specjax.generate(tiny_model, [[5, 6, 7, 8] * 3], method, max_new_tokens=16, eos_token_ids=())
    assert len(long.tokens[0]) == 40 and short.tokens[0] == long.tokens[0][:16]
    assert short.stats["cache_len"] == long.stats["cache_len"] == 256


def test_cache_folder_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path / "c"))
    assert root() == tmp_path / "c"
    monkeypatch.setenv("SPECJAX_CACHE_DIR", "none")
    assert root() is None


_CHILD = textwrap.dedent("""
    import sys, jax, jax.monitoring as mon
    hits, compiles = [], []
    mon.register_event_listener(lambda n, **k: hits.append(n) if n == "/jax/compilation_cache/cache_hits" else None)
    mon.register_event_duration_secs_listener(
        lambda n, s, **k: compiles.append(n) if n == "/jax/core/compile/backend_compile_duration" else None)
    import specjax
    from specjax import programs
    if sys.argv[1] == "load":  # a checkpoint folder: the load prefetches and warms last time's programs
        model = specjax.load(sys.argv[2], tokenizer=False)
    else:
        from specjax.config import ModelConfig
        from specjax.model import Model
        from specjax.models.transformer import init_params
        cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=512, eos_token_ids=(2,))
        model = Model(config=cfg, params=init_params(cfg, jax.random.PRNGKey(0)), tokenizer=None, name="t")
    hits.clear(); compiles.clear()
    out = specjax.generate(model, [[5, 6, 7]], "pld", max_new_tokens=6)
    # JAX times a disk-cache hit as a backend compile too: a real compile is an event without a hit
    c = programs.counts()
    print("HITS", len(hits), "COMPILES", len(compiles) - len(hits), "STORE", c["from_disk"], c["prefetched"],
          c["warmed"], "TOKENS", out.tokens[0])
""")


def _two_processes(env: dict, *args: str) -> tuple[list[str], list[str]]:
    runs = [subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    cold, warm = (r.stdout.split("HITS")[-1].split() for r in runs)
    assert cold[cold.index("TOKENS"):] == warm[warm.index("TOKENS"):]  # same tokens
    return cold, warm


def test_warm_cache_folder_serves_a_second_process(tmp_path):
    """The second process compiles nothing: prefill, start_proposer and decode come from the program
    store whole (no tracing), the step costs of the adaptive widths from step_costs.json."""
    env = {**os.environ, "SPECJAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    cold, warm = _two_processes(env, "built")
    assert int(cold[0]) == 0 and int(cold[2]) >= 3 and int(cold[4]) == 0
    assert int(warm[2]) == 0 and int(warm[4]) == 3  # prefill, start_proposer, decode: read from disk
    assert len(list((tmp_path / "cache" / "programs").glob("*.bin"))) >= 3


def test_load_prefetches_and_replays_the_call_it_ran_last(tmp_path, tiny_checkpoints):
    env = {**os.environ, "SPECJAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu", "SPECJAX_ADAPTIVE": "1"}
    cold, warm = _two_processes(env, "load", str(tiny_checkpoints["smollm2"][0]))
    assert int(cold[2]) >= 3 and cold[4:7] == ["0", "0", "0"]
    # load read all three back before the call and replayed the call on a dummy prompt: the prefill,
    # the proposer's start and one decode step per verify width
    from specjax.adaptive import loop_widths
    from specjax.proposers import make_proposer

    widths = len(loop_widths(make_proposer("pld")))
    assert int(warm[2]) == 0 and warm[4:7] == ["0", "3", str(2 + widths)]


def test_a_head_start_runs_only_stored_programs(tmp_path, monkeypatch, tiny_model):
    """Replaying a recipe whose programs the store lacks compiles nothing and leaves no trace."""
    from specjax import programs, warm_start

    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    recipe = warm_start.Recipe(method=make_proposer_named("pld"), temperature=0.0, top_k=0, top_p=1.0,
                               num_prompts=1, num_samples=1, prompt_bucket=64, cache_len=256, eos_ids=(2,),
                               speculate_max_rows=None, adaptive=True, programs=())
    programs.clear()  # nothing in memory either
    before = programs.counts()
    with pytest.raises(programs.NotStored), programs.stored_only():
        warm_start.replay(tiny_model, recipe)
    after = programs.counts()
    assert after["compiled"] == before["compiled"] and after["warmed"] == before["warmed"]
    assert not list(tmp_path.glob("programs/*.bin"))


def test_recipes_put_the_last_process_first_in_order_of_use(tmp_path, monkeypatch):
    from specjax import warm_start

    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    make = lambda method, n: warm_start.Recipe(
        method=make_proposer_named(method), temperature=0.0, top_k=0, top_p=1.0, num_prompts=n, num_samples=1,
        prompt_bucket=64, cache_len=256, eos_ids=(2,), speculate_max_rows=None, adaptive=True, programs=())
    monkeypatch.setattr(warm_start, "_this_process", {})
    for r in [make("pld", 1), make("suffix", 1), make("pld", 1), make("pld", 2)]:  # one process
        warm_start.record("owner", r)
    assert warm_start.recipes("owner") == [make("pld", 1), make("suffix", 1), make("pld", 2)]  # first use
    monkeypatch.setattr(warm_start, "_this_process", {})  # the next process goes first
    for n in (1, 2, 3):
        warm_start.record("owner", make("ar", n))
    kept = warm_start.recipes("owner")
    assert kept == [make("ar", 1), make("ar", 2), make("ar", 3), make("pld", 1)]
    assert len(kept) == warm_start.REMEMBERED and warm_start.recipes("other") == []
    (tmp_path / "programs" / "recipes.pkl").write_bytes(b"torn")
    assert warm_start.recipes("owner") == []  # a damaged file is ignored, then rewritten
    monkeypatch.setattr(warm_start, "_this_process", {})
    warm_start.record("owner", make("pld", 1))
    assert warm_start.recipes("owner") == [make("pld", 1)]


def make_proposer_named(method: str):
    from specjax.proposers import make_proposer

    return make_proposer(method)


def test_a_damaged_stored_program_is_compiled_again(tmp_path, monkeypatch):
    from specjax import programs

    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    fn = jax.jit(lambda x, *, k: x * k, static_argnames=("k",))
    args = (jax.numpy.arange(3.0),)
    assert programs.program_key(fn, args, {"k": 2}) != programs.program_key(fn, args, {"k": 3})
    assert programs.program_key(fn, (jax.numpy.arange(4.0),), {"k": 2}) != programs.program_key(fn, args, {"k": 2})
    key = programs.program_key(fn, args, {"k": 2})
    assert programs.call(fn, args, {"k": 2}).tolist() == [0.0, 2.0, 4.0]
    stored = tmp_path / "programs" / f"{key}.bin"
    assert stored.is_file()
    programs.clear()
    stored.write_bytes(b"not a program")
    before = programs.counts()["compiled"]
    assert programs.call(fn, args, {"k": 2}).tolist() == [0.0, 2.0, 4.0]
    # compiled again (XLA's own cache may answer; then the store does not keep it): never the damaged file
    assert programs.counts()["compiled"] == before + 1
    assert not stored.is_file() or stored.read_bytes() != b"not a program"


_SEVERAL_DEVICES = textwrap.dedent("""
    import jax
    from specjax import programs
    assert len(jax.devices()) == 2
    fn = jax.jit(lambda x, *, k: x * k, static_argnames=("k",))
    args = (jax.numpy.arange(3.0),)
    first = programs.call(fn, args, {"k": 2}).tolist()
    programs.clear()
    again = programs.call(fn, args, {"k": 2}).tolist()
    print("STORE", programs.counts()["from_disk"], first == again == [0.0, 2.0, 4.0])
""")


def test_a_stored_program_runs_on_a_host_with_several_devices(tmp_path):
    """A program read back from the store runs on the one device it was compiled for, not on every
    local device (a machine with several GPUs, or forced host devices, would reject the call)."""
    env = {**os.environ, "SPECJAX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    run = subprocess.run([sys.executable, "-c", _SEVERAL_DEVICES], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("STORE")[-1].split() == ["1", "True"]
