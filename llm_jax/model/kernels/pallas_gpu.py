"""GPU flash attention with segment ids: JAX's Pallas (Triton) kernel, wrapped.

Why not cuDNN: jax 0.10.2's public `jax.nn.dot_product_attention` takes no segment ids (its
`query_seq_lengths` marks one valid prefix per row, not several documents), so a packed batch
needs a dense [B, 1, L, L] mask there (the `cudnn` setting). The cuDNN packed layout
(`q_offsets`) exists only in the private `jax._src.cudnn` module. This kernel instead compares
the segment ids of each (query tile, key tile) pair on the fly, in the forward and both backward
passes.

GQA: the kernel wants as many key/value heads as query heads, so k and v are repeated over
each group (query head n reads kv head n // group, as in `xla_attention`). The repeat is
[B, L, N, H], linear in L; its transpose sums the group's gradients back.
"""

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention


def block_sizes(bq: int, bkv: int, bq_bwd: int, bkv_bwd: int) -> triton_attention.BlockSizes:
  # The fused backward kernel walks kv tiles (dK, dV) and q tiles (dQ) with one program id, so
  # it needs as many q tiles in the dQ pass as kv tiles in the dK/dV pass: the dQ pass uses
  # the transposed tile pair.
  return triton_attention.BlockSizes(block_q=bq, block_k=bkv, block_q_dkv=bq_bwd,
                                     block_kv_dkv=bkv_bwd, block_q_dq=bkv_bwd, block_kv_dq=bq_bwd)


def attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, blocks, interpret: bool):
  """Causal attention within segments; blocks = (bq, bkv, bq_bwd, bkv_bwd), each dividing L."""
  n_heads, n_kv, head_dim = q_BxLxNxH.shape[2], k_BxLxKxH.shape[2], q_BxLxNxH.shape[3]
  if n_kv != n_heads:
    k_BxLxKxH = jnp.repeat(k_BxLxKxH, n_heads // n_kv, axis=2)
    v_BxLxKxH = jnp.repeat(v_BxLxKxH, n_heads // n_kv, axis=2)
  return triton_attention.mha(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL.astype(jnp.int32),
                              sm_scale=head_dim ** -0.5, causal=True,
                              block_sizes=block_sizes(*blocks), interpret=interpret)
