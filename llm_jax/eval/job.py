"""The eval job: runs the chosen tasks on each chosen checkpoint of a run, writes one JSON per
checkpoint, then the summary table, CSV and plots over every checkpoint evaluated so far.

Task data is read and checked before the first checkpoint is loaded, so a malformed file fails
at once. A checkpoint's JSON keeps the results of tasks run earlier (an eval with
tasks=rouge adds to the JSON a loss eval wrote). Only process 0 writes files, holding the
output directory's eval lock (`.llm_jax-eval.lock`, workdir_lock.py): a second eval writing
the same results is refused; a training run of the same directory is not (it writes other
files, and an eval reads only finished checkpoints).
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging

from llm_jax import checkpoint, console, rundir, sharding, workdir_lock, xla_flags
from llm_jax.console import ConfigError
from llm_jax.eval import model_io, rouge as rouge_lib, run_config, summary, tasks as tasks_lib
from llm_jax.model import init as model_init
from llm_jax.model.config import ModelConfig
from llm_jax.train import metrics as metrics_lib

LOSS_KEYS = ("loss", "perplexity", "accuracy", "tokens", "batches", "documents", "doc_mean_loss",
             "doc_perplexity_geomean", "doc_perplexity_mean", "data")


def select_steps(workdir: str, spec: str, single: int) -> list[int]:
  available = checkpoint.steps(workdir)
  if not available:
    raise FileNotFoundError(f"no checkpoints under {checkpoint.checkpoint_dir(workdir)}")
  spec = str(spec).strip()
  if not spec:
    return [checkpoint.pick_step(workdir, single)]
  if spec == "latest":
    return [available[-1]]
  if spec == "all":
    return available
  try:
    wanted = sorted({int(s) for s in spec.split(",") if s.strip()})
  except ValueError:
    raise ConfigError(f"config.eval.steps={spec!r}: use all, latest or a comma list of steps; "
                     f"available: {available}") from None
  missing = [s for s in wanted if s not in available]
  if missing or not wanted:
    raise ConfigError(f"config.eval.steps={spec!r}: no checkpoint for step(s) {missing}; "
                     f"available: {available}")
  return wanted


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)


def run_eval(config: ml_collections.ConfigDict, workdir: str, explicit=()) -> dict:
  """Evaluates `workdir`'s checkpoints; returns {step: that checkpoint's JSON}.
  `explicit`: the dotted config fields the user set ("data.packing", ...; see
  run_config.resolve); every other setting is the run's own."""
  xla_flags.apply_config(config)  # before JAX starts its backend
  sharding.maybe_initialize_distributed()
  workdir = os.path.abspath(workdir)
  cfg = run_config.resolve(config, workdir, explicit)
  e = cfg.eval
  names = tasks_lib.parse_tasks(e.tasks)
  steps = select_steps(workdir, e.steps, e.step)
  json_dir = os.path.abspath(e.out_dir) if e.out_dir else workdir
  # One eval writes json_dir's results at a time (a training run of workdir may go on: it
  # writes other files, and the eval reads only its finished checkpoints).
  with workdir_lock.hold(json_dir, name=workdir_lock.EVAL_LOCK_NAME, jax_processes=True,
                         hint="use another config.eval.out_dir"):
    return _evaluate(cfg, workdir, names, steps, json_dir)


def _evaluate(cfg: ml_collections.ConfigDict, workdir: str, names, steps, json_dir: str) -> dict:
  e = cfg.eval
  out_dir = os.path.abspath(e.out_dir) if e.out_dir else os.path.join(workdir, "eval")
  writer = jax.process_index() == 0

  tok = rundir.load_tokenizer(workdir, cfg)
  model_cfg = ModelConfig.from_config(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = tuple(tuple(r) for r in cfg.sharding_rules)
  _, param_sh = model_init.abstract(model_cfg, mesh, rules)
  ctx = tasks_lib.Context(cfg, workdir, tok, model_cfg, mesh, rules, param_sh,
                          context=rundir.context_length(workdir))
  task_objs = {name: tasks_lib.REGISTRY[name](ctx) for name in names}  # reads and checks data
  score_fn = model_io.make_score_fn(model_cfg, param_sh, mesh, rules)
  logging.info("eval of %s: tasks %s on steps %s", workdir, ",".join(names), steps)

  results = {}
  t_sweep = time.perf_counter()
  for n, step in enumerate(steps):
    t0 = time.perf_counter()
    if len(steps) > 1:  # a sweep: where it is, and (after the first) how long the rest takes
      left = (t0 - t_sweep) / n * (len(steps) - n) if n else None
      logging.info("checkpoint %d of %d: step %d%s", n + 1, len(steps), step,
                   f" (about {console.duration(left)} left for the sweep)" if left else "")
    with sharding.mesh_context(mesh, rules):
      params, _ = rundir.load_params(workdir, step, shardings=param_sh,
                                     dtype=model_cfg.weight_dtype)
    runner = model_io.ModelRunner(params, model_cfg, mesh, rules, score_fn, batch_size=e.batch_size,
                                  context=ctx.context)
    path = os.path.join(json_dir, f"eval_{step}.json")
    res = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        res = json.load(f)
    res.update(step=step, workdir=workdir, context=ctx.context)
    res.setdefault("tasks", {})
    for name, task in task_objs.items():
      t_task = time.perf_counter()
      metrics, samples = task.run(runner)
      metrics["seconds"] = round(time.perf_counter() - t_task, 2)
      if runner.cut_prompts:
        metrics["prompts_cut_to_context"], runner.cut_prompts = runner.cut_prompts, 0
      res["tasks"][name] = metrics
      if name == "loss":  # the loss figures also at the top level (eval_<step>.json readers use them)
        res.update({k: metrics[k] for k in LOSS_KEYS if k in metrics})
      if writer and samples:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        with open(os.path.join(out_dir, "samples", f"step_{step}_{name}.jsonl"), "w",
                  encoding="utf-8") as f:
          f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
      logging.info("step %d %s: %s", step, name, _brief(name, metrics))
    if writer:
      os.makedirs(json_dir, exist_ok=True)
      _write_json(path, res)
    logging.info("step %d done in %s; written to %s", step,
                 console.duration(time.perf_counter() - t0), path)
    results[step] = res

  if writer:
    everything = summary.load_results(json_dir)
    out = summary.write(everything, out_dir, draw=e.plots, title=os.path.basename(workdir))
    print(out["console"])
    logging.info("summary: %s", ", ".join(out["files"]))
  return results


def _brief(name: str, metrics: dict) -> str:
  flat = summary.flatten({name: metrics})
  keys = [k for k in summary.headline_keys([flat])]
  line = " | ".join(f"{k.split('.', 1)[1]} {flat[k]:.4g}" for k in keys) or "done"
  if name == "rouge" and metrics.get("tokenizer"):  # the scores mean nothing without it
    line += f" ({rouge_lib.describe(metrics['tokenizer'])})"
  if name == "loss" and "tokens" in metrics:  # what it scored: the JSON's own counts
    line += (f" ({metrics_lib.scored(metrics['tokens'], metrics.get('documents'), metrics.get('batches'))}"
             f" of {metrics.get('data', 'data.eval')})")
  return line
