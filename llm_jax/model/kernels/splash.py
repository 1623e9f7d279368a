"""TPU splash attention with segment ids: `jax.experimental.pallas.ops.tpu.splash_attention`, wrapped.

The kernel takes one row at a time ([heads, L, head_dim]) and is vmapped over the batch. Its
static mask is causal; the segment ids (same id on both sides, padding included) are and-ed in
per tile, and tiles that the causal mask empties are skipped entirely. Grouped-query attention is
native: query head n reads kv head n // (N / K), exactly as `xla_attention` groups them.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash


def _kernel(n_heads: int, length: int, blocks: tuple[int, int, int, int], interpret: bool):
  # Built per trace (its mask tables become constants of the traced program): the numpy walk
  # over the causal mask's tiles costs milliseconds, once per compile.
  bq, bkv, bq_bwd, bkv_bwd = blocks
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * n_heads)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                            block_q_dkv=bq_bwd, block_kv_dkv=bkv_bwd, block_kv_dkv_compute=bkv_bwd,
                            block_q_dq=bq_bwd, block_kv_dq=bkv_bwd)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, blocks, interpret: bool):
  """Causal attention within segments; blocks = (bq, bkv, bq_bwd, bkv_bwd), multiples of 128
  dividing L."""
  _, length, n_heads, head_dim = q_BxLxNxH.shape
  kernel = _kernel(n_heads, length, tuple(blocks), interpret)
  # The kernel has no softmax scale: scale q (in float32, then back to its dtype).
  q_BxNxLxH = jnp.swapaxes((q_BxLxNxH.astype(jnp.float32) * head_dim ** -0.5).astype(q_BxLxNxH.dtype), 1, 2)
  k_BxKxLxH = jnp.swapaxes(k_BxLxKxH, 1, 2)
  v_BxKxLxH = jnp.swapaxes(v_BxLxKxH, 1, 2)
  segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)

  def one_row(q_NxLxH, k_KxLxH, v_KxLxH, seg_L):
    return kernel(q_NxLxH, k_KxLxH, v_KxLxH, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

  out_BxNxLxH = jax.vmap(one_row)(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, segment_ids_BxL)
  return jnp.swapaxes(out_BxNxLxH, 1, 2)
