"""Question sets: the arith generator, JSONL files, datasets-loaded dirs, the spectts alias and how its file
is found or built, errors."""

from __future__ import annotations

import json

import pytest

from specjax.tts import datasets as ds_mod
from specjax.tts.datasets import Question, arith_problems, load_dataset, spectts_path

# the answer of each arith template, written out independently of the generator's own formulas
FORMULAS = {
    "mul_sub": lambda v: v["a"] * v["b"] - v["c"],
    "add_mul": lambda v: (v["a"] + v["b"]) * v["c"],
    "div_sub": lambda v: v["a"] / v["b"] - v["c"],
    "add_sub": lambda v: v["a"] + v["b"] - v["c"],
    "mul_add": lambda v: v["a"] * v["b"] + v["c"],
    "change": lambda v: v["c"] - v["a"] * v["b"],
}


def test_arith_deterministic_and_correct():
    a = load_dataset("arith", limit=20, seed=3)
    assert a == load_dataset("arith", limit=20, seed=3)
    assert a != load_dataset("arith", limit=20, seed=4)
    assert load_dataset("arith", limit=5, seed=3) == a[:5]
    assert all(isinstance(q, Question) and "\\boxed{}" in q.question for q in a)
    problems = arith_problems(300, seed=0)
    assert {p.template for p in problems} == set(FORMULAS)
    for p in problems:
        expected = FORMULAS[p.template](p.values)
        assert expected == int(expected) and 0 < expected < 100, p  # whole, positive, small
        assert p.answer == expected
        assert all(str(v) in p.question for v in p.values.values()), p  # every value is stated
    assert [q.answer for q in load_dataset("arith", limit=300)] == [str(p.answer) for p in problems]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"id": 7, "question": "1+1?", "answer": "2", "source": "s"},
                                               {"question": "2+2?", "answer": 4}])
    qs = load_dataset(str(path))
    assert qs == [Question("7", "1+1?", "2", "s"), Question("1", "2+2?", "4", "")]
    assert load_dataset(str(path), limit=1) == qs[:1]
    assert sorted(q.id for q in load_dataset(str(path), shuffle=True, seed=1)) == ["1", "7"]


def test_jsonl_errors(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"problem": "1+1?", "solution": "2"}])
    with pytest.raises(ValueError, match=r"no field 'question'.*\['problem', 'solution'\].*question_field"):
        load_dataset(str(path))
    assert load_dataset(str(path), question_field="problem", answer_field="solution")[0].answer == "2"
    with pytest.raises(ValueError, match="not found"):
        load_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_dataset(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_dataset("arith", limit=0)


def test_datasets_dir_with_field_remapping(tmp_path):
    """A local dataset dir goes through `datasets.load_dataset` (split from the file name)."""
    ds = tmp_path / "myds"
    ds.mkdir()
    _write_jsonl(ds / "test.jsonl", [{"problem": f"{i}+1?", "solution": f"#### {i + 1}"} for i in range(3)])
    qs = load_dataset(str(ds), question_field="problem", answer_field="solution", limit=2)
    assert [(q.id, q.question, q.answer) for q in qs] == [("0", "0+1?", "1"), ("1", "1+1?", "2")]
    with pytest.raises(ValueError, match="could not load"):
        load_dataset(str(ds), split="validation")


def test_spectts_alias(monkeypatch, tmp_path):
    """90 questions of three sources: from the shared file where it sits beside the checkout, else from one
    the fetch path builds (here from a stand-in hub: a fresh clone may have neither ../shared nor a network)."""
    monkeypatch.delenv("SPECJAX_SPECTTS", raising=False)
    if not any(p.is_file() for p in ds_mod._shared_candidates()):
        monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setattr(ds_mod, "_hub_rows", _fake_hub([]))
        monkeypatch.setattr(ds_mod, "_uncached_spectts", None)
    qs = load_dataset("spectts")
    assert len(qs) == 90 and len({q.id for q in qs}) == 90
    assert qs[0].answer.startswith("\\boxed{") and {q.source for q in qs} == {"aime24", "aime25", "math500"}


@pytest.fixture
def no_spectts(monkeypatch, tmp_path):
    """No $SPECJAX_SPECTTS, no shared dir, a fresh cache under tmp_path and a hub that fails (never the network)."""
    monkeypatch.delenv("SPECJAX_SPECTTS", raising=False)
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ds_mod, "_shared_candidates", lambda: [tmp_path / "shared" / "spectts_bench_math.jsonl"])
    monkeypatch.setattr(ds_mod, "_uncached_spectts", None)

    def offline(name, config, split):
        raise ConnectionError(f"no network for {name}")
    monkeypatch.setattr(ds_mod, "_hub_rows", offline)
    return tmp_path / "cache" / "data" / "spectts_bench_math.jsonl"


def _spectts_row(i):
    return {"id": i, "source": "aime24", "question": f"q{i}?", "answer": f"\\boxed{{{i}}}"}


