"""The one-time measurements of this machine say what they time, where it is kept and how long it took,
once: a timing read back from the cache folder prints nothing, and `SPECJAX_QUIET=1` silences them."""

from __future__ import annotations

import json
import uuid

import pytest

from specjax import step_cost


def _keys(n: int = 2) -> list[str]:
    tag = uuid.uuid4().hex  # keys no other test (or earlier run) has stored
    return [f"test|{tag}|{i}" for i in range(n)]


def test_a_measurement_prints_one_notice_with_its_seconds_then_reads_back_silently(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(step_cost.QUIET_ENV, raising=False)
    keys, calls = _keys(), []

    def measure(todo):
        calls.append(list(todo))
        return {k: 0.25 * (i + 1) for i, k in enumerate(todo)}

    secs, spent = step_cost.cached_seconds(keys, measure, "the widgets")
    assert secs == [0.25, 0.5] and calls == [keys] and spent >= 0
    err = capsys.readouterr().err
    assert err.startswith("specjax: timing the widgets on this machine, once (kept in ")
    assert str(tmp_path / "step_costs.json") in err and err.rstrip().endswith(" s") and err.count("\n") == 1
    stored = json.loads((tmp_path / "step_costs.json").read_text())
    assert [stored[k] for k in keys] == [0.25, 0.5]

    for k in keys:  # as a new process: read back from the file, nothing measured or printed
        step_cost._MEMORY.pop(k)
    assert step_cost.cached_seconds(keys, measure, "the widgets") == ([0.25, 0.5], 0.0)
    assert calls == [keys] and capsys.readouterr().err == ""


def test_quiet_silences_the_notice_and_no_name_prints_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(step_cost.QUIET_ENV, "1")
    measure = lambda todo: {k: 1.0 for k in todo}
    assert step_cost.cached_seconds(_keys(), measure, "the widgets")[0] == [1.0, 1.0]
    monkeypatch.setenv(step_cost.QUIET_ENV, "0")  # 0 is not quiet: only an unnamed measurement is silent
    assert step_cost.cached_seconds(_keys(), measure)[0] == [1.0, 1.0]
    assert capsys.readouterr().err == ""
    step_cost.cached_seconds(_keys(), measure, "the gadgets")
    assert "specjax: timing the gadgets" in capsys.readouterr().err


def test_a_failed_measurement_still_ends_its_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(step_cost.QUIET_ENV, raising=False)

    def measure(todo):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        step_cost.cached_seconds(_keys(), measure, "the widgets")
    err = capsys.readouterr().err
    assert err.startswith("specjax: timing the widgets") and err.endswith(" s\n")
