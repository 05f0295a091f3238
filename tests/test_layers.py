"""The layering holds (no import runs back up), and a new method is one file: a toy proposer defined
here registers itself and runs through `generate` and `eval.tts` without a project file changing."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import jax.numpy as jnp
import pytest

import specjax
from specjax.drafting import Context, Draft, check_context, pending_tokens
from specjax.proposers import Proposer, bound, option_fields, register, registry

PACKAGE = Path(specjax.__file__).parent
# module (or package) -> what it must never import: the layers above it
LOWER = {
    "specjax.drafting": ("specjax",),  # the leaf: nothing of specjax at all
    "specjax.verify": ("specjax.proposers", "specjax.engine", "specjax.tts", "eval", "specjax.plan"),
    "specjax.sampling": ("specjax.proposers", "specjax.engine", "specjax.tts", "eval", "specjax.verify"),
    "specjax.models": ("specjax.proposers", "specjax.engine", "specjax.tts", "eval", "specjax.verify"),
    "specjax.proposers": ("specjax.engine", "specjax.tts", "eval"),
    "specjax.adaptive": ("specjax.engine", "specjax.tts", "eval", "specjax.plan"),  # called by the loop
    "specjax.engine": ("specjax.tts", "eval"),
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


@pytest.mark.parametrize("layer", sorted(LOWER))
def test_no_import_runs_up_the_layers(layer):
    files = [p for p in PACKAGE.rglob("*.py") if _module_name(p) == layer or _module_name(p).startswith(layer + ".")]
    assert files, layer
    bad = []
    for path in files:
        for mod in _imports(path):
            if layer == "specjax.drafting":
                if mod == "specjax" or mod.startswith("specjax."):
                    bad.append((path.name, mod))
            elif any(mod == up or mod.startswith(up + ".") for up in LOWER[layer]):
                bad.append((path.name, mod))
    assert not bad, f"{layer} imports a higher layer: {bad}"


@dataclasses.dataclass(frozen=True)
class RepeatLast(Proposer):
    """Drafts the pending token k times: right exactly where the text repeats one token."""

    sources: ClassVar[tuple[str, ...]] = ("repeat",)
    k: int = 3
    vocab: int = bound(0)

    def bind(self, model, sampling_mode):
        return dataclasses.replace(self, vocab=model.config.vocab_size), None

    def propose(self, state, ctx: Context, rng):
        batch = check_context(ctx)
        tokens = jnp.broadcast_to(pending_tokens(ctx)[:, None], (batch, self.k))
        return state, Draft(tokens=tokens, num=jnp.where(ctx.active, self.k, 0).astype(jnp.int32))


@pytest.fixture
def toy():
    """Registers the toy for one test (other tests' `--method all` must not see it)."""
    from specjax.proposers import base

    register("toy_repeat")(RepeatLast)
    yield RepeatLast
    base._REGISTRY.pop("toy_repeat")


def test_a_toy_proposer_registers_and_runs_through_generate(toy, tiny_model):
    assert "toy_repeat" in registry() and set(option_fields(RepeatLast)) == {"k"}  # vocab is bound
    prompt = [[5, 6, 7, 8, 9, 10, 11, 12]]
    ar = specjax.generate(tiny_model, prompt, "ar", max_new_tokens=24, eos_token_ids=())
    toy = specjax.generate(tiny_model, prompt, "toy_repeat", max_new_tokens=24, eos_token_ids=(), k=2)
    assert toy.tokens == ar.tokens  # lossless, whatever it drafts
    assert toy.stats["method"] == "toy_repeat" and toy.stats["draft_k"] == 2
    with pytest.raises(ValueError, match="does not take option"):
        specjax.generate(tiny_model, prompt, "toy_repeat", vocab=3)
    with pytest.raises(ValueError, match="already registered"):
        register("pld")(RepeatLast)


def test_a_toy_proposer_runs_through_eval_tts(toy, tiny_chat_checkpoint, tmp_path):
    from eval import tts

    out = tmp_path / "toy.json"
    assert tts.main(["--model", str(tiny_chat_checkpoint), "--method", "toy_repeat", "--dataset", "arith",
                     "--limit", "1", "--max-new-tokens", "8", "--option", "k=2", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"]["method"] == "toy_repeat" and res["summary"]["outputs_equal_ar"] == 1.0


@pytest.mark.parametrize("preset", sorted(p.stem for p in (PACKAGE.parent / "configs").glob("*.toml")))
def test_config_presets_load_and_run(preset, tiny_chat_checkpoint, tmp_path):
    """Every shipped preset parses into eval.tts flags and runs (shrunk: tiny model, arith, 1 question)."""
    from eval import tts

    args = tts.parse_args(["--config", preset])
    assert args.config == preset and args.dataset in ("arith", "spectts")
    methods = "ar" if args.method == "all" else args.method.split(",")[0]  # "all" is covered by test_tts
    out = tmp_path / "r.json"
    assert tts.main(["--config", preset, "--model", str(tiny_chat_checkpoint), "--dataset", "arith", "--limit", "1",
                     "--max-new-tokens", "4", "--n", "2", "--method", methods, "--output", str(out)]
                    + (["--option", "draft=self:1"] if methods == "hybrid" else [])) == 0
    assert json.loads(out.read_text())["config"]["paradigm"] == args.paradigm


def test_config_errors_name_the_fix(tmp_path, capsys):
    from eval import tts

    bad = tmp_path / "bad.toml"
    bad.write_text('max-new-token = 3\n')
    with pytest.raises(SystemExit):
        tts.parse_args(["--config", str(bad)])
    assert "unknown key 'max-new-token'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tts.parse_args(["--config", "nope"])
    assert "presets: best_of_n" in capsys.readouterr().err
    assert tts.parse_args(["--config", "smoke", "--limit", "5"]).limit == 5  # the command line wins
