"""Sharded LoRA training equals one device: 3 steps with dropout, 8 virtual devices vs 1. The
base stays bit-identical and every adapter tensor moves."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_lora_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "lora_sharded_check.py")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  # Adapters follow their layer's logical axes: really sharded over fsdp and tensor.
  assert res["specs"] == {"k_b": "P(None, None, 'tensor', None)",
                          "o_a": "P(None, 'tensor', None, None)", "up_a": "P(None, 'fsdp', None)",
                          "up_b": "P(None, None, 'tensor')", "head_b": "P(None, 'tensor')"}, res
  assert res["base_unchanged"] and res["adapters_all_moved"], res
  assert res["adapter_init_max_abs_diff"] == 0.0, res  # the same fresh adapters either way
  assert res["losses_1"][-1] < res["losses_1"][0], res  # it trained
  assert res["loss_rel_diff"] <= 1e-4, res
  # Per adapter, relative to its largest element (float noise that Adam carries for 3 steps).
  assert res["adapter_rel_diff"] <= 1e-4, res
