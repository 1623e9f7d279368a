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
  z_loss * log(Z)^2 on the same tokens."""
  model = Decoder(model_cfg)

  def sums(params, frozen, batch, rng):
    del frozen, rng
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                               batch["segment_ids"])
    return loss_lib.cross_entropy_sums(logits_BxLxV, batch["targets"], batch["loss_weights"],
                                       z_loss)

  def metrics(s):
    weight = jnp.maximum(s["weight"], 1.0)
    return {"loss": s["ce"] / weight, "z_loss": (s["loss"] - s["ce"]) / weight,
            "accuracy": s["correct"] / weight, "trained_tokens": s["weight"]}

  return Objective("lm", normalizer=lambda b: jnp.sum(b["loss_weights"].astype(jnp.float32)),
                   sums=sums, metrics=metrics, sum_keys=("loss", "ce", "correct", "weight"))


def for_config(config, model_cfg: ModelConfig) -> Objective:
  """The objective of a job's config (`config.job`). New jobs (dpo, distill) register here."""
  if config.job in ("pretrain", "sft"):
    return language_model(model_cfg, z_loss=config.train.z_loss)
  if config.job in ("dpo", "distill"):
    return _post_training(config, model_cfg)
  raise ValueError(f"config.job={config.job!r} has no training objective")


def _post_training(config, model_cfg: ModelConfig) -> Objective:
  """DPO (train/dpo.py) and reasoning distillation (train/distill.py); their frozen trees come
  from train/frozen.py."""
  # pylint: disable=g-import-not-at-top (these modules import this one)
  from llm_jax.train import distill, dpo, frozen
  if frozen.lora_enabled(config):
    # Hook: pass policy_variables / reference_variables built from LoRA's variable layout
    # (policy = base + adapters, DPO reference = base alone); see dpo.py and frozen.py.
    raise NotImplementedError(f"config.job={config.job!r} with config.lora is not wired yet.")
  if config.job == "dpo":
    return dpo.objective(model_cfg, beta=config.dpo.beta,
                         label_smoothing=config.dpo.label_smoothing,
                         loss_type=config.dpo.loss_type)
  from llm_jax.data import tokenizer as tok_lib
  tok = tok_lib.get_tokenizer(config.data.tokenizer, None, corpus_fn=None)
  d = config.distill
  return distill.objective(model_cfg, tag_ids=distill.tag_token_ids(tok, d.tag_tokens),
                           tag_weight=d.tag_weight,
                           teacher_cfg=frozen.teacher_model_config(config, model_cfg),
                           alpha=d.alpha, temperature=d.temperature)
