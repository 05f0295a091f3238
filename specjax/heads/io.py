"""A trained head on disk: `head.json` (kind, shape, target) + `head.safetensors` (flat weights).

Small and framework-neutral, so a head ships inside the package or next to a checkpoint, and
`generate(..., head=DIR)` loads it without Orbax or the optimiser state (training checkpoints, with
the optimiser, live in DIR/checkpoints and are Orbax's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CONFIG, WEIGHTS = "head.json", "head.safetensors"
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "heads"  # heads trained for the embedded default


def default_head(model, kind: str) -> str:
    """The shipped head of `kind` for this model (or model name), matched by the name it was trained on, or ''."""
    folder = SHIPPED / f"{kind}-{model if isinstance(model, str) else model.name}"
    return str(folder) if (folder / CONFIG).is_file() else ""


def head_for(model, kind: str, path: str = "") -> tuple[str, dict[str, Any], Any]:
    """(folder, config, params) of the `kind` head at `path`, or of the one shipped for `model`, checked
    against the model's shapes; errors say how to get a head that fits."""
    path = path or default_head(model, kind)
    if not path:
        raise ValueError(f"method {kind!r} needs head=DIR (no head ships for {model.name!r}): train one with "
                         f"`python -m train.draft_head --head {kind} --out DIR`")
    config, params = load_head(path, kind=kind)
    cfg = model.config
    if (config["hidden_size"], config["vocab_size"]) != (cfg.hidden_size, cfg.vocab_size):
        raise ValueError(f"head {path} was trained for hidden {config['hidden_size']} / vocab "
                         f"{config['vocab_size']}, the model has {cfg.hidden_size} / {cfg.vocab_size}: "
                         "train a head for this model")
    return str(path), config, params


def head_kind(folder) -> str:
    """The kind ('medusa', 'eagle') of the head saved in `folder`."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ValueError(f"no trained head in {folder} (need {CONFIG}): train one with `python -m train.draft_head`")
    try:
        return str(json.loads(path.read_text())["kind"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e}); re-export the head") from None


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = np.asarray(value)
    return out


def _unflatten(flat):
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _is_int(a) -> bool:
    """Integer arrays (e.g. a draft vocabulary) keep their dtype; everything else is a float weight
    (bfloat16 is not a numpy floating type, so test for integers)."""
    return np.issubdtype(a.dtype, np.integer)


def save_head(folder, config: dict[str, Any], params, dtype: str = "bfloat16") -> Path:
    """Writes the head; float weights are cast to `dtype` (bf16 halves the file), integer arrays kept."""
    import ml_dtypes
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    flat = {k: np.ascontiguousarray(v if _is_int(v) else v.astype(np_dtype)) for k, v in _flatten(params).items()}
    save_file(flat, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


REQUIRED = {"medusa": ("num_heads",), "eagle": ("draft_vocab_size",)}


def load_head(folder, kind: str = "medusa") -> tuple[dict[str, Any], Any]:
    """(config, params: floats as float32) of a saved head of `kind`; errors say what is wrong and how
    to get a head."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(f"no trained head in {folder} (need {CONFIG} and {WEIGHTS}): train one with "
                         f"`python -m train.draft_head --head {kind} --out {folder}`")
    try:
        config = json.loads((folder / CONFIG).read_text())
        flat = load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - any parse failure means the files are damaged
        raise ValueError(f"the head in {folder} is corrupt ({type(e).__name__}: {e}); re-export it with "
                         "`python -m train.draft_head ... --out` (training resumes from its checkpoints)") from None
    if config.get("kind") != kind:
        raise ValueError(f"{folder} holds a {config.get('kind')!r} head, not a {kind!r} one")
    for key in ("hidden_size", "vocab_size") + REQUIRED.get(kind, ()):
        if key not in config:
            raise ValueError(f"{folder / CONFIG} lacks {key!r}: the head is corrupt or from another tool")
    return config, _unflatten({k: v if _is_int(v) else v.astype(np.float32) for k, v in flat.items()})
