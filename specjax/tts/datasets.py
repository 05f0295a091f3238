"""Question sets for test-time-scaling runs: built-ins, JSONL files and Hugging Face datasets.

Every source becomes a list of `Question`, so paradigms and grading never care where questions came from.
`arith` is generated (no download, a difficulty a 135M model partly solves: accuracy moves when methods
or paradigms change); `spectts` is the 90-question SpecTTS-Bench math set: `$SPECJAX_SPECTTS`, the shared
data dir, the specjax cache, else built once from the public Hugging Face datasets into that cache.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specjax import cache_folder

SPECTTS_NAME = "spectts_bench_math.jsonl"
SPECTTS_FILE = f"shared/data/{SPECTTS_NAME}"
SPECTTS_ENV = "SPECJAX_SPECTTS"
ARITH_DEFAULT_SIZE = 100
BOX_INSTRUCTION = "Put your final answer in \\boxed{}."
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str  # reference answer, plain ("42") or boxed ("\boxed{42}"); grading accepts both
    source: str = ""


# ---- arith: seeded multi-step word problems --------------------------------------------------------

@dataclass(frozen=True)
class ArithProblem:
    """One generated problem with the values it was built from, so tests can recompute the answer."""
    template: str
    values: dict[str, int]
    question: str
    answer: int


_NAMES = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lucy", "she"), ("Sam", "he"), ("Mia", "she")]


def _mul_sub(r: random.Random, name: str, pr: str) -> tuple[dict[str, int], str]:
    a, b = r.randint(2, 6), r.randint(2, 6)
    c = r.randint(1, a * b - 1)
    return {"a": a, "b": b, "c": c}, (f"{name} has {a} boxes with {b} apples each. {pr.capitalize()} gives away "
                                      f"{c} apples. How many apples does {pr} have left?")


def _add_mul(r: random.Random, name: str, pr: str) -> tuple[dict[str, int], str]:
    a, b, c = r.randint(2, 6), r.randint(2, 6), r.randint(2, 4)
    return {"a": a, "b": b, "c": c}, (f"Each bag holds {a} red marbles and {b} blue marbles. {name} has {c} bags. "
                                      f"How many marbles does {name} have in total?")


def _div_sub(r: random.Random, name: str, pr: str) -> tuple[dict[str, int], str]:
    b, q = r.randint(2, 5), r.randint(2, 6)
    c = r.randint(1, q - 1)
    return {"a": b * q, "b": b, "c": c}, (f"{name} bakes {b * q} cookies and puts them equally into {b} boxes. Then "
                                          f"{pr} eats {c} cookies from one box. How many cookies are left in that box?")


def _add_sub(r: random.Random, name: str, pr: str) -> tuple[dict[str, int], str]:
    a, b = r.randint(3, 15), r.randint(2, 10)
    c = r.randint(1, a + b - 1)
    return {"a": a, "b": b, "c": c}, (f"{name} had {a} stickers and got {b} more. Then {pr} gave {c} stickers to a "
                                      f"friend. How many stickers does {name} have now?")


def _mul_add(r: random.Random, name: str, pr: str) -> tuple[dict[str, int], str]:
    a, b, c = r.randint(2, 5), r.randint(2, 6), r.randint(2, 9)
    return {"a": a, "b": b, "c": c}, (f"A shelf has {a} rows with {b} books in each row. {name} adds {c} more books. "
                                      f"How many books are on the shelf now?")


def _change(r: random.Random, name: str, pr: str) -> tuple[dict[str, int], str]:
    a, b = r.randint(1, 4), r.randint(2, 4)
    c = 10 if a * b < 10 else 20
    return {"a": a, "b": b, "c": c}, (f"Pencils cost {a} dollars each. {name} buys {b} pencils and pays with a "
                                      f"{c}-dollar bill. How many dollars of change does {pr} get?")


# template name -> (builder, answer from values); the formulas are the single source of truth for answers
ARITH_TEMPLATES: dict[str, tuple[Callable, Callable[[dict[str, int]], int]]] = {
    "mul_sub": (_mul_sub, lambda v: v["a"] * v["b"] - v["c"]),
    "add_mul": (_add_mul, lambda v: (v["a"] + v["b"]) * v["c"]),
    "div_sub": (_div_sub, lambda v: v["a"] // v["b"] - v["c"]),
    "add_sub": (_add_sub, lambda v: v["a"] + v["b"] - v["c"]),
    "mul_add": (_mul_add, lambda v: v["a"] * v["b"] + v["c"]),
    "change": (_change, lambda v: v["c"] - v["a"] * v["b"]),
}


def arith_problems(n: int, seed: int = 0) -> list[ArithProblem]:
    """`n` problems drawn from one seeded stream: the first k of n are the same for any n >= k."""
    r = random.Random(seed)
    names = list(ARITH_TEMPLATES)
    out = []
    for _ in range(n):
        template = r.choice(names)
        name, pronoun = r.choice(_NAMES)
        build, solve = ARITH_TEMPLATES[template]
        values, text = build(r, name, pronoun)
        out.append(ArithProblem(template, values, f"{text} {BOX_INSTRUCTION}", solve(values)))
    return out


def _arith(n: int, seed: int) -> list[Question]:
    return [Question(f"arith-{seed}-{i}", p.question, str(p.answer), f"arith:{p.template}")
            for i, p in enumerate(arith_problems(n, seed))]


# ---- files and hub datasets ------------------------------------------------------------------------

# the hub sources of spectts in id order: source -> (mirrors, each (parts (name, config, split), question
# field)), answer field, rows kept (AIME: exactly all of them), and how its first question starts
_Part = tuple[str, str | None, str]
_SPECTTS_HUB: dict[str, tuple[list[tuple[list[_Part], str]], str, int, str]] = {
    "aime24": ([([("HuggingFaceH4/aime_2024", None, "train")], "problem")], "answer", 30,
               "Every morning Aya goes for a $9$-kilometer-long walk"),
    "aime25": ([([("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")],
                 "question"),
                ([("yentinglin/aime_2025", None, "train")], "problem")], "answer", 30,
               "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b"),
    "math500": ([([("HuggingFaceH4/MATH-500", None, "test")], "problem")], "solution", 30,
                "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates."),
}
_uncached_spectts: Path | None = None  # this process's built copy when there is no (writable) cache


def _shared_candidates() -> list[Path]:
    """The shared data dir next to the repo (/work/shared), then next to the working dir."""
    return [Path(__file__).resolve().parents[2].parent / SPECTTS_FILE, Path.cwd().parent / SPECTTS_FILE]


def _spectts_cache() -> Path | None:
    root = cache_folder.root()
    return None if root is None else root / "data" / SPECTTS_NAME


def _hub_rows(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """One split of a Hugging Face hub dataset: the only network access of spectts (tests replace it)."""
    import datasets as hf

    return list(hf.load_dataset(name, config, split=split))


def _boxed(answer: Any) -> str:
    text = str(answer).strip()
    return text if text.startswith("\\boxed{") else f"\\boxed{{{text}}}"


def _spectts_hub_records() -> list[dict[str, Any]]:
    """The 90 spectts records (ids 1..90: AIME24, AIME25, MATH-500) from the hub; raises on any mismatch."""
    records: list[dict[str, Any]] = []
    for source, (mirrors, answer_field, keep, first) in _SPECTTS_HUB.items():
        errors = []
        for parts, question_field in mirrors:
            try:
                rows = [row for name, config, split in parts for row in _hub_rows(name, config, split)]
                pairs = [(str(r[question_field]), str(r[answer_field])) for r in rows]
                if len(pairs) < keep or (source != "math500" and len(pairs) != keep):
                    raise ValueError(f"{len(pairs)} rows, expected {keep}")
                if not pairs[0][0].startswith(first):
                    raise ValueError(f"its first question starts {pairs[0][0][:40]!r}, expected {first[:40]!r}")
                break
            except Exception as e:  # try the next mirror; report every failure when none works
                errors.append(f"{'+'.join(n + (':' + c if c else '') for n, c, _ in parts)}: {e!r}")
        else:
            raise ValueError(f"{source}: " + "; ".join(errors))
        for question, answer in pairs[:keep]:
            records.append({"id": len(records) + 1, "source": source, "question": question,
                            "answer": _boxed(answer) if source == "aime24" else str(answer)})  # as the shared file
    return records


def _write_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    """A temp file in the target dir, renamed over `path`: readers (other processes) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def spectts_path() -> Path:
    """The SpecTTS-Bench file: `$SPECJAX_SPECTTS`, the shared data dir, the specjax cache's copy, else
    built once from the Hugging Face hub into that cache (a temp dir when the cache is off or read-only)."""
    global _uncached_spectts
    env = os.environ.get(SPECTTS_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ValueError(f"{SPECTTS_ENV}={env} is not a file; point it at {SPECTTS_NAME} or unset it")
        return path
    shared = _shared_candidates()
    cached = _spectts_cache()
    for p in [*shared, *([cached] if cached else []), *([_uncached_spectts] if _uncached_spectts else [])]:
        if p.is_file():
            return p
    try:
        records = _spectts_hub_records()
    except Exception as e:
        looked = ", ".join(map(str, shared + ([cached] if cached else [])))
        raise ValueError(f"the spectts dataset file {SPECTTS_NAME} is missing (looked at {looked}) and building "
                         f"it from the Hugging Face hub failed ({' '.join(str(e).split())[:400]}); set "
                         f"{SPECTTS_ENV}=/path/to/{SPECTTS_NAME}, or put it in ../shared/data/, or run where "
                         "the Hugging Face hub is reachable") from e
    if cached is not None:
        try:
            _write_atomic(cached, records)
            return cached
        except OSError:  # a read-only cache: keep this process's copy in a temp dir instead
            pass
    folder = tempfile.mkdtemp(prefix="specjax-spectts-")
    atexit.register(shutil.rmtree, folder, True)
    _uncached_spectts = Path(folder) / SPECTTS_NAME
    _write_atomic(_uncached_spectts, records)
    return _uncached_spectts


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); expected one JSON object per line") from e
    return rows


