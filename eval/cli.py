"""What every eval CLI shares: comma-list flags, and bad input reported as one line with exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


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
