"""Loss, perplexity and token accuracy over a finite stream of batches.

Token-weighted figures divide sums over all weighted tokens; the per-document mean averages
each packed document's own mean loss, so long documents do not dominate it.
"""

import math
from typing import Iterable

import numpy as np


def evaluate(eval_step, params, batches: Iterable[dict], to_global, max_batches: int = 0) -> dict:
  ce = correct = weight = 0.0
  doc_losses = []
  n = 0
  for batch in batches:
    if max_batches and n >= max_batches:
      break
    sums = eval_step(params, to_global(batch))
    sums = {k: np.asarray(v) for k, v in sums.items()}
    ce += float(sums["ce"])
    correct += float(sums["correct"])
    weight += float(sums["weight"])
    if "doc_weight" in sums:
      has = sums["doc_weight"] > 0
      doc_losses.extend((sums["doc_ce"][has] / sums["doc_weight"][has]).tolist())
    n += 1
  if weight == 0:
    raise ValueError("the evaluation data has no weighted target tokens (empty eval set, or "
                     "no assistant turns in SFT data)")
  loss = ce / weight
  out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / weight,
         "tokens": weight, "batches": n}
  if doc_losses:
    out["documents"] = len(doc_losses)
    out["doc_mean_loss"] = float(np.mean(doc_losses))
    out["doc_mean_perplexity"] = float(np.mean(np.exp(np.minimum(doc_losses, 700.0))))
  return out