def _read_hf(spec: str, split: str) -> list[dict[str, Any]]:
    """A local dataset dir / data file or a hub id (`id` or `id:config`, e.g. `openai/gsm8k:main`)."""
    import datasets as hf

    path = Path(spec).expanduser()
    if path.is_file():  # a single json/csv/parquet file: the builder is its suffix, its one split "train"
        builder = {".jsonl": "json", ".txt": "text"}.get(path.suffix, path.suffix.lstrip("."))
        args, kwargs, split = (builder,), {"data_files": str(path)}, "train"
    elif path.is_dir() or ":" not in spec:
        args, kwargs = (str(path) if path.is_dir() else spec,), {}
    else:
        name, config = spec.rsplit(":", 1)
        args, kwargs = (name, config), {}
    try:
        return list(hf.load_dataset(*args, split=split, **kwargs))
    except Exception as e:
        raise ValueError(f"could not load dataset {spec!r} (split {split!r}) with datasets.load_dataset: {e}. "
                         "Pass a built-in name (arith, spectts), a JSONL file, a local dataset dir or a Hugging "
                         "Face dataset id (id:config for one with configs), and check --split") from e


def _to_questions(rows: list[dict[str, Any]], spec: str, qf: str, af: str) -> list[Question]:
    if not rows:
        raise ValueError(f"dataset {spec!r} is empty: it has no records")
    out = []
    for i, row in enumerate(rows):
        for field, flag in ((qf, "question_field"), (af, "answer_field")):
            if field not in row:
                raise ValueError(f"record {i} of {spec!r} has no field {field!r}; its fields are "
                                 f"{sorted(row)}: pass {flag}= (--{flag.replace('_', '-')}) naming one of them")
        answer = str(row[af])
        if "####" in answer:  # GSM8K style: reasoning, then "#### 42"
            answer = answer.rsplit("####", 1)[1].strip()
        out.append(Question(str(row.get("id", i)), str(row[qf]), answer, str(row.get("source", ""))))
    return out


