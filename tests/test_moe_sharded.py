"""Expert parallelism: an MoE model trained on 8 virtual devices (expert=4 x data=2, 2 microbatches)
equals one device; a forward on fsdp=2 x expert=2 x tensor=2 equals one device."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expert_parallel_training_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "moe_sharded_check.py")], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  # The experts really are split: 8 experts over expert=4 -> 2 per device (leading axis: layers).
  assert res["gate_spec"].startswith("P(None, 'expert'"), res["gate_spec"]
  assert res["gate_shard"][1] == 2, res["gate_shard"]
  assert res["losses_1"][-1] < res["losses_1"][0]  # it trained
  assert 0.9 < res["aux_1"][0] < 2.0  # a real load-balancing statistic (1.0 = balanced)
  assert res["loss_rel_diff"] <= 1e-4, res
  assert res["param_rel_diff"] <= 1e-4, res
  assert res["logits_rel_diff"] <= 1e-5, res
  assert res["stats_rel_diff"] <= 1e-5, res
