"""Cross-entropy over chunks of the sequence, so the [B, L, V] logits never exist in full.

With Qwen's 151,936-token vocabulary the float32 logits of one 8 x 4096 batch take 20 GB, and
their gradient as much again. Here the loss takes the final hidden states [B, L, D] and the
output projection instead, and walks the sequence `chunk_len` positions at a time: each chunk's
logits [B, C, V] are made, reduced to per-token log Z, target logit and argmax, and dropped.

The gradient is a custom VJP computed chunk by chunk in the forward pass:
  dlogits = (softmax * (1 + 2 z log Z) - onehot(target)) * weight
  dhidden = dlogits @ W^T,   dW += hidden^T @ dlogits
so the backward pass neither keeps nor recomputes any logits, and the vocabulary matmuls stay
at three per chunk (the unchunked loss also does forward + two gradient matmuls). The backward
pass only scales the stored gradients by the incoming cotangent (1 / normalizer).

Numerics follow the model's: matmul operands in the compute dtype with float32 accumulation,
softmax / log Z / loss in float32, dW accumulated in float32. `loss.cross_entropy_sums` on the
full logits is the reference (tests/test_chunked_loss.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

_W_AXES = {"vd": ("vocab", "embed"), "dv": ("embed", "vocab")}  # logical axes of the weight


def _padded(hidden_BxLxD, targets_BxL, chunk_len):
  """Pads the sequence to whole chunks (padded positions get weight 0 from the caller)."""
  length = targets_BxL.shape[1]
  n_chunks = -(-length // chunk_len)
  pad = n_chunks * chunk_len - length
  hidden_BxPxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
  targets_BxP = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
  return hidden_BxPxD, targets_BxP, n_chunks


def _unchunk(x_NxBxC, length):
  """[n_chunks, B, C, ...] -> [B, L, ...] (drops the padding)."""
  n, b, c = x_NxBxC.shape[:3]
  return jnp.swapaxes(x_NxBxC, 0, 1).reshape(b, n * c, *x_NxBxC.shape[3:])[:, :length]


def _chunk_logits(h_BxCxD, w, eq, dtype):
  logits_BxCxV = jnp.einsum(eq, h_BxCxD.astype(dtype), w.astype(dtype),
                            preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits_BxCxV, ("act_batch", "act_length", "act_vocab"))


def _token_stats(logits_BxCxV, t_BxC):
  log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_logit_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
  correct_BxC = (jnp.argmax(logits_BxCxV, axis=-1) == t_BxC).astype(jnp.float32)
  return log_z_BxC, target_logit_BxC, correct_BxC


def token_stats(hidden_BxLxD, w, targets_BxL, *, eq: str, chunk_len: int, dtype):
  """Per-token (log Z, target logit, correct) [B, L] float32, chunk by chunk (forward only)."""
  length = targets_BxL.shape[1]
  h_BxPxD, t_BxP, n_chunks = _padded(hidden_BxLxD, targets_BxL, chunk_len)

  def body(_, i):
    h_BxCxD = jax.lax.dynamic_slice_in_dim(h_BxPxD, i * chunk_len, chunk_len, axis=1)
    t_BxC = jax.lax.dynamic_slice_in_dim(t_BxP, i * chunk_len, chunk_len, axis=1)
    return None, _token_stats(_chunk_logits(h_BxCxD, w, eq, dtype), t_BxC)

  _, stats = jax.lax.scan(body, None, jnp.arange(n_chunks))
  return tuple(_unchunk(s, length) for s in stats)


def _sums(log_z_BxL, target_logit_BxL, correct_BxL, weights_BxL, z_loss):
  ce_BxL = log_z_BxL - target_logit_BxL
  z_BxL = z_loss * jnp.square(log_z_BxL)
  return {
      "loss": jnp.sum((ce_BxL + z_BxL) * weights_BxL),
      "ce": jnp.sum(ce_BxL * weights_BxL),
      "correct": jnp.sum(correct_BxL * weights_BxL),
      "weight": jnp.sum(weights_BxL),
  }


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ce_sums(hidden_BxLxD, w, targets_BxL, weights_BxL, z_loss, eq, chunk_len, dtype):
  stats = token_stats(hidden_BxLxD, w, targets_BxL, eq=eq, chunk_len=chunk_len, dtype=dtype)
  return _sums(*stats, weights_BxL.astype(jnp.float32), z_loss)


def _ce_fwd(hidden_BxLxD, w, targets_BxL, weights_BxL, z_loss, eq, chunk_len, dtype):
  # With symbolic zeros, primal inputs arrive wrapped (value, perturbed).
  hidden_BxLxD, w, targets_BxL, weights_BxL = (
      x.value for x in (hidden_BxLxD, w, targets_BxL, weights_BxL))
  length = targets_BxL.shape[1]
  weights_BxL = weights_BxL.astype(jnp.float32)
  h_BxPxD, t_BxP, n_chunks = _padded(hidden_BxLxD, targets_BxL, chunk_len)
  w_BxP = jnp.pad(weights_BxL, ((0, 0), (0, h_BxPxD.shape[1] - length)))
  w_eq = eq.split("->")[0].split(",")[1]  # "vd" (tied embedding) or "dv" (lm_head kernel)
  # dW from one chunk: the weight's indices from the hidden's d and the logits' v.
  dw_eq = f"bcv,bcd->{w_eq}"
  dh_eq = f"bcv,{w_eq}->bcd"

  def body(dw_acc, i):
    h_BxCxD = jax.lax.dynamic_slice_in_dim(h_BxPxD, i * chunk_len, chunk_len, axis=1)
    t_BxC = jax.lax.dynamic_slice_in_dim(t_BxP, i * chunk_len, chunk_len, axis=1)
    wt_BxC = jax.lax.dynamic_slice_in_dim(w_BxP, i * chunk_len, chunk_len, axis=1)
    logits_BxCxV = _chunk_logits(h_BxCxD, w, eq, dtype)
    log_z_BxC, target_logit_BxC, correct_BxC = _token_stats(logits_BxCxV, t_BxC)
    probs_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
    # d/dlogits of w * (log Z - logit[t] + z log Z^2)
    dlogits_BxCxV = probs_BxCxV * (1.0 + 2.0 * z_loss * log_z_BxC)[..., None]
    dlogits_BxCxV = dlogits_BxCxV - jax.nn.one_hot(t_BxC, logits_BxCxV.shape[-1], dtype=jnp.float32)
    dlogits_BxCxV = (dlogits_BxCxV * wt_BxC[..., None]).astype(dtype)
    dh_BxCxD = jnp.einsum(dh_eq, dlogits_BxCxV, w.astype(dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum(dw_eq, dlogits_BxCxV, h_BxCxD.astype(dtype), preferred_element_type=jnp.float32)
    dw_acc = nn.with_logical_constraint(dw_acc + dw, _W_AXES[w_eq])
    return dw_acc, (dh_BxCxD.astype(hidden_BxLxD.dtype), log_z_BxC, target_logit_BxC, correct_BxC)

  dw0 = nn.with_logical_constraint(jnp.zeros(w.shape, jnp.float32), _W_AXES[w_eq])
  dw_acc, (dh, log_z, target_logit, correct) = jax.lax.scan(body, dw0, jnp.arange(n_chunks))
  dh_BxLxD = _unchunk(dh, length)
  log_z_BxL, target_logit_BxL, correct_BxL = (_unchunk(s, length) for s in (log_z, target_logit, correct))
  sums = _sums(log_z_BxL, target_logit_BxL, correct_BxL, weights_BxL, z_loss)
  ce_BxL = log_z_BxL - target_logit_BxL
  residuals = (dh_BxLxD, dw_acc.astype(w.dtype), ce_BxL, z_loss * jnp.square(log_z_BxL), correct_BxL)
  return sums, residuals


def _ce_bwd(z_loss, eq, chunk_len, dtype, residuals, ct):
  del eq, chunk_len, dtype
  dh_BxLxD, dw, ce_BxL, z_BxL, correct_BxL = residuals
  zero = lambda c: isinstance(c, SymbolicZero)
  ct_loss = 0.0 if zero(ct["loss"]) else ct["loss"]
  ct_ce = 0.0 if zero(ct["ce"]) else ct["ce"]
  if z_loss and not zero(ct["ce"]):
    # The stored gradient is d(loss)/d(.), which equals d(ce)/d(.) only without z-loss.
    raise NotImplementedError("chunked cross-entropy with z_loss > 0 differentiates 'loss' only, "
                              "not 'ce'")
  scale = ct_loss + ct_ce
  d_hidden = (dh_BxLxD.astype(jnp.float32) * scale).astype(dh_BxLxD.dtype)
  d_w = (dw.astype(jnp.float32) * scale).astype(dw.dtype)
  # The sums are linear in the weights: d/dw_t = ct . (ce_t + z_t, ce_t, correct_t, 1).
  d_weights = ct_loss * (ce_BxL + z_BxL) + ct_ce * ce_BxL
  for key, per_token in (("correct", correct_BxL), ("weight", 1.0)):
    if not zero(ct[key]):
      d_weights = d_weights + ct[key] * per_token
  return d_hidden, d_w, None, d_weights * jnp.ones_like(ce_BxL)


_ce_sums.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)


def chunked_cross_entropy_sums(hidden_BxLxD, w, targets_BxL, weights_BxL, *, eq: str,
                               chunk_len: int, z_loss: float = 0.0, dtype=jnp.float32):
  """The sums of `loss.cross_entropy_sums(einsum(eq, hidden, w), ...)` (loss, ce, correct,
  weight) without ever holding more than [B, chunk_len, V] logits.

  hidden_BxLxD: final-normed hidden states (`Decoder(..., return_hidden=True)`);
  w, eq: `decoder.output_weights(params, cfg)`; dtype: the matmuls' operand dtype.
  """
  return _ce_sums(hidden_BxLxD, w, targets_BxL, weights_BxL.astype(jnp.float32), float(z_loss),
                  eq, int(chunk_len), jnp.dtype(dtype))


def eval_sums(hidden_BxLxD, w, batch: dict, *, eq: str, chunk_len: int, dtype,
              per_document: bool = False) -> dict:
  """The eval step's sums (ce, correct, weight, and per-document doc_ce / doc_weight as
  `loss.per_document_sums` lays them out) from hidden states, chunk by chunk."""
  targets_BxL, segment_ids_BxL = batch["targets"], batch["segment_ids"]
  weights_BxL = batch["loss_weights"].astype(jnp.float32)
  log_z_BxL, target_logit_BxL, correct_BxL = token_stats(
      hidden_BxLxD, w, targets_BxL, eq=eq, chunk_len=chunk_len, dtype=dtype)
  sums = _sums(log_z_BxL, target_logit_BxL, correct_BxL, weights_BxL, 0.0)
  if per_document:
    B, L = targets_BxL.shape
    ce_BxL = log_z_BxL - target_logit_BxL
    doc_weights_BxL = weights_BxL * (segment_ids_BxL > 0)
    doc_BxL = jnp.arange(B)[:, None] * L + jnp.clip(segment_ids_BxL, 0, L - 1)
    sums["doc_ce"] = jax.ops.segment_sum((ce_BxL * doc_weights_BxL).ravel(), doc_BxL.ravel(),
                                         num_segments=B * L)
    sums["doc_weight"] = jax.ops.segment_sum(doc_weights_BxL.ravel(), doc_BxL.ravel(),
                                             num_segments=B * L)
  return sums
