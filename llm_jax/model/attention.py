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
from llm_jax.model import cpu
from llm_jax.model import cpu_attention
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


def write_cache(cache_BxSxKxH, new_BxLxKxH, positions_BxL, segment_ids_BxL, head_major: bool = False):
  """Scatters each token's key/value into slot = its position; padding tokens are dropped.
  head_major: the cache is [B, K, S, H] (decoder.init_cache(per_layer=True)) instead."""
  batch, cache_len = cache_BxSxKxH.shape[0], cache_BxSxKxH.shape[2 if head_major else 1]
  slot_BxL = jnp.where(segment_ids_BxL > 0, positions_BxL, cache_len)  # out of range -> dropped
  batch_Bx1 = jnp.arange(batch)[:, None]
  new_BxLxKxH = new_BxLxKxH.astype(cache_BxSxKxH.dtype)
  if head_major:  # indices around a slice: the indexed view is [B, L, K, H], as new_BxLxKxH
    return cache_BxSxKxH.at[batch_Bx1, :, slot_BxL].set(new_BxLxKxH, mode="drop")
  return cache_BxSxKxH.at[batch_Bx1, slot_BxL].set(new_BxLxKxH, mode="drop")


def one_token_step(cache, length: int) -> bool:
  """True when a cached call decodes one token per row. Then each layer attends to its cache and to
  the new token's own key/value without writing them, returns only those ({"k", "v"} of
  [B, 1, K, H]), and the decoder writes every layer's into the stacked cache in one scatter
  (`write_token`): no layer copies or rewrites its [B, S, K, H] cache at every token."""
  return cache is not None and length == 1


def write_token(cache_NxBxSxKxH, new_NxBx1xKxH, positions_Bx1, segment_ids_Bx1):
  """Every layer's new key/value (n_layers leading) into slot = the token's position, in place
  when the cache is donated; padding rows are dropped (as `write_cache` does)."""
  batch, cache_len = cache_NxBxSxKxH.shape[1:3]
  slot_B = jnp.where(segment_ids_Bx1[:, 0] > 0, positions_Bx1[:, 0], cache_len)
  return cache_NxBxSxKxH.at[:, jnp.arange(batch), slot_B].set(
      new_NxBx1xKxH[:, :, 0].astype(cache_NxBxSxKxH.dtype), mode="drop")


