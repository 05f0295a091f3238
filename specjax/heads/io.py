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
    """The shipped head of `kind` for this model (matched by the `target` name it was trained on), or ''."""
    folder = SHIPPED / f"{kind}-{model.name}"
    return str(folder) if (folder / CONFIG).is_file() else ""


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


def save_head(folder, config: dict[str, Any], params, dtype: str = "bfloat16") -> Path:
    """Writes the head; weights are cast to `dtype` (bf16 halves the file)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    flat = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in _flatten(params).items()}
    save_file(flat, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def load_head(folder) -> tuple[dict[str, Any], Any]:
    """(config, float32 params) of a saved head; errors say what is wrong and how to get a head."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(f"no trained head in {folder} (need {CONFIG} and {WEIGHTS}): train one with "
                         f"`python -m train.draft_head --head medusa --out {folder}`")
    try:
        config = json.loads((folder / CONFIG).read_text())
        flat = load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - any parse failure means the files are damaged
        raise ValueError(f"the head in {folder} is corrupt ({type(e).__name__}: {e}); re-export it with "
                         "`python -m train.draft_head ... --out` (training resumes from its checkpoints)") from None
    for key in ("kind", "num_heads", "hidden_size", "vocab_size"):
        if key not in config:
            raise ValueError(f"{folder / CONFIG} lacks {key!r}: the head is corrupt or from another tool")
    return config, _unflatten({k: v.astype(np.float32) for k, v in flat.items()})
