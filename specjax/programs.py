"""Compiled programs kept on disk whole, so a new process runs its first call without tracing.

JAX's persistent cache (`<cache folder>/xla`) saves the XLA compile, but a new process still traces
and lowers every program to find its cache key, then deserialises the executable: on a 2-core CPU
about 2.6 s before the first token of a call whose steady-state run takes 1.3 s. This store keys each
compiled program by what determines it (the function, its static arguments, the avals of its inputs,
the specjax source, jax and the device) without tracing, keeps the serialised executable under
`<cache folder>/programs`. `specjax.load` reads back the programs of the last process's first call
(`specjax.warm_start` records which) in a background thread while the weights load (`prefetch`), and
once the weights are placed replays that call on a dummy prompt while the tokenizer loads in another
thread: XLA:CPU's YNNPACK fusions set themselves up on their first run (per executable and per verify
width, 0.15-0.35 s each for the default model on a 2-core CPU, nothing a cache can hold). A repeated
workload's first call then finds its programs in memory and initialised.

Only single-process, single-device runs of specjax's own proposers use the store; sharded ones (a mesh,
`jax.distributed`), proposers defined outside specjax (their code is not in the digest) and
`SPECJAX_CACHE_DIR=none` go through `jax.jit` as before; so must code that patches specjax's functions
at run time (set the variable). A file that cannot be read back (another jaxlib, a damaged write) is
compiled again and replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from specjax.cache_folder import root

_lock = threading.Lock()
_memory: dict[str, Any] = {}  # key -> loaded executable
_loading: dict[str, threading.Event] = {}  # keys a prefetch thread is reading now
_local = threading.local()  # .stored_only: a head start (`stored_only`); .used: keys `recording` collects
_counts = {"compiled": 0, "from_disk": 0, "prefetched": 0, "warmed": 0}
_source_digest: str | None = None


def counts() -> dict[str, int]:
    """Programs this process compiled, read from disk on demand, read ahead by `prefetch`, and ran
    in a head start (`stored_only`)."""
    return dict(_counts)


def clear() -> None:
    """Drops the programs held in memory (as `jax.clear_caches` does for jit's); the disk keeps them."""
    _memory.clear()


def free_all() -> None:
    """Drops every compiled program this process holds, jit's and the store's (the disks keep them): a
    process compiling hundreds of programs (a test suite, a benchmark matrix) runs out of memory
    mappings for XLA:CPU's code ("LLVM ERROR: Unable to allocate section memory") or crashes."""
    jax.clear_caches()
    clear()


def _folder() -> Path | None:
    base = root()
    return None if base is None else base / "programs"


def source_digest() -> str:
    """A digest of specjax's own source: a changed program body must not meet a stale executable."""
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha1()
        pkg = Path(__file__).parent
        for path in sorted(pkg.rglob("*.py")):
            h.update(str(path.relative_to(pkg)).encode())
            h.update(path.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def _environment() -> str:
    dev = jax.devices()[0]
    return "|".join([jax.__version__, dev.platform, dev.device_kind, dev.client.platform_version,
                     os.environ.get("XLA_FLAGS", ""), str(jax.config.jax_enable_x64),
                     str(jax.config.jax_default_matmul_precision), source_digest()])


def _leaf(x: Any) -> str:
    aval = jax.typeof(x)
    weak = getattr(aval, "weak_type", False)
    return f"{aval.dtype}{list(aval.shape)}{'w' if weak else ''}"


def _single_device(leaves: list[Any]) -> bool:
    """One process, every input on the default device: what a stored executable was compiled for."""
    if jax.process_count() > 1:
        return False
    home = {jax.devices()[0]}
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if sharding is not None and sharding.device_set != home:
            return False
    return True


def _ours(value: Any) -> bool:
    """A static argument whose code the source digest covers: plain values and specjax's own types.
    A user's proposer class could change its code under the same name, so its calls go through jit."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, tuple):
        return all(map(_ours, value))
    return type(value).__module__.split(".")[0] == "specjax"


def program_key(fn: Callable, args: tuple, static: dict[str, Any]) -> str | None:
    """The store's key for `fn(*args, **static)`, or None when the store does not serve the call."""
    leaves, tree = jax.tree.flatten(args)
    if not _single_device(leaves) or static.get("mesh") is not None or not all(map(_ours, static.values())):
        return None
    parts = [getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)),
             repr(sorted((k, f"{type(v).__module__}.{type(v).__qualname__}:{v!r}") for k, v in static.items())),
             str(tree), ",".join(map(_leaf, leaves)), _environment()]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _read(key: str) -> Any | None:
    folder = _folder()
    path = None if folder is None else folder / f"{key}.bin"
    if path is None or not path.is_file():
        return None
    from jax.experimental import serialize_executable

    try:
        blob, in_tree, out_tree = pickle.loads(zlib.decompress(path.read_bytes()))
        # onto the one device it was compiled for: the default, all local devices, would make a host
        # with several (GPUs, forced host devices) reject the call ("expected args to have N shards")
        return serialize_executable.deserialize_and_load(blob, in_tree, out_tree,
                                                         execution_devices=jax.devices()[:1])
    except Exception:  # another jaxlib, a torn write: compile again and replace it
        path.unlink(missing_ok=True)
        return None


