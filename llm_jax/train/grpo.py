"""Online RL with verifiable rewards (the GRPO family) as an objective of the one train step.

A step's batch comes from a rollout stage (llm_jax/rl/rollout.py): each prompt is repeated
`num_generations` (G) times, one completion per row, rows of a group adjacent. Besides the five
batch keys (inputs, targets, loss_weights = 1 on the completion's targets, segment_ids,
positions) it carries
  advantages [B]      one number per completion (`group_advantages`)
  old_logps  [B, L]   only with iterations_per_batch > 1: log pi_old(target) at rollout time;
                      with one iteration pi_old is the current policy, taken as stop_gradient(logp)
                      (TRL and tunix do the same), so the ratio is exactly 1.

Advantages (per group of G rewards r):
  grpo      (r - mean_g) / (std_g + 1e-6)      std with ddof=1 as TRL (tunix uses ddof=0)
  dr_grpo   r - mean_g                         (Dr. GRPO: no std, which favours easy/hard groups)
  rloo      r - mean of the other G-1 rewards  = G / (G - 1) * (r - mean_g)

Per-token loss, r_t = exp(logp_t - old_t), A the row's advantage:
  grpo   -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)     (clip-higher: DAPO)
  gspo   the same with the sequence ratio s = exp(mean_t(logp_t - old_t)) for every token
         (GSPO; gradients flow through the mean)
  cispo  -stop_gradient(min(r_t, 1 + clip_high)) A logp_t           (MiniMax-M1's CISPO: the
         importance weight is clipped and detached, so no token loses its gradient)
  + kl_beta * k3_t,  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (Schulman's k3, as TRL,
         MaxText and minimind; the reference is the init_from weights or the LoRA base)

Aggregation (the objective's normalizer, so k microbatches add up exactly):
  token_mean            sum over all completion tokens / number of completion tokens
  seq_mean_token_mean   per row the mean over its tokens, then the mean over rows
  dr_grpo               sum over all completion tokens / (rows * max_new_tokens)

Log-probabilities are of logits / temperature (the sampling temperature), as TRL computes them.
Metrics carry TRL's names: kl, entropy, clip_ratio/low_mean, clip_ratio/high_mean,
clip_ratio/region_mean (token means over completion tokens).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import objectives

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
LOSSES = ("grpo", "gspo", "cispo")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")
STD_EPS = 1e-6


def group_advantages(rewards_N, group_size: int, kind: str = "grpo") -> np.ndarray:
  """Advantages [N] float32 of rewards [N] in consecutive groups of `group_size` (host side:
  rewards come from Python reward functions)."""
  if kind not in ADVANTAGES:
    raise ValueError(f"config.grpo.advantage={kind!r}: must be one of {ADVANTAGES}")
  r_GxN = np.asarray(rewards_N, np.float64).reshape(-1, group_size)
  mean_Gx1 = r_GxN.mean(axis=1, keepdims=True)
  if kind == "grpo":
    adv = (r_GxN - mean_Gx1) / (r_GxN.std(axis=1, ddof=1, keepdims=True) + STD_EPS)
  elif kind == "dr_grpo":
    adv = r_GxN - mean_Gx1
  else:  # leave-one-out baseline
    adv = r_GxN - (r_GxN.sum(axis=1, keepdims=True) - r_GxN) / (group_size - 1)
  return adv.reshape(-1).astype(np.float32)


def token_logps(logits_BxLxV: jax.Array, targets_BxL: jax.Array, temperature: float = 1.0):
  """(log p(target) [B, L], entropy [B, L]) of softmax(logits / temperature), in float32."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32) / temperature
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  logp_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0] - logz_BxL
  probs_BxLxV = jax.nn.softmax(logits_BxLxV, axis=-1)
  entropy_BxL = logz_BxL - jnp.sum(probs_BxLxV * logits_BxLxV, axis=-1)
  return logp_BxL, entropy_BxL


def k3(logp_BxL, ref_BxL):
  """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = ref - logp."""
  d = ref_BxL - logp_BxL
  return jnp.exp(d) - d - 1.0


