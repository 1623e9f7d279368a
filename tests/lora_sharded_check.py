"""Run by test_lora_sharded.py in a subprocess with 8 virtual CPU devices: the same LoRA train
steps (dropout on, a projection of each sharding kind adapted) on one device and on a data=2, fsdp=2, tensor=2
mesh. Prints JSON: the differences, the adapters' shardings, and whether the base stayed put."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import ml_collections
import numpy as np

from configs import base
from llm_jax.train.measure import synthetic_batch
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib
from llm_jax import sharding
from tests.model_reference import random_params

STEPS = 3


def run(mesh_sizes, devices):
  config = base.get_config()
  cfg = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    mlp_dim=64, tie_embeddings=False)
  lcfg = lora.with_lora(cfg, lora.LoraConfig(
      # One projection of each sharding kind: out over kv heads, in over heads, in over embed
      # and out over mlp, out over the vocabulary.
      rank=4, alpha=8.0, dropout=0.1, targets=("k", "o", "up", "lm_head")))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_sizes), devices)
  rules = config.sharding_rules
  tc = config.train
  # eps 1e-6: Adam keeps float noise in near-zero gradient elements proportional (see
  # moe_sharded_check.py); with 1e-8 a +-1e-9 gradient moves its parameter by +-lr.
  tc.lr, tc.warmup_steps, tc.steps, tc.eps = 1e-2, 0, STEPS, 1e-6
  opt, sched = opt_lib.make_optimizer(tc), opt_lib.make_schedule(tc)
  _, sh = state_lib.state_shardings(lcfg, opt, mesh, rules)
  base_host = jax.device_get(random_params(cfg, std=0.1))
  state = state_lib.create_state(lcfg, opt, jax.random.key(0), sh, mesh, rules,
                                 jax.device_put(base_host, sh["frozen"]))
  adapters0 = jax.device_get(state["params"])
  step = step_lib.jit_train_step(step_lib.make_train_step(lcfg, opt, sched), sh, mesh, rules)
  losses = []
  with sharding.mesh_context(mesh, rules):
    for i in range(STEPS):
      batch = synthetic_batch(8, 32, 128, 3, seed=0)  # one batch again and again: loss must fall
      state, m = step(state, sharding.to_global(batch, mesh, rules))
      losses.append(float(m["loss"]))
  frozen = jax.device_get(state["frozen"])
  base_same = all(np.array_equal(a, b) for a, b in
                  zip(jax.tree.leaves(frozen), jax.tree.leaves(base_host)))
  adapters = jax.device_get(state["params"])
  all_moved = all(np.abs(a - b).max() > 0 for a, b in
                  zip(jax.tree.leaves(adapters), jax.tree.leaves(adapters0)))
  p = state["params"]
  specs = {"k_b": str(p["layers"]["attn"]["k_proj"]["lora_b"].sharding.spec),
           "o_a": str(p["layers"]["attn"]["o_proj"]["lora_a"].sharding.spec),
           "up_a": str(p["layers"]["mlp"]["up_proj"]["lora_a"].sharding.spec),
           "up_b": str(p["layers"]["mlp"]["up_proj"]["lora_b"].sharding.spec),
           "head_b": str(p["lm_head"]["lora_b"].sharding.spec)}
  return losses, adapters0, adapters, base_same, all_moved, specs


def main():
  l1, a0_1, p1, same1, moved1, _ = run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  l8, a0_8, p8, same8, moved8, specs = run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  rel = max(abs(a - b) / abs(a) for a, b in zip(l1, l8))
  init_diff = max(float(np.max(np.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(a0_1), jax.tree.leaves(a0_8)))
  # Per adapter: the largest difference relative to the adapter's largest element.
  pdiff = max(float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
              for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
  print(json.dumps({"losses_1": l1, "losses_8": l8, "loss_rel_diff": rel,
                    "adapter_init_max_abs_diff": init_diff, "adapter_rel_diff": pdiff,
                    "base_unchanged": same1 and same8, "adapters_all_moved": moved1 and moved8,
                    "specs": specs}))


if __name__ == "__main__":
  main()