def attention_with_new_token(q_Bx1xNxH, k_cache_BxSxKxH, v_cache_BxSxKxH, k_Bx1xKxH, v_Bx1xKxH,
                             positions_Bx1, dtype):
  """One query per row over cache slots j < p plus the token's own key/value (slot p): the same
  softmax as writing the token into the cache first and attending to slots j <= p.

  Written as broadcast products and sums rather than einsums: with G queries per key/value head
  there is nothing for a matmul to reuse, and XLA then reads the cache in its stored [B, S, K, H]
  layout instead of transposing every layer's cache at every token.
  """
  batch, _, n_heads, head_dim = q_Bx1xNxH.shape
  n_kv = k_cache_BxSxKxH.shape[2]
  f32 = jnp.float32
  q_Bx1xKxGxH = q_Bx1xNxH.astype(dtype).astype(f32).reshape(batch, 1, n_kv, n_heads // n_kv, head_dim)
  scale = head_dim ** -0.5
  k_BxSxKx1xH = k_cache_BxSxKxH.astype(dtype).astype(f32)[:, :, :, None, :]
  logits_BxSxKxG = jnp.sum(q_Bx1xKxGxH * k_BxSxKx1xH, axis=-1) * scale
  slots_S = jnp.arange(k_cache_BxSxKxH.shape[1], dtype=positions_Bx1.dtype)
  seen_BxS = slots_S[None] < positions_Bx1
  logits_BxSxKxG = jnp.where(seen_BxS[:, :, None, None], logits_BxSxKxG, jnp.finfo(f32).min)
  self_Bx1xKxG = jnp.sum(q_Bx1xKxGxH * k_Bx1xKxH.astype(dtype).astype(f32)[:, :, :, None, :], axis=-1) * scale
  max_Bx1xKxG = jnp.maximum(jnp.max(logits_BxSxKxG, axis=1, keepdims=True), self_Bx1xKxG)
  exp_BxSxKxG = jnp.exp(logits_BxSxKxG - max_Bx1xKxG)
  exp_self_Bx1xKxG = jnp.exp(self_Bx1xKxG - max_Bx1xKxG)
  denom_Bx1xKxG = jnp.sum(exp_BxSxKxG, axis=1, keepdims=True) + exp_self_Bx1xKxG
  probs_BxSxKxG = (exp_BxSxKxG / denom_Bx1xKxG).astype(dtype).astype(f32)
  out_BxKxGxH = jnp.sum(probs_BxSxKxG[..., None] * v_cache_BxSxKxH.astype(dtype).astype(f32)[:, :, :, None, :], axis=1)
  probs_self_Bx1xKxG = (exp_self_Bx1xKxG / denom_Bx1xKxG).astype(dtype).astype(f32)
  out_BxKxGxH = out_BxKxGxH + probs_self_Bx1xKxG[:, 0, :, :, None] * v_Bx1xKxH.astype(dtype).astype(f32)[:, 0, :, None, :]
  return out_BxKxGxH.astype(dtype).reshape(batch, 1, n_heads, head_dim)


def attention_over_cache(q_Bx1xNxH, k_cache_BxKxSxH, v_cache_BxKxSxH, positions_Bx1, dtype):
  """One query per row over a head-major cache whose slot p already holds the query's own key and
  value: slots j <= p. The scores and the value sum are batched matmuls over (b, k) with G query
  rows each, reading contiguous [S, H] blocks (decode attention at 26M: 55 -> 25 us per layer at
  batch 1, 231 -> 170 at batch 8 against broadcast products and sums over a [B, S, K, H]
  cache, this machine)."""
  batch, _, n_heads, head_dim = q_Bx1xNxH.shape
  n_kv = k_cache_BxKxSxH.shape[1]
  q_BxKxGxH = q_Bx1xNxH.astype(dtype).reshape(batch, n_kv, n_heads // n_kv, head_dim)
  logits_BxKxGxS = jnp.einsum("bkgh,bksh->bkgs", q_BxKxGxH, k_cache_BxKxSxH.astype(dtype),
                              preferred_element_type=jnp.float32) * (head_dim ** -0.5)
  slots_S = jnp.arange(k_cache_BxKxSxH.shape[2], dtype=positions_Bx1.dtype)
  seen_Bx1x1xS = (slots_S[None] <= positions_Bx1)[:, None, None, :]
  logits_BxKxGxS = jnp.where(seen_Bx1x1xS, logits_BxKxGxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxS = jax.nn.softmax(logits_BxKxGxS, axis=-1).astype(dtype)
  out_BxKxGxH = jnp.einsum("bkgs,bksh->bkgh", probs_BxKxGxS, v_cache_BxKxSxH.astype(dtype),
                           preferred_element_type=jnp.float32)
  return out_BxKxGxH.astype(dtype).reshape(batch, 1, n_heads, head_dim)


def xla_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, dtype, causal=False):
  """Softmax attention in plain jnp: logits and softmax in float32, GQA without repeating k/v.

  causal=True promises that the mask hides every key after its query (self-attention, index
  order). Then, on the CPU, long sequences run in query blocks that skip the keys after each
  block (cpu.query_blocks); every row still sees all its unmasked keys, so results are unchanged.
  """
  blocks = cpu.query_blocks(q_BxLxNxH.shape[1], k_BxSxKxH.shape[1]) if causal else [(0, q_BxLxNxH.shape[1])]
  if len(blocks) > 1:
    return jnp.concatenate([_softmax_attention(q_BxLxNxH[:, a:b], k_BxSxKxH[:, :b], v_BxSxKxH[:, :b],
                                               mask_BxLxS[:, a:b, :b], dtype) for a, b in blocks], axis=1)
  return _softmax_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, dtype)


def _softmax_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, dtype):
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
  # The cache given is this layer's own head-major [B, K, S, H] buffer (decoder.init_cache with
  # per_layer=True), not a [B, S, K, H] slice of the stacked one. Decoding one token then writes
  # its key/value first and attends to slots j <= p: XLA updates the cache in place because the
  # read depends on the write; reading the old cache and writing after made it copy the cache at
  # every token. Returns the updated cache.
  own_cache: bool = False
  # Prefill of an empty cache (positions from 0): causal self-attention over the new tokens alone,
  # as in training (the CPU's fast path included), then their keys/values are written; attending
  # over the whole fixed-size cache did several times the work at a short prompt.
  fresh_cache: bool = False

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
    if one_token_step(cache, q_BxLxNxH.shape[1]) and not self.own_cache:
      # Decoding one token: its own key/value go back to the decoder, which writes all layers'.
      new_cache = {"k": k_BxLxKxH, "v": v_BxLxKxH}
      out_BxLxNxH = attention_with_new_token(q_BxLxNxH, cache["k"], cache["v"], k_BxLxKxH, v_BxLxKxH,
                                             positions_BxL, cfg.compute_dtype)
    elif cache is not None:
      head_major = self.own_cache
      new_cache = {"k": write_cache(cache["k"], k_BxLxKxH, positions_BxL, segment_ids_BxL, head_major),
                   "v": write_cache(cache["v"], v_BxLxKxH, positions_BxL, segment_ids_BxL, head_major)}
      if one_token_step(cache, q_BxLxNxH.shape[1]):  # own cache, token written: slots j <= p
        out_BxLxNxH = attention_over_cache(q_BxLxNxH, new_cache["k"], new_cache["v"], positions_BxL,
                                           cfg.compute_dtype)
      elif self.fresh_cache:  # nothing before these tokens: attend among them alone
        out_BxLxNxH = self._self_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
      else:
        # Prefill: attend over the whole fixed-size cache (XLA path; one query per row is memory
        # bound, so a fused kernel buys little there).
        k_BxSxKxH, v_BxSxKxH = new_cache["k"], new_cache["v"]
        if head_major:
          k_BxSxKxH, v_BxSxKxH = jnp.swapaxes(k_BxSxKxH, 1, 2), jnp.swapaxes(v_BxSxKxH, 1, 2)
        mask_BxLxS = cache_mask(positions_BxL, k_BxSxKxH.shape[1])
        out_BxLxNxH = xla_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, cfg.compute_dtype)
    else:
      out_BxLxNxH = self._self_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
    out_BxLxNxH = nn.with_logical_constraint(out_BxLxNxH, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    # The remat policy "save_attn_out" keeps exactly this tensor, so the backward pass never
    # recomputes the softmax.
    out_BxLxNxH = checkpoint_name(out_BxLxNxH, "attn_out")
    y_BxLxD = Projection("blnh,nhd->bld", (n, h, d), ("q_heads", "head_dim", "embed"), cfg,
                         name="o_proj")(out_BxLxNxH)
    return y_BxLxD, new_cache

  def _self_attention(self, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL):
    """Causal attention within each segment of the given tokens, by the configured implementation."""
    cfg = self.cfg
    if cfg.attention == "cudnn":
      return cudnn_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
    if not self.is_initializing() and kernels.fused_impl(cfg, q_BxLxNxH.shape[1]):
      # splash (TPU) / pallas_gpu, explicit or by `auto`; init's 1-token dummy takes the XLA path.
      return kernels.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, cfg)
    if cpu.on_cpu():
      # The same function with a flash-style backward pass that XLA's CPU backend runs faster.
      return cpu_attention.causal_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL,
                                            cfg.compute_dtype)
    return xla_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_causal_mask(segment_ids_BxL),
                         cfg.compute_dtype, causal=True)
