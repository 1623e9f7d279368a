"""What every job resolves before it starts: the tokenizer, the model shape, the mesh."""

import os
import tempfile
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from llm_jax.data import pipeline, sources, tokenizer as tok_lib
from llm_jax.model.config import ModelConfig
from llm_jax.train import checkpoint

# Fields that define the weights (their shapes, their meaning, and the checkpoint's tree layout:
# scanned layers are stored stacked). Everything else in config.model (dtypes, remat, attention
# kernel) is a runtime choice the new job may change; parameters are cast to its param_dtype.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                "rope_theta", "rms_eps", "qkv_bias", "qk_norm", "tie_embeddings", "scan_layers")
# Dotted sub-config fields that define the weights too (a run written before a sub-config existed
# had its defaults: dense MLPs, unscaled RoPE). Routing choices (capacity, loss weights, kernels)
# stay the new job's.
SUB_SHAPE_FIELDS = ("moe.n_experts", "moe.top_k", "moe.expert_mlp_dim", "moe.n_shared_experts",
                    "moe.shared_mlp_dim", "moe.shared_expert_gate", "moe.every", "moe.norm_topk_prob",
                    "rope_scaling.type", "rope_scaling.factor",
                    "rope_scaling.original_max_position_embeddings", "rope_scaling.low_freq_factor",
                    "rope_scaling.high_freq_factor", "rope_scaling.beta_fast", "rope_scaling.beta_slow",
                    "rope_scaling.attention_factor", "rope_scaling.mscale",
                    "rope_scaling.mscale_all_dim", "rope_scaling.truncate")


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
  src = checkpoint.read_config(source_dir)
  from configs import models  # pylint: disable=g-import-not-at-top
  defaults = models.get("tiny")
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
      want, have = _sub_field(src.model, f, _sub_field(defaults, f)), _sub_field(config.model, f)
      if want != have:
        logging.warning("config.model.%s=%s replaced by %s from %s (init_from)", f, have, want,
                        source_dir)
        section, field = f.split(".")
        config.model[section][field] = want
    if not config.data.tokenizer.path:
      config.data.tokenizer.path = checkpoint.tokenizer_path(source_dir, src)


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A run resumed in `workdir` continues the model and tokenizer saved there. A requested
  shape or tokenizer that differs cannot be honoured: stop, naming the field and the fix, rather
  than silently keep the saved one."""
  saved = checkpoint.read_config(workdir)
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
  own = checkpoint.tokenizer_path(workdir, saved)
  path = requested.data.tokenizer.path
  if path and os.path.exists(own) and not same_tokenizer(path, own):
    raise ValueError(f"config.data.tokenizer.path={path!r}: {workdir} was trained with its own "
                     f"tokenizer ({own}), and a resumed run cannot switch tokenizers; {fix}.")
  if not path:
    for f in ("vocab_size", "model_type"):
      want, have = requested.data.tokenizer[f], saved.data.tokenizer.get(f, requested.data.tokenizer[f])
      if want != have:
        raise ValueError(f"config.data.tokenizer.{f}={want!r}: {workdir} already has a tokenizer "
                         f"trained with {f}={have!r} (a resumed run keeps it); {fix}.")


def same_tokenizer(path: str, own: str) -> bool | None:
  """Whether two tokenizers (a file, or a directory holding tokenizer.json / the SentencePiece
  model) are the same bytes; None when either cannot be found."""
  def files(p):
    if os.path.isdir(p):
      for name in ("tokenizer.json", tok_lib.MODEL_FILE):
        if os.path.isfile(os.path.join(p, name)):
          return os.path.join(p, name)
    return p
  a, b = files(path), files(own)
  if os.path.abspath(a) == os.path.abspath(b):
    return True
  if not (os.path.isfile(a) and os.path.isfile(b)):
    return None
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks, before any work (no tokenizer training, no compile), what a user can get wrong:
  the run directory, the data files, the source run of init_from, and whether the batch splits
  over the devices. Each failure is one line naming the field or path and the fix."""
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
  for field in ("train", "eval"):
    spec = config.data[field]
    if not spec:
      continue
    for s in pipeline.parse_spec(spec, f"config.data.{field}"):
      if not s.path.startswith(pipeline.BUILTIN_PREFIX):
        sources.check_spec_path(s.path)
  if config.init_from:
    checkpoint.read_config(config.init_from)  # names the directory if it is not a run
    if not checkpoint.steps(config.init_from):
      raise FileNotFoundError(f"config.init_from={config.init_from}: the run has no checkpoints "
                              f"under {checkpoint.checkpoint_dir(config.init_from)}")
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
  if jax.process_count() > 1 and not config.data.tokenizer.path:
    _tokenizer_from_process_0(config, workdir, corpus)
  tok = tok_lib.get_tokenizer(config.data.tokenizer, workdir, corpus)
  if config.data.tokenizer.path and jax.process_index() == 0:
    # A run carries its own tokenizer, so it stays usable if the original file moves.
    own = checkpoint.tokenizer_path(workdir, config)
    if not os.path.abspath(own).startswith(os.path.abspath(workdir) + os.sep):
      tok.save(os.path.join(workdir, "tokenizer") if isinstance(tok, _hf_tokenizer_cls())
               else workdir)
  with config.unlocked():
    config.data.tokenizer.path = os.path.abspath(checkpoint.tokenizer_path(workdir, config))
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
