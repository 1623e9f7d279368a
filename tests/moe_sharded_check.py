"""Run by test_moe_sharded.py in a subprocess with 8 virtual CPU devices.

1. Training: 5 steps of an MoE model on one device, and on an expert=4 x data=2 mesh with 2
   microbatches. Prints JSON: losses, the largest relative parameter difference, shardings.
2. Forward: logits and router statistics on an fsdp=2 x expert=2 x tensor=2 mesh against one device.
"""

import json
import os

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import base
from llm_jax import sharding
from llm_jax.train.measure import synthetic_batch
from llm_jax.model.config import ModelConfig, MoEConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib
from llm_jax.model import init as model_init

CFG = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                  tie_embeddings=False,
                  moe=MoEConfig(n_experts=8, top_k=2, expert_mlp_dim=32, n_shared_experts=1,
                                aux_loss_coef=0.01, z_loss_coef=0.001, gmm="auto", gmm_tile=16))
MESH_1 = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}


def _numpy_params():
  """Initial parameters from numpy (compiling the PRNG init costs seconds; any weights will do):
  normal(0.02) kernels, norm scales 1."""
  shapes, _ = model_init.abstract(
      CFG, sharding.make_mesh(ml_collections.ConfigDict(MESH_1), jax.devices()[:1]), base.SHARDING_RULES)
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones(x.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
      else (0.02 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


PARAMS = _numpy_params()


def train(mesh_sizes, devices, grad_accum):
  config = base.get_config()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_sizes), devices)
  rules = config.sharding_rules
  tc = config.train
  # Adam turns float noise in near-zero gradients into update differences proportional to lr:
  # with eps 1e-8 a gradient element of 1e-9 on one mesh and -1e-9 on the other moves its
  # parameter by +lr and -lr. eps 1e-6 keeps updates of such elements proportional to the
  # gradient (real gradient elements here are far above 1e-6), and lr 3e-3 keeps what is left
  # well inside the 1e-4 the parameters are compared at (the loss agrees to ~1e-7).
  tc.lr, tc.warmup_steps, tc.steps, tc.eps = 3e-3, 2, 5, 1e-6
  opt, sched = opt_lib.make_optimizer(tc), opt_lib.make_schedule(tc)
  _, sh = state_lib.state_shardings(CFG, opt, mesh, rules)
  state = state_lib.create_state(CFG, opt, None, sh, mesh, rules, params=jax.device_put(PARAMS, sh["params"]))
  step = step_lib.jit_train_step(step_lib.make_train_step(CFG, opt, sched, grad_accum=grad_accum),
                                 sh, mesh, rules)
  losses, aux = [], []
  with sharding.mesh_context(mesh, rules):
    for i in range(5):
      batch = sharding.to_global(synthetic_batch(16, 16, 128, 3, seed=0), mesh, rules)
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
      aux.append(float(m["moe_aux_loss"]))
  gate = state["params"]["layers"]["moe"]["gate_proj"]
  return losses, aux, jax.device_get(state["params"]), gate


def forward(mesh_sizes, devices, params):
  config = base.get_config()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_sizes), devices)
  rules = config.sharding_rules
  _, shardings = model_init.abstract(CFG, mesh, rules)
  params = jax.device_put(params, shardings)
  b = synthetic_batch(8, 16, 128, 3, seed=9)
  b["segment_ids"][1, 10:] = 0  # padding
  fwd = lambda p, i, q, s: Decoder(CFG).apply({"params": p}, i, q, s, mutable=["intermediates"])
  with sharding.mesh_context(mesh, rules):
    batch = sharding.to_global(b, mesh, rules)
    logits, state = jax.jit(fwd)(params, batch["inputs"], batch["positions"], batch["segment_ids"])
  return np.asarray(logits), jax.device_get(state["intermediates"])


def main():
  l1, a1, p1, _ = train(MESH_1, jax.devices()[:1], 1)
  l8, a8, p8, gate = train({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}, jax.devices(), 2)
  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
  param_rel = max(rel(a, b) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
  f1, s1 = forward(MESH_1, jax.devices()[:1], p1)
  f8, s8 = forward({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}, jax.devices(), p1)
  stats_rel = max(rel(a, b) for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1)))
  print(json.dumps({
      "losses_1": l1, "losses_8": l8, "aux_1": a1, "aux_8": a8,
      "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(l8, l1)), "param_rel_diff": param_rel,
      "gate_spec": str(gate.sharding.spec), "gate_shard": list(gate.addressable_shards[0].data.shape),
      "logits_rel_diff": rel(f8, f1), "stats_rel_diff": stats_rel}))


if __name__ == "__main__":
  main()
