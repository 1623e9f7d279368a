"""Any training objective's metrics on held-out data: its sums over a finite stream of batches,
then its own `metrics` (DPO's rewards/accuracies on held-out pairs, distillation's weighted loss
and per-token CE). Sums add exactly across batches, as across microbatches in the train step."""

from typing import Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import sharding
from llm_jax.train import objectives


def make_eval_step(objective: objectives.Objective, param_shardings, frozen_shardings, mesh,
                   rules):
  """(params, frozen, batch) -> the objective's sums over the batch (forward only)."""
  def eval_step(params, frozen, batch):
    return objective.sums(params, frozen, batch, jax.random.key(0))

  return jax.jit(eval_step,
                 in_shardings=(param_shardings, frozen_shardings,
                               sharding.row_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, P()))


def evaluate(eval_step, objective: objectives.Objective, params, frozen, batches: Iterable[dict],
             to_global, max_batches: int = 0) -> dict[str, float]:
  totals: dict[str, float] = {}
  n = 0
  for batch in batches:
    if max_batches and n >= max_batches:
      break
    for k, v in jax.device_get(eval_step(params, frozen, to_global(batch))).items():
      totals[k] = totals.get(k, 0.0) + float(np.asarray(v, np.float64))
    n += 1
  if not n:
    raise ValueError("the evaluation data yielded no batches (empty config.data.eval?)")
  out = {k: float(np.asarray(v)) for k, v in
         jax.device_get(objective.metrics({k: np.float32(v) for k, v in totals.items()})).items()}
  out["batches"] = n
  return out
