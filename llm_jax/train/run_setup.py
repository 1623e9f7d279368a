"""What every job resolves before it starts: the tokenizer, the model shape, the mesh."""

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from llm_jax.data import pipeline, tokenizer as tok_lib
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


def adopt_source_model(config: ml_collections.ConfigDict, source_dir: str) -> None:
  """For `init_from`: the model's shape and tokenizer come from the source run."""
  src = checkpoint.read_config(source_dir)
  from configs import models  # pylint: disable=g-import-not-at-top
  defaults = models.get("tiny")
  with config.unlocked():
    for f in SHAPE_FIELDS:
      if f in src.model and src.model[f] != config.model[f]:
        if config.model[f] not in (0, src.model[f]) and f != "vocab_size":
          logging.warning("config.model.%s=%s replaced by %s from %s (init_from)",
                          f, config.model[f], src.model[f], source_dir)
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