def _write(key: str, compiled: Any) -> None:
    folder = _folder()
    if folder is None:
        return
    from jax.experimental import serialize_executable

    try:
        data = zlib.compress(pickle.dumps(serialize_executable.serialize(compiled)), 1)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / f"{key}.bin")
    except Exception:  # an executable that cannot be serialised, a full disk: it still runs
        pass


_hits = threading.local()


def _count_hit(name: str, **_: Any) -> None:
    if name == "/jax/compilation_cache/cache_hits":
        _hits.n = getattr(_hits, "n", 0) + 1


jax.monitoring.register_event_listener(_count_hit)


def _compile(lowered: Any) -> tuple[Any, bool]:
    """(executable, whether it may be stored). An executable that XLA:CPU read back from JAX's
    persistent cache serialises without its kernels ("Function ... not found" when run again), so the
    store keeps only real compiles: a no-op option gives the store's programs XLA cache keys of their
    own (a jit call's entry of the same program never answers for them), and XLA's cache is not
    written under those keys (the store holds the program), so it cannot answer for them later either."""
    before = getattr(_hits, "n", 0)
    with _lock:
        floor = jax.config.jax_persistent_cache_min_compile_time_secs
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
        try:
            compiled = lowered.compile(compiler_options={"xla_embed_ir_in_executable": False})
        finally:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", floor)
    return compiled, getattr(_hits, "n", 0) == before


class NotStored(LookupError):
    """A head start met a program the store does not hold: compiling it is the real call's business."""


def call(fn: Callable, args: tuple, static: dict[str, Any]) -> Any:
    """`fn(*args, **static)` for a `jax.jit` function, through the store when it serves the call."""
    key = None if _folder() is None else program_key(fn, args, static)
    warming = getattr(_local, "stored_only", False)
    if key is None:
        if warming:
            raise NotStored(getattr(fn, "__qualname__", repr(fn)))
        return fn(*args, **static)
    used = getattr(_local, "used", None)
    if used is not None and key not in used:
        used.append(key)
    pending = _loading.get(key)
    if pending is not None:
        pending.wait()
    compiled = _memory.get(key)
    if compiled is None:
        compiled = _read(key)
        if compiled is not None:
            _counts["from_disk"] += 1
        elif warming:
            raise NotStored(key)
        else:
            compiled, fresh = _compile(fn.lower(*args, **static))
            _counts["compiled"] += 1
            if fresh:
                _write(key, compiled)
        _memory[key] = compiled
    if warming:
        _counts["warmed"] += 1
    return compiled(*args)


@contextlib.contextmanager
def capture(fn: Callable) -> Iterator[dict[str, Any]]:
    """Within the block, the first `call` of `fn` is also compiled to text: yields a dict that then
    holds "hlo" (its optimised HLO) and "args" (its arguments; donated ones keep their shapes). For
    reading a compiled program (the decode loop) in profiles and tests."""
    global call
    seen: dict[str, Any] = {}
    original = call

    def spy(f: Callable, args: tuple, static: dict[str, Any]) -> Any:
        if f is fn and "hlo" not in seen:
            seen["hlo"], seen["args"] = f.lower(*args, **static).compile().as_text(), args
        return original(f, args, static)

    call = spy
    try:
        yield seen
    finally:
        call = original


@contextlib.contextmanager
def recording() -> Iterator[list[str]]:
    """Collects the keys of the stored programs that this thread's calls run inside, in order of first use."""
    outer = getattr(_local, "used", None)
    _local.used = []
    try:
        yield _local.used
    finally:
        _local.used = outer


def owner_key(*parts: Any) -> str:
    """A loaded model's name in the store: what it was loaded from and how (path, size, mtime, dtypes)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:20]


def prefetch(keys: list[str]) -> threading.Thread | None:
    """Reads these stored programs into memory, in this order, in a background thread (returned; None
    when there is nothing to read). A call that needs a program being read waits for it."""
    folder = _folder()
    if folder is None:
        return None
    keys = [k for k in dict.fromkeys(keys)
            if k not in _memory and k not in _loading and (folder / f"{k}.bin").is_file()]
    if not keys:
        return None
    events = {k: threading.Event() for k in keys}
    _loading.update(events)

    def work() -> None:
        for k in keys:
            try:
                compiled = _read(k)
                if compiled is not None:
                    _memory[k] = compiled
                    _counts["prefetched"] += 1
            finally:
                _loading.pop(k, None)
                events[k].set()

    thread = threading.Thread(target=work, name="specjax-prefetch", daemon=True)
    thread.start()
    _threads.append(thread)
    return thread


_threads: list[threading.Thread] = []


def settle() -> None:
    """Waits for this process's prefetch threads (before timing anything)."""
    for thread in list(_threads):
        thread.join()
    _threads.clear()


@contextlib.contextmanager
def stored_only() -> Iterator[None]:
    """A head start (`specjax.warm_start`): inside, `call` runs only programs the store holds (raising
    `NotStored` otherwise: a head start never compiles), counts them as warmed and does not reorder
    the model's recent programs. It runs on the thread of the calls it prepares: an XLA:CPU executable
    first run on another thread stays slower on this one (1.7 vs 1.1 s a suffix call, 2-core CPU)."""
    _local.stored_only = True
    try:
        yield
    finally:
        _local.stored_only = False
