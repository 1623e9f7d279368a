"""Building blocks of the decoder: RMSNorm, a logically partitioned einsum projection, RoPE, SwiGLU.

Every parameter is created through `nn.with_logical_partitioning` so that `sharding.py` can map
its logical axis names (see configs/base.py SHARDING_RULES) onto the device mesh.
"""

from typing import Sequence

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model import cpu, precision
from llm_jax.model import lora as lora_lib
from llm_jax.model.config import ModelConfig, RopeScaling


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
    if self.out_dtype == jnp.float32:  # logits: float32 out, matmuls backward in the compute dtype
      y = precision.einsum_f32_out(self.equation, x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype))
    else:  # one 2-D matmul on the CPU (cpu.py)
      y = cpu.flat_einsum(self.equation, x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype),
                          preferred_element_type=self.out_dtype)
    if self.use_bias:
      bias_shape = tuple(self.shape[-len(self.bias_axes):])
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.bias_axes)),
                        bias_shape, cfg.weight_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    if cfg.lora is not None:  # + scale * (x @ A) @ B where config.lora targets this layer
      y = lora_lib.adapt_projection(self, x, y)
    return y


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2 (HF `_compute_default_rope_parameters`)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None
                     ) -> tuple[jax.Array, float]:
  """(inv_freq [head_dim/2] float32, attention factor) of a possibly scaled RoPE.

  Mirrors transformers' ROPE_INIT_FUNCTIONS ("linear", "llama3", "yarn") operation for operation
  in float32: at positions of tens of thousands an angle is position * inv_freq, so one ulp of
  inv_freq moves it by ~1e-3 rad; computing the frequencies the way the checkpoint's reference
  does keeps imported models within float32 round-off of it. The attention factor scales cos and
  sin (yarn; 1 otherwise).
  """
  inv_freq_F = rope_inv_freq(head_dim, theta)
  kind = "none" if scaling is None else scaling.type
  if kind == "none":
    return inv_freq_F, 1.0
  factor = scaling.factor
  if kind == "linear":
    return inv_freq_F / factor, 1.0
  orig = scaling.original_max_position_embeddings
  if kind == "llama3":
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen_F = 2 * math.pi / inv_freq_F
    # Long wavelengths (> orig / lo) are interpolated by `factor`, short ones (< orig / hi) kept,
    # the band between blended smoothly.
    scaled_F = jnp.where(wavelen_F > orig / lo, inv_freq_F / factor, inv_freq_F)
    smooth_F = (orig / wavelen_F - lo) / (hi - lo)
    smoothed_F = (1 - smooth_F) * scaled_F / factor + smooth_F * scaled_F
    medium_F = ~(wavelen_F < orig / hi) & ~(wavelen_F > orig / lo)
    return jnp.where(medium_F, smoothed_F, scaled_F), 1.0
  if kind == "yarn":
    def mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if scaling.attention_factor:
      attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
      attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    else:
      attention_factor = mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in orig
      return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001  # no zero-width ramp
    pos_freqs_F = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ramp_F = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolate_F = 1 - ramp_F  # 1: keep the original frequency, 0: interpolate it by `factor`
    inv_freq_F = (1.0 / (factor * pos_freqs_F)) * (1 - extrapolate_F) + (1.0 / pos_freqs_F) * extrapolate_F
    return inv_freq_F, attention_factor
  raise ValueError(f"unknown rope_scaling.type {kind!r}")


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float,
               scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary embedding in the HF "rotate_half" layout: pairs are (i, i + H/2), not interleaved.

  Positions come from the batch, so they restart at 0 for every packed document. The rotation is
  computed in float32 and cast back to x's dtype. `scaling`: see rope_frequencies.
  """
  head_dim = x_BxLxNxH.shape[-1]
  inv_freq_F, attention_factor = rope_frequencies(head_dim, theta, scaling)
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_F
  sin_BxLx1xF = jnp.sin(angles_BxLxF)[:, :, None, :]
  cos_BxLx1xF = jnp.cos(angles_BxLxF)[:, :, None, :]
  if attention_factor != 1.0:
    sin_BxLx1xF, cos_BxLx1xF = sin_BxLx1xF * attention_factor, cos_BxLx1xF * attention_factor
  x_f32 = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x_f32, 2, axis=-1)
  # [x1, x2] * cos + [-x2, x1] * sin, with cos/sin repeated over both halves.
  out = jnp.concatenate([x1 * cos_BxLx1xF - x2 * sin_BxLx1xF, x2 * cos_BxLx1xF + x1 * sin_BxLx1xF], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig
  mlp_dim: int = 0  # hidden size; 0 = cfg.mlp_dim (MoE shared experts have their own)

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    mlp_dim = self.mlp_dim or cfg.mlp_dim
    gate_BxLxF = Projection("bld,df->blf", (cfg.dim, mlp_dim), ("embed", "mlp"), cfg, name="gate_proj")(x_BxLxD)
    up_BxLxF = Projection("bld,df->blf", (cfg.dim, mlp_dim), ("embed", "mlp"), cfg, name="up_proj")(x_BxLxD)
    h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("act_batch", "act_length", "act_mlp"))
    return Projection("blf,fd->bld", (mlp_dim, cfg.dim), ("mlp", "embed"), cfg, name="down_proj")(h_BxLxF)
