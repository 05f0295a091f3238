"""`python -m specjax`: prints the answer and the speed; bad input exits 2 with the reason."""

from __future__ import annotations

from specjax.__main__ import main


def test_cli_answers_and_reports_speed(tiny_chat_checkpoint, capsys):
    assert main(["What is 7 + 5?", "--model", str(tiny_chat_checkpoint), "--method", "suffix",
                 "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # the decoded answer
    assert "tok/s" in captured.err and "[suffix]" in captured.err


def test_cli_unknown_model_and_method(tiny_chat_checkpoint, capsys):
    assert main(["hi", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["hi", "--model", str(tiny_chat_checkpoint), "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
