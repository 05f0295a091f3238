"""Checks of user input, shared by `load`, `generate`, `make_plan`, `Model.logits`, `make_proposer` and the CLIs.

Bad input must fail before anything slow (loading a model, compiling, decoding) and in words. Each check
raises a ValueError (a wrong value) or an `InvalidType` (a TypeError: a wrong type) whose one line names
the argument, what was given and what is allowed. Nothing is coerced: 2.5 and True are not integers,
"no" is not a boolean, NaN is not a temperature, and token ids are checked against the vocabulary, since
a silent fix-up gives wrong results that look right. Pure host code: no JAX arrays are made here.

A proposer's options are checked against its dataclass fields: the annotated type (`int`, `float`,
`bool`, `str`, `tuple[int, ...]`, optionally `| None`) and the range a field declares with
`proposers.base.option(default, min=..., max=..., gt=..., lt=..., choices=...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["InvalidType", "boolean", "encoded_prompts", "generate_args", "given", "integer", "load_args",
           "mark_session", "method_options", "number", "option_types", "option_value", "plan_args", "string",
           "token_array", "token_ids"]

INT32 = (-(2**31), 2**31 - 1)  # seeds and token ids travel as int32
_SESSION_OWNER = "_specjax_model"  # the attribute `mark_session` sets: a weak reference to the session's model


class InvalidType(TypeError):
    """A wrong type found by these checks. The CLIs print it as one `error:` line like a ValueError; any other
    TypeError is a bug and keeps its traceback."""


def given(value: Any) -> str:
    """`value` as an error message shows it: its repr (cut at 60 characters) and its type."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _bounds(min: float | None = None, max: float | None = None, gt: float | None = None,
            lt: float | None = None) -> str:
    """'>= 1', '< 0.5', 'in (0, 1]' or 'equal to 0': the range text of a message."""
    low = (f"[{min}" if min is not None else f"({gt}") if min is not None or gt is not None else None
    high = (f"{max}]" if max is not None else f"{lt})") if max is not None or lt is not None else None
    if min is not None and min == max:
        return f"equal to {min}"
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {min}" if min is not None else f"> {gt}"
    if high:
        return f"<= {max}" if max is not None else f"< {lt}"
    return ""


def _allowed(kind: str, optional: bool, bounds: str) -> str:
    return ("None or " if optional else "") + kind + (f" {bounds}" if bounds else "")


def _in_range(value: float, min: float | None, max: float | None, gt: float | None, lt: float | None) -> bool:
    return ((min is None or value >= min) and (max is None or value <= max) and (gt is None or value > gt)
            and (lt is None or value < lt))


def integer(name: str, value: Any, *, min: int | None = None, max: int | None = None, optional: bool = False
            ) -> int | None:
    """An int (numpy integers too; bools and 2.0 are not), within [min, max]; None passes when `optional`."""
    if value is None and optional:
        return None
    bounds = _bounds(min, max)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidType(f"{name} must be {_allowed('an integer', optional, bounds)}, got {given(value)}")
    if not _in_range(int(value), min, max, None, None):
        raise ValueError(f"{name} must be {_allowed('an integer', True, bounds) if optional else bounds}, "
                         f"got {int(value)}")
    return int(value)


