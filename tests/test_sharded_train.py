"""A sharded run equals a single-device run: 5 train steps, 8 virtual devices vs 1."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sharded_equals_single_device(grad_accum):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_train_check.py"),
                        str(grad_accum)], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["embedding_spec"] == "P('tensor', 'fsdp')"  # really sharded
  assert res["losses_1"][-1] < res["losses_1"][0]  # it trained
  assert res["loss_rel_diff"] <= 1e-4, res
  # Per parameter, relative to its largest element (float noise that Adam carries for 5 steps).
  assert res["param_rel_diff"] <= 1e-4, res
