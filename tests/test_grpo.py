"""GRPO-family math against float64 numpy formulas written out per group and per row: the
advantages (GRPO, Dr.GRPO, RLOO), the clipped / GSPO / CISPO per-token losses, k3 KL, the three
aggregations, and with one iteration per batch (ratio exactly 1) the gradient, which must equal
that of -A * logp aggregated, checked against the analytic softmax gradient in float64."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.train import grpo
from tests.numerics import assert_close

G = 4  # completions per prompt
# Three groups: mixed rewards, a group where every reward is equal (zero std), a binary group.
REWARDS = np.array([1.0, 0.0, 0.5, 2.0,  1.0, 1.0, 1.0, 1.0,  0.0, 1.0, 0.0, 0.0])
B, L, V = len(REWARDS), 7, 5


def np_advantages(r, kind):
  out = []
  for g in range(len(r) // G):
    grp = [float(x) for x in r[g * G:(g + 1) * G]]
    mean = sum(grp) / G
    std = (sum((x - mean) ** 2 for x in grp) / (G - 1)) ** 0.5
    for i, x in enumerate(grp):
      if kind == "grpo":
        out.append((x - mean) / (std + 1e-6))
      elif kind == "dr_grpo":
        out.append(x - mean)
      else:
        others = [y for j, y in enumerate(grp) if j != i]
        out.append(x - sum(others) / (G - 1))
  return np.array(out)


@pytest.mark.parametrize("kind", grpo.ADVANTAGES)
def test_advantages_equal_float64_formula(kind):
  got = grpo.group_advantages(REWARDS, G, kind)
  want = np_advantages(REWARDS, kind)
  assert_close(got, want, rel=1e-6)
  assert np.all(got[G:2 * G] == 0)  # equal rewards: no signal


def _batch(seed=0):
  """Hand-built padded completions: row b has n_b trained tokens starting at s_b (prompt before,
  padding after); logp / old / ref are arbitrary log-probs with ratios both inside and far
  outside the clip band."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, L))
  for b in range(B):
    start, n = rng.integers(0, 3), rng.integers(1, L - 2)
    mask[b, start:start + n] = 1.0
  logp = -rng.uniform(0.05, 3.0, (B, L))
  old = logp + rng.normal(0, 0.4, (B, L)) + rng.normal(0, 0.6, (B, 1))  # whole rows off too (GSPO)
  ref = logp + rng.normal(0, 0.6, (B, L))
  adv = np_advantages(REWARDS, "grpo")
  return mask, logp, old, ref, adv


def np_loss(mask, logp, old, ref, adv, loss, clip_low, clip_high, beta):
  """Per-token loss and the clip indicators, row by row, token by token, in float64."""
  out = np.zeros((B, L))
  low, high = np.zeros((B, L)), np.zeros((B, L))
  for b in range(B):
    idx = [t for t in range(L) if mask[b, t]]
    seq_ratio = np.exp(np.mean([logp[b, t] - old[b, t] for t in idx]))
    for t in range(L):
      r = seq_ratio if loss == "gspo" else np.exp(logp[b, t] - old[b, t])
      if not mask[b, t]:
        r = seq_ratio if loss == "gspo" else 1.0
      a = adv[b]
      if loss == "cispo":
        val = -min(r, 1 + clip_high) * a * logp[b, t]
      else:
        val = -min(r * a, min(max(r, 1 - clip_low), 1 + clip_high) * a)
      d = ref[b, t] - logp[b, t]
      out[b, t] = val + beta * (np.exp(d) - d - 1)
      low[b, t] = r < 1 - clip_low and a < 0
      high[b, t] = r > 1 + clip_high and a > 0
  return out, low, high


def np_aggregate(loss_bt, mask, aggregation, max_new):
  if aggregation == "token_mean":
    return (loss_bt * mask).sum() / mask.sum()
  if aggregation == "seq_mean_token_mean":
    return np.mean([(loss_bt[b] * mask[b]).sum() / mask[b].sum() for b in range(B)])
  return (loss_bt * mask).sum() / (B * max_new)