def number(name: str, value: Any, *, min: float | None = None, max: float | None = None, gt: float | None = None,
           lt: float | None = None, optional: bool = False) -> float | None:
    """A finite int or float (not a bool, not a string) within the bounds, returned as a float."""
    if value is None and optional:
        return None
    bounds = _bounds(min, max, gt, lt)
    kind = "a finite number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidType(f"{name} must be {_allowed(kind, optional, bounds)}, got {given(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be {_allowed(kind, optional, bounds)}, got {x}")
    if not _in_range(x, min, max, gt, lt):
        raise ValueError(f"{name} must be {_allowed(kind, True, bounds) if optional else bounds}, got {value!r}")
    return x


def boolean(name: str, value: Any) -> bool:
    """True or False (numpy bools too); not 'no', 1 or None, which would read as a different answer."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidType(f"{name} must be True or False, got {given(value)}")
    return bool(value)


def string(name: str, value: Any, *, choices: Sequence[str] | None = None) -> str:
    """A str (a path object for a path, as its text), one of `choices` when given."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InvalidType(f"{name} must be a string, got {given(value)}")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "dtype"))


def token_ids(name: str, ids: Any, vocab: int) -> list[int]:
    """One prompt's token ids: a non-empty 1-D sequence of integers in [0, vocab)."""
    if _is_array(ids):
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise InvalidType(f"{name} must hold integer token ids, got an array of {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D list of token ids, got an array of shape {arr.shape}")
        values = arr.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidType(f"{name} must be a string or a list of token ids, got {given(ids)}")
    else:
        for j, t in enumerate(ids):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise InvalidType(f"{name}[{j}] must be an integer token id in [0, {vocab}), got {given(t)}")
        values = [int(t) for t in ids]
    if not values:
        raise ValueError(f"{name} is empty: a prompt needs at least one token")
    bad = next((t for t in values if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"{name} holds token id {bad}; token ids must be in [0, {vocab}) (the model's vocabulary)")
    return values


def token_array(name: str, value: Any, vocab: int) -> np.ndarray:
    """`Model.logits`' input: [T] or [B, T] integer ids in [0, vocab), returned as int32 [B, T]."""
    if _is_array(value):
        arr = np.asarray(value)
        if arr.dtype.kind not in "iu":
            raise InvalidType(f"{name} must hold integer token ids, got an array of {arr.dtype}")
        if arr.ndim not in (1, 2) or arr.size == 0:
            raise ValueError(f"{name} must be non-empty [T] or [B, T] token ids, got an array of shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= vocab:
            bad = int(arr.min() if arr.min() < 0 else arr.max())
            raise ValueError(f"{name} holds token id {bad}; token ids must be in [0, {vocab}) (the model's vocabulary)")
        return arr.astype(np.int32).reshape((-1, arr.shape[-1]))
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidType(f"{name} must be [T] or [B, T] token ids, got {given(value)}")
    nested = len(value) > 0 and all(_is_array(r) or (isinstance(r, Sequence) and not isinstance(r, str))
                                    for r in value)
    rows = value if nested else [value]
    checked = [token_ids(f"{name}[{b}]" if nested else name, r, vocab) for b, r in enumerate(rows)]
    if len({len(r) for r in checked}) > 1:
        raise ValueError(f"{name} rows differ in length ({sorted({len(r) for r in checked})}): pass [B, T] token ids")
    return np.asarray(checked, np.int32)


def _prompt_list(prompts: Any, vocab: int, has_tokenizer: bool) -> None:
    if isinstance(prompts, (str, bytes)) or not (isinstance(prompts, Sequence) or _is_array(prompts)):
        raise InvalidType(f"prompts must be a list of prompts (strings or token-id lists), got {given(prompts)}; "
                          "wrap a single prompt in a list")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass a list of strings or of token-id lists")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not has_tokenizer:
                raise ValueError(f"prompts[{i}] is a string, and string prompts need a tokenizer: load the model "
                                 "with tokenizer=True, or pass token-id lists")
        else:
            token_ids(f"prompts[{i}]", p, vocab)


def encoded_prompts(ids: Sequence[Sequence[int]], vocab: int) -> None:
    """After encoding: every prompt holds tokens, and the tokenizer's ids fit the model's vocabulary."""
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompts[{i}] is empty after encoding (chat=False / --no-chat feeds the text as it "
                             "is): pass some text, or use the chat template")
        bad = next((t for t in x if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompts[{i}] encodes to token id {bad}, outside the model's vocabulary [0, {vocab}): "
                             "the tokenizer does not belong to this model")


def _model_config(model: Any):
    from specjax.config import ModelConfig

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig) or not hasattr(model, "params"):
        raise InvalidType(f"model must be a loaded model (specjax.load), got {given(model)}")
    return cfg


def mark_session(session: Any, model: Any) -> None:
    """Records which model made `session`, so that continuing it on another model is refused."""
    try:
        setattr(session, _SESSION_OWNER, weakref.ref(model))
    except TypeError:  # a model object without weak references: keep its id
        setattr(session, _SESSION_OWNER, id(model))


def _session(session: Any, model: Any) -> None:
    from specjax.engine import Session

    if not isinstance(session, Session):
        raise InvalidType(f"session must be None or the Session of an earlier generate(..., keep_session=True) "
                          f"call, got {given(session)}")
    owner = getattr(session, _SESSION_OWNER, None)
    if owner is not None:
        same = owner() is model if isinstance(owner, weakref.ref) else owner == id(model)
        if not same:
            raise ValueError("session comes from a generate call on another model: continue a session on the "
                             "model that made it")
        return
    cfg, cache = model.config, session.cache  # a Session built by hand: its cache must fit this model
    shape = (len(cache.k), cache.k[0].shape[1], cache.k[0].shape[3]) if cache.k else ()
    if shape != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
        raise ValueError(f"session's cache (layers, kv heads, head dim) {shape} does not fit this model "
                         f"({cfg.num_layers}, {cfg.num_kv_heads}, {cfg.head_dim}): it comes from another model")


def plan_args(model: Any, prompts: Any, *, max_new_tokens: Any, chat: Any, num_samples: Any, group: Any,
              max_len: Any, pad_prompts_to: Any, session: Any, pad_new_to: Any) -> None:
    """What `make_plan` takes: types and ranges, token ids against the vocabulary, the session's origin."""
    cfg = _model_config(model)
    integer("max_new_tokens", max_new_tokens, min=1)
    boolean("chat", chat)
    integer("num_samples", num_samples, min=1)
    integer("max_len", max_len, min=1, optional=True)
    integer("pad_prompts_to", pad_prompts_to, min=0)
    integer("pad_new_to", pad_new_to, min=0)
    _prompt_list(prompts, cfg.vocab_size, getattr(model, "tokenizer", None) is not None)
    if group is not None:
        if isinstance(group, (str, bytes)) or not (isinstance(group, Sequence) or _is_array(group)):
            raise InvalidType(f"group must be None or one integer per row, got {given(group)}")
        for b, g in enumerate(np.asarray(group).tolist() if _is_array(group) else group):
            integer(f"group[{b}]", g, min=INT32[0], max=INT32[1])
    if session is not None:
        _session(session, model)


def generate_args(model: Any, prompts: Any, *, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                  seed: Any, chat: Any, num_samples: Any, group: Any, max_len: Any, eos_token_ids: Any,
                  pad_prompts_to: Any, session: Any, keep_session: Any, pad_new_to: Any, stop_rows: Any,
                  check_every: Any, speculate_max_rows: Any) -> None:
    """Every argument of `generate` but the method and its options (`method_options` checks those)."""
    plan_args(model, prompts, max_new_tokens=max_new_tokens, chat=chat, num_samples=num_samples, group=group,
              max_len=max_len, pad_prompts_to=pad_prompts_to, session=session, pad_new_to=pad_new_to)
    number("temperature", temperature, min=0)
    integer("top_k", top_k, min=0)
    number("top_p", top_p, gt=0, max=1)
    integer("seed", seed, min=INT32[0], max=INT32[1])
    boolean("keep_session", keep_session)
    if stop_rows is not None and not callable(stop_rows):
        raise InvalidType(f"stop_rows must be None or a function (generated, finished) -> bool per row, got "
                          f"{given(stop_rows)}")
    integer("check_every", check_every, min=1)
    integer("speculate_max_rows", speculate_max_rows, min=0, optional=True)
    if eos_token_ids is not None:
        if isinstance(eos_token_ids, (str, bytes)) or not isinstance(eos_token_ids, (Sequence, set, frozenset)):
            raise InvalidType(f"eos_token_ids must be None or a list of token ids, got {given(eos_token_ids)}")
        vocab = model.config.vocab_size
        for i, t in enumerate(eos_token_ids):
            integer(f"eos_token_ids[{i}]", t, min=0, max=vocab - 1)


def load_args(name: Any, dtype: Any, tokenizer: Any, mesh: Any, matmul_dtype: Any) -> None:
    """What `specjax.load` takes, checked before any file is read."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise InvalidType(f"name must be a model name, a .gguf path, a folder or a hub id (a string), got "
                          f"{given(name)}")
    if not name.strip():
        raise ValueError("name is empty: pass a model name, a .gguf path, a folder or a hub id")
    for arg, value in (("dtype", dtype), ("matmul_dtype", matmul_dtype)):
        if value is None and arg == "matmul_dtype":
            continue
        if isinstance(value, str):
            continue  # a name: `loading.parse_dtype` checks it against its table, naming the choices
        try:
            np.dtype(value)
        except TypeError:
            raise InvalidType(f"{arg} must be a dtype name ('float32', 'bfloat16') or a dtype, got {given(value)}") \
                from None
    boolean("tokenizer", tokenizer)
    if mesh is not None:
        from jax.sharding import Mesh

        if not isinstance(mesh, Mesh):
            raise InvalidType(f"mesh must be None or a jax.sharding.Mesh (specjax.sharding.make_mesh), got "
                              f"{given(mesh)}")


@functools.cache
def option_types(cls: type) -> dict[str, Any]:
    """A proposer class's user options (`base.option_fields`) and their types, string annotations resolved.
    An annotation that does not resolve is `Any`: not checked here (the proposer checks it)."""
    from specjax.proposers.base import option_fields

    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):
        hints = {}
    return {name: hints.get(name, Any) for name in option_fields(cls)}


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a finite number", bool: "True or False", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def option_value(label: str, value: Any, hint: Any, meta: Mapping[str, Any], where: str = "") -> Any:
    """`value` checked against a field's type `hint` and the range in its metadata (`min`, `max`, `gt`, `lt`,
    `choices`); returned as the field holds it (an int as a float for a float field, a list as a tuple).
    Messages name `label` (a tuple's entries as `label[i]`), then `where` (e.g. " of method 'pld'")."""
    name = label + where
    bounds = {k: meta[k] for k in ("min", "max", "gt", "lt") if meta.get(k) is not None}
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value  # a union of several types: the proposer checks it
        optional, hint = type(None) in args, rest[0]
        if value is None and optional:
            return None
    if hint is bool:
        return boolean(name, value)
    if hint is int:
        return integer(name, value, optional=optional, **bounds)
    if hint is float:
        return number(name, value, optional=optional, **bounds)
    if hint is str:
        return string(name, value, choices=meta.get("choices"))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (tuple, list)):
                raise InvalidType(f"{name} must be a tuple of {_describe(args[0])}s (e.g. (2, 2)), got {given(value)}")
            return tuple(option_value(f"{label}[{i}]", v, args[0], meta, where) for i, v in enumerate(value))
    return value


def method_options(cls: type, method: str, options: Mapping[str, Any],
                   labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A method's options: known names, each value of its field's type and range. `labels` names an option
    in messages (a CLI passes '--option k' or '--k'); default 'option k'."""
    types_ = option_types(cls)
    unknown = set(options) - set(types_)
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {', '.join(sorted(unknown))}; "
                         f"its options are: {', '.join(sorted(types_)) or 'none'}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in options.items():
        label = (labels or {}).get(name, f"option {name}")
        out[name] = option_value(label, value, types_[name], fields[name].metadata, f" of method {method!r}")
    return out
