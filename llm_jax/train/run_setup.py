"""What every job resolves before it starts: the tokenizer, the model shape, the mesh."""

import os
import tempfile
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from llm_jax import checkpoint, packages, rundir
from llm_jax.data import builtin, files, pipeline, store as store_lib, tokenizer as tok_lib
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig, SHAPE_FIELDS, sub_field_default, SUB_SHAPE_FIELDS
from llm_jax.train import distill, dpo, frozen, grpo, objectives

def _sub_field(model: ml_collections.ConfigDict, dotted: str, default=None):
  section, field = dotted.split(".")
  return model[section][field] if section in model and field in model[section] else default


def adopt_source_model(config: ml_collections.ConfigDict, source_dir: str,
                       explicit: Sequence[str] = ()) -> None:
  """For `init_from`: the model's shape and tokenizer come from the source run.

  `explicit`: config fields the user set on the command line (e.g. "model.dim"); such a shape
  field that disagrees with the source cannot be honoured and stops the job. Other differences
  (a preset's defaults) are replaced by the source's values.
  """
  src = rundir.read_config(source_dir)
  with config.unlocked():
    for f in SHAPE_FIELDS:
      if f in src.model and src.model[f] != config.model[f]:
        if config.model[f] not in (0, src.model[f]) and f"model.{f}" in explicit:
          raise ValueError(
              f"config.model.{f}={config.model[f]!r}: config.init_from={source_dir} has "
              f"model.{f}={src.model[f]!r}, and a run started from its weights keeps its shape; "
              f"drop --config.model.{f}, or train from scratch without init_from.")
        config.model[f] = src.model[f]
    for f in SUB_SHAPE_FIELDS:
      want, have = _sub_field(src.model, f, sub_field_default(f)), _sub_field(config.model, f)
      if want != have:
        logging.warning("config.model.%s=%s replaced by %s from %s (init_from)", f, have, want,
                        source_dir)
        section, field = f.split(".")
        config.model[section][field] = want
    if not config.data.tokenizer.path:
      config.data.tokenizer.path = rundir.tokenizer_path(source_dir, src)


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A run resumed in `workdir` continues the model and tokenizer saved there. A requested
  shape or tokenizer that differs cannot be honoured: stop, naming the field and the fix, rather
  than silently keep the saved one."""
  saved = rundir.read_config(workdir)
  requested = ml_collections.ConfigDict(config)
  if requested.init_from:  # the shape this command asks for is its source's
    adopt_source_model(requested, requested.init_from)
  fix = f"drop the override to resume {workdir}, or train it as a new run with another --workdir"
  for f in SHAPE_FIELDS:
    want, have = requested.model.get(f), saved.model.get(f)
    if f in ("vocab_size", "head_dim") and want == 0:  # 0 = "take it from the tokenizer / dim"
      continue
    if f in saved.model and want != have:
      raise ValueError(f"config.model.{f}={want!r}: {workdir} holds a run with model.{f}={have!r} "
                       f"(a resumed run keeps its model); {fix}.")
  own = rundir.tokenizer_path(workdir, saved)
  path = requested.data.tokenizer.path
  if path and os.path.exists(own) and not tok_lib.same_tokenizer(path, own):
    raise ValueError(f"config.data.tokenizer.path={path!r}: {workdir} was trained with its own "
                     f"tokenizer ({own}), and a resumed run cannot switch tokenizers; {fix}.")
  if not path:
    for f in ("vocab_size", "model_type"):
      want, have = requested.data.tokenizer[f], saved.data.tokenizer.get(f, requested.data.tokenizer[f])
      if want != have:
        raise ValueError(f"config.data.tokenizer.{f}={want!r}: {workdir} already has a tokenizer "
                         f"trained with {f}={have!r} (a resumed run keeps it); {fix}.")


def check_workdir(workdir: str) -> None:
  """The run directory is a directory this process can write (it is created if missing)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file; give a directory for the run "
                             "(it is created if missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror}); choose a "
                          "directory you can write to.") from None