@pytest.mark.parametrize("loss,aggregation", list(itertools.product(grpo.LOSSES,
                                                                     grpo.AGGREGATIONS)))
def test_loss_and_aggregation_equal_float64_formula(loss, aggregation):
  mask, logp, old, ref, adv = _batch()
  clip_low, clip_high, beta, max_new = 0.2, 0.28, 0.05, L
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got_bt, stats = grpo.per_token_loss(f32(logp), f32(old), f32(adv), f32(mask), loss=loss,
                                      clip_low=clip_low, clip_high=clip_high, ref_BxL=f32(ref),
                                      kl_beta=beta)
  want_bt, low, high = np_loss(mask, logp, old, ref, adv, loss, clip_low, clip_high, beta)
  assert_close(np.asarray(got_bt) * mask, want_bt * mask, rel=1e-5)
  got = grpo.aggregate_sum(got_bt, f32(mask), aggregation) / grpo.normalizer(
      f32(mask), aggregation, max_new)
  assert_close(got, np_aggregate(want_bt, mask, aggregation, max_new), rel=1e-5)
  assert np.array_equal(np.asarray(stats["clip_low"]) * mask, low * mask)
  assert np.array_equal(np.asarray(stats["clip_high"]) * mask, high * mask)
  assert (low * mask).sum() > 0 and (high * mask).sum() > 0  # the batch exercises both clips
  d = ref - logp
  assert_close(np.asarray(stats["kl"]), np.exp(d) - d - 1, rel=1e-5)


@pytest.mark.parametrize("loss,aggregation", list(itertools.product(grpo.LOSSES,
                                                                     grpo.AGGREGATIONS)))
def test_one_iteration_gradient_is_policy_gradient(loss, aggregation):
  """old = stop_gradient(logp): the ratio is 1 and d loss / d logits equals the float64 gradient
  of -sum(A * w * logp(target)) / normalizer, w the aggregation's per-token weight."""
  rng = np.random.default_rng(3)
  mask, *_ = _batch(1)
  adv = np_advantages(REWARDS, "rloo")
  logits = rng.normal(0, 1.5, (B, L, V))
  targets = rng.integers(0, V, (B, L))
  max_new = L + 2

  def f(logits_BxLxV):
    logp, _ = grpo.token_logps(logits_BxLxV, jnp.asarray(targets), 1.0)
    per_tok, stats = grpo.per_token_loss(logp, jax.lax.stop_gradient(logp), jnp.asarray(adv, jnp.float32),
                                         jnp.asarray(mask, jnp.float32), loss=loss)
    return (grpo.aggregate_sum(per_tok, jnp.asarray(mask), aggregation)
            / grpo.normalizer(jnp.asarray(mask), aggregation, max_new)), stats
  (val, stats), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits, jnp.float32))
  assert float(jnp.sum(stats["clip_region"])) == 0.0  # ratio 1: nothing clipped

  # float64: per-token weight of the aggregation, then d(-A w logp)/dlogits = -A w (onehot - p).
  n = mask.sum(axis=1, keepdims=True)
  w = {"token_mean": mask / mask.sum(), "seq_mean_token_mean": mask / n / B,
       "dr_grpo": mask / (B * max_new)}[aggregation]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(V)[targets]
  want = -(adv[:, None, None] * w[..., None]) * (onehot - p)
  assert_close(grad, want, rel=1e-5)
  logp = np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
  # The value: cispo is -A logp itself; the ratio losses are -A * 1 at the ratio's value 1.
  want_val = -(adv[:, None] * w * (logp if loss == "cispo" else 1.0)).sum()
  # (a sum of advantages is about 0: the tolerance is relative to its terms' scale)
  assert abs(float(val) - want_val) <= 1e-5 * np.abs(adv[:, None] * w).sum()
