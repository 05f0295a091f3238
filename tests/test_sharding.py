"""Sharding rules, and every method under (data, model) meshes on 8 host devices giving the tokens of one
device (in a subprocess: the device count is fixed when jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_tiny_config
from test_moe import save_tiny_moe


def test_spec_for_divides_or_replicates():
    import jax

    from specjax import sharding

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert sharding.spec_for(mesh, (64, 128), (None, "model")) == sharding.P(None, None)  # axis of size 1
    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.make_mesh(2, 4, devices=jax.devices()[:1])


def test_mesh_rules_and_tokens_on_8_devices(tmp_path):
    import torch
    import transformers as tf

    cfg = hf_tiny_config("llama")
    cfg.num_key_value_heads = 4  # so that a model axis of 4 splits the cache's kv-heads
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # peaky logits: no near-ties that a different reduction order could flip
        model.lm_head.weight.mul_(5.0)
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    save_tiny_moe("qwen3_moe", tmp_path / "moe")
    # XLA:CPU sizes its thread pools max(cores, devices): 8 on a 2-core machine. Its collectives block a pool
    # thread each while they wait for their peers, so 8 devices can fill the pool with waiting collectives and
    # leave a peer's queued; PJRT_NPROC (or NPROC) sets the pools' size (XLA's `DefaultThreadPoolSize`). Even
    # with 64 threads a 2-core CI run once saw 7 of 8 devices wait out the 300 s termination timeout in one
    # collective permute, the eighth never arriving. That hang aborts the process with "Termination timeout";
    # it is not a token mismatch (a wrong token fails every run alike), so the run is repeated once
    flags = "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=120"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}", "JAX_PLATFORMS": "cpu",
           "PJRT_NPROC": "256", "NPROC": "256"}
    script = Path(__file__).parent / "helpers" / "sharded_generate.py"
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "head"),
                               str(tmp_path / "moe")], env=env, capture_output=True, text=True, timeout=1500)
        if proc.returncode == 0 or "Termination timeout for" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["mismatch"] == []
    s = found["specs"]
    # (data 8, model 1): params whole, rows over data
    assert s["(8, 1)"]["wqkv"] == [None, None] and s["(8, 1)"]["cache"] == ["data", None, None, None]
    # (data 2, model 4): column/row splits, kv-heads (4) over model, rows over data
    t = s["(2, 4)"]
    assert t["wqkv"] == [None, "model"] and t["wo"] == ["model", None]
    assert t["w_gate_up"] == [None, "model"] and t["w_down"] == ["model", None]
    assert t["lm_head"] == [None, "model"] and t["attn_norm"] == [None]
    assert t["cache"] == ["data", "model", None, None] and t["tokens"] == ["data", None]
    assert t["shard_shape_wqkv"] == [64, (4 + 2 * 4) * 16 // 4]  # each device holds a quarter of the columns
    assert s["moe"] == {"we_gate_up": ["expert", None, "model"], "we_down": ["expert", "model", None]}
    # (1, 8): 4 kv-heads do not divide by 8: the cache's head dimension stays whole
    assert s["(1, 8)"]["cache"] == [None, None, None, None] and np.prod(
        s["(1, 8)"]["shard_shape_wqkv"]) == 64 * 192 // 8
