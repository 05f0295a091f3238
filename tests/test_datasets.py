"""Question sets: the arith generator, JSONL files, datasets-loaded dirs, the spectts alias, errors."""

from __future__ import annotations

import json

import pytest

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


def test_spectts_alias():
    spectts_path()  # ../shared/data beside the checkout is part of every machine and CI run: never skip
    qs = load_dataset("spectts")
    assert len(qs) == 90 and len({q.id for q in qs}) == 90
    assert qs[0].answer.startswith("\\boxed{") and {q.source for q in qs} == {"aime24", "aime25", "math500"}
