"""Run by tests/test_plan.py in a subprocess with 32 virtual CPU devices: for every model preset
and several meshes, the planner's per-device parameter and optimizer bytes against the trainer's
own layout (state.state_shardings: jax.eval_shape of the real state, placed by JAX's
NamedSharding), and against a train state really allocated on 8 devices. Prints JSON."""

import json
import sys

import jax
import numpy as np

from configs import pretrain
from llm_jax import sharding
from llm_jax.model.config import ModelConfig
from llm_jax.plan import memory
from llm_jax.train import optimizer as opt_lib, state as state_lib

VOCAB = {"tiny": 4096, "minimind-26m": 6400, "minimind-moe": 6400, "qwen2-0.5b": 151936, "llama-1b": 128256}
MESHES = [(32, 1, 1), (1, 32, 1), (2, 8, 2), (1, 8, 4)]  # (data, fsdp, tensor)


def trainer_bytes(model_cfg, optimizer, mesh, rules):
  """Per-device bytes of the abstract state the trainer would allocate, or 'indivisible'."""
  abstract, _ = state_lib.state_shardings(model_cfg, optimizer, mesh, rules)
  try:
    size = lambda tree: sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
                            for a in jax.tree.leaves(tree))
    return {"params": size(abstract["params"]),
            "optimizer": size(abstract["opt_state"]) + size(abstract["step"])}
  except ValueError:  # jax's IndivisibleError: JAX will not lay this state out
    return "indivisible"


def planner_bytes(model_cfg, optimizer, sizes, rules):
  try:
    return memory.state_bytes(model_cfg, optimizer, sizes, rules)
  except memory.Indivisible:
    return "indivisible"


def main():
  results = []
  for name, vocab in VOCAB.items():
    config = pretrain.get_config(name)
    model_cfg = ModelConfig.from_config(config.model, vocab_size=vocab)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    optimizer = opt_lib.make_optimizer(config.train)
    for data, fsdp, tensor in MESHES:
      sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
      mesh = sharding.make_mesh(sizes)
      results.append({"preset": name, "mesh": sizes,
                      "trainer": trainer_bytes(model_cfg, optimizer, mesh, rules),
                      "planner": planner_bytes(model_cfg, optimizer, sizes, rules)})
  # A state really created on 8 devices: the bytes of every array's shard on device 0.
  config = pretrain.get_config("tiny")
  model_cfg = ModelConfig.from_config(config.model, vocab_size=VOCAB["tiny"])
  rules = tuple(tuple(r) for r in config.sharding_rules)
  optimizer = opt_lib.make_optimizer(config.train)
  sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  mesh = sharding.make_mesh(sizes, jax.devices()[:8])
  _, sh = state_lib.state_shardings(model_cfg, optimizer, mesh, rules)
  state = state_lib.create_state(model_cfg, optimizer, jax.random.key(0), sh, mesh, rules)
  dev0 = jax.devices()[0]
  on_dev0 = lambda tree: sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards
                             if s.device == dev0)
  allocated = {"params": on_dev0(state["params"]),
               "optimizer": on_dev0(state["opt_state"]) + on_dev0(state["step"])}
  print(json.dumps({"results": results, "allocated": allocated,
                    "planned": planner_bytes(model_cfg, optimizer, sizes, rules)}))


if __name__ == "__main__":
  sys.exit(main())