def test_spectts_env_wins(no_spectts, monkeypatch, tmp_path):
    no_spectts.parent.mkdir(parents=True)
    _write_jsonl(no_spectts, [_spectts_row(1)])
    (tmp_path / "shared").mkdir()
    _write_jsonl(tmp_path / "shared" / "spectts_bench_math.jsonl", [_spectts_row(2)])
    mine = _write_jsonl(tmp_path / "mine.jsonl", [_spectts_row(3)])
    monkeypatch.setenv("SPECJAX_SPECTTS", str(mine))
    assert spectts_path() == mine and [q.id for q in load_dataset("spectts")] == ["3"]
    monkeypatch.setenv("SPECJAX_SPECTTS", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="SPECJAX_SPECTTS=.*missing.jsonl is not a file"):
        spectts_path()
    monkeypatch.delenv("SPECJAX_SPECTTS")
    assert spectts_path() == tmp_path / "shared" / "spectts_bench_math.jsonl"  # then the shared dir, then the cache


def test_spectts_cached_copy(no_spectts):
    no_spectts.parent.mkdir(parents=True)
    _write_jsonl(no_spectts, [_spectts_row(1), _spectts_row(2)])
    assert spectts_path() == no_spectts  # the hub (failing here) is not asked
    assert [q.id for q in load_dataset("spectts")] == ["1", "2"]


def _fake_hub(calls, fail=()):
    def rows(name, config, split):
        calls.append((name, config, split))
        if name in fail:
            raise ConnectionError(f"{name} unreachable")
        if name == "HuggingFaceH4/aime_2024":
            assert split == "train"
            return [{"id": 60 + i, "problem": "Every morning Aya goes for a $9$-kilometer-long walk." if i == 0 else
                     f"aime24 problem {i}", "answer": str(100 + i), "solution": "..."} for i in range(30)]
        if name == "opencompass/AIME2025":
            assert split == "test" and config in ("AIME2025-I", "AIME2025-II")
            part = 0 if config == "AIME2025-I" else 15
            return [{"question": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$"
                     if part + i == 0 else f"aime25 problem {part + i}", "answer": 200 + part + i} for i in range(15)]
        if name == "yentinglin/aime_2025":
            assert (config, split) == (None, "train")
            return [{"problem": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$"
                     if i == 0 else f"aime25 mirror problem {i}", "answer": str(200 + i)} for i in range(30)]
        assert (name, config, split) == ("HuggingFaceH4/MATH-500", None, "test")
        return [{"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates." if i == 0
                 else f"math500 problem {i}", "solution": f"so it is $\\boxed{{{i}}}$", "answer": str(i)}
                for i in range(35)]
    return rows


def test_spectts_built_from_hub(no_spectts, monkeypatch):
    calls = []
    monkeypatch.setattr(ds_mod, "_hub_rows", _fake_hub(calls))
    assert spectts_path() == no_spectts
    rows = [json.loads(line) for line in no_spectts.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(1, 91))
    assert all(set(r) == {"id", "source", "question", "answer"} for r in rows)
    assert [r["source"] for r in rows] == ["aime24"] * 30 + ["aime25"] * 30 + ["math500"] * 30
    assert rows[0]["question"].startswith("Every morning Aya") and rows[0]["answer"] == "\\boxed{100}"
    assert rows[30]["question"].startswith("Find the sum of all integer bases") and rows[30]["answer"] == "200"
    assert rows[45]["question"] == "aime25 problem 15" and rows[59]["answer"] == "229"  # I, then II
    assert rows[60]["question"].startswith("Convert the point $(0,3)$") and rows[89]["question"] == "math500 problem 29"
    assert rows[60]["answer"] == "so it is $\\boxed{0}$"  # MATH-500: the full solution
    assert list(no_spectts.parent.iterdir()) == [no_spectts]  # renamed into place: no temp file left
    qs = load_dataset("spectts")
    assert len(qs) == 90 and qs[0].answer == "\\boxed{100}"
    assert len(calls) == 4  # once: later lookups read the cached copy

    no_spectts.unlink()  # AIME 2025 falls back to its mirror when opencompass is unreachable
    monkeypatch.setattr(ds_mod, "_hub_rows", _fake_hub(calls := [], fail=("opencompass/AIME2025",)))
    rows = [json.loads(line) for line in spectts_path().read_text().splitlines()]
    assert rows[31]["question"] == "aime25 mirror problem 1" and len(rows) == 90


def test_spectts_without_cache(no_spectts, monkeypatch):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", "none")
    calls = []
    monkeypatch.setattr(ds_mod, "_hub_rows", _fake_hub(calls))
    path = spectts_path()
    assert path.is_file() and not no_spectts.exists() and len(path.read_text().splitlines()) == 90
    assert spectts_path() == path and len(calls) == 4  # built once per process


def test_spectts_hub_unreachable(no_spectts):
    with pytest.raises(ValueError) as e:
        load_dataset("spectts")
    message = str(e.value)
    assert "\n" not in message and "no network for HuggingFaceH4/aime_2024" in message
    for fix in ("SPECJAX_SPECTTS=/path/to/spectts_bench_math.jsonl", "../shared/data/",
                "Hugging Face hub is reachable"):
        assert fix in message
    assert not no_spectts.parent.exists()  # nothing half-written
