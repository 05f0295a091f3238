"""Runs that survive a kill: eval.tts --resume, the records file, eval.build_datastore and eval.latency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from eval.records import RunRecords, records_path

TIMING = {"wall_s", "tokens_per_s", "prefill_s", "decode_s", "decode_tokens_per_s", "speedup_vs_ar", "baseline"}


def _drop_timing(x):
    if isinstance(x, dict):
        return {k: _drop_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_drop_timing(v) for v in x]
    return x


def test_records_keep_finished_units_and_refuse_other_settings(tmp_path):
    path = tmp_path / "r.records.jsonl"
    rec = RunRecords(path, {"a": 1}, resume=False)
    rec.add("m/0", {"x": [1, 2]})
    with open(path, "a") as f:
        f.write('{"key": "m/1", "val')  # a line cut short by a kill
    again = RunRecords(path, {"a": 1}, resume=True)
    assert again.resumed == 1 and again.get("m/0") == {"x": [1, 2]} and again.get("m/1") is None
    again.add("m/1", 3)
    assert RunRecords(path, {"a": 1}, resume=True).get("m/1") == 3
    with pytest.raises(ValueError, match="other settings"):
        RunRecords(path, {"a": 2}, resume=True)
    assert RunRecords(path, {"a": 2}, resume=False).resumed == 0  # without --resume: starts over
    assert records_path("o/res.json").name == "res.records.jsonl" and records_path("o/ds").name == "ds.records.jsonl"


def test_killed_eval_tts_resumes_to_the_uninterrupted_results(tiny_chat_checkpoint, tmp_path, capsys):
    from eval import tts

    argv = ["--model", str(tiny_chat_checkpoint), "--method", "pld", "--dataset", "arith", "--limit", "3",
            "--max-new-tokens", "24", "--temperature", "0"]
    assert tts.main(argv + ["--output", str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())

    out = tmp_path / "killed.json"
    rec = records_path(out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-m", "eval.tts", *argv, "--output", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if rec.exists() and len(rec.read_text().splitlines()) >= 2:  # settings + the first question's record
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run finished before its first record could be killed"
    assert not out.exists()
    done = len(rec.read_text().splitlines()) - 1
    assert 1 <= done < 6  # 3 ar + 3 pld batches

    capsys.readouterr()
    assert tts.main(argv + ["--output", str(out), "--resume"]) == 0
    assert f"{done} finished batches" in capsys.readouterr().err
    resumed = json.loads(out.read_text())
    assert resumed["config"] == {**whole["config"], "output": str(out)}
    assert _drop_timing(resumed["summary"]) == _drop_timing(whole["summary"])
    assert resumed["samples"] == whole["samples"]


def test_resume_needs_an_output(capsys):
    from eval import tts

    assert tts.main(["--resume"]) == 2
    assert "--output" in capsys.readouterr().err
