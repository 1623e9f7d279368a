"""The train state {"step", "params", "opt_state"}, created already sharded.

Shapes and shardings come from `jax.eval_shape` of the initialiser (no memory touched); the
parameters and then the optimizer moments are built by jits whose `out_shardings` place each
array on its devices as it is created, so no host ever holds a whole unsharded model.
"""


import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.model import init as model_init
from llm_jax.model.config import ModelConfig
from llm_jax.train import lora_state


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh, rules):
  """(abstract state of ShapeDtypeStructs with .sharding, sharding tree). Optimizer moments
  follow their parameter's sharding; scalars (step, counts) are replicated. With LoRA
  (model_cfg.lora) the params are the adapters and the base is "frozen" (lora_state.py)."""
  if model_cfg.lora is not None:
    return lora_state.state_shardings(model_cfg, optimizer, mesh, rules)
  abstract_params, p_shard = model_init.abstract(model_cfg, mesh, rules)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  o_shard = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, p_shard,
      transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": p_shard, "opt_state": o_shard}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
              "opt_state": abstract_opt}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def create_state(model_cfg: ModelConfig, optimizer, rng, shardings, mesh, rules, params=None):
  """Initialises the state on its devices. With `params` (already sharded, e.g. from
  `config.init_from`), only the optimizer state is fresh. With LoRA, `params` is the base: the
  adapters and their optimizer state are fresh."""
  if model_cfg.lora is not None:
    return lora_state.create_state(model_cfg, optimizer, rng, shardings, mesh, rules, params)
  if params is None:
    params = model_init.init(model_cfg, rng, mesh, rules)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"step": step, "params": params, "opt_state": opt_state}
