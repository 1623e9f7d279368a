"""Grouped-query self-attention with a causal, block-diagonal (packed documents) mask and a KV cache.

The mask is built here from `segment_ids` (0 = padding, 1.. per packed document): a query sees a key
iff both have the same segment id and the key is not after the query. Padding tokens form their
own "segment 0" block, so each of them sees at least itself and never yields an all-masked row
(no NaN); their outputs are ignored by the loss.

With a KV cache, keys/values are written at slot = the token's position (padding tokens are not
written), and a query at position p sees the cache slots j <= p. See `decoder.init_cache`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm_jax.model import kernels
from llm_jax.model.config import ModelConfig
from llm_jax.model.layers import Projection, RMSNorm, apply_rope


def segment_causal_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """[B, L, L] bool: same segment and key index <= query index."""
  length = segment_ids_BxL.shape[1]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  return same_BxLxL & causal_LxL[None]


def cache_mask(positions_BxL: jax.Array, cache_len: int) -> jax.Array:
  """[B, L, S] bool: a query at position p sees cache slots j <= p."""
  slots_S = jnp.arange(cache_len, dtype=positions_BxL.dtype)
  return slots_S[None, None, :] <= positions_BxL[:, :, None]


def write_cache(cache_BxSxKxH, new_BxLxKxH, positions_BxL, segment_ids_BxL):
  """Scatters each token's key/value into slot = its position; padding tokens are dropped."""
  batch, cache_len = cache_BxSxKxH.shape[:2]
  slot_BxL = jnp.where(segment_ids_BxL > 0, positions_BxL, cache_len)  # out of range -> dropped
  batch_Bx1 = jnp.arange(batch)[:, None]
  return cache_BxSxKxH.at[batch_Bx1, slot_BxL].set(new_BxLxKxH.astype(cache_BxSxKxH.dtype), mode="drop")


def xla_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, dtype):
  """Softmax attention in plain jnp: logits and softmax in float32, GQA without repeating k/v."""
  batch, length, n_heads, head_dim = q_BxLxNxH.shape
  n_kv = k_BxSxKxH.shape[2]
  q_BxLxKxGxH = q_BxLxNxH.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
  logits_BxKxGxLxS = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH,
                                preferred_element_type=jnp.float32) * (head_dim ** -0.5)
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(dtype)
  out_BxLxKxGxH = jnp.einsum("bkgls,bskh->blkgh", probs_BxKxGxLxS, v_BxSxKxH.astype(dtype))
  return out_BxLxKxGxH.reshape(batch, length, n_heads, head_dim)


def cudnn_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL):
  """cuDNN fused (flash) attention through jax.nn.dot_product_attention.

  jax 0.10.2's public API has no segment ids, so packed documents are separated by a boolean
  [B, 1, L, L] segment mask (is_causal adds the causal part inside the kernel). The mask is built
  here from segment_ids, never passed in by callers.
  """
  if jax.default_backend() != "gpu":
    raise ValueError(f"config.model.attention='cudnn' needs a CUDA GPU, but JAX's backend is "
                     f"{jax.default_backend()!r}; set --config.model.attention=xla")
  same_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=same_Bx1xLxL,
                                      is_causal=True, implementation="cudnn")


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
    cfg = self.cfg
    n, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    q_BxLxNxH = Projection("bld,dnh->blnh", (d, n, h), ("embed", "q_heads", "head_dim"), cfg,
                           use_bias=cfg.qkv_bias, bias_axes=("q_heads", "head_dim"), name="q_proj")(x_BxLxD)
    k_BxLxKxH = Projection("bld,dkh->blkh", (d, k, h), ("embed", "kv_heads", "head_dim"), cfg,
                           use_bias=cfg.qkv_bias, bias_axes=("kv_heads", "head_dim"), name="k_proj")(x_BxLxD)
    v_BxLxKxH = Projection("bld,dkh->blkh", (d, k, h), ("embed", "kv_heads", "head_dim"), cfg,
                           use_bias=cfg.qkv_bias, bias_axes=("kv_heads", "head_dim"), name="v_proj")(x_BxLxD)
    if cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
      q_BxLxNxH = RMSNorm(cfg.rms_eps, cfg.compute_dtype, cfg.weight_dtype, "head_dim", name="q_norm")(q_BxLxNxH)
      k_BxLxKxH = RMSNorm(cfg.rms_eps, cfg.compute_dtype, cfg.weight_dtype, "head_dim", name="k_norm")(k_BxLxKxH)
    q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, cfg.rope_theta, cfg.rope_scaling)
    k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, cfg.rope_theta, cfg.rope_scaling)
    q_BxLxNxH = nn.with_logical_constraint(q_BxLxNxH, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    k_BxLxKxH = nn.with_logical_constraint(k_BxLxKxH, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
    v_BxLxKxH = nn.with_logical_constraint(v_BxLxKxH, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))

    new_cache = None
    if cache is not None:
      # Decoding: attend over the whole fixed-size cache (XLA path; one query per row is memory
      # bound, so a fused kernel buys little there).
      k_cache = write_cache(cache["k"], k_BxLxKxH, positions_BxL, segment_ids_BxL)
      v_cache = write_cache(cache["v"], v_BxLxKxH, positions_BxL, segment_ids_BxL)
      new_cache = {"k": k_cache, "v": v_cache}
      mask_BxLxS = cache_mask(positions_BxL, k_cache.shape[1])
      out_BxLxNxH = xla_attention(q_BxLxNxH, k_cache, v_cache, mask_BxLxS, cfg.compute_dtype)
    elif cfg.attention == "cudnn":
      out_BxLxNxH = cudnn_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
    elif not self.is_initializing() and kernels.fused_impl(cfg, q_BxLxNxH.shape[1]):
      # splash (TPU) / pallas_gpu, explicit or by `auto`; init's 1-token dummy takes the XLA path.
      out_BxLxNxH = kernels.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, cfg)
    else:
      out_BxLxNxH = xla_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_causal_mask(segment_ids_BxL),
                                  cfg.compute_dtype)
    out_BxLxNxH = nn.with_logical_constraint(out_BxLxNxH, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    # The remat policy "save_attn_out" keeps exactly this tensor, so the backward pass never
    # recomputes the softmax.
    out_BxLxNxH = checkpoint_name(out_BxLxNxH, "attn_out")
    y_BxLxD = Projection("blnh,nhd->bld", (n, h, d), ("q_heads", "head_dim", "embed"), cfg,
                         name="o_proj")(out_BxLxNxH)
    return y_BxLxD, new_cache
