"""Run by tests/test_sharding.py in a fresh process with 8 host devices (XLA_FLAGS must be set before
jax starts): every method's tokens under meshes (8,1), (2,4), (1,8) against one device, and the
shardings the rules promise. Prints one JSON line of findings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's helpers

import jax  # noqa: E402
from conftest import save_random_eagle_head  # noqa: E402

import specjax  # noqa: E402
from specjax import sharding  # noqa: E402
from specjax.datastore import build_datastore, save_datastore  # noqa: E402


def spec(array) -> list:
    """The array's PartitionSpec as a list with one entry (axis name or None) per dimension."""
    parts = [None if a is None else str(a) for a in array.sharding.spec]
    return parts + [None] * (array.ndim - len(parts))


def save_random_medusa_head(model, folder: Path) -> str:
    """Two random (not zero) Medusa heads for `model`, saved like trained ones."""
    import jax.numpy as jnp
    import numpy as np

    from specjax.heads.io import save_head
    from specjax.heads.medusa import MedusaHeads

    cfg = model.config
    params = MedusaHeads(2, cfg.hidden_size).init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.hidden_size)))["params"]
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
    save_head(folder, {"kind": "medusa", "num_heads": 2, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size},
              jax.tree.map(np.asarray, dict(params)), dtype="float32")
    return str(folder)


def main(checkpoint: str, head_dir: str, moe_checkpoint: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    single = specjax.load(checkpoint, tokenizer=False)
    head = save_random_eagle_head(single, Path(head_dir))
    medusa = save_random_medusa_head(single, Path(head_dir).parent / "medusa")
    methods = {"ar": {}, "pld": {"k": 4}, "suffix": {"k": 4}, "pool": {"k": 4}, "draft": {"draft": "self:1", "k": 3},
               "eagle": {"head": head}, "hybrid": {"head_path": head, "head_min_prob": 0.0}, "recycling": {"k": 3},
               "medusa": {"head": medusa}, "lookahead": {}, "pia": {}}
    # 8 rows of mixed lengths, with repeats so that n-gram drafts get accepted
    prompts = [[5 + (i * 7 + j) % 40 for j in range(3 + 2 * i)] * 2 for i in range(8)]
    store = Path(head_dir).parent / "datastore"
    save_datastore(build_datastore([p * 2 for p in prompts], vocab_size=single.config.vocab_size), store)
    methods["rest"] = {"datastore": str(store)}
    kw = dict(max_new_tokens=16, eos_token_ids=())
    ref = {m: specjax.generate(single, prompts, m, **kw, **o).tokens for m, o in methods.items()}
    found: dict = {"mismatch": [], "specs": {}}
    # every method on the mesh that splits both rows and weights; the pure data and pure model meshes with
    # a model-free drafter, a draft model and a head (each method compiles its own programs: ~5 s apiece)
    few = ("ar", "suffix", "draft", "eagle")
    for shape in ((8, 1), (2, 4), (1, 8)):
        mesh = sharding.make_mesh(*shape)
        model = specjax.load(checkpoint, tokenizer=False, mesh=mesh)
        assert model.mesh is mesh
        layer = model.params["layers"][0]
        for m, o in methods.items():
            if shape != (2, 4) and m not in few:
                continue
            out = specjax.generate(model, prompts, m, keep_session=True, **kw, **o)
            if out.tokens != ref[m]:
                found["mismatch"].append([list(shape), m])
        found["specs"][str(shape)] = {
            "wqkv": spec(layer["wqkv"]), "wo": spec(layer["wo"]),
            "w_gate_up": spec(layer["w_gate_up"]), "w_down": spec(layer["w_down"]),
            "lm_head": spec(model.params["lm_head"]), "attn_norm": spec(layer["attn_norm"]),
            "cache": spec(out.session.cache.k[0]), "tokens": spec(out.session.context.tokens),
            "shard_shape_wqkv": list(layer["wqkv"].addressable_shards[0].data.shape),
        }
    # a sparse MoE target over (data 2, model 2, expert 2): experts split over `expert`
    moe_single = specjax.load(moe_checkpoint, tokenizer=False)
    moe = specjax.load(moe_checkpoint, tokenizer=False, mesh=sharding.make_mesh(2, 2, 2))
    sparse = next(lp for lp in moe.params["layers"] if "we_gate_up" in lp)
    found["specs"]["moe"] = {"we_gate_up": spec(sparse["we_gate_up"]),
                             "we_down": spec(sparse["we_down"])}
    for m in ("ar", "suffix"):
        if specjax.generate(moe, prompts, m, **kw, **methods[m]).tokens != specjax.generate(
                moe_single, prompts, m, **kw, **methods[m]).tokens:
            found["mismatch"].append(["moe", m])
    print(json.dumps(found))


if __name__ == "__main__":
    main(*sys.argv[1:4])
