"""The eval job's settings: the run's own config.json, with every field the user set on top.

The fields the user set are the ones named on the command line (`--config.data.packing=none`,
main.explicit_fields) or in a notebook's overrides, passed down as `explicit`. Data fields
(packing, seq_len, batch_size, eval sources, synthetic data...), eval fields, the mesh and the
seed are honoured. A field the eval job cannot honour stops it before any work, naming the field:
the model's shape (the checkpoint fixes it), the tokenizer (the run's own is always used),
training and checkpoint settings, and data-loader settings that a single in-order pass ignores.
"""

from __future__ import annotations

from typing import Iterable

import ml_collections

from llm_jax import fields as fields_lib, rundir
from llm_jax.console import ConfigError

# Runtime choices of config.model the eval job may change (parameters are cast to param_dtype).
MODEL_RUNTIME = ("dtype", "param_dtype", "attention", "remat_policy")
_NOT_FOR_EVAL = {
    "train": "training settings have no effect on the eval job",
    "checkpoint": "checkpoint settings have no effect on the eval job (pick steps with "
                  "--config.eval.steps)",
    "init_from": "the eval job scores its --workdir's own checkpoints",
    "init_step": "pick checkpoints with --config.eval.steps",
    "data.tokenizer": "the run's own tokenizer is always used (the model was trained with it)",
    "data.worker_count": "the eval pass runs in the main process",
    "data.worker_buffer_size": "the eval pass runs in the main process",
    "data.shuffle_seed": "the eval pass reads its data in order, unshuffled",
}


def refuse_unhonoured(fields: Iterable[str]) -> None:
  for field in sorted(fields):
    if field.startswith("model."):
      name = field.split(".", 1)[1]
      if name not in MODEL_RUNTIME:
        raise ConfigError(f"config.{field}: the eval job takes the model's shape from the run's "
                         f"config.json; remove this override (only {', '.join(MODEL_RUNTIME)} "
                         "may change)")
      continue
    for prefix, why in _NOT_FOR_EVAL.items():
      if field == prefix or field.startswith(prefix + "."):
        raise ConfigError(f"config.{field}: {why}; remove this override")


def resolve(config: ml_collections.ConfigDict, workdir: str,
            explicit: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The settings the eval job runs with (a new, unlocked ConfigDict). `explicit`: the dotted
  config fields the user set; every other field comes from the run's config.json."""
  fields = set(explicit) - {"job"}
  refuse_unhonoured(fields)
  run = rundir.read_config(workdir)
  merged = ml_collections.ConfigDict(config.to_dict())
  # Data: the eval job's own values for fields the run predates, then the run's, then the user's.
  data = ml_collections.ConfigDict(config.data.to_dict())
  run_data = run.get("data", ml_collections.ConfigDict()).to_dict()
  for path, value in fields_lib.flatten(run_data).items():
    fields_lib.set_path(data, path, value, make=ml_collections.ConfigDict)
  for path in fields:
    if path.startswith("data."):
      fields_lib.set_path(data, path[len("data."):], fields_lib.get(config, path),
                           make=ml_collections.ConfigDict)
  with data.unlocked():
    data.tokenizer.path = rundir.tokenizer_path(workdir, run)
    if config.eval.split == "train":
      data.eval = data.train
    elif config.eval.split != "eval":
      raise ConfigError(f"config.eval.split={config.eval.split!r}: use eval or train")
  merged.data = data
  model = ml_collections.ConfigDict(run.model.to_dict())
  for path in fields:
    if path.startswith("model."):
      model[path.split(".", 1)[1]] = fields_lib.get(config, path)
  merged.model = model
  return merged

