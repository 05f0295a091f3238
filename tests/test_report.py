"""eval.report: plots and the markdown table from results files, and its input errors."""

from __future__ import annotations

import json

import pytest

from eval import report


def _results(method: str, paradigm: str, tps: float, speedup: float, hist: list[int], rounds: int = 1) -> dict:
    per_round = [{"round": i + 1, "tokens_per_s": tps * (1 + 0.1 * i), "speedup_vs_ar": speedup * (1 + 0.05 * i)}
                 for i in range(rounds)]
    summary = {"method": method, "paradigm": paradigm, "questions": 4, "generated_tokens": 400, "wall_s": 2.0,
               "tokens_per_s": tps, "target_forwards": 150, "mean_accepted_tokens": 2.25, "accuracy": 0.5,
               "baseline": {"method": "ar", "tokens_per_s": 50.0, "wall_s": 4.0}, "speedup_vs_ar": speedup,
               "accepted_hist": hist, "per_round": per_round}
    return {"config": {"method": method, "paradigm": paradigm}, "summary": summary,
            "samples": [{"id": "1", "question": "q", "answer": "1", "outputs": ["1"], "predicted": "1",
                         "correct": True}]}


def test_report_writes_plots_and_table(tmp_path):
    files = []
    for name, res in {"ar_single": _results("ar", "single", 50.0, 1.0, [0, 100]),
                      "pld_single": _results("pld", "single", 90.0, 1.8, [0, 40, 30, 20, 10]),
                      "pld_multi": _results("pld", "multi_round", 110.0, 2.2, [0, 30, 30, 20, 10, 10], rounds=3),
                      "ar_multi": _results("ar", "multi_round", 50.0, 1.0, [0, 100], rounds=3)}.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(res))
        files.append(str(path))
    out = tmp_path / "report"
    assert report.main(files + ["--out", str(out)]) == 0

    from PIL import Image

    for png in ("speedup.png", "accepted_hist.png", "rounds.png"):
        path = out / png
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    md = (out / "report.md").read_text()
    assert "| pld | single | 4 | 0.500 | 90.0 | 1.80x | 2.25 | 150 |" in md
    assert "| pld | multi_round | 4 | 0.500 | 110.0 | 2.20x |" in md
    assert "| ar | single |" in md and "![" in md and "(speedup.png)" in md


def test_paper_table_layout():
    rows = [dict(_results(m, p, 50.0, s, [0, 10])["summary"], label=m) for m, p, s in
            [("ar", "best_of_n", 1.0), ("suffix", "best_of_n", 1.5), ("suffix", "multi_round", 2.1),
             ("pld", "multi_round", 1.3), ("hybrid", "best_of_n", 1.7)]]
    lines = report.paper_table(rows).splitlines()
    assert lines[0] == "| method | specjax | best-of-n: speedup / MAT | multi-round: speedup / MAT |"
    # the paper's row order (PLD before SAM-Decoding before SAM[EAGLE-3]); AR is the reference, not a row
    assert lines[2:] == ["| PLD | pld | – | 1.30x / 2.25 |",
                         "| SAM-Decoding | suffix | 1.50x / 2.25 | 2.10x / 2.25 |",
                         "| SAM[EAGLE-3] | hybrid | 1.70x / 2.25 | – |"]


def test_report_input_errors(tmp_path, capsys):
    assert report.main(["--out", str(tmp_path / "r")]) == 2
    assert "no results files" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert report.main([str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="summary.method"):
        bad.write_text(json.dumps({"samples": []}))
        report.load_results([str(bad)])
