"""The compiled decode loop updates the KV cache in place: no step copies a whole cache buffer.

XLA:CPU copies a buffer that a step both reads (attention) and writes in place (the new entries) unless
its copy insertion runs region analysis (`specjax.xla_flags`); these tests read the compiled loop."""

from __future__ import annotations

import re

import numpy as np
import pytest

import specjax
from specjax import engine, programs, xla_flags


def _decode_hlo(model, method: str, batch: int, **opts) -> tuple[str, tuple[int, ...]]:
    """The optimised HLO of the decode loop a `generate` call runs, and the shape of a cache buffer."""
    with programs.capture(engine.decode) as seen:
        specjax.generate(model, [[5, 6, 7, 8, 9, 5, 6, 7]] * batch, method, max_new_tokens=8, **opts)
    return seen["hlo"], tuple(seen["args"][1].cache.k[0].shape)


@pytest.mark.parametrize("method, batch, opts", [("ar", 1, {}), ("ar", 4, {}), ("pld", 4, {"k": 4}),
                                                 ("suffix", 2, {"branches": 2, "k": 4}),
                                                 ("pld", 4, {"k": 8, "adaptive": True}),
                                                 ("suffix", 2, {"branches": 2, "k": 4, "adaptive": True})],
                         ids=["ar-b1", "ar-b4", "pld-b4", "suffix-tree", "pld-adaptive", "suffix-tree-adaptive"])
def test_decode_copies_no_cache_buffer(tiny_model, method, batch, opts):
    """Fixed widths (1 or 2 verify widths) and the adaptive loop (each width's branch a while loop that
    writes the cache it carries, a tree's sub-trees among them)."""
    assert xla_flags.in_force, "import specjax ran after a JAX backend started: the flags did not apply"
    hlo, cache = _decode_hlo(tiny_model, method, batch, **opts)
    shape = "f32[" + ",".join(map(str, cache)) + "]"
    copies = [line for line in hlo.splitlines() if re.search(rf"= {re.escape(shape)}\S* copy\(", line)]
    assert copies == [], f"{len(copies)} whole-buffer copies of the KV cache in the decode loop"


@pytest.mark.parametrize("opts", [{"adaptive": True}, {"adaptive": False, "speculate_max_rows": 0}],
                         ids=["adaptive", "never-proposing"])
def test_eagle_copies_neither_kv_cache(tiny_model, tmp_path_factory, opts):
    """The head's cache too: drafting writes nothing it throws away into the head cache, and the proposal
    and the lag's absorption run in loops run once or not at all, not conditionals (each had made XLA
    copy the head's cache: 6 copies a proposing step at batch 8, 2 more a catch-up). (The 20-position lag
    buffer, which a long wait shifts each step, may be copied: 1.1 MB at batch 8.)"""
    from conftest import save_random_eagle_head

    head = save_random_eagle_head(tiny_model, tmp_path_factory.mktemp("eagle_buffers"))
    with programs.capture(engine.decode) as seen:
        specjax.generate(tiny_model, [[5, 6, 7, 8, 9, 5, 6, 7]] * 4, "eagle", head=head, max_new_tokens=8, **opts)
    state = seen["args"][1]
    shapes = {tuple(state.cache.k[0].shape), tuple(state.proposer_state.cache.k[0].shape)}
    for shape in shapes:
        text = "f32[" + ",".join(map(str, shape)) + "]"
        copies = [line for line in seen["hlo"].splitlines() if re.search(rf"= {re.escape(text)}\S* copy\(", line)]
        assert copies == [], f"{len(copies)} whole-buffer copies of {text} in the eagle decode loop"


def test_flags_merge_with_the_users():
    assert xla_flags.merged("") == "--xla_cpu_copy_insertion_use_region_analysis=true"
    user = "--xla_force_host_platform_device_count=8 --xla_cpu_copy_insertion_use_region_analysis=false"
    assert xla_flags.merged(user) == user  # a flag the user set is theirs
    assert xla_flags.merged("--xla_force_host_platform_device_count=8").split() == [
        "--xla_force_host_platform_device_count=8", "--xla_cpu_copy_insertion_use_region_analysis=true"]


def test_cache_write_drops_slots_past_the_end():
    """New entry t of row b lands at slots[b, t]; those past the buffer are dropped, never clamped onto
    earlier slots."""
    import jax.numpy as jnp

    from specjax.models import cache as kv

    buf = jnp.zeros((2, 1, 6, 1))
    new = jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3, 1, 1)  # [B, T, KV, hd]
    out = np.asarray(kv.write(buf, new, jnp.array([[1, 2, 3], [4, 5, 6]])))[:, 0, :, 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 3, 0, 0], [0, 0, 0, 0, 4, 5]])
    # entries past the buffer (here slot S = 6) are dropped, the others written
    out = np.asarray(kv.write(buf, new, jnp.array([[2, 6, 6], [0, 1, 6]])))[:, 0, :, 0]
    np.testing.assert_array_equal(out, [[0, 0, 1, 0, 0, 0], [4, 5, 0, 0, 0, 0]])


@pytest.mark.parametrize("drafted, written", [(0, 1), (2, 3), (4, 5)])
def test_a_step_writes_only_the_rows_its_verify_ran(tiny_model, drafted, written):
    """A verify writes the rows its chosen width computed and no other (a 1-token step writes one row,
    not K+1): each width's branch writes its own rows, with nothing padded."""
    import jax
    import jax.numpy as jnp

    from specjax import engine, sampling
    from specjax.config import SamplingConfig
    from specjax.drafting import Draft
    from specjax.models.cache import KVCache

    cfg, k1 = tiny_model.config, 5
    sentinel = 7.0  # never a key or value of the random model
    cache = KVCache.init(cfg, 2, 32)
    cache = cache.replace(k=tuple(jnp.full_like(c, sentinel) for c in cache.k),
                          v=tuple(jnp.full_like(c, sentinel) for c in cache.v),
                          lengths=jnp.asarray([3, 10], jnp.int32))
    draft = Draft(tokens=jnp.full((2, k1 - 1), 5, jnp.int32), num=jnp.full((2,), drafted, jnp.int32))
    inputs = jnp.concatenate([jnp.full((2, 1), 6, jnp.int32), draft.tokens], axis=1)
    out = engine._verify(tiny_model.params, cfg, inputs, draft, None, cache, jnp.int32(drafted),
                         sampling.traced(SamplingConfig()), jax.random.PRNGKey(0), (1, 3, 5))[3]
    for buf in out.k + out.v:
        for row, start in enumerate((3, 10)):
            slots = np.asarray(buf[row, 0, :, 0])
            assert (slots[start:start + written] != sentinel).all()  # the rows the verify computed
            assert (slots[start + written:] == sentinel).all()  # nothing past them
            assert (slots[:start] == sentinel).all()