def per_token_loss(logp_BxL, old_BxL, adv_B, mask_BxL, *, loss: str = "grpo",
                   clip_low: float = 0.2, clip_high: float = 0.2, ref_BxL=None,
                   kl_beta: float = 0.0):
  """(loss [B, L], stats) before aggregation; `stats` holds the [B, L] indicator arrays
  clip_low / clip_high / clip_region and, with a reference, kl. `old_BxL` is treated as a
  constant; masked positions may hold anything (they are zeroed by the aggregation)."""
  if loss not in LOSSES:
    raise ValueError(f"config.grpo.loss={loss!r}: must be one of {LOSSES}")
  mask_BxL = mask_BxL.astype(jnp.float32)
  adv_Bx1 = adv_B.astype(jnp.float32)[:, None]
  log_ratio_BxL = (logp_BxL - jax.lax.stop_gradient(old_BxL)) * mask_BxL
  if loss == "gspo":
    n_Bx1 = jnp.maximum(jnp.sum(mask_BxL, axis=1, keepdims=True), 1.0)
    log_ratio_BxL = jnp.broadcast_to(jnp.sum(log_ratio_BxL, axis=1, keepdims=True) / n_Bx1,
                                     logp_BxL.shape)
  ratio_BxL = jnp.exp(log_ratio_BxL)
  if loss == "cispo":
    weight_BxL = jax.lax.stop_gradient(jnp.minimum(ratio_BxL, 1.0 + clip_high))
    out_BxL = -weight_BxL * adv_Bx1 * logp_BxL
  else:
    clipped_BxL = jnp.clip(ratio_BxL, 1.0 - clip_low, 1.0 + clip_high)
    out_BxL = -jnp.minimum(ratio_BxL * adv_Bx1, clipped_BxL * adv_Bx1)
  # TRL's clip statistics: a token is clipped low when its ratio is below the band and its
  # advantage negative (the clip then removes its gradient), high symmetrically.
  low = ((ratio_BxL < 1.0 - clip_low) & (adv_Bx1 < 0)).astype(jnp.float32)
  high = ((ratio_BxL > 1.0 + clip_high) & (adv_Bx1 > 0)).astype(jnp.float32)
  stats = {"clip_low": low, "clip_high": high, "clip_region": jnp.maximum(low, high)}
  if ref_BxL is not None:
    kl_BxL = k3(logp_BxL, jax.lax.stop_gradient(ref_BxL))
    stats["kl"] = kl_BxL
    if kl_beta:
      out_BxL = out_BxL + kl_beta * kl_BxL
  return out_BxL, stats


def aggregate_sum(loss_BxL, mask_BxL, aggregation: str) -> jax.Array:
  """The loss's numerator for `aggregation` (see `normalizer`): loss = aggregate_sum / normalizer."""
  mask_BxL = mask_BxL.astype(jnp.float32)
  row_sum_B = jnp.sum(loss_BxL * mask_BxL, axis=1)
  if aggregation == "seq_mean_token_mean":
    return jnp.sum(row_sum_B / jnp.maximum(jnp.sum(mask_BxL, axis=1), 1.0))
  if aggregation in ("token_mean", "dr_grpo"):
    return jnp.sum(row_sum_B)
  raise ValueError(f"config.grpo.loss_aggregation={aggregation!r}: must be one of {AGGREGATIONS}")


def normalizer(mask_BxL, aggregation: str, max_new_tokens: int) -> jax.Array:
  """The global denominator: completion tokens, rows with a completion, or rows * max_new."""
  mask_BxL = mask_BxL.astype(jnp.float32)
  rows = jnp.sum((jnp.sum(mask_BxL, axis=1) > 0).astype(jnp.float32))
  if aggregation == "token_mean":
    return jnp.sum(mask_BxL)
  if aggregation == "seq_mean_token_mean":
    return rows
  if aggregation == "dr_grpo":
    return rows * float(max_new_tokens)
  raise ValueError(f"config.grpo.loss_aggregation={aggregation!r}: must be one of {AGGREGATIONS}")


