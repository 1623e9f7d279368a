"""Merge a LoRA run's adapters into its base: a full run directory every tool loads.

  python -m llm_jax.convert.merge_lora --workdir=runs/lora --out=runs/lora-merged [--step=-1]

W + (alpha / rank) * A @ B is computed in float32 for every adapted weight, then stored in the
base's dtype (`--dtype=float32` keeps full precision for a bf16 base). The output holds
config.json (LoRA off), the tokenizer, a params checkpoint and lora_merge.json (where it came
from). The merge always starts from the pristine base (`init_from` at the recorded step), so it
can never add the adapters twice: running the same merge again is a no-op, and a merged directory
is refused as input (it is no LoRA run any more).

Chat, eval and export also read a LoRA run directly: `rundir.load_params` merges on load with
`load_merged_params`.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging

from llm_jax import checkpoint, console, rundir, workdir_lock

MERGE_FILE = rundir.MERGE_FILE
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _copy_tokenizer(workdir: str, config: ml_collections.ConfigDict, out: str) -> str:
  src = rundir.tokenizer_path(workdir, config)
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
  config = rundir.read_config(workdir)
  lora_cfg = rundir.lora_config(config, workdir)
  step = checkpoint.pick_step(workdir, step)
  if out in (workdir, os.path.abspath(config.init_from)):
    raise ValueError(f"--out={out} is the LoRA run or its base: write the merge to a new directory")
  provenance = {"workdir": workdir, "step": step, "base": config.init_from,
                "base_step": int(config.init_step), "rank": lora_cfg.rank,
                "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets)}
  if dtype and dtype not in _DTYPES:
    raise ValueError(f"--dtype={dtype!r}: must be one of {sorted(_DTYPES)} (or empty: the base's)")
  provenance["dtype"] = dtype
  with workdir_lock.hold(out, hint="use another --out"):  # one writer of `out` at a time
    return _merge(workdir, out, step, dtype, config, provenance)


def _merge(workdir: str, out: str, step: int, dtype: str, config: ml_collections.ConfigDict,
           provenance: dict) -> str:
  done = os.path.join(out, MERGE_FILE)
  if os.path.exists(os.path.join(out, rundir.CONFIG_FILE)) or os.path.exists(done):
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
  params, _ = rundir.load_params(workdir, step, dtype=_DTYPES[dtype] if dtype else None)
  merged_cfg = ml_collections.ConfigDict(config.to_dict())
  with merged_cfg.unlocked():
    merged_cfg.lora.rank = 0  # a full model now: tools must not look for adapters or a base
    merged_cfg.model.param_dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name
    os.makedirs(out, exist_ok=True)
    merged_cfg.data.tokenizer.path = _copy_tokenizer(workdir, config, out)
  with open(done, "w") as f:  # first: a crash below leaves a merge this command can finish
    json.dump(provenance, f, indent=2)
  rundir.save_params(out, params, merged_cfg, step=step)
  logging.info("Wrote the merged model to %s (from %s step %d + base %s step %d)", out, workdir,
               step, config.init_from, config.init_step)
  return out


def main():
  f = flags.FLAGS
  merge_run(f.workdir, f.out, f.step, f.dtype)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "the LoRA run directory (config.json + checkpoints/)")
  flags.DEFINE_string("out", None, "new run directory for the merged model")
  flags.DEFINE_integer("step", -1, "the adapters' checkpoint step; -1 is the latest")
  flags.DEFINE_string("dtype", "", "dtype of the merged weights (float32, bfloat16); empty: the base's")
  flags.mark_flags_as_required(["workdir", "out"])
  console.cli(main)
