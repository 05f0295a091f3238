"""What a decode step costs on the device at hand: the target's verify forward at each static width, and
a drafter's own `propose`, measured (never assumed) and kept in the specjax cache folder.

The adaptive loop (`engine.decode(adaptive=True)`) divides expected accepted tokens by these seconds to
pick each step's width, so they must be this machine's: a verify of 17 tokens costs ~2x a 1-token step
on a 2-core AMD EPYC and far less on an accelerator. Timings are taken on the run's own shapes (batch,
cache bucket) the first time they are needed (about 0.5-1.5 s per width for the default model on a 2-core
CPU once the loop is compiled; a first process compiles it first), announced on stderr, then read from
`<cache>/step_costs.json` by every later call and process. `python -m specjax.calibrate` measures them
ahead of time (`--force` measures again, e.g. after a run on a busy machine). Values are lower quartiles
over a few repeats, the widths timed in interleaved rounds; a shared, noisy machine still moves them
by ~10-20%.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from specjax.cache_folder import root

REPEATS = 5
_MEMORY: dict[str, float] = {}  # this process's timings (also when the disk cache is off)


def device_name() -> str:
    """The accelerator kind, or the CPU's model name: timings of one machine never serve another."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.platform}:{dev.device_kind}"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu:{line.split(':', 1)[1].strip()}:{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu:{platform.processor() or platform.machine()}:{os.cpu_count()}"


def env_rows(name: str, meaning: str) -> int | None:
    """A row-count override of a timed choice (`SPECJAX_REDUCE_SCORES_FROM`, `SPECJAX_TRANSPOSED_FROM`):
    None when unset, else a whole number, or an error that says what to set (`meaning`: what the values
    mean)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{name}={value!r}: set a whole number of rows ({meaning}), or unset it to let "
                         f"specjax time the choice")
    return int(value)


def model_key(cfg: Any, params: Any) -> str:
    """What a timing depends on in the model: its shapes and the dtypes of its weights."""
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
    return hashlib.sha1(f"{cfg!r}|{dtypes}".encode()).hexdigest()[:16]


def _path() -> Path | None:
    base = root()
    return None if base is None else base / "step_costs.json"


def _load() -> dict[str, float]:
    path = _path()
    if path is None or not path.is_file():
        return {}
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, OSError, AttributeError):
        return {}  # a damaged file is measured again and rewritten


def _store(new: dict[str, float]) -> None:
    path = _path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_load(), **new}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file
    except OSError:
        pass  # a read-only cache folder: the timings live in this process only


def timed_seconds(run: Callable[[], Any], repeats: int = REPEATS, percentile: float = 25) -> float:
    """Wall time of `run()` (its outputs blocked on), after one untimed call (compile, warm-up): by
    default the lower quartile of the repeats, since other work on a shared machine only ever adds time
    (the analyses' timings use the median, 50)."""
    return interleaved_seconds({"run": run}, repeats, percentile)["run"]


def interleaved_seconds(runs: dict[Any, Callable[..., Any]], repeats: int = REPEATS, percentile: float = 25,
                        inputs: dict[Any, Callable[[], Any]] | None = None) -> dict[Any, float]:
    """`timed_seconds` of several runs taken in rounds (each run once per round) rather than one after
    another: a burst of other work on the machine then lands on every width alike instead of inflating
    whichever was being timed (one such burst made a 9-token verify look 1.75x a 1-token step where the
    loop itself paid 1.4x, and the adaptive loop drafted too little). `inputs[k]()`, untimed, makes a
    fresh input for each run of `runs[k]` (for runs that consume theirs: a donated loop state)."""
    times = interleaved_times(runs, repeats, inputs)
    return {k: float(np.percentile(v, percentile)) for k, v in times.items()}


def interleaved_times(runs: dict[Any, Callable[..., Any]], repeats: int = REPEATS,
                      inputs: dict[Any, Callable[[], Any]] | None = None) -> dict[Any, list[float]]:
    """Every round's seconds of each run (see `interleaved_seconds`), in round order: two runs' times of
    one round were taken back to back, so their difference is free of the machine's slower drifts."""
    def args(k: Any) -> tuple:  # made (and finished) before the clock starts
        return () if inputs is None else (jax.block_until_ready(inputs[k]()),)

    for k, run in runs.items():
        jax.block_until_ready(run(*args(k)))
    times: dict[Any, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            given = args(k)
            t0 = time.perf_counter()
            jax.block_until_ready(run(*given))
            times[k].append(time.perf_counter() - t0)
    return times


QUIET_ENV = "SPECJAX_QUIET"  # set (to anything but 0 or empty): no notice of a one-time measurement


def _notice(text: str, end: str = "\n") -> None:
    """A line on stderr while a one-time measurement runs: a first call on a new machine otherwise sits
    silent for up to a minute (timing the model's products, compiling and timing a method's widths)."""
    if os.environ.get(QUIET_ENV, "").strip() not in ("", "0"):
        return
    print(text, end=end, file=sys.stderr, flush=True)


def cached_seconds(keys: Sequence[str], measure: Callable[[list[str]], dict[str, float]], what: str = ""
                   ) -> tuple[list[float], float]:
    """The seconds of each key: from memory, else the cache folder's file, else `measure(missing keys)`
    (stored). Returns them and the seconds spent measuring. `what` names the measurement in the notice
    printed on stderr while it runs (with how long it took; `SPECJAX_QUIET=1` turns it off)."""
    missing = [k for k in keys if k not in _MEMORY]
    if missing:
        _MEMORY.update({k: v for k, v in _load().items() if k in missing})
    t0 = time.perf_counter()
    todo = [k for k in keys if k not in _MEMORY]
    if todo and what:
        path = _path()
        kept = f"kept in {path}" if path is not None else "not kept: no cache folder"
        _notice(f"specjax: timing {what} on this machine, once ({kept}) ...", end="")
    try:
        fresh = measure(todo) if todo else {}
    finally:  # the line ends even when the measurement fails, before its error is printed
        if todo and what:
            _notice(f" {time.perf_counter() - t0:.1f} s")
    spent = time.perf_counter() - t0 if fresh else 0.0
    if fresh:
        _MEMORY.update(fresh)
        _store(fresh)
    return [_MEMORY[k] for k in keys], spent


def forget(match: str = "") -> int:
    """Drops the stored timings whose key contains `match` (all of this device's: "") so they are
    measured again; returns how many."""
    stored = _load()
    mine = [k for k in stored if k.startswith(device_name() + "|") and match in k]
    for k in mine:
        stored.pop(k)
        _MEMORY.pop(k, None)
    path = _path()
    if path is not None and mine:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=0, sort_keys=True))
        tmp.replace(path)
    return len(mine)


def step_key(kind: str, model: str, batch: int, cache_len: int, detail: str) -> str:
    """One timing's key: device, what is timed, the model's key, and the run's static shapes."""
    return f"{device_name()}|jax {jax.__version__}|{kind}|{model}|B{batch}|S{cache_len}|{detail}"
