"""Which fused kernel runs (`config.model.attention`), with which tiles, sharded how.

`auto` takes splash on a TPU and pallas_gpu on a GPU when the sequence length suits the kernel
(else the XLA path, with one log line saying why); `splash` / `pallas_gpu` named explicitly fail
with a message naming the field instead. Kernels are opaque to XLA's sharding propagation, so
they run under `shard_map`: each device attends over its own rows and heads, laid out by the
same logical-axis rules as the rest of the model (act_batch, act_heads, act_kv_heads).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from llm_jax.model.config import ModelConfig

PLATFORM = {"splash": "tpu", "pallas_gpu": "gpu"}
# Tile rules per kernel: default (bq, bkv, bq_bwd, bkv_bwd), the unit a tile is a multiple of,
# and whether it must be a power of two. splash: MaxText's 512 default on v4/v5 TPUs, in units
# of the 128 TPU lanes. pallas_gpu: JAX's own defaults for its Triton kernel (known to fit in
# shared memory), in powers of two >= 16 (Triton's smallest matmul tile); tune per GPU.
TILES = {"splash": ((512, 512, 512, 512), 128, False),
         "pallas_gpu": ((128, 128, 32, 32), 16, True)}
_LOGGED = set()


def _fit_block(want: int, length: int, quantum: int, power_of_two: bool) -> int:
  """The largest tile <= want that divides `length` and is a multiple of `quantum` (and a
  power of two if asked); 0 if there is none."""
  for b in range(min(want, length), quantum - 1, -1):
    if length % b == 0 and b % quantum == 0 and (not power_of_two or b & (b - 1) == 0):
      return b
  return 0


def blocks(cfg: ModelConfig, impl: str, length: int) -> tuple[tuple[int, ...], str]:
  """((bq, bkv, bq_bwd, bkv_bwd), "") for this length, or ((), why the kernel cannot run)."""
  defaults, quantum, pow2 = TILES[impl]
  asked = (cfg.attention_block_q, cfg.attention_block_kv, cfg.attention_block_q_bwd,
           cfg.attention_block_kv_bwd)
  fitted = tuple(_fit_block(a or d, length, quantum, pow2) for a, d in zip(asked, defaults))
  if not all(fitted):
    kind = "a power of two" if pow2 else "a multiple"
    return (), (f"{impl} needs a sequence length with a tile that is {kind} of {quantum} dividing "
                f"it; got length {length}")
  return fitted, ""


def fused_impl(cfg: ModelConfig, length: int) -> str | None:
  """"splash" or "pallas_gpu" when that kernel runs for config.model.attention at this sequence
  length on this platform; None when the XLA (or cudnn) path does."""
  if cfg.attention in ("xla", "cudnn"):
    return None
  platform = jax.default_backend()
  if cfg.attention == "auto":
    impl = {"tpu": "splash", "gpu": "pallas_gpu"}.get(platform)
    if impl is None:
      return None
    _, why = blocks(cfg, impl, length)
    if why:
      if (impl, length) not in _LOGGED:
        _LOGGED.add((impl, length))
        logging.warning("config.model.attention='auto': %s; using the XLA attention", why)
      return None
    return impl
  impl = cfg.attention
  if platform != PLATFORM[impl] and not cfg.attention_interpret:
    raise ValueError(
        f"config.model.attention={impl!r} needs a {PLATFORM[impl].upper()}, but JAX's backend is "
        f"{platform!r}; set --config.model.attention=auto (picks per platform) or xla")
  _, why = blocks(cfg, impl, length)
  if why:
    raise ValueError(f"config.model.attention={impl!r}: {why} (config.data.seq_len); change the "
                     "length or the config.model.attention_block_* tiles, or use attention=auto")
  return impl


def _axes_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[a] for a in names)


def attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, cfg: ModelConfig):
  """Causal attention within packed segments by the kernel `fused_impl` picks, under shard_map
  over the mesh in context (jax.set_mesh); a plain call when there is no mesh."""
  batch, length, n_heads, _ = q_BxLxNxH.shape
  n_kv = k_BxLxKxH.shape[2]
  impl = fused_impl(cfg, length)
  tiles, _ = blocks(cfg, impl, length)
  # Imported here: the Pallas op modules are only loaded by runs that use them.
  if impl == "splash":
    from llm_jax.model.kernels import splash as module  # pylint: disable=import-outside-toplevel
  else:
    from llm_jax.model.kernels import pallas_gpu as module  # pylint: disable=import-outside-toplevel

  def kernel(q, k, v, seg):
    return module.attention(q, k, v, seg, tiles, cfg.attention_interpret)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)

  # Rows and heads follow the model's logical rules; an axis that does not divide its dimension
  # is left whole (correct, only less parallel). The sequence is never split: every query tile
  # needs every key tile of its row.
  b_axes, h_axes, kv_axes = (nn.logical_to_mesh_axes((name,))[0]
                             for name in ("act_batch", "act_heads", "act_kv_heads"))
  if batch % _axes_size(mesh, b_axes):
    b_axes = None
  if n_heads % _axes_size(mesh, h_axes):
    h_axes = None
  if h_axes is not None and (kv_axes != h_axes or n_kv % _axes_size(mesh, h_axes)):
    # KV heads cannot follow the query heads' split: give every query head its own copy, so
    # each device holds the kv heads its query heads read.
    k_BxLxKxH = jnp.repeat(k_BxLxKxH, n_heads // n_kv, axis=2)
    v_BxLxKxH = jnp.repeat(v_BxLxKxH, n_heads // n_kv, axis=2)
  qkv_spec = P(b_axes, None, h_axes, None)
  return jax.shard_map(kernel, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(b_axes, None)),
                       out_specs=qkv_spec, check_vma=False)(
                           q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
