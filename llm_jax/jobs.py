"""config.job -> the function that runs it. Imports are lazy so a job loads only what it uses."""

import ml_collections

from llm_jax import config_check

JOBS = ("pretrain", "sft", "dpo", "distill", "eval", "tokenizer")


def run(config: ml_collections.ConfigDict, workdir: str, explicit=()):
  """Runs the job `config.job` in `workdir`. `explicit`: the config fields the command line set
  (see main.explicit_fields)."""
  config_check.validate(config)
  if config.job in ("pretrain", "sft", "dpo", "distill"):  # one loop, the job's objective
    from llm_jax.train import loop
    return loop.train_and_evaluate(config, workdir, explicit=explicit)
  if config.job == "eval":
    from llm_jax.eval import job
    return job.run_eval(config, workdir)
  if config.job == "tokenizer":
    from llm_jax.data import tokenizer
    return tokenizer.run_tokenizer_job(config, workdir)
  raise ValueError(f"config.job={config.job!r}: must be one of {JOBS}")
