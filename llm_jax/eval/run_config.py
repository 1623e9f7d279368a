"""The eval job's settings: the run's own config.json, with every field the user set on top.

A field counts as set when it was named on the command line (`--config.data.packing=none`) or,
for a config built in Python, when it differs from configs/eval.py's default. Data fields
(packing, seq_len, batch_size, eval sources, synthetic data...), eval fields, the mesh and the
seed are honoured. A field the eval job cannot honour stops it before any work, naming the field:
the model's shape (the checkpoint fixes it), the tokenizer (the run's own is always used),
training and checkpoint settings, and data-loader settings that a single in-order pass ignores.
"""

from __future__ import annotations

from typing import Iterable

import ml_collections

from configs import eval as eval_config
from llm_jax.config_check import ConfigError
from llm_jax.train import checkpoint

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


def flatten(c, prefix: str = "") -> dict:
  out = {}
  for k, v in c.items():
    path = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, path + "."))
    else:
      out[path] = tuple(map(tuple, v)) if k == "sharding_rules" else v
  return out


def _set(c: ml_collections.ConfigDict, path: str, value) -> None:
  *parents, leaf = path.split(".")
  for p in parents:
    if p not in c:
      c[p] = ml_collections.ConfigDict()
    c = c[p]
  c[leaf] = value


def user_set_fields(config: ml_collections.ConfigDict, flag_overrides: Iterable[str] = ()) -> set:
  """Dotted paths the user set: named overrides plus fields that differ from the defaults."""
  defaults = flatten(eval_config.get_config())
  given = flatten(config)
  # (A model preset, configs/eval.py:NAME, counts as setting its shape fields, which the eval
  # job refuses: the run's checkpoint fixes the model.)
  diff = {k for k, v in given.items() if k not in defaults or defaults[k] != v}
  return (diff | set(flag_overrides)) - {"job"}


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
            flag_overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The settings the eval job runs with (a new, unlocked ConfigDict)."""
  fields = user_set_fields(config, flag_overrides)
  refuse_unhonoured(fields)
  run = checkpoint.read_config(workdir)
  merged = ml_collections.ConfigDict(config.to_dict())
  # Data: the eval job's defaults for fields the run predates, then the run's, then the user's.
  data = ml_collections.ConfigDict(eval_config.get_config().data.to_dict())
  run_data = run.get("data", ml_collections.ConfigDict()).to_dict()
  for path, value in flatten(run_data).items():
    _set(data, path, value)
  for path in fields:
    if path.startswith("data."):
      _set(data, path[len("data."):], _get(config, path))
  with data.unlocked():
    data.tokenizer.path = checkpoint.tokenizer_path(workdir, run)
    if config.eval.split == "train":
      data.eval = data.train
    elif config.eval.split != "eval":
      raise ConfigError(f"config.eval.split={config.eval.split!r}: use eval or train")
  merged.data = data
  model = ml_collections.ConfigDict(run.model.to_dict())
  for path in fields:
    if path.startswith("model."):
      model[path.split(".", 1)[1]] = _get(config, path)
  merged.model = model
  return merged


def _get(c, path: str):
  for p in path.split("."):
    c = c[p]
  return c
