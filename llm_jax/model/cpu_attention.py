"""Causal self-attention for training on the CPU: flash attention's math, XLA's matmuls.

The same function as `attention.xla_attention(..., segment_causal_mask(segment_ids), causal=True)`
(float round-off only), with its own backward pass (FlashAttention-2's):

- forward: per query block, scores, row max, exp and row sum, then the value matmul divided by
  the row sum after the matmul ([Q, H] divisions instead of [Q, S]). It keeps the output and the
  log-sum-exp per row; the [B, N, L, L] probabilities are never stored for the backward pass.
- backward: per block, the probabilities are recomputed from the scores and the log-sum-exp in
  one pass, and dS = P * (dP - rowsum(dO * O)) in one more; autodiff of the softmax took about
  six passes over the scores and kept them all alive.

What made the plain formulation slow on the CPU (profile of the minimind-26m step; timings in
docs/benchmarks.md): the five-dimensional GQA einsums made XLA transpose scores and their gradients
between the matmuls, and the softmax's elementwise passes (mask, max, exp, divide, and their
gradients) cost more than the attention matmuls themselves. Here q, k and v are put head-major
once per layer ([B, K, L, G, H], the G query heads of a key/value head next to each other, so a
block of queries is one [Q = rows x G, H] matrix per kv head) and every matmul is batched over
(B, K) with its contracted axis where XLA's dot wants it. The backward pass works with the
transposed scores [S, Q], which makes dK and dV plain matmuls; only the small dQ^T comes out
transposed.

Queries run in the blocks of `cpu.query_blocks`, each seeing keys [0, block end): most masked
work is skipped and every softmax row is still whole.
"""

import functools

import jax
import jax.numpy as jnp

from llm_jax.model import cpu

_NEG = jnp.finfo(jnp.float32).min


def causal_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, dtype):
  """[B, L, N, H] attention output; a query sees the keys of its own segment up to itself
  (padding, segment 0, is one more segment). Matmul inputs in `dtype`, softmax in float32."""
  # Cast outside the custom VJP: the casts' own gradients return dq/dk/dv in the inputs' dtypes.
  dtype = jnp.dtype(dtype)
  return _attention(q_BxLxNxH.astype(dtype), k_BxLxKxH.astype(dtype), v_BxLxKxH.astype(dtype),
                    segment_ids_BxL, dtype)


def _heads(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH):
  """Head-major copies: q [B, K, L, G, H], k and v [B, K, L, H]."""
  batch, length, n_heads, head_dim = q_BxLxNxH.shape
  n_kv = k_BxLxKxH.shape[2]
  q_BxKxLxGxH = q_BxLxNxH.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
  return (q_BxKxLxGxH.transpose(0, 2, 1, 3, 4), k_BxLxKxH.transpose(0, 2, 1, 3),
          v_BxLxKxH.transpose(0, 2, 1, 3))


def _block_mask(segment_ids_BxL, start: int, end: int, group: int):
  """[B, 1, Q, end] bool, Q = (rows, G) merged as in `_rows`: query rows [start, end) (each
  repeated for the G query heads of a kv head) against keys [0, end), in the scores' own
  [B, K, Q, S] layout. Callers add it as a bias (0 or float32's min) rather than select with it:
  the select on a 5-D view of the scores cost the forward pass a quarter of its time, the add
  fuses with the score matmul (attention microbenchmark, 26M shape: forward 41 -> 31 ms)."""
  seg_q_BxQ = jnp.repeat(segment_ids_BxL[:, start:end], group, axis=1)
  pos_q_Q = jnp.repeat(jnp.arange(start, end), group)
  same_BxQxS = seg_q_BxQ[:, :, None] == segment_ids_BxL[:, None, :end]
  return (same_BxQxS & (pos_q_Q[:, None] >= jnp.arange(end)[None, :])[None])[:, None]


def _rows(x_BxKxLxG_, start: int, end: int):
  """Rows [start, end) of a head-major tensor, (rows, G) merged into Q (a free reshape)."""
  blk = x_BxKxLxG_[:, :, start:end]
  return blk.reshape(blk.shape[0], blk.shape[1], -1, *blk.shape[4:])