def load_dataset(spec: str, *, split: str = "test", question_field: str = "question",
                 answer_field: str = "answer", limit: int | None = None, shuffle: bool = False,
                 seed: int = 0) -> list[Question]:
    """Questions from a built-in name (`arith`, `spectts`), a JSONL file, a local dataset or a hub id.

    `shuffle` (seeded) happens before `limit`, so `limit` picks a random subset rather than the first
    rows, which for sorted benchmarks would all come from one source. For `arith`, `seed` also seeds
    the generator.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all questions), got {limit}")
    if spec == "arith":
        questions = _arith(max(limit or ARITH_DEFAULT_SIZE, ARITH_DEFAULT_SIZE) if shuffle else
                           (limit or ARITH_DEFAULT_SIZE), seed)
    else:
        path = spectts_path() if spec == "spectts" else Path(spec).expanduser()
        looks_like_file = path.suffix in _FILE_SUFFIXES or spec.startswith((".", "/", "~"))
        if looks_like_file and not path.exists():
            raise ValueError(f"dataset file {spec!r} not found (cwd {Path.cwd()}); pass an existing JSONL path, "
                             "a built-in name (arith, spectts) or a Hugging Face dataset id")
        rows = _read_jsonl(path) if path.is_file() and path.suffix == ".jsonl" else _read_hf(spec, split)
        questions = _to_questions(rows, spec, question_field, answer_field)
    if shuffle:
        random.Random(seed).shuffle(questions)
    return questions[:limit] if limit else questions
