"""What every eval CLI shares: comma-list flags, and bad input reported as one line with exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

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


def run(parse: Callable[[list[str] | None], argparse.Namespace], body: Callable[[argparse.Namespace], int],
        argv: list[str] | None) -> int:
    """Parses argv and runs body; a ValueError or missing file is printed as `error: ...` (exit 2), since
    those are the user's to fix (the message names the fix), not tracebacks to read."""
    args = parse(argv)
    try:
        return body(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
