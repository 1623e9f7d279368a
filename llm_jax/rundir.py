"""The run directory: the one place that reads what a run is. Chat, eval, the server, export,
the notebooks and distillation's teacher all load a run through here.

  runs/sft/
    config.json              the run's full config (write_config / read_config)
    tokenizer.model | tokenizer/   the tokenizer it trained or was given (tokenizer_path)
    checkpoints/<step>/      Orbax checkpoints (checkpoint.py)
    hf_config.json           an imported model's own Hugging Face config (convert/hf_import.py)
    lora_merge.json          where a merged LoRA run came from (convert/merge_lora.py)

  run = rundir.load("runs/sft")      # params (LoRA merged), model shape, tokenizer, context
  params, config = rundir.load_params("runs/sft", step=200, shardings=shardings)

A LoRA run (config.lora.rank > 0) stores adapters only; its parameters are its base's
(`init_from` at `init_step`) with the adapters merged in, so every reader sees a whole model.
A run's context is the longest sequence it can be given (`context_length`).
"""

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import ml_collections
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import checkpoint
from llm_jax.data import tokenizer as tok_lib
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
HF_SOURCE_CONFIG = "hf_config.json"  # an imported model's own config.json (convert/hf_import.py)
MERGE_FILE = "lora_merge.json"  # a merged LoRA run's provenance (convert/merge_lora.py)
_MAX_LINEAGE = 16  # init_from hops followed at most (a loop of runs is stopped, not followed)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes config.json from process 0 (the file is the same on every process)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader never sees half a config
  return path


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not an llm_jax run directory (expected config.json "
        "and checkpoints/ written by a training job or by llm_jax.convert.hf_import)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def save_params(workdir: str, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> str:
  """Writes config.json and a params-only checkpoint that any job can start from
  (`config.init_from=<workdir>`). Used by the Hugging Face importer and the LoRA merge."""
  write_config(workdir, config)
  checkpoint.save_params(workdir, params, step)
  return workdir


def tokenizer_path(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Where a run's tokenizer lives: its own copy if it has one, else the configured path."""
  for name in ("tokenizer.model", "tokenizer"):
    p = os.path.join(workdir, name)
    if os.path.exists(p):
      return p
  return config.data.tokenizer.path


def load_tokenizer(workdir: str, config: ml_collections.ConfigDict):
  """The run's tokenizer (SentencePiece or Hugging Face); sets config.data.tokenizer.path to it."""
  with config.unlocked():
    config.data.tokenizer.path = tokenizer_path(workdir, config)
  return tok_lib.get_tokenizer(config.data.tokenizer, workdir, corpus_fn=None)


def lineage(workdir: str) -> Iterator[tuple[str, ml_collections.ConfigDict | None]]:
  """(run directory, its config) for the run and each run it started from (`init_from`), newest
  first; a source that is gone ends the walk with (its path, None)."""
  seen, wd = set(), workdir
  while wd and os.path.abspath(wd) not in seen and len(seen) < _MAX_LINEAGE:
    seen.add(os.path.abspath(wd))
    try:
      config = read_config(wd)
    except FileNotFoundError:
      yield wd, None
      return
    yield wd, config
    wd = config.get("init_from") or ""


def training_lineage(workdir: str) -> list[str]:
  """What the run and the runs it started from trained on, newest first ("sft: builtin:...")."""
  return [f"{wd} (config.json not found)" if c is None
          else f"{c.get('job', '?')}: {c.get('data', {}).get('train', '?')}"
          for wd, c in lineage(workdir)]


def context_length(workdir: str) -> int:
  """The longest sequence (prompt + answer) a run is meant to see: the longest its weights were
  trained on, i.e. the largest data.seq_len of the run and of every run it started from
  (`init_from`, followed back), or an imported model's own max_position_embeddings where the
  line reaches a Hugging Face import (the importer's seq_len is only a default there). RoPE has
  no hard limit, but positions beyond what a model saw in training produce garbage. Chat, eval,
  the server and export all use this one rule."""
  longest = 0
  for wd, run in lineage(workdir):
    if run is None:
      break
    source = os.path.join(wd, HF_SOURCE_CONFIG)
    if os.path.isfile(source):
      with open(source) as f:
        longest = max(longest, int(json.load(f).get("max_position_embeddings") or 0))
    else:
      longest = max(longest, int(run.get("data", {}).get("seq_len", 0) or 0))
  if longest <= 0:
    raise ValueError(f"{workdir}/{CONFIG_FILE} records no data.seq_len (nor does any run it "
                     "started from); give the context explicitly (--max_context)")
  return longest


def lora_config(config: ml_collections.ConfigDict, workdir: str) -> lora.LoraConfig:
  """The run's LoraConfig; refuses a directory that is not (or no longer) a LoRA run."""
  if not (config.get("lora") and config.lora.get("rank", 0)):
    merged = os.path.join(workdir, MERGE_FILE)
    if os.path.isfile(merged):
      with open(merged) as f:
        src = json.load(f)
      raise ValueError(f"{workdir} was merged from {src['workdir']} (step {src['step']}) already; "
                       "it holds no adapters, and merging again would add them twice")
    raise ValueError(f"{workdir} is not a LoRA run (config.lora.rank is 0 in its config.json): "
                     "there are no adapters to merge or export")
  return lora.LoraConfig.from_config(config.lora)


def _replicated_like(s):
  """Where the (small) adapters go when the base has shardings `s`: replicated over its mesh."""
  return NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else s


def _merged_lora_params(workdir: str, config, step: int, shardings: Any, dtype: Any):
  """(step, the base (`init_from` at `init_step`) + the run's adapters), merged on the devices
  in float32; without a dtype the base's own is kept."""
  lora_cfg = lora_config(config, workdir)
  if not config.init_from or not os.path.isdir(config.init_from):
    raise FileNotFoundError(f"{workdir}'s base model config.init_from={config.init_from!r} is not "
                            "a directory: a LoRA run needs its base to be read (move it back, or "
                            "edit init_from in its config.json)")
  base, _ = load_params(config.init_from, config.init_step, shardings=shardings)
  # The (small) adapters are read replicated over the base's devices (multi-host safe).
  step, adapters = checkpoint.restore_params(
      workdir, step, shardings=_replicated_like(jax.tree.leaves(base)[0].sharding))
  out_sh = shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, base)
  merged = jax.jit(lambda b, a: lora.merge(b, a, lora_cfg, dtype), out_shardings=out_sh)(
      base, adapters)
  logging.info("Merged the rank-%d adapters of %s (step %d) into %s (step %d)", lora_cfg.rank,
               workdir, step, config.init_from, config.init_step)
  return step, merged


def load_params(workdir: str, step: int = -1, shardings: Any = None, dtype: Any = None, *,
                merge_lora: bool = True, with_step: bool = False):
  """Reads only the parameters of a run's checkpoint (no optimizer state).

  `step` -1 takes the newest checkpoint that can be read: a damaged newer one is reported and
  skipped (never deleted). `shardings`: a tree of NamedShardings matching the params, or one
  Sharding for all of them; None puts them on one device. `dtype`: cast every parameter to it
  while reading (e.g. bf16 imports trained in float32).
  A LoRA run (config.lora.rank > 0) stores adapters only: its parameters are its base's with the
  adapters merged in (float32), so every tool reads it like any run; `merge_lora=False` returns
  the adapters as stored.
  Returns (params, the run's config), or with `with_step` also the step read.
  """
  config = read_config(workdir)
  if merge_lora and config.get("lora") and config.lora.get("rank", 0) > 0:
    step, params = _merged_lora_params(workdir, config, step, shardings, dtype)
  else:
    step, params = checkpoint.restore_params(workdir, step, shardings, dtype)
  return (params, config, step) if with_step else (params, config)


@dataclasses.dataclass
class LoadedRun:
  params: Any
  model_cfg: ModelConfig
  tokenizer: Any
  config: ml_collections.ConfigDict
  context: int = 0  # longest prompt + answer (context_length)
  step: int = -1  # the checkpoint step loaded
  workdir: str = ""


def load(workdir: str, step: int = -1, shardings: Any = None, dtype: Any = None) -> LoadedRun:
  """Parameters (LoRA merged), model shape, tokenizer and context of a run directory."""
  params, config, step = load_params(workdir, step, shardings, dtype, with_step=True)
  tok = load_tokenizer(workdir, config)
  model_cfg = ModelConfig.from_config(config.model, vocab_size=tok.vocab_size)
  return LoadedRun(params, model_cfg, tok, config, context=context_length(workdir),
                   step=step, workdir=workdir)
