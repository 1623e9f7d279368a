"""The planner: its parameter and optimizer memory equals what the trainer allocates, for every
preset and several meshes; device names; the plan it picks; the CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from configs import pretrain
from llm_jax import devices as devices_lib
from llm_jax.plan import search as planner
from llm_jax.model.config import REMAT_POLICIES
from llm_jax.plan import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_planned_state_bytes_equal_the_trainers_for_every_preset():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=32", PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "plan_state_check.py")], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert {r["preset"] for r in res["results"]} == set(pretrain.base.models.PRESETS)
  for r in res["results"]:
    assert r["planner"] == r["trainer"], r
  laid_out = [r for r in res["results"] if r["trainer"] != "indivisible"]
  assert len(laid_out) >= 12 and len(laid_out) < len(res["results"])  # both kinds covered
  assert res["planned"] == res["allocated"]  # bytes really placed on device 0 of 8


def test_device_names():
  v5p = devices_lib.parse("tpu-v5p-64")
  assert (v5p.count, v5p.hosts, v5p.platform, v5p.hbm_bytes) == (32, 8, "tpu", 95e9)
  assert (devices_lib.parse("v4-8").count, devices_lib.parse("v4-8").hosts) == (4, 1)
  assert (devices_lib.parse("v5litepod-16").count, devices_lib.parse("v5litepod-16").hosts) == (16, 4)
  h100 = devices_lib.parse("8xH100")
  assert (h100.count, h100.hosts, h100.peak_flops) == (8, 1, 989e12)
  a100 = devices_lib.parse("2x8xA100-40GB")
  assert (a100.count, a100.per_host, a100.hosts, a100.hbm_bytes) == (16, 8, 2, 40e9)
  with pytest.raises(ValueError, match="--devices='8xGTX480': unknown"):
    devices_lib.parse("8xGTX480")
  with pytest.raises(ValueError, match="multiple of 2"):
    devices_lib.parse("tpu-v5p-3")


def _config(preset, vocab, seq_len, batch, **model):
  c = pretrain.get_config(preset)
  c.model.vocab_size, c.data.seq_len, c.data.batch_size = vocab, seq_len, batch
  c.model.update(model)
  return c


def test_estimates_order_policies_and_kernels():
  cfg = planner.model_config(_config("llama-1b", 128256, 8192, 32))
  layout = memory.Layout(rows=4, seq_len=8192, tensor=1)
  for fused in (True, False):
    acts = [memory.activation_bytes(cfg, layout, p, fused) for p in planner.POLICY_ORDER]
    assert acts == sorted(acts, reverse=True), acts  # each policy keeps less than the one before
  # XLA attention keeps [L, L] scores per head: at 8k it dwarfs everything else.
  assert memory.activation_bytes(cfg, layout, "none", False) > 5 * memory.activation_bytes(cfg, layout, "none", True)
  assert set(planner.POLICY_ORDER) == set(REMAT_POLICIES)
  chunked = dataclasses.replace(cfg, loss_chunk_len=512)
  assert memory.logits_bytes(chunked, layout) < memory.logits_bytes(cfg, layout) / 8


def test_plan_prefers_plain_data_parallel_and_shards_when_needed():
  small = _config("tiny", 4096, 256, 64)
  best, policy, _ = planner.plan(small, devices_lib.parse("8xH100"))
  assert (best.mesh, policy, best.loss_chunk_len) == ({"data": 8, "fsdp": 1, "tensor": 1}, "none", 0)

  big = _config("llama-1b", 128256, 4096, 64)
  gpus = devices_lib.parse("8xL4")  # 24 GB each: the replicated state alone does not fit
  best, policy, tried = planner.plan(big, gpus)
  budget = 0.9 * gpus.hbm_bytes
  assert best.total(policy) <= budget
  assert best.mesh["fsdp"] > 1 and best.mesh["tensor"] == 1
  assert best.loss_chunk_len > 0  # a 128k vocabulary: the chunked loss is chosen before remat
  # Nothing earlier in the preference order fits: no faster policy on this tensor size.
  faster = planner.POLICY_ORDER[:planner.POLICY_ORDER.index(policy)]
  assert not any(o.total(p) <= budget for o in tried if o.mesh["tensor"] == 1 for p in faster)
  assert planner.plan(big, devices_lib.parse("L4"))[0] is None  # one 24 GB GPU: nothing fits


def test_cli_prints_the_plan_and_refuses_unknown_devices():
  run = lambda *a: subprocess.run([sys.executable, "-m", "llm_jax.plan", "--config=configs/pretrain.py:qwen2-0.5b",
                                   "--config.model.vocab_size=151936", "--config.data.seq_len=4096",
                                   "--config.data.batch_size=64", *a], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out = run("--devices=8xH100")
  assert out.returncode == 0, out.stderr[-2000:]
  for line in ("parameters (exact)", "optimizer state (exact)", "activations by remat policy (estimates)",
               "fastest that fits", "run with   --config.mesh.data=", "tokens/s"):
    assert line in out.stdout, out.stdout
  bad = run("--devices=8xGTX480")
  assert bad.returncode != 0 and "--devices='8xGTX480': unknown" in bad.stderr
  assert "Traceback" not in bad.stderr
