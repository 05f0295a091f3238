"""What every eval CLI shares: comma-list flags, and bad input reported as one line with exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specjax import validation

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the presets shipped with the project


def config_path(spec: str) -> Path:
    """A preset: a TOML path, or the name of one in the project's configs/ (`think_twice`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = CONFIGS / f"{spec}.toml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.toml"))) or "none"
    raise ValueError(f"--config {spec!r}: no such file, and no preset of that name (presets: {known})")


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses argv after the flags a `--config FILE.toml` preset stands for, so flags given on the
    command line win (a repeatable flag adds to the preset's). The preset's keys are the flags' names
    (`max-new-tokens` or `max_new_tokens`); `true` turns a switch on; a list repeats a flag."""
    import tomllib

    p.add_argument("--config", default=None, metavar="TOML", help="a preset of flags (a TOML file or the name of "
                   "one in configs/); flags on the command line override it")
    argv = sys.argv[1:] if argv is None else list(argv)
    first, _ = p.parse_known_args(argv)
    if first.config is None:
        return p.parse_args(argv)
    try:
        path = config_path(first.config)
        preset = tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        p.error(str(e))
    flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    pre: list[str] = []
    for key, value in preset.items():
        dest = key.replace("-", "_")
        if dest not in flags or dest in ("help", "config"):
            p.error(f"{path}: unknown key {key!r}; the keys are {p.prog}'s flags")
        if isinstance(value, bool):
            pre += [flags[dest]] if value else []
        else:
            pre += [x for v in (value if isinstance(value, list) else [value]) for x in (flags[dest], str(v))]
    return p.parse_args(pre + argv)


def int_list(text: str, flag: str) -> list[int]:
    """A comma list of integers >= 1, e.g. `--batch-sizes 1,2,4`."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def add_matmul_dtype_flag(p: argparse.ArgumentParser) -> None:
    """--matmul-dtype, given to `specjax.load(matmul_dtype=)` as it is."""
    p.add_argument("--matmul-dtype", default=None, choices=["bfloat16"],
                   help="hold the matmul weights in bf16 beside --dtype activations (fast on CPUs with AMX)")


def add_precision_flags(p: argparse.ArgumentParser) -> None:
    """--dtype and --matmul-dtype, given to `specjax.load` as they are."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_matmul_dtype_flag(p)


class Parser(argparse.ArgumentParser):
    """argparse whose bad flag is reported like every other bad input: one `error: ...` line, exit 2 (not the
    usage text and then the message)."""

    def error(self, message: str):  # argparse's hook for every parse error
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def flag(dest: str) -> str:
    """An argparse dest as the user typed it: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + dest.replace("_", "-")


def check_ints(args: argparse.Namespace, minimum: int, *dests: str) -> None:
    """Each of these flags is an integer >= minimum; an optional flag left unset (None) passes."""
    for dest in dests:
        if getattr(args, dest) is not None:
            validation.integer(flag(dest), getattr(args, dest), min=minimum)


def check_sampling(args: argparse.Namespace) -> None:
    """The `generate` flags this CLI has (--max-new-tokens, --temperature, --top-k, --top-p, --seed), checked
    as `generate` checks them but before the model loads."""
    checks = {"max_new_tokens": dict(min=1), "top_k": dict(min=0), "seed": dict(min=validation.INT32[0],
                                                                                max=validation.INT32[1])}
    for dest, bounds in checks.items():
        if hasattr(args, dest):
            validation.integer(flag(dest), getattr(args, dest), **bounds)
    if hasattr(args, "temperature"):
        validation.number("--temperature", args.temperature, min=0)
    if hasattr(args, "top_p"):
        validation.number("--top-p", args.top_p, gt=0, max=1)


def check_methods(methods: list[str], options: dict[str, dict[str, Any]] | None = None,
                  k: int | None = None) -> None:
    """Every method's options (`--k` too, for each method but `ar`) against its proposer's fields, and each
    proposer built once (its checks across fields), before anything loads. No model is needed for that."""
    from specjax.proposers import make_proposer, registry

    known = registry()
    for method in methods:
        if method not in known:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(known)}")
        opts, labels = dict((options or {}).get(method, {})), {}
        if k is not None and method != "ar":
            opts["k"], labels["k"] = k, "--k"
        opts = validation.method_options(known[method], method, opts, labels)
        make_proposer(method, **opts)


