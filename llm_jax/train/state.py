"""The train state {"step", "params", "opt_state"}, created already sharded.

Shapes and shardings come from `jax.eval_shape` of the initialiser (no memory touched); the
state is then built by one jit whose `out_shardings` place every parameter and optimizer
moment on its devices as it is created, so no host ever holds a whole unsharded model.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder


def init_params_fn(model_cfg: ModelConfig):
  """rng -> boxed params (nn.LogicallyPartitioned leaves carry logical axis names)."""
  model = Decoder(model_cfg)

  def init(rng):
    tokens_1x8 = jnp.zeros((1, 8), jnp.int32)
    positions_1x8 = jnp.arange(8, dtype=jnp.int32)[None]
    return model.init(rng, tokens_1x8, positions_1x8, jnp.ones_like(tokens_1x8))["params"]
  return init


def param_shardings(model_cfg: ModelConfig, mesh, rules) -> tuple[Any, Any]:
  """(abstract unboxed params, NamedSharding tree) without allocating anything."""
  boxed = jax.eval_shape(init_params_fn(model_cfg), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return nn.meta.unbox(boxed), shardings


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh, rules):
  """(abstract state of ShapeDtypeStructs with .sharding, sharding tree). Optimizer moments
  follow their parameter's sharding; scalars (step, counts) are replicated."""
  abstract_params, p_shard = param_shardings(model_cfg, mesh, rules)
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


def create_state(model_cfg: ModelConfig, optimizer, rng, shardings, params=None):
  """Initialises the state on its devices. With `params` (already sharded, e.g. from
  `config.init_from`), only the optimizer state is fresh."""
  init = init_params_fn(model_cfg)

  def make(rng, params):
    if params is None:
      params = nn.meta.unbox(init(rng))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

  if params is None:
    return jax.jit(lambda r: make(r, None), out_shardings=shardings)(rng)
  return jax.jit(make, out_shardings=shardings, donate_argnums=1)(rng, params)