def _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, dtype):
  q_BxKxLxGxH, k_BxKxLxH, v_BxKxLxH = _heads(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)
  batch, n_kv, length, group, head_dim = q_BxKxLxGxH.shape
  scale = head_dim ** -0.5
  outs, lses = [], []
  for start, end in cpu.query_blocks(length, length):
    q_BxKxQxH = _rows(q_BxKxLxGxH, start, end)
    s_BxKxQxS = jnp.einsum("bkqh,bksh->bkqs", q_BxKxQxH, k_BxKxLxH[:, :, :end],
                           preferred_element_type=jnp.float32) * scale
    s_BxKxQxS = s_BxKxQxS + jnp.where(_block_mask(segment_ids_BxL, start, end, group), 0.0, _NEG)
    max_BxKxQ = jnp.max(s_BxKxQxS, axis=-1)
    p_BxKxQxS = jnp.exp(s_BxKxQxS - max_BxKxQ[..., None])
    sum_BxKxQ = jnp.sum(p_BxKxQxS, axis=-1)
    o_BxKxQxH = jnp.einsum("bkqs,bksh->bkqh", p_BxKxQxS.astype(dtype), v_BxKxLxH[:, :, :end],
                           preferred_element_type=jnp.float32) / sum_BxKxQ[..., None]
    outs.append(o_BxKxQxH.reshape(batch, n_kv, end - start, group, head_dim))
    lses.append((max_BxKxQ + jnp.log(sum_BxKxQ)).reshape(batch, n_kv, end - start, group))
  o_BxKxLxGxH = jnp.concatenate(outs, axis=2).astype(dtype)
  lse_BxKxLxG = jnp.concatenate(lses, axis=2)
  out_BxLxNxH = o_BxKxLxGxH.transpose(0, 2, 1, 3, 4).reshape(q_BxLxNxH.shape)
  return out_BxLxNxH, (q_BxKxLxGxH, k_BxKxLxH, v_BxKxLxH, o_BxKxLxGxH, lse_BxKxLxG)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, dtype):
  return _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, dtype)[0]


def _attention_fwd(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, dtype):
  out_BxLxNxH, res = _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, dtype)
  return out_BxLxNxH, (res, segment_ids_BxL)


def _attention_bwd(dtype, saved, dout_BxLxNxH):
  (q_BxKxLxGxH, k_BxKxLxH, v_BxKxLxH, o_BxKxLxGxH, lse_BxKxLxG), segment_ids_BxL = saved
  batch, n_kv, length, group, head_dim = q_BxKxLxGxH.shape
  scale = head_dim ** -0.5
  do_BxKxLxGxH = dout_BxLxNxH.astype(dtype).reshape(batch, length, n_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
  # rowsum(dO * O): the softmax's gradient term shared by a row's keys.
  delta_BxKxLxG = jnp.sum(do_BxKxLxGxH.astype(jnp.float32) * o_BxKxLxGxH.astype(jnp.float32), axis=-1)
  dqs, dk_BxKxLxH, dv_BxKxLxH = [], None, None
  for start, end in cpu.query_blocks(length, length):
    q_BxKxQxH, do_BxKxQxH = _rows(q_BxKxLxGxH, start, end), _rows(do_BxKxLxGxH, start, end)
    lse_BxKxQ, delta_BxKxQ = _rows(lse_BxKxLxG, start, end), _rows(delta_BxKxLxG, start, end)
    k_BxKxSxH, v_BxKxSxH = k_BxKxLxH[:, :, :end], v_BxKxLxH[:, :, :end]
    # Transposed scores [S, Q]: dK and dV are then matmuls in XLA's preferred operand order.
    sT_BxKxSxQ = jnp.einsum("bksh,bkqh->bksq", k_BxKxSxH, q_BxKxQxH,
                            preferred_element_type=jnp.float32) * scale
    maskT_Bx1xSxQ = jnp.swapaxes(_block_mask(segment_ids_BxL, start, end, group), 2, 3)
    pT_BxKxSxQ = jnp.exp(sT_BxKxSxQ + jnp.where(maskT_Bx1xSxQ, 0.0, _NEG) - lse_BxKxQ[:, :, None, :])
    dv_blk = jnp.einsum("bksq,bkqh->bksh", pT_BxKxSxQ.astype(dtype), do_BxKxQxH,
                        preferred_element_type=jnp.float32)
    dpT_BxKxSxQ = jnp.einsum("bksh,bkqh->bksq", v_BxKxSxH, do_BxKxQxH,
                             preferred_element_type=jnp.float32)
    dsT_BxKxSxQ = (pT_BxKxSxQ * (dpT_BxKxSxQ - delta_BxKxQ[:, :, None, :]) * scale).astype(dtype)
    dk_blk = jnp.einsum("bksq,bkqh->bksh", dsT_BxKxSxQ, q_BxKxQxH, preferred_element_type=jnp.float32)
    dqT_BxKxHxQ = jnp.einsum("bksh,bksq->bkhq", k_BxKxSxH, dsT_BxKxSxQ, preferred_element_type=jnp.float32)
    dqs.append(jnp.swapaxes(dqT_BxKxHxQ, 2, 3).reshape(batch, n_kv, end - start, group, head_dim))
    pad = ((0, 0), (0, 0), (0, length - end), (0, 0))
    dk_BxKxLxH = jnp.pad(dk_blk, pad) if dk_BxKxLxH is None else dk_BxKxLxH + jnp.pad(dk_blk, pad)
    dv_BxKxLxH = jnp.pad(dv_blk, pad) if dv_BxKxLxH is None else dv_BxKxLxH + jnp.pad(dv_blk, pad)
  dq_BxLxNxH = jnp.concatenate(dqs, axis=2).transpose(0, 2, 1, 3, 4).reshape(batch, length, -1, head_dim)
  dk_BxLxKxH, dv_BxLxKxH = dk_BxKxLxH.transpose(0, 2, 1, 3), dv_BxKxLxH.transpose(0, 2, 1, 3)
  return dq_BxLxNxH.astype(dtype), dk_BxLxKxH.astype(dtype), dv_BxLxKxH.astype(dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