def option_value(raw: str, hint: Any) -> Any:
    """The text of `--option KEY=VALUE` as its field holds it: a string field takes the text as it is (or the
    string a quoted literal spells), a bool field True/False (or true/false), any other a Python literal (4,
    0.5, 2,2). Text that is no literal stays text, for the field's type check to refuse with a message."""
    import ast

    if hint is bool and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw
    if hint is str or hint == (str | None):
        return value if isinstance(value, str) else raw  # head=123 is the text '123'
    return value


def parse_options(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """--option [METHOD.]KEY=VALUE pairs -> per-method option dicts.

    A plain key goes to every method of the run that takes it; `hybrid.head=medusa` only to hybrid
    (for keys that mean different things to different methods). A key no method takes is an error, and so
    is a value its field does not take (`k=abc`, `k=2.5`, `shared=no`): each is checked here, before any
    model loads, against the field's type and range.
    """
    from specjax.proposers import option_fields, registry

    fields = {m: set(option_fields(registry()[m])) for m in methods}
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    scoped: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: write KEY=VALUE, e.g. --option threshold=4")
        method, dot, name = key.rpartition(".")
        targets = [method] if dot else [m for m in methods if name in fields[m]]
        if dot and method not in fields:
            raise ValueError(f"--option {key}: {method!r} is not a method of this run ({', '.join(methods)})")
        if not targets or any(name not in fields[m] for m in targets):
            raise ValueError(f"--option {key}: none of the methods {', '.join(targets or methods)} takes it; their "
                             "options: " + "; ".join(f"{m}: {', '.join(sorted(fields[m])) or 'none'}"
                                                    for m in (targets or methods)))
        for m in targets:
            (scoped if dot else out)[m][name] = (key, raw)

    def typed(m: str, name: str, key: str, raw: str) -> Any:  # the text as the field holds it, type and range checked
        hint, meta = validation.option_types(registry()[m])[name], option_fields(registry()[m])[name].metadata
        return validation.option_value(f"--option {key}", option_value(raw, hint), hint, meta, f" of method {m!r}")

    return {m: {name: typed(m, name, *given) for name, given in {**out[m], **scoped[m]}.items()} for m in methods}


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dir(value: str | Path, flag: str) -> Path:
    """A folder a CLI writes into: an existing folder, or one it can create (no file in the way, writable)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder: pass a folder path (created if missing)")
    base = _first_existing(path)
    if not base.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be created: {str(base)!r} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: {str(base)!r} is not writable; pass a folder you can write to")
    return path


def output_file(value: str | Path, flag: str) -> Path:
    """A file a CLI writes: not a folder, and in a folder it can create or write into."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder, not a file: pass a file path")
    output_dir(path.parent, flag)
    return path


def run(parse: Callable[[list[str] | None], argparse.Namespace], body: Callable[[argparse.Namespace], int],
        argv: list[str] | None) -> int:
    """Parses argv and runs body; a ValueError, a wrong type found by `specjax.validation` or a missing file is
    printed as one `error: ...` line (exit 2), since those are the user's to fix (the message names the fix),
    not tracebacks to read. A bad flag (`Parser`) exits 2 the same way; --help exits 0."""
    try:
        args = parse(argv)
    except SystemExit as e:  # argparse: --help, or a bad flag already reported
        return e.code if isinstance(e.code, int) else 2
    try:
        return body(args)
    except (ValueError, FileNotFoundError, validation.InvalidType) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