def check_checkpoint_dir(workdir: str) -> None:
  """workdir/checkpoints can take a new checkpoint: a probe file is written and removed there
  (a run that cannot save would otherwise find out at its first checkpoint)."""
  ckpt = checkpoint.checkpoint_dir(workdir)
  if os.path.isfile(ckpt):  # (not "exists and not a dir": another process may remove it between)
    raise NotADirectoryError(f"{ckpt} is a file, where the run keeps its checkpoints; move it "
                             "away or choose another --workdir.")
  # Every process of a multi-host job probes the same directory at once (each writes its own
  # shards there later): another process's probe may be in it, or it may remove it meanwhile.
  made, error = False, None
  for _ in range(3):
    made, error = not os.path.exists(ckpt), None
    try:
      os.makedirs(ckpt, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=ckpt, prefix=".write-test-"):
        pass
      break
    except (FileNotFoundError, FileExistsError) as e:  # another process removed it meanwhile
      error = e
    except OSError as e:
      error = e
      break
  if error is not None:
    raise PermissionError(f"{ckpt} is not writable ({error.strerror}): the run could not save "
                          "checkpoints; fix its permissions or choose another --workdir.") from None
  if made:  # leave the run directory as it was (a later check may still refuse the job),
    try:
      os.rmdir(ckpt)
    except OSError:  # unless another process of the job is probing it too, or removed it
      pass


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks, before any work (no tokenizer training, no compile), what a user can get wrong:
  the run directory and its checkpoints/, the data files, the source run of init_from, and
  whether the batch splits over the devices. Each failure is one line naming the field or path
  and the fix."""
  check_workdir(workdir)
  if config.get("metrics") and config.metrics.wandb_project:
    packages.require("wandb")  # one line with the pip command, before any work
  for field in ("train", "eval"):
    spec = config.data[field]
    if not spec:
      continue
    if field == "train" and pipeline.store_spec(spec) is not None:
      store_lib.read_manifest(pipeline.store_spec(spec))  # a finished store, or one line why
      continue
    for s in pipeline.parse_spec(spec, f"config.data.{field}"):
      if not builtin.is_builtin(s.path):
        files.check_spec_path(s.path)
  if config.init_from:
    rundir.read_config(config.init_from)  # names the directory if it is not a run
    if not checkpoint.steps(config.init_from):
      raise FileNotFoundError(f"config.init_from={config.init_from}: the run has no checkpoints "
                              f"under {checkpoint.checkpoint_dir(config.init_from)}")
  if config.checkpoint.enabled:
    check_checkpoint_dir(workdir)
  shards = batch_shards(config)
  if config.data.batch_size % shards:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} does not split over the "
                     f"{shards} data-parallel devices (config.mesh: data x fsdp); use a multiple "
                     f"of {shards}, or set config.mesh so that data x fsdp divides it.")


def batch_shards(config: ml_collections.ConfigDict) -> int:
  """How many ways the batch's rows are split: the mesh axes the act_batch rule names."""
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, jax.device_count())))
  axes = dict((k, v) for k, v in config.sharding_rules).get("act_batch") or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([sizes[a] for a in axes])) if axes else 1


def resolve_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """Loads (or trains and caches) the tokenizer; records its path in the config."""
  corpus = lambda: pipeline.corpus_texts(config.data)
  store = pipeline.store_spec(config.data.train)
  if store is not None and not config.data.tokenizer.path:  # the tokenizer the store was made with
    with config.unlocked():
      config.data.tokenizer.path = os.path.join(
          store, store_lib.read_manifest(store)["tokenizer"]["file"])
  if jax.process_count() > 1 and not config.data.tokenizer.path:
    _tokenizer_from_process_0(config, workdir, corpus)
  tok = tok_lib.get_tokenizer(config.data.tokenizer, workdir, corpus)
  if config.data.tokenizer.path and jax.process_index() == 0:
    # A run carries its own tokenizer, so it stays usable if the original file moves.
    own = rundir.tokenizer_path(workdir, config)
    if not os.path.abspath(own).startswith(os.path.abspath(workdir) + os.sep):
      tok.save(os.path.join(workdir, "tokenizer") if isinstance(tok, _hf_tokenizer_cls())
               else workdir)
  with config.unlocked():
    config.data.tokenizer.path = os.path.abspath(rundir.tokenizer_path(workdir, config))
  return tok


