"""Fused attention kernels that read packed-document segment ids tile by tile.

  impl = kernels.fused_impl(cfg, length)    # "splash" | "pallas_gpu" | None (use the XLA path)
  out_BxLxNxH = kernels.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, cfg)

Both kernels compute the same function as `attention.xla_attention` with the causal,
block-diagonal mask of `segment_causal_mask` (padding, segment 0, is its own causal block), but
never materialise anything of size [L, L]: memory stays linear in the sequence length, in the
forward and the backward pass. Each sits in its own wrapper module (the Pallas op APIs move fast):

  splash.py      TPU: jax.experimental.pallas.ops.tpu.splash_attention (native GQA)
  pallas_gpu.py  GPU: jax.experimental.pallas.ops.gpu.attention, a Triton flash kernel
  dispatch.py    `auto` per platform, shape checks, and the shard_map over the device mesh
"""

from llm_jax.model.kernels.dispatch import attention, fused_impl

__all__ = ["attention", "fused_impl"]
