"""Device mesh, logical-axis sharding and multi-host start-up.

The mesh has four axes, sized by `config.mesh`:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism whose parameters/optimizer state are sharded (ZeRO-3 style)
  expert  expert parallelism: MoE experts are split over it; everything else treats it as data
          parallelism (the batch is split over it too; see model/moe.py)
  tensor  tensor parallelism over attention heads, MLP hidden units and the vocabulary
Parameters and activations carry logical axis names (configs/base.py SHARDING_RULES maps them to
mesh axes). How callers must wrap tracing so the model's `nn.with_logical_constraint`s apply:

  mesh = make_mesh(config.mesh)
  rules = config.sharding_rules
  params = model_init.init(model_cfg, rng, mesh, rules)       # llm_jax/model/init.py: sharded
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):      # around jit *tracing and calls*
    logits = jax.jit(lambda p, b: Decoder(model_cfg).apply({"params": p}, ...))(params, batch)

`jax.set_mesh` (jax 0.10.2; `with mesh:` is deprecated and no longer sets the mesh flax reads) must
be entered outside jit. Without a mesh in context the constraints are no-ops, so single-device
code needs no wrapping at all.
"""

import contextlib
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
  """Resolves config.mesh.{data,fsdp,expert,tensor} (one may be -1: the devices left over). An
  axis the config does not name (e.g. `expert` in older configs) has size 1."""
  sizes = {name: int(mesh_cfg[name]) if name in mesh_cfg else 1 for name in MESH_AXES}
  fill = [name for name, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one of {fill} may be -1 (it takes the devices left over)")
  for name, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{name}={s}: must be a positive size or -1")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if n_devices % known:
      bad = [n for n in MESH_AXES if sizes[n] != -1 and n_devices % sizes[n]] or [n for n in MESH_AXES if sizes[n] != -1]
      raise ValueError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: the fixed mesh sizes (product {known}) must "
                       f"divide the {n_devices} devices")
    sizes[fill[0]] = n_devices // known
  elif known != n_devices:
    raise ValueError(f"config.mesh: data*fsdp*expert*tensor = {known} but there are {n_devices} devices; "
                     f"set one of config.mesh.data/fsdp/expert/tensor to -1 or make the product {n_devices}")
  return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp", "expert", "tensor") mesh over `devices` (default: all devices of all processes).

  Axes are Auto (GSPMD propagates shardings from the constraints), not jax.make_mesh's default of
  Explicit sharding-in-types.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_shardings(logical_spec_tree, mesh: Mesh, rules):
  """A tree of logical PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


def logical_sharding(mesh: Mesh, rules, *logical_axes: str | None) -> NamedSharding:
  """The NamedSharding of one array whose dimensions have these logical names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of the [batch, length] arrays of a training batch (act_batch, act_length)."""
  return logical_sharding(mesh, rules, "act_batch", "act_length")


def row_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Every batch array is split over its leading (row) axis by the act_batch rule, whatever its
  rank, so objectives may carry keys of any shape ([B, L] tokens, [B] pair ids, ...)."""
  return NamedSharding(mesh, P(batch_sharding(mesh, rules).spec[0]))


def to_global(batch: dict, mesh: Mesh, rules) -> dict:
  """Per-process numpy rows -> one global jax.Array per key (multi-host safe)."""
  sh = row_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """Tracing context: the mesh for sharding constraints and the logical -> mesh axis rules
  the model's `nn.with_logical_constraint` calls read."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def maybe_initialize_distributed() -> None:
  """Starts jax.distributed when this is one process of a multi-process job; else does nothing.

  - JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID set (launch/ scripts,
    any cluster): initialise with exactly those.
  - SLURM with more than one task (SLURM_NTASKS > 1), or a multi-host Cloud TPU slice
    (TPU_WORKER_HOSTNAMES lists more than one host): `jax.distributed.initialize()` with no arguments,
    which auto-detects the coordinator and process ids from that environment.
  - Otherwise (one process: laptop, one GPU box, single-host TPU) nothing is initialised.
  Safe to call twice. Logs process index/count and local/global device counts.
  """
  env = os.environ
  explicit = "JAX_COORDINATOR_ADDRESS" in env
  detected = (int(env.get("SLURM_NTASKS", "1")) > 1 or
              len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
  if (explicit or detected) and not jax.distributed.is_initialized():
    # CPU processes need a collectives backend to talk to each other (local multi-process runs,
    # CPU clusters); GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
      missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
      if missing:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three "
                         "(see launch/) or none")
      jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                 num_processes=int(env["JAX_NUM_PROCESSES"]),
                                 process_id=int(env["JAX_PROCESS_ID"]))
    else:
      jax.distributed.initialize()
  logging.info("process %d of %d; %d local devices, %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
