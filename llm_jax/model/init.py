"""The decoder's variables without running it: abstract shapes, shardings and a sharded init.

One `jax.eval_shape` of `Decoder.init` serves the full parameters ("params"), LoRA's adapters
("lora") and the planner's per-device sizes:

  abstract_PxS, shardings = abstract(cfg, mesh, rules)              # nothing allocated
  params = init(cfg, rng, mesh, rules)                              # each array in its sharding
  adapters = init(lora_cfg, rng, mesh, rules, lora.COLLECTION)      # B = 0; the base is not built
  shapes, specs = mesh_specs(cfg, rules)                            # no mesh needed (plan/)

Each array carries its layer's logical axes (see sharding.py), mapped to mesh axes by `rules`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder

PARAMS = "params"


def _hashable(rules):
  return tuple(_hashable(r) for r in rules) if isinstance(rules, (list, tuple)) else rules


def _init_fn(cfg: ModelConfig, collection: str):
  def init_vars(rng):
    ids_BxL = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg).init(rng, ids_BxL, ids_BxL, jnp.ones_like(ids_BxL))[collection]
  return init_vars


@functools.lru_cache(maxsize=32)
def _boxed(cfg: ModelConfig, collection: str, mesh, rules):
  """eval_shape of the collection, with its logical-axis boxes (cached: jobs and plans ask often)."""
  init_vars = _init_fn(cfg, collection)
  if mesh is None:
    return jax.eval_shape(init_vars, jax.random.key(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.eval_shape(init_vars, jax.random.key(0))


def _unbox(boxed):
  # No sharding constraint on abstract values: callers may already be inside a mesh context.
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False), boxed,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def abstract(cfg: ModelConfig, mesh, rules, collection: str = PARAMS):
  """(ShapeDtypeStruct tree of the collection's unboxed arrays, NamedSharding tree on `mesh`)."""
  rules = _hashable(rules)
  boxed = _boxed(cfg, collection, mesh, rules)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  return _unbox(boxed), shardings


def init(cfg: ModelConfig, rng: jax.Array, mesh, rules, collection: str = PARAMS):
  """The collection's arrays, each created directly in its sharding (no host copy). For the
  "lora" collection jit drops the base's initialisation as dead code."""
  _, shardings = abstract(cfg, mesh, rules, collection)
  init_vars = _init_fn(cfg, collection)
  with jax.set_mesh(mesh), nn.logical_axis_rules(_hashable(rules)):
    return jax.jit(lambda r: nn.unbox(init_vars(r)), out_shardings=shardings)(rng)


def mesh_specs(cfg: ModelConfig, rules, collection: str = PARAMS):
  """(ShapeDtypeStruct tree, mesh PartitionSpec tree) without a mesh: how each array would be
  split over the mesh axes `rules` name (the planner tries many meshes of one model)."""
  rules = _hashable(rules)
  boxed = _boxed(cfg, collection, None, rules)
  specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(s, rules), nn.get_partition_spec(boxed),
                       is_leaf=lambda x: isinstance(x, P))
  return _unbox(boxed), specs