default_policy_variables = objectives.default_policy_variables
default_reference_variables = objectives.default_reference_variables


def objective(model_cfg: ModelConfig, *, loss: str = "grpo", clip_low: float = 0.2,
              clip_high: float = 0.2, kl_beta: float = 0.0, aggregation: str = "token_mean",
              max_new_tokens: int = 64, temperature: float = 1.0,
              policy_variables: Callable = default_policy_variables,
              reference_variables: Callable | None = default_reference_variables,
              ) -> objectives.Objective:
  """The GRPO-family objective. `reference_variables` None: no reference forward pass (kl_beta
  0 and no KL to report). With LoRA the policy is base + adapters and the reference the base."""
  if loss not in LOSSES:
    raise ValueError(f"config.grpo.loss={loss!r}: must be one of {LOSSES}")
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"config.grpo.loss_aggregation={aggregation!r}: must be one of "
                     f"{AGGREGATIONS}")
  model = Decoder(model_cfg)

  def logps(variables, batch):
    logits_BxLxV = model.apply(variables, batch["inputs"], batch["positions"],
                               batch["segment_ids"])
    return token_logps(logits_BxLxV, batch["targets"], temperature)

  def sums(params, frozen, batch, rng):
    del rng
    mask_BxL = (batch["loss_weights"] > 0).astype(jnp.float32)
    logp_BxL, entropy_BxL = logps(policy_variables(params, frozen), batch)
    old_BxL = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp_BxL)
    ref_BxL = None
    if reference_variables is not None:
      ref_BxL, _ = logps(jax.lax.stop_gradient(reference_variables(params, frozen)), batch)
    loss_BxL, stats = per_token_loss(logp_BxL, old_BxL, batch["advantages"], mask_BxL,
                                     loss=loss, clip_low=clip_low, clip_high=clip_high,
                                     ref_BxL=ref_BxL, kl_beta=kl_beta)
    total = lambda x: jnp.sum(x * mask_BxL)
    out = {"loss": aggregate_sum(loss_BxL, mask_BxL, aggregation),
           "norm": normalizer(mask_BxL, aggregation, max_new_tokens),
           "tokens": jnp.sum(mask_BxL), "entropy": total(jax.lax.stop_gradient(entropy_BxL)),
           "clip_low": total(stats["clip_low"]), "clip_high": total(stats["clip_high"]),
           "clip_region": total(stats["clip_region"])}
    out["kl"] = total(stats["kl"]) if "kl" in stats else jnp.zeros((), jnp.float32)
    return out

  def metrics(s):
    tokens = jnp.maximum(s["tokens"], 1.0)
    return {"loss": s["loss"] / jnp.maximum(s["norm"], 1.0), "kl": s["kl"] / tokens,
            "entropy": s["entropy"] / tokens,
            "clip_ratio/low_mean": s["clip_low"] / tokens,
            "clip_ratio/high_mean": s["clip_high"] / tokens,
            "clip_ratio/region_mean": s["clip_region"] / tokens,
            "trained_tokens": s["tokens"]}

  return objectives.Objective(
      "grpo", normalizer=lambda b: normalizer(b["loss_weights"] > 0, aggregation, max_new_tokens),
      sums=sums, metrics=metrics,
      sum_keys=("loss", "norm", "tokens", "entropy", "clip_low", "clip_high", "clip_region", "kl"))


def policy_logps(model_cfg: ModelConfig, temperature: float = 1.0,
                 policy_variables: Callable = default_policy_variables) -> Callable:
  """fn(params, frozen, batch) -> log p(target) [B, L] of the policy: the old log-probs of a
  rollout reused for several iterations, and what the tests compare with the sampler's."""
  model = Decoder(model_cfg)

  def fn(params, frozen, batch):
    logits_BxLxV = model.apply(policy_variables(params, frozen), batch["inputs"],
                               batch["positions"], batch["segment_ids"])
    return token_logps(logits_BxLxV, batch["targets"], temperature)[0]
  return fn
