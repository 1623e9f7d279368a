"""Loss, perplexity and token accuracy over a finite stream of batches (the `loss` eval task).

Token-weighted (every weighted token counts once; long documents weigh more):
  loss        sum(w * ce) / sum(w)
  perplexity  exp(loss)
  accuracy    share of weighted targets that are the argmax
Per document (each packed document counts once, whatever its length):
  doc_mean_loss           mean over documents of the document's own mean loss
  doc_perplexity_geomean  exp(doc_mean_loss): the geometric mean of the documents' perplexities
  doc_perplexity_mean     arithmetic mean of the documents' perplexities exp(doc loss); always
                          >= the geometric mean, and dominated by the worst documents
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
    out["doc_perplexity_geomean"] = math.exp(min(out["doc_mean_loss"], 700.0))
    out["doc_perplexity_mean"] = float(np.mean(np.exp(np.minimum(doc_losses, 700.0))))
  return out