def _hf_tokenizer_cls():
  from llm_jax.data.hf_tokenizer import HFTokenizer  # lazy: most runs never load `tokenizers`
  return HFTokenizer


def _tokenizer_from_process_0(config, workdir: str, corpus) -> None:
  """Process 0 trains (or finds) the tokenizer and sends its bytes to every process, which caches
  them in its own workdir. Hosts never train their own copies (which could differ and silently
  scramble token ids between data shards), and no shared filesystem is needed."""
  proto = b""
  if jax.process_index() == 0:
    tok_lib.get_tokenizer(config.data.tokenizer, workdir, corpus)
    with open(os.path.join(workdir, tok_lib.MODEL_FILE), "rb") as f:
      proto = f.read()
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(proto))))
  buf = np.frombuffer(proto, np.uint8) if proto else np.zeros(size, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()
  if jax.process_index() != 0:
    tok_lib.Tokenizer(received).save(workdir)


def resolve_model(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """ModelConfig with the vocabulary taken from the tokenizer unless set (must then fit it)."""
  if config.model.vocab_size and config.model.vocab_size < vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {vocab_size} tokens; set it to 0 to take the tokenizer's size")
  with config.unlocked():
    config.model.vocab_size = config.model.vocab_size or vocab_size
  return ModelConfig.from_config(config.model)


def objective_for(config, model_cfg: ModelConfig) -> objectives.Objective:
  """The objective of a job's config (`config.job`), the one place that maps jobs to losses (as
  nanodo's model_factory does). New jobs register here."""
  if config.job in ("pretrain", "sft"):
    return objectives.language_model(model_cfg, z_loss=config.train.z_loss)
  if config.job in ("dpo", "distill"):
    return _post_training(config, model_cfg)
  if config.job == "grpo":
    return _grpo(config, model_cfg)
  raise ValueError(f"config.job={config.job!r} has no training objective")


def _grpo(config, model_cfg: ModelConfig) -> objectives.Objective:
  """GRPO and its variants (train/grpo.py). The KL reference is the init_from weights
  (frozen["reference"]) or, with LoRA, the base; without kl_beta no reference pass runs."""
  g = config.grpo
  variables = {}
  if frozen.lora_enabled(config):
    variables["policy_variables"] = lambda params, base: lora.variables(model_cfg, params, base)
    variables["reference_variables"] = lambda params, base: {"params": base}
  if not g.kl_beta:
    variables["reference_variables"] = None
  return grpo.objective(model_cfg, loss=g.loss, clip_low=g.clip_low, clip_high=g.clip_high,
                        kl_beta=g.kl_beta, aggregation=g.loss_aggregation,
                        max_new_tokens=g.max_new_tokens, temperature=g.temperature, **variables)


def _post_training(config, model_cfg: ModelConfig) -> objectives.Objective:
  """DPO (train/dpo.py) and reasoning distillation (train/distill.py); their frozen trees come
  from train/frozen.py."""
  variables = {}
  if frozen.lora_enabled(config):
    # With LoRA the state's "frozen" entry is the base (train/lora_state.py): the policy is base +
    # adapters, and DPO's reference is the same module without the "lora" collection, the base.
    variables["policy_variables"] = lambda params, base: lora.variables(model_cfg, params, base)
    if config.job == "dpo":
      variables["reference_variables"] = lambda params, base: {"params": base}
  if config.job == "dpo":
    return dpo.objective(model_cfg, beta=config.dpo.beta,
                         label_smoothing=config.dpo.label_smoothing,
                         loss_type=config.dpo.loss_type, **variables)
  tok = tok_lib.get_tokenizer(config.data.tokenizer, None, corpus_fn=None)
  d = config.distill
  return distill.objective(model_cfg, tag_ids=distill.tag_token_ids(tok, d.tag_tokens),
                           tag_weight=d.tag_weight,
                           teacher_cfg=frozen.teacher_model_config(config, model_cfg),
                           alpha=d.alpha, temperature=d.temperature, **variables)
