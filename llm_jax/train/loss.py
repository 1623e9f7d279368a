"""Token-weighted cross-entropy. Functions return sums, never means, so callers can normalise
by the number of weighted tokens in the whole global batch (not a mean of per-device or
per-microbatch means, which over-weights short microbatches)."""

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                       z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums over all tokens: loss (CE + z_loss * logZ^2), ce, correct, weight."""
  with jax.named_scope("cross_entropy"):  # names its ops in profiles
    return _cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss)


def _cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss):
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  weights_BxL = weights_BxL.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  ce_BxL = log_z_BxL - target_logit_BxL
  z_BxL = z_loss * jnp.square(log_z_BxL)
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
  return {
      "loss": jnp.sum((ce_BxL + z_BxL) * weights_BxL),
      "ce": jnp.sum(ce_BxL * weights_BxL),
      "correct": jnp.sum(correct_BxL * weights_BxL),
      "weight": jnp.sum(weights_BxL),
  }


def document_count(weights_BxL, segment_ids_BxL):
  """How many documents a batch scores: (row, segment) pairs with a weighted target, the count
  `per_document_sums` has entries for (a document split over two rows counts twice)."""
  B, L = segment_ids_BxL.shape
  weights_BxL = (weights_BxL > 0) & (segment_ids_BxL > 0)
  doc_BxL = jnp.arange(B)[:, None] * L + jnp.clip(segment_ids_BxL, 0, L - 1)
  hit = jax.ops.segment_max(weights_BxL.astype(jnp.int32).ravel(), doc_BxL.ravel(),
                            num_segments=B * L)
  return jnp.sum(hit > 0).astype(jnp.float32)


def per_document_sums(logits_BxLxV, targets_BxL, weights_BxL, segment_ids_BxL):
  """CE and weight summed per (row, segment): arrays of size B*L indexed row * L + segment id.
  Entries with weight 0 are not documents (padding or unused ids)."""
  B, L = targets_BxL.shape
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  ce_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1) - jnp.take_along_axis(
      logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  weights_BxL = weights_BxL.astype(jnp.float32) * (segment_ids_BxL > 0)
  doc_BxL = jnp.arange(B)[:, None] * L + jnp.clip(segment_ids_BxL, 0, L - 1)
  ce_sum = jax.ops.segment_sum((ce_BxL * weights_BxL).ravel(), doc_BxL.ravel(), num_segments=B * L)
  w_sum = jax.ops.segment_sum(weights_BxL.ravel(), doc_BxL.ravel(), num_segments=B * L)
  return ce_sum, w_sum
