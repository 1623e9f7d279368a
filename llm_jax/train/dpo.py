"""Direct Preference Optimization (Rafailov et al. 2023) as an objective of the one train step.

Per pair, with log-probabilities summed over the response tokens (weights 1 exactly where SFT
trains, data/preference.py):
  logits = (logp_policy(chosen) - logp_policy(rejected)) - (logp_ref(chosen) - logp_ref(rejected))
  sigmoid  loss = -(1 - eps) * log sigmoid(beta * logits) - eps * log sigmoid(-beta * logits)
                  (eps = label_smoothing: conservative DPO, the labels flipped with prob eps)
  ipo      loss = (logits - 1 / (2 beta))^2, with log-probs AVERAGED over each response's tokens
                  (as TRL does for IPO, following its authors), also in the rewards and logps
  rewards  beta * (logp_policy - logp_ref) per side (TRL's implicit rewards)
The step minimises sum(loss) / pairs over the global batch (the objective's normalizer counts
pairs), so microbatches add up exactly. Metrics carry TRL's names: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies (chosen reward strictly above rejected),
logps/chosen, logps/rejected, each a mean over pairs.

Batch layout (preference.py): rows of packed pairs; pair k of a row has segment id 2k-1 on its
chosen tokens and 2k on its rejected tokens. One forward pass over the rows gives both sides
(TRL's "concatenated forward"), and a pair never leaves its row, so sharding rows over devices
or microbatches never splits one.

The reference model is frozen: by default `frozen["reference"]`, the starting checkpoint
(`init_from`, llm_jax/train/frozen.py). `policy_variables` / `reference_variables` say which
variables each forward pass uses: with LoRA the policy is {"params": base, <adapters>} and the
reference the base alone, {"params": base}, with no second copy of the weights.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import objectives

LOSS_TYPES = ("sigmoid", "ipo")

def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
                label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
  """Per-pair (loss, chosen reward, rejected reward) from per-pair log-probabilities."""
  logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
  if loss_type == "sigmoid":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
  elif loss_type == "ipo":
    losses = jnp.square(logits - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f"config.dpo.loss_type={loss_type!r}: must be one of {LOSS_TYPES}")
  return losses, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def sequence_logps(logits_BxLxV: jax.Array, batch: dict):
  """Per pair slot of each row: (chosen logp, rejected logp, chosen tokens, rejected tokens,
  valid), each [B, L // 2]; logps are sums of log p(target) * weight over each side."""
  targets_BxL, segment_ids_BxL = batch["targets"], batch["segment_ids"]
  B, L = targets_BxL.shape
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  logp_BxL = (jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
              - jax.nn.logsumexp(logits_BxLxV, axis=-1))
  w_BxL = batch["loss_weights"].astype(jnp.float32) * (segment_ids_BxL > 0)
  # Per row (vmap keeps the scatter row-local, so a row-sharded batch stays sharded): sums by
  # segment id 0..L; odd ids are chosen sides, even ids (> 0) rejected ones.
  seg_sum = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=L + 1))
  logp_BxS = seg_sum(logp_BxL * w_BxL, segment_ids_BxL)
  tokens_BxS = seg_sum(w_BxL, segment_ids_BxL)
  P = L // 2
  chosen = lambda x: x[:, 1::2][:, :P]
  rejected = lambda x: x[:, 2::2][:, :P]
  n_pairs_B = jnp.max(segment_ids_BxL, axis=1) // 2
  valid_BxP = jnp.arange(1, P + 1)[None, :] <= n_pairs_B[:, None]
  return (chosen(logp_BxS), rejected(logp_BxS), chosen(tokens_BxS), rejected(tokens_BxS),
          valid_BxP)


def count_pairs(batch: dict) -> jax.Array:
  """Pairs in a batch: each row's largest segment id is twice its number of pairs."""
  return jnp.sum(jnp.max(batch["segment_ids"], axis=1) // 2).astype(jnp.float32)


default_policy_variables = objectives.default_policy_variables
default_reference_variables = objectives.default_reference_variables


def objective(model_cfg: ModelConfig, *, beta: float = 0.1, label_smoothing: float = 0.0,
              loss_type: str = "sigmoid",
              policy_variables: Callable = default_policy_variables,
              reference_variables: Callable = default_reference_variables
              ) -> objectives.Objective:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"config.dpo.loss_type={loss_type!r}: must be one of {LOSS_TYPES}")
  model = Decoder(model_cfg)

  def logps(variables, batch):
    logits_BxLxV = model.apply(variables, batch["inputs"], batch["positions"],
                               batch["segment_ids"])
    return sequence_logps(logits_BxLxV, batch)

  def sums(params, frozen, batch, rng):
    del rng
    pc, pr, nc, nr, valid = logps(policy_variables(params, frozen), batch)
    rc, rr, _, _, _ = logps(jax.lax.stop_gradient(reference_variables(params, frozen)), batch)
    if loss_type == "ipo":  # length-normalised log-probs (see the module docstring)
      pc, rc = pc / jnp.maximum(nc, 1.0), rc / jnp.maximum(nc, 1.0)
      pr, rr = pr / jnp.maximum(nr, 1.0), rr / jnp.maximum(nr, 1.0)
    losses, chosen_r, rejected_r = pair_losses(pc, pr, rc, rr, beta=beta,
                                               label_smoothing=label_smoothing,
                                               loss_type=loss_type)
    v = valid.astype(jnp.float32)
    total = lambda x: jnp.sum(jnp.where(valid, x, 0.0))
    return {"loss": total(losses), "pairs": jnp.sum(v),
            "rewards_chosen": total(chosen_r), "rewards_rejected": total(rejected_r),
            "rewards_correct": total((chosen_r > rejected_r).astype(jnp.float32)),
            "logps_chosen": total(pc), "logps_rejected": total(pr)}

  def metrics(s):
    n = jnp.maximum(s["pairs"], 1.0)
    return {"loss": s["loss"] / n,
            "rewards/chosen": s["rewards_chosen"] / n,
            "rewards/rejected": s["rewards_rejected"] / n,
            "rewards/margins": (s["rewards_chosen"] - s["rewards_rejected"]) / n,
            "rewards/accuracies": s["rewards_correct"] / n,
            "logps/chosen": s["logps_chosen"] / n,
            "logps/rejected": s["logps_rejected"] / n,
            "pairs": s["pairs"]}

  return objectives.Objective(
      "dpo", normalizer=count_pairs, sums=sums, metrics=metrics,
      sum_keys=("loss", "pairs", "rewards_chosen", "rewards_rejected", "rewards_correct",
                "logps_chosen", "logps_rejected"))
