"""Held-out evaluation of a training objective over a finite stream of batches: during training
(every train.eval_every steps) and in the eval job's `loss` task. The evaluator lives beside the
trainer, as nanodo keeps evaluate.py beside train.py; eval/ is the post-hoc job over checkpoints.

Sums add exactly across batches, as across microbatches in the train step. The language-model
objective reports (token-weighted: every weighted token counts once; long documents weigh more)
  loss        sum(w * ce) / sum(w)
  perplexity  exp(loss)
  accuracy    share of weighted targets that are the argmax
  tokens, documents, batches  what was scored (documents: (row, segment) pairs with a weighted
                              target, so a document split over two rows counts twice)
and, with per_document (each packed document counts once, whatever its length),
  doc_mean_loss           mean over documents of the document's own mean loss
  doc_perplexity_geomean  exp(doc_mean_loss): the geometric mean of the documents' perplexities
  doc_perplexity_mean     arithmetic mean of the documents' perplexities exp(doc loss); always
                          >= the geometric mean, and dominated by the worst documents
Any other objective reports its own `metrics` of the summed batches (DPO's rewards and
accuracies on held-out pairs, distillation's weighted loss and per-token CE).
"""

import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import sharding
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder, output_weights
from llm_jax.train import chunked_loss, lora_state, loss as loss_lib, objectives

_PER_DOCUMENT = ("doc_ce", "doc_weight")  # [B * documents] arrays, not scalar sums


def lm_sums(model_cfg: ModelConfig, variables, batch, *, per_document: bool = False) -> dict:
  """Weighted sums (ce, correct, weight) of the language model over a batch, plus per-document
  sums if asked. `variables`: {"params": ...} (and "lora": adapters with model_cfg.lora)."""
  model = Decoder(model_cfg)
  if model_cfg.loss_chunk_len:  # no [B, L, V] logits (chunked_loss.py)
    hidden_BxLxD = model.apply(variables, batch["inputs"], batch["positions"],
                               batch["segment_ids"], return_hidden=True)
    w, eq = output_weights(variables["params"], model_cfg)
    if model_cfg.lora is not None:
      delta = lora.output_weight_delta(model_cfg, variables[lora.COLLECTION])
      w = w if delta is None else w.astype(jnp.float32) + delta
    return chunked_loss.eval_sums(hidden_BxLxD, w, batch, eq=eq, chunk_len=model_cfg.loss_chunk_len,
                                  dtype=model_cfg.compute_dtype, per_document=per_document)
  logits_BxLxV = model.apply(variables, batch["inputs"], batch["positions"], batch["segment_ids"])
  sums = loss_lib.cross_entropy_sums(logits_BxLxV, batch["targets"], batch["loss_weights"])
  if per_document:
    sums["doc_ce"], sums["doc_weight"] = loss_lib.per_document_sums(
        logits_BxLxV, batch["targets"], batch["loss_weights"], batch["segment_ids"])
  return sums


def _with_documents(sums: dict, batch) -> dict:
  """The LM sums plus how many documents they scored, so every eval says what it covered."""
  return {**sums, "documents": loss_lib.document_count(batch["loss_weights"], batch["segment_ids"])}


class Evaluator:
  """One objective's held-out evaluation, compiled once:

    evaluator = Evaluator(model_cfg, state_sh["params"], mesh, rules, objective=objective,
                          frozen_shardings=frozen_sh)
    metrics = evaluator(state["params"], state.get("frozen", {}), batches, max_batches=8)

  `objective` None (or the LM objective) gives the language model's figures; a LoRA model is
  evaluated on base + adapters (the state's "frozen" base and its "params" adapters).
  """

  def __init__(self, model_cfg: ModelConfig, param_shardings, mesh, rules, *,
               objective: objectives.Objective | None = None, frozen_shardings=None,
               per_document: bool = False):
    self.objective = None if objective is None or objective.name == "lm" else objective
    self.mesh, self.rules = mesh, rules
    frozen_shardings = frozen_shardings or {}
    if self.objective is None:
      def eval_step(params, frozen, batch):
        variables = lora_state.eval_params(model_cfg, {"params": params, "frozen": frozen})
        if model_cfg.lora is None:
          variables = {"params": variables}
        return _with_documents(lm_sums(model_cfg, variables, batch, per_document=per_document),
                               batch)
    else:
      def eval_step(params, frozen, batch):
        return self.objective.sums(params, frozen, batch, jax.random.key(0))
    self._step = jax.jit(eval_step,
                         in_shardings=(param_shardings, frozen_shardings,
                                       sharding.row_sharding(mesh, rules)),
                         out_shardings=NamedSharding(mesh, P()))

  def __call__(self, params, frozen, batches: Iterable[dict], max_batches: int = 0) -> dict:
    """The metrics over `batches` (at most `max_batches`; 0: all). Call inside the mesh context."""
    totals: dict[str, float] = {}
    doc_losses: list[float] = []
    n = 0
    for batch in batches:
      if max_batches and n >= max_batches:
        break
      out = jax.device_get(self._step(params, frozen, sharding.to_global(batch, self.mesh,
                                                                         self.rules)))
      for k, v in out.items():
        if k not in _PER_DOCUMENT:
          totals[k] = totals.get(k, 0.0) + float(np.asarray(v, np.float64))
      if "doc_weight" in out:
        has = np.asarray(out["doc_weight"]) > 0
        doc_losses += (np.asarray(out["doc_ce"])[has] / np.asarray(out["doc_weight"])[has]).tolist()
      n += 1
    if self.objective is not None:
      if not n:
        raise ValueError("the evaluation data yielded no batches (empty config.data.eval?)")
      sums = {k: np.float32(v) for k, v in totals.items()}
      out = {k: float(np.asarray(v)) for k, v in jax.device_get(self.objective.metrics(sums)).items()}
      return {**out, "batches": n}
    return _lm_metrics(totals, doc_losses, n)


def _lm_metrics(totals: dict, doc_losses: list, n: int) -> dict:
  weight = totals.get("weight", 0.0)
  if weight == 0:
    raise ValueError("the evaluation data has no weighted target tokens (empty eval set, or "
                     "no assistant turns in SFT data)")
  loss = totals["ce"] / weight
  out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
         "accuracy": totals["correct"] / weight, "tokens": weight, "batches": n,
         "documents": int(round(totals.get("documents", len(doc_losses))))}
  if doc_losses:
    out["doc_mean_loss"] = float(np.mean(doc_losses))
    out["doc_perplexity_geomean"] = math.exp(min(out["doc_mean_loss"], 700.0))
    out["doc_perplexity_mean"] = float(np.mean(np.exp(np.minimum(doc_losses, 700.0))))
  return out
