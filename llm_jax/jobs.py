"""config.job -> the function that runs it. Imports are lazy so a job loads only what it uses."""

from typing import Collection

import ml_collections

from llm_jax import config_check
from llm_jax.config_check import JOBS


def run(config: ml_collections.ConfigDict, workdir: str, explicit: Collection[str] = ()):
  """Runs the job `config.job` in `workdir`. `explicit`: the config fields the user set (the
  command line's `--config.<field>=` overrides, see main.explicit_fields, or a notebook's
  overrides): training honours them against `init_from`, the eval job over the run's own."""
  config_check.validate(config)
  if config.job in ("pretrain", "sft", "dpo", "distill"):  # one loop, the job's objective
    from llm_jax.train import loop
    return loop.train_and_evaluate(config, workdir, explicit=explicit)
  if config.job == "grpo":  # the same loop, its batches from the rollout stage
    from llm_jax.rl import rollout
    from llm_jax.train import loop
    return loop.train_and_evaluate(config, workdir, explicit=explicit,
                                   rollout_factory=rollout.Rollout)
  if config.job == "eval":
    from llm_jax.eval import job
    return job.run_eval(config, workdir, explicit=explicit)
  raise ValueError(f"config.job={config.job!r}: must be one of {JOBS}")
