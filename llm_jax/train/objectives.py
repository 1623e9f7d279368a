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

from llm_jax.model import lora, moe as moe_lib
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder, output_weights  # chunked loss
from llm_jax.train import chunked_loss, loss as loss_lib

Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  normalizer: Callable[[dict], jax.Array]
  sums: Callable[[Any, Any, dict, jax.Array], Sums]
  metrics: Callable[[Sums], dict[str, jax.Array]]
  # Names of the sums (for zero-initialising the accumulation carry).
  sum_keys: tuple[str, ...]


def default_policy_variables(params, frozen):
  """The trained model's variables (preference and RL objectives): its parameters as they are.
  With LoRA the jobs pass base + adapters instead."""
  del frozen
  return {"params": params}


def default_reference_variables(params, frozen):
  """The frozen reference model's variables: the parameters the job started from."""
  del params
  return {"params": frozen["reference"]}


def language_model(model_cfg: ModelConfig, *, z_loss: float = 0.0) -> Objective:
  """Token-weighted next-token cross-entropy (pretrain and SFT): sum(w * ce) / sum(w), plus
  z_loss * log(Z)^2 on the same tokens. With MoE layers, plus the router's load-balancing and
  z losses (model/moe.py: objective_sums), reported as "moe_loss"."""
  model = Decoder(model_cfg)
  moe = model_cfg.moe.enabled

  def sums(params, frozen, batch, rng):
    # With LoRA, params are the adapters and frozen the base (lora.variables); rng: their dropout.
    variables, rngs = lora.variables(model_cfg, params, frozen), lora.rngs(model_cfg, rng)
    # MoE layers sow their routing statistics into "intermediates".
    mutable = ["intermediates"] if moe else False
    split = lambda out: out if moe else (out, None)
    if model_cfg.loss_chunk_len:  # the [B, L, V] logits never exist (chunked_loss.py)
      hidden_BxLxD, state = split(model.apply(variables, batch["inputs"], batch["positions"],
                                              batch["segment_ids"], return_hidden=True,
                                              rngs=rngs, mutable=mutable))
      w, eq = output_weights(variables["params"], model_cfg)
      delta = lora.output_weight_delta(model_cfg, params) if model_cfg.lora is not None else None
      if delta is not None:  # an adapter on the head: the adapted weight (no head dropout here)
        w = w.astype(jnp.float32) + delta
      s = chunked_loss.chunked_cross_entropy_sums(
          hidden_BxLxD, w, batch["targets"], batch["loss_weights"], eq=eq,
          chunk_len=model_cfg.loss_chunk_len, z_loss=z_loss, dtype=model_cfg.compute_dtype)
    else:
      logits_BxLxV, state = split(model.apply(variables, batch["inputs"], batch["positions"],
                                              batch["segment_ids"], rngs=rngs, mutable=mutable))
      s = loss_lib.cross_entropy_sums(logits_BxLxV, batch["targets"], batch["loss_weights"],
                                      z_loss)
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
