"""Building blocks of the decoder: RMSNorm, a logically partitioned einsum projection, RoPE, SwiGLU.

Every parameter is created through `nn.with_logical_partitioning` so that `sharding.py` can map
its logical axis names (see configs/base.py SHARDING_RULES) onto the device mesh.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model import cpu
from llm_jax.model.config import ModelConfig


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * scale, computed in float32 (HF Llama/Qwen), cast back."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x_f32 = x.astype(jnp.float32)
    x_f32 = x_f32 * jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + self.eps)
    return (x_f32 * scale.astype(jnp.float32)).astype(self.dtype)


class Projection(nn.Module):
  """`einsum(equation, x, kernel)` with a kernel of `shape` and logical axes `axes` (+ optional bias).

  A plain einsum rather than nn.DenseGeneral keeps the kernel shape (e.g. [dim, heads, head_dim])
  exactly as the parameter-tree contract in common.md states, and the einsum readable.
  """
  equation: str
  shape: Sequence[int]
  axes: Sequence[str]
  cfg: ModelConfig
  use_bias: bool = False
  bias_axes: Sequence[str] = ()
  out_dtype: jnp.dtype | None = None  # e.g. float32 for the logits: accumulate and return in f32

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), tuple(self.axes)),
        tuple(self.shape), cfg.weight_dtype)
    y = cpu.flat_einsum(self.equation, x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype),
                        preferred_element_type=self.out_dtype)
    if self.use_bias:
      bias_shape = tuple(self.shape[-len(self.bias_axes):])
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.bias_axes)),
                        bias_shape, cfg.weight_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2 (HF `_compute_default_rope_parameters`)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF "rotate_half" layout: pairs are (i, i + H/2), not interleaved.

  Positions come from the batch, so they restart at 0 for every packed document. The rotation is
  computed in float32 and cast back to x's dtype.
  """
  head_dim = x_BxLxNxH.shape[-1]
  inv_freq_F = rope_inv_freq(head_dim, theta)
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_F
  sin_BxLx1xF = jnp.sin(angles_BxLxF)[:, :, None, :]
  cos_BxLx1xF = jnp.cos(angles_BxLxF)[:, :, None, :]
  x_f32 = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x_f32, 2, axis=-1)
  # [x1, x2] * cos + [-x2, x1] * sin, with cos/sin repeated over both halves.
  out = jnp.concatenate([x1 * cos_BxLx1xF - x2 * sin_BxLx1xF, x2 * cos_BxLx1xF + x1 * sin_BxLx1xF], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    gate_BxLxF = Projection("bld,df->blf", (cfg.dim, cfg.mlp_dim), ("embed", "mlp"), cfg, name="gate_proj")(x_BxLxD)
    up_BxLxF = Projection("bld,df->blf", (cfg.dim, cfg.mlp_dim), ("embed", "mlp"), cfg, name="up_proj")(x_BxLxD)
    h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("act_batch", "act_length", "act_mlp"))
    return Projection("blf,fd->bld", (cfg.mlp_dim, cfg.dim), ("mlp", "embed"), cfg, name="down_proj")(h_BxLxF)
