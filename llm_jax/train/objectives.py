"""Training objectives: what a step minimises. The loop, gradient accumulation, sharding,
checkpoints and metrics are shared; a job picks an objective (ARCHITECTURE.md: "one loop,
several objectives").

An objective turns (params, batch) into *sums* over the batch's rows, never means:

  normalizer(batch)                  the global denominator of the loss (trained tokens for
                                     LM, pairs for DPO), computed once over the whole batch
  sums(params, frozen, batch, rng)   {"loss": what is minimised (before / normalizer), ...}
                                     plus any additive metric sums
  metrics(sums)                      the reported figures, from the sums over the whole batch

Because everything is a sum, k microbatches add up to exactly the full batch's loss, gradient
and metrics. `frozen` holds parameters the step reads but never trains (a LoRA base, a DPO
reference model, a distillation teacher); `{}` when there are none. `rng` is a fresh key per
step (dropout); deterministic objectives ignore it.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig
from llm_jax.model import moe as moe_lib
from llm_jax.model.decoder import Decoder
from llm_jax.train import loss as loss_lib

Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  normalizer: Callable[[dict], jax.Array]
  sums: Callable[[Any, Any, dict, jax.Array], Sums]
  metrics: Callable[[Sums], dict[str, jax.Array]]
  # Names of the sums (for zero-initialising the accumulation carry).
  sum_keys: tuple[str, ...]


def language_model(model_cfg: ModelConfig, *, z_loss: float = 0.0) -> Objective:
  """Token-weighted next-token cross-entropy (pretrain and SFT): sum(w * ce) / sum(w), plus
  z_loss * log(Z)^2 on the same tokens. With MoE layers, plus the router's load-balancing and
  z losses (model/moe.py: objective_sums), reported as "moe_loss"."""
  model = Decoder(model_cfg)
  moe = model_cfg.moe.enabled

  def sums(params, frozen, batch, rng):
    del frozen, rng
    if moe:  # the MoE layers sow their routing statistics
      logits_BxLxV, state = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                        batch["segment_ids"], mutable=["intermediates"])
    else:
      logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                 batch["segment_ids"])
    s = loss_lib.cross_entropy_sums(logits_BxLxV, batch["targets"], batch["loss_weights"], z_loss)
    if moe:
      s.update(moe_lib.objective_sums(state["intermediates"], batch["loss_weights"], model_cfg))
      s["loss"] = s["loss"] + s["moe_loss"]
    return s

  def metrics(s):
    weight = jnp.maximum(s["weight"], 1.0)
    out = {"loss": s["ce"] / weight, "z_loss": (s["loss"] - s["ce"]) / weight,
           "accuracy": s["correct"] / weight, "trained_tokens": s["weight"]}
    if moe:
      out["z_loss"] = (s["loss"] - s["ce"] - s["moe_loss"]) / weight
      out.update(moe_lib.objective_metrics(s, model_cfg))
    return out

  keys = ("loss", "ce", "correct", "weight") + (moe_lib.sum_keys(model_cfg) if moe else ())
  return Objective("lm", normalizer=lambda b: jnp.sum(b["loss_weights"].astype(jnp.float32)),
                   sums=sums, metrics=metrics, sum_keys=keys)


def for_config(config, model_cfg: ModelConfig) -> Objective:
  """The objective of a job's config (`config.job`). New jobs (dpo, distill) register here."""
  if config.job in ("pretrain", "sft"):
    return language_model(model_cfg, z_loss=config.train.z_loss)
  raise ValueError(f"config.job={config.job!r} has no training objective")
