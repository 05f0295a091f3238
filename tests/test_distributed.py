"""Data-parallel eval.tts over two jax.distributed processes on localhost (CPU collectives) writes the
results file one process writes; and the merge of per-process summaries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from specjax.distributed import merge_stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_single_process_results(tiny_chat_checkpoint, tmp_path):
    common = [sys.executable, "-m", "eval.tts", "--model", str(tiny_chat_checkpoint), "--method", "ar,pld",
              "--paradigm", "best_of_n", "--n", "2", "--temperature", "0.8", "--dataset", "arith", "--limit", "5",
              "--max-new-tokens", "8"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    one = subprocess.run(common + ["--output", str(tmp_path / "one.json")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(common + ["--output", str(tmp_path / "two.json"), "--distributed", "--coordinator",
                                        f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    for method in ("ar", "pld"):
        a = json.loads((tmp_path / f"one.{method}.json").read_text())
        b = json.loads((tmp_path / f"two.{method}.json").read_text())
        assert [s["id"] for s in b["samples"]] == [s["id"] for s in a["samples"]]  # every question, in order
        assert b["samples"] == a["samples"]  # same sampled outputs: seeds follow the global question index
        for key in ("questions", "generated_tokens", "accuracy", "maj_at_n", "pass_at_n", "mean_sample_accuracy"):
            assert b["summary"][key] == a["summary"][key], key
    assert "over 2 processes" in " ".join(errs[0].split())  # rich wraps the line


def test_merge_stats():
    part = lambda tokens, wall, mean: {"generated_tokens": tokens, "target_forwards": tokens // 2, "questions": 2,
                                       "wall_s": wall, "tokens_per_s": tokens / wall, "accepted_hist": [0, 2, 3],
                                       "mean_accepted_tokens": mean,
                                       "per_round": [{"round": 1, "wall_s": wall, "generated_tokens": tokens,
                                                      "tokens_per_s": tokens / wall, "mean_accepted_tokens": mean}]}
    m = merge_stats([part(100, 2.0, 2.0), part(60, 3.0, 1.5)])
    assert m["generated_tokens"] == 160 and m["questions"] == 4 and m["wall_s"] == 3.0
    assert m["tokens_per_s"] == pytest.approx(160 / 3.0)  # parallel: the slowest process bounds the wall time
    assert m["accepted_hist"] == [0, 4, 6] and m["mean_accepted_tokens"] == pytest.approx(16 / 10)
    assert m["per_round"][0]["mean_accepted_tokens"] == pytest.approx(160 / (50 + 40))
