"""Run by test_sharded_train.py in a subprocess with 8 virtual CPU devices: the same 5 train
steps on one device and on a data=2, fsdp=2, tensor=2 mesh. Prints JSON of the differences."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import ml_collections
import numpy as np

from configs import base
from llm_jax import sharding
from llm_jax.train.measure import synthetic_batch
from llm_jax.model.config import ModelConfig
from llm_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib


def run(mesh_sizes, devices, grad_accum):
  config = base.get_config()
  cfg = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    mlp_dim=64, tie_embeddings=False)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_sizes), devices)
  rules = config.sharding_rules
  tc = config.train
  # eps 1e-6: Adam keeps float noise in near-zero gradient elements proportional (see
  # moe_sharded_check.py); with 1e-8 a +-1e-9 gradient moves its parameter by +-lr.
  tc.lr, tc.warmup_steps, tc.steps, tc.eps = 3e-3, 2, 5, 1e-6
  opt, sched = opt_lib.make_optimizer(tc), opt_lib.make_schedule(tc)
  _, sh = state_lib.state_shardings(cfg, opt, mesh, rules)
  state = state_lib.create_state(cfg, opt, jax.random.key(0), sh, mesh, rules)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(cfg, opt, sched, grad_accum=grad_accum), sh, mesh, rules)
  losses = []
  with sharding.mesh_context(mesh, rules):
    for i in range(5):
      state, m = step(state, sharding.to_global(synthetic_batch(8, 32, 128, 3, seed=0), mesh, rules))
      losses.append(float(m["loss"]))
  emb_spec = state["params"]["embed"]["embedding"].sharding.spec
  return losses, jax.device_get(state["params"]), str(emb_spec)


def main():
  grad_accum = int(sys.argv[1]) if len(sys.argv) > 1 else 1
  l1, p1, _ = run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], 1)
  l8, p8, spec = run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), grad_accum)
  rel = max(abs(a - b) / abs(a) for a, b in zip(l1, l8))
  # Per parameter: the largest difference relative to the parameter's largest element.
  pdiff = max(float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
              for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
  print(json.dumps({"losses_1": l1, "losses_8": l8, "loss_rel_diff": rel, "param_rel_diff": pdiff,
                    "embedding_spec": spec}))


if __name__ == "__main__":
  main()
