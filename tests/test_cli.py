"""`python -m specjax`: prints the answer and the speed; bad input exits 2 with the reason."""

from __future__ import annotations

from specjax.__main__ import main


def test_cli_answers_and_reports_speed(tiny_chat_checkpoint, capsys):
    assert main(["What is 7 + 5?", "--model", str(tiny_chat_checkpoint), "--method", "suffix",
                 "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # the decoded answer
    assert "tok/s" in captured.err and "[suffix]" in captured.err
    assert "compiled in the call" in captured.err or "programs read from the cache" in captured.err
    assert main(["What is 7 + 5?", "--model", str(tiny_chat_checkpoint), "--method", "suffix",
                 "--max-new-tokens", "8"]) == 0
    assert "programs read from the cache" in capsys.readouterr().err  # the same shapes again: nothing compiled


def test_cli_says_whether_the_call_compiled():
    from specjax import programs
    from specjax.__main__ import compiled_note

    now = programs.counts().get("compiled", 0)
    assert compiled_note(now) == "programs read from the cache"
    assert compiled_note(now - 1) == "1 program compiled in the call"
    assert compiled_note(now - 3) == "3 programs compiled in the call"


def test_cli_unknown_model_and_method(tiny_chat_checkpoint, capsys):
    assert main(["hi", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["hi", "--model", str(tiny_chat_checkpoint), "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_cli_passes_method_options_precision_and_fixed_widths(tiny_chat_checkpoint, monkeypatch, capsys):
    """--option, --matmul-dtype and --no-adaptive reach `load` and `generate` as eval.tts gives them."""
    import specjax

    seen = {}
    real_load, real_generate = specjax.load, specjax.generate

    def load(*args, **kwargs):
        seen["load"] = kwargs
        return real_load(*args, **kwargs)

    def generate(*args, **kwargs):
        seen["generate"] = kwargs
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(specjax, "load", load)
    monkeypatch.setattr(specjax, "generate", generate)
    assert main(["What is 7 + 5?", "--model", str(tiny_chat_checkpoint), "--method", "suffix", "--max-new-tokens",
                 "8", "--option", "k=4", "--option", "shared=false", "--no-adaptive",
                 "--matmul-dtype", "bfloat16"]) == 0
    assert "[suffix]" in capsys.readouterr().err
    assert seen["load"]["matmul_dtype"] == "bfloat16"
    assert seen["generate"]["k"] == 4 and seen["generate"]["shared"] is False
    assert seen["generate"]["adaptive"] is False
    assert main(["What is 7 + 5?", "--model", str(tiny_chat_checkpoint), "--method", "suffix",
                 "--max-new-tokens", "8"]) == 0
    assert seen["load"]["matmul_dtype"] is None and seen["generate"]["adaptive"] is None
    assert "k" not in seen["generate"]
