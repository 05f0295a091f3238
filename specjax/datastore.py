"""REST's datastore: a token corpus and its suffix array, built offline on the host (numpy).

Documents are concatenated into one int32 array, each followed by the separator -1, so a match never
continues into the next document. The suffix array lists every non-separator position, sorted
lexicographically by the next `window` tokens read up to (and padded with) the first -1: -1 sorts
before every token, so a document's end orders like a string's end. All suffixes starting with an
n-gram (n <= window) then form one contiguous range, which `rest` finds by binary search inside jit.

On disk: `PATH.npz` (tokens, suffix_array) and `PATH.json` (meta: model, vocab size, tokenizer,
document and token counts, window, source). `load_datastore` checks both and names the fix for what
is wrong (missing, corrupt, built for another vocabulary, empty).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int

SEPARATOR = -1
DEFAULT_WINDOW = 16  # sort key length: >= rest's max_key (default 8) with room to raise it
FORMAT = "specjax-rest-datastore"
BUILD_HINT = "python -m eval.build_datastore --model MODEL --dataset DATASET --out PATH"


@dataclasses.dataclass(frozen=True, eq=False)
class Datastore:
    tokens: Int[np.ndarray, "T"]  # documents, each followed by SEPARATOR
    suffix_array: Int[np.ndarray, "N"]  # non-separator positions, sorted by their next `window` tokens
    meta: dict[str, Any]

    @property
    def window(self) -> int:
        return int(self.meta["window"])


def datastore_paths(path: str | Path) -> tuple[Path, Path]:
    """(`.npz`, `.json`) for a datastore path given with or without its `.npz` suffix."""
    p = Path(path).expanduser()
    base = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def concat_documents(documents: Sequence[Sequence[int]]) -> tuple[Int[np.ndarray, "T"], int]:
    """One array of the non-empty documents, each followed by SEPARATOR; also how many were kept."""
    parts = [np.asarray(d, np.int64).reshape(-1) for d in documents]
    parts = [p for p in parts if p.size]
    for p in parts:
        if (p < 0).any() or (p > np.iinfo(np.int32).max).any():
            raise ValueError("document token ids must be in [0, 2**31): -1 is the datastore's separator")
    if not parts:
        return np.zeros((0,), np.int32), 0
    sep = np.asarray([SEPARATOR], np.int64)
    return np.concatenate([x for p in parts for x in (p, sep)]).astype(np.int32), len(parts)


def windows(tokens: Int[np.ndarray, "T"], positions: Int[np.ndarray, "N"], width: int) -> Int[np.ndarray, "N W"]:
    """tokens[p : p + width] per position, -1 from the first separator on (and past the end)."""
    padded = np.concatenate([tokens, np.full((width,), SEPARATOR, np.int32)])
    w = padded[positions[:, None] + np.arange(width)[None]]
    alive = np.cumprod(w != SEPARATOR, axis=1).astype(bool)
    return np.where(alive, w, SEPARATOR).astype(np.int32)


def suffix_array(tokens: Int[np.ndarray, "T"], window: int = DEFAULT_WINDOW) -> Int[np.ndarray, "N"]:
    """Non-separator positions sorted by their next `window` tokens (ties: position order, lexsort is stable)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    positions = np.nonzero(tokens != SEPARATOR)[0].astype(np.int32)
    if positions.size == 0:
        return positions
    w = windows(tokens, positions, window)
    order = np.lexsort(w.T[::-1])  # lexsort's last key is primary: reverse so column 0 is
    return positions[order].astype(np.int32)


def build_datastore(documents: Sequence[Sequence[int]], *, vocab_size: int, window: int = DEFAULT_WINDOW,
                    **meta: Any) -> Datastore:
    """The datastore of `documents` (token-id lists); `meta` adds fields such as model, tokenizer, source."""
    tokens, num_docs = concat_documents(documents)
    if num_docs == 0:
        raise ValueError("no tokens to index: every document is empty (check the dataset and --source)")
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary of {vocab_size}")
    sa = suffix_array(tokens, window)
    info = {"format": FORMAT, "version": 1, "vocab_size": int(vocab_size), "documents": num_docs,
            "tokens": int(sa.size), "window": int(window), **meta}
    return Datastore(tokens=tokens, suffix_array=sa, meta=info)


def save_datastore(store: Datastore, path: str | Path) -> tuple[Path, Path]:
    """Writes `PATH.npz` and `PATH.json`; returns their paths."""
    npz, meta = datastore_paths(path)
    npz.parent.mkdir(parents=True, exist_ok=True)
    with open(npz, "wb") as f:  # a file object: np.savez would otherwise append its own suffix
        np.savez(f, tokens=store.tokens.astype(np.int32), suffix_array=store.suffix_array.astype(np.int32))
    meta.write_text(json.dumps(store.meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return npz, meta


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"datastore {path} is corrupt ({why}); rebuild it with {BUILD_HINT}")


def load_datastore(path: str | Path, vocab_size: int) -> Datastore:
    """Reads and checks a saved datastore for a model of `vocab_size`; errors name the fix."""
    npz, meta_path = datastore_paths(path)
    for p in (npz, meta_path):
        if not p.is_file():
            raise ValueError(f"no datastore file {p}: build one with {BUILD_HINT.replace('PATH', str(npz))}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(meta_path, f"meta is not JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "vocab_size" not in meta or "window" not in meta:
        raise _corrupt(meta_path, "meta lacks format/vocab_size/window")
    try:
        with np.load(npz, allow_pickle=False) as f:
            tokens, sa = np.asarray(f["tokens"]), np.asarray(f["suffix_array"])
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        raise _corrupt(npz, f"{type(e).__name__}: {e}") from e
    if tokens.ndim != 1 or sa.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) \
            or not np.issubdtype(sa.dtype, np.integer):
        raise _corrupt(npz, "tokens and suffix_array must be 1-D integer arrays")
    if int(meta["vocab_size"]) != int(vocab_size) or (tokens.size and int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"datastore {npz} was built for model {meta.get('model', '?')!r} (vocab {meta['vocab_size']}), but this "
            f"model's vocabulary is {vocab_size}: rebuild it with python -m eval.build_datastore --model "
            f"<this model> --dataset DATASET --out {npz}")
    if sa.size == 0:
        raise ValueError(f"datastore {npz} is empty (no documents): rebuild it from a dataset with text, "
                         f"{BUILD_HINT}")
    if sa.min() < 0 or sa.max() >= tokens.size or (tokens[sa] == SEPARATOR).any():
        raise _corrupt(npz, "suffix_array points outside the tokens or at separators")
    return Datastore(tokens=tokens.astype(np.int32), suffix_array=sa.astype(np.int32), meta=meta)
