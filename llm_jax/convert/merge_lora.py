"""Merge a LoRA run's adapters into its base: a full run directory every tool loads.

  python -m llm_jax.convert.merge_lora --workdir=runs/lora --out=runs/lora-merged [--step=-1]

W + (alpha / rank) * A @ B is computed in float32 for every adapted weight, then stored in the
base's dtype (`--dtype=float32` keeps full precision for a bf16 base). The output holds
config.json (LoRA off), the tokenizer, a params checkpoint and lora_merge.json (where it came
from). The merge always starts from the pristine base (`init_from` at the recorded step), so it
can never add the adapters twice: running the same merge again is a no-op, and a merged directory
is refused as input (it is no LoRA run any more).

Chat, eval and export also read a LoRA run directly: `checkpoint.load_params` merges on load with
`load_merged_params`.
"""

import json
import os
import shutil
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import console
from llm_jax.model import lora
from llm_jax.train import checkpoint

MERGE_FILE = "lora_merge.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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


def load_merged_params(workdir: str, step: int = -1, shardings: Any = None, dtype: Any = None):
  """The parameters of a LoRA run: its base (`init_from` at `init_step`) + its adapters.

  `shardings`/`dtype` as in `checkpoint.load_params` (applied to the merged tree); without a
  dtype the base's own is kept. The merge runs on the devices, in float32.
  """
  config = checkpoint.read_config(workdir)
  lora_cfg = lora_config(config, workdir)
  if not config.init_from or not os.path.isdir(config.init_from):
    raise FileNotFoundError(f"{workdir}'s base model config.init_from={config.init_from!r} is not "
                            "a directory: a LoRA run needs its base to be read (move it back, or "
                            "edit init_from in its config.json)")
  base, _ = checkpoint.load_params(config.init_from, config.init_step, shardings=shardings)
  # The (small) adapters are read replicated over the base's devices (multi-host safe).
  adapters, _ = checkpoint.load_params(
      workdir, step, shardings=_replicated_like(jax.tree.leaves(base)[0].sharding),
      merge_lora=False)
  out_sh = shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, base)
  merged = jax.jit(lambda b, a: lora.merge(b, a, lora_cfg, dtype), out_shardings=out_sh)(
      base, adapters)
  logging.info("Merged the rank-%d adapters of %s (step %d) into %s (step %d)", lora_cfg.rank,
               workdir, checkpoint.pick_step(workdir, step), config.init_from, config.init_step)
  return merged


def _copy_tokenizer(workdir: str, config: ml_collections.ConfigDict, out: str) -> str:
  src = checkpoint.tokenizer_path(workdir, config)
  if not src or not os.path.exists(src):
    raise FileNotFoundError(f"{workdir} has no tokenizer (tokenizer.model or tokenizer/)")
  dst = os.path.join(out, os.path.basename(os.path.normpath(src)))
  if os.path.isdir(src):
    shutil.copytree(src, dst, dirs_exist_ok=True)
  else:
    shutil.copyfile(src, dst)
  return dst


def merge_run(workdir: str, out: str, step: int = -1, dtype: str = "") -> str:
  """Writes the merged run directory `out`; returns it. See the module docstring."""
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  config = checkpoint.read_config(workdir)
  lora_cfg = lora_config(config, workdir)
  step = checkpoint.pick_step(workdir, step)
  if out in (workdir, os.path.abspath(config.init_from)):
    raise ValueError(f"--out={out} is the LoRA run or its base: write the merge to a new directory")
  provenance = {"workdir": workdir, "step": step, "base": config.init_from,
                "base_step": int(config.init_step), "rank": lora_cfg.rank,
                "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets)}
  if dtype and dtype not in _DTYPES:
    raise ValueError(f"--dtype={dtype!r}: must be one of {sorted(_DTYPES)} (or empty: the base's)")
  provenance["dtype"] = dtype
  done = os.path.join(out, MERGE_FILE)
  if os.path.exists(os.path.join(out, checkpoint.CONFIG_FILE)) or os.path.exists(done):
    previous = None
    if os.path.isfile(done):
      with open(done) as f:
        previous = json.load(f)
    if previous != provenance:
      raise ValueError(f"--out={out} already holds a run (not this merge of {workdir} step "
                       f"{step}); choose a new directory")
    if checkpoint.steps(out):
      logging.info("%s already holds this merge (%s step %d); nothing to do", out, workdir, step)
      return out
    shutil.rmtree(checkpoint.checkpoint_dir(out), ignore_errors=True)  # an interrupted merge: redo
  params = load_merged_params(workdir, step, dtype=_DTYPES[dtype] if dtype else None)
  merged_cfg = ml_collections.ConfigDict(config.to_dict())
  with merged_cfg.unlocked():
    merged_cfg.lora.rank = 0  # a full model now: tools must not look for adapters or a base
    merged_cfg.model.param_dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name
    os.makedirs(out, exist_ok=True)
    merged_cfg.data.tokenizer.path = _copy_tokenizer(workdir, config, out)
  with open(done, "w") as f:  # first: a crash below leaves a merge this command can finish
    json.dump(provenance, f, indent=2)
  checkpoint.save_params(out, params, merged_cfg, step=step)
  logging.info("Wrote the merged model to %s (from %s step %d + base %s step %d)", out, workdir,
               step, config.init_from, config.init_step)
  return out


def main(argv):
  console.setup()
  del argv
  f = flags.FLAGS
  merge_run(f.workdir, f.out, f.step, f.dtype)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "the LoRA run directory (config.json + checkpoints/)")
  flags.DEFINE_string("out", None, "new run directory for the merged model")
  flags.DEFINE_integer("step", -1, "the adapters' checkpoint step; -1 is the latest")
  flags.DEFINE_string("dtype", "", "dtype of the merged weights (float32, bfloat16); empty: the base's")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=console.parse_flags)
