"""The frozen parameter trees of post-training jobs: the train state's "frozen" entry, which the
objective reads and the optimizer never touches.

  dpo       {"reference": the starting checkpoint's params (config.init_from, init_step)}
  grpo      the same, when config.grpo.kl_beta > 0 (the k3 KL's reference)
  distill   {"teacher": the teacher run's params} when config.distill.teacher is set

They are never checkpointed (checkpoint.save drops the entry): a run re-reads them from their
source run when it starts or resumes, so checkpoints hold only what trains. Each is a separate
copy in the job's parameter dtype and shardings (the train step donates the state, so the
reference must not alias the trained params).

With LoRA (config.lora, a separate variable collection), the DPO reference is the frozen base
without the adapters: no copy is loaded here, and the objective's `reference_variables` reads the
base (see train/dpo.py).
"""

import ml_collections

from llm_jax import rundir
from llm_jax.data import tokenizer as tok_lib
from llm_jax.model import init as model_init
from llm_jax.model.config import ModelConfig, SHAPE_FIELDS


def lora_enabled(config) -> bool:
  lora = config.get("lora")
  return bool(lora is not None and lora.get("rank", 0))


def teacher_model_config(config, model_cfg: ModelConfig) -> ModelConfig | None:
  """The teacher's shape (from its run's config.json) with this job's runtime choices (dtypes,
  remat, attention kernel); None without a teacher."""
  teacher_dir = config.get("distill", {}).get("teacher", "")
  if config.job != "distill" or not teacher_dir:
    return None
  src = rundir.read_config(teacher_dir)
  cfg = ml_collections.ConfigDict(config.model.to_dict())
  for f in SHAPE_FIELDS:
    if f in src.model:
      cfg[f] = src.model[f]
  teacher_cfg = ModelConfig.from_config(cfg)
  if teacher_cfg.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"config.distill.teacher={teacher_dir!r} has a vocabulary of "
                     f"{teacher_cfg.vocab_size} tokens, the student {model_cfg.vocab_size}: "
                     "logit distillation needs the same tokenizer for both.")
  theirs = rundir.tokenizer_path(teacher_dir, src)
  if theirs and config.data.tokenizer.path and tok_lib.same_tokenizer(
      theirs, config.data.tokenizer.path) is False:
    raise ValueError(f"config.distill.teacher={teacher_dir!r} uses another tokenizer than this "
                     f"run ({config.data.tokenizer.path}): logit distillation compares "
                     "distributions over the same token ids; train the student with the "
                     "teacher's tokenizer (config.data.tokenizer.path).")
  return teacher_cfg


def shardings(config, model_cfg: ModelConfig, mesh, rules, param_shardings) -> dict:
  """The frozen entry's sharding tree ({} when the job has no frozen params)."""
  if config.job == "grpo" and config.grpo.kl_beta and not lora_enabled(config):
    if not config.init_from:
      raise ValueError(f"config.grpo.kl_beta={config.grpo.kl_beta}: the KL's reference is the "
                       "starting model, so set config.init_from (e.g. an SFT run), or set "
                       "config.grpo.kl_beta=0")
    return {"reference": param_shardings}
  if config.job == "dpo" and not lora_enabled(config):
    return {"reference": param_shardings}
  teacher_cfg = teacher_model_config(config, model_cfg)
  if teacher_cfg is not None:
    _, teacher_sh = model_init.abstract(teacher_cfg, mesh, rules)
    return {"teacher": teacher_sh}
  return {}


def load(config, frozen_shardings: dict, model_cfg: ModelConfig) -> dict:
  """Reads the frozen trees into their shardings (call inside the mesh context)."""
  out = {}
  if "reference" in frozen_shardings:
    out["reference"], _ = rundir.load_params(config.init_from, config.init_step,
                                             shardings=frozen_shardings["reference"],
                                             dtype=model_cfg.weight_dtype)
  if "teacher" in frozen_shardings:
    out["teacher"], _ = rundir.load_params(config.distill.teacher, -1,
                                           shardings=frozen_shardings["teacher"],
                                           dtype=model_cfg.weight_dtype)
  return out
