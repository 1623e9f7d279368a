"""The eval job: score a run's checkpoint on a dataset, print it and write it as JSON."""

import json
import os

import jax
import ml_collections
from absl import logging

from llm_jax import sharding
from llm_jax.data import pipeline
from llm_jax.data import tokenizer as tok_lib
from llm_jax.eval import lm_eval
from llm_jax.model.config import ModelConfig
from llm_jax.train import checkpoint, step as step_lib


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  sharding.maybe_initialize_distributed()
  run_cfg = checkpoint.read_config(workdir)
  model_cfg = ModelConfig.from_config(run_cfg.model)
  data_cfg = ml_collections.ConfigDict(run_cfg.data)
  with data_cfg.unlocked():
    data_cfg.tokenizer.path = checkpoint.tokenizer_path(workdir, run_cfg)
    if config.eval.split == "train":
      data_cfg.eval = data_cfg.train
    elif config.data.eval:
      data_cfg.eval = config.data.eval
      data_cfg.format = config.data.format
    if not data_cfg.eval:
      raise ValueError(f"nothing to evaluate: {workdir}'s run has no eval data; set "
                       "config.data.eval to a source (a file path or builtin:...)")
  tok = tok_lib.get_tokenizer(data_cfg.tokenizer, workdir, corpus_fn=None)

  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  _, param_sh = sharding.abstract_params_and_shardings(model_cfg, mesh, rules)
  with step_lib.mesh_context(mesh, rules):
    params, _ = checkpoint.load_params(workdir, config.eval.step, shardings=param_sh)
    step = checkpoint.pick_step(workdir, config.eval.step)
    eval_step = step_lib.make_eval_step(model_cfg, param_sh, mesh, rules, per_document=True)
    batches = pipeline.make_eval_iterator(data_cfg, tok, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    res = lm_eval.evaluate(eval_step, params, batches, lambda b: step_lib.to_global(b, mesh, rules),
                           config.eval.max_batches)
  res.update(step=step, data=data_cfg.eval)
  path = os.path.join(workdir, f"eval_{step}.json")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(res, f, indent=2, ensure_ascii=False)
  logging.info("eval of %s step %d on %s: loss %.4f | perplexity %.2f | accuracy %.3f | "
               "per-document mean loss %.4f over %d documents; written to %s",
               workdir, step, data_cfg.eval, res["loss"], res["perplexity"], res["accuracy"],
               res.get("doc_mean_loss", float("nan")), res.get("documents", 0), path)
  print(json.dumps(res, indent=2, ensure_ascii=False))
  return res
