"""The train state of a LoRA job: the adapters train, the base stays frozen.

  {"step", "params": the adapters (model/lora.py's "lora" collection),
   "opt_state": AdamW moments of the adapters only,
   "frozen": the base parameters, from config.init_from}

The optimizer never sees the base, so it holds no moments for it; checkpoints hold everything but
"frozen" (checkpoint.py), and the base is read again from `init_from` at `init_step`,
which the run records at its first start, whenever it resumes, merges or exports.

  python -m llm_jax.train.lora_state --config=configs/sft.py:minimind-26m \
      --config.lora.rank=8 --config.model.vocab_size=6400

prints the memory LoRA saves for a model shape without building anything.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import sharding
from llm_jax.model import init as model_init, lora

# A run's LoRA settings, fixed at its first start: a resumed run goes on training the same way.
_RUN_FIELDS = ("rank", "alpha", "dropout", "targets", "init")


def prepare(config: ml_collections.ConfigDict, model_cfg, workdir: str, resuming: bool):
  """The ModelConfig with the job's adapters (unchanged when config.lora.rank is 0).

  A resumed run keeps the LoRA settings and the base it started with (config.json); a new run
  records the base's absolute path and its concrete step, so every later reader (resume, merge,
  PEFT export, chat) finds the very same base.
  """
  from llm_jax import checkpoint, rundir  # pylint: disable=g-import-not-at-top (Orbax, for jobs only)
  if resuming:
    run = rundir.read_config(workdir)
    saved = run.get("lora") or ml_collections.ConfigDict({"rank": 0})
    with config.unlocked():
      for f in _RUN_FIELDS:
        if f in saved and saved[f] != config.lora[f]:
          logging.warning("config.lora.%s=%s replaced by %s: %s was trained with it", f,
                          config.lora[f], saved[f], workdir)
          config.lora[f] = saved[f]
      if saved.get("rank", 0):
        config.init_from, config.init_step = run.init_from, run.init_step
  lora_cfg = lora.LoraConfig.from_config(config.lora)
  if lora_cfg is None:
    return model_cfg
  with config.unlocked():
    config.init_from = os.path.abspath(config.init_from)
    config.init_step = checkpoint.pick_step(config.init_from, config.init_step)
  return lora.with_lora(model_cfg, lora_cfg)


def state_shardings(model_cfg, optimizer: optax.GradientTransformation, mesh, rules):
  """(abstract state, sharding tree) as `state.state_shardings`, with the "frozen" base."""
  abstract_base, base_sh = model_init.abstract(lora.base_config(model_cfg),
                                                                  mesh, rules)
  abstract_ad, ad_sh = model_init.abstract(model_cfg, mesh, rules, lora.COLLECTION)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_ad)
  replicated = NamedSharding(mesh, P())
  o_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, ad_sh,
                                  transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": ad_sh, "opt_state": o_shard, "frozen": base_sh}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_ad,
              "opt_state": abstract_opt, "frozen": abstract_base}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def create_state(model_cfg, optimizer, rng, shardings, mesh, rules, base):
  """Fresh adapters (B = 0) and their optimizer state beside the given (sharded) base."""
  if base is None:
    raise ValueError("LoRA (config.lora.rank > 0) adapts a base model: set config.init_from")
  adapters = model_init.init(model_cfg, rng, mesh, rules, lora.COLLECTION)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(adapters)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"step": step, "params": adapters, "opt_state": opt_state, "frozen": base}


def eval_params(model_cfg, tree):
  """What `step.make_eval_step` applies the model to, from a state (or its sharding tree): the
  params, or with LoRA the variables {"params": base, "lora": adapters}."""
  if model_cfg.lora is None:
    return tree["params"]
  return lora.variables(model_cfg, tree["params"], tree["frozen"])


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory(model_cfg, optimizer, abstract_state) -> dict:
  """Bytes of parameters + optimizer state, for this LoRA state and for full fine-tuning of the
  same model with the same optimizer (computed from shapes; nothing is allocated)."""
  base = abstract_state["frozen"]
  full_opt = jax.eval_shape(optimizer.init, base)
  n_base = sum(math.prod(x.shape) for x in jax.tree.leaves(base))
  n_ad = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))
  lora_bytes = _nbytes(base) + _nbytes(abstract_state["params"]) + _nbytes(abstract_state["opt_state"])
  full_bytes = _nbytes(base) + _nbytes(full_opt)
  # A step also holds one gradient per trained parameter.
  return {"trainable": n_ad, "base": n_base, "lora_bytes": lora_bytes, "full_bytes": full_bytes,
          "lora_grad_bytes": _nbytes(abstract_state["params"]), "full_grad_bytes": _nbytes(base)}


def summary(model_cfg, optimizer, abstract_state) -> str:
  """One log line: what trains, and the memory LoRA saves."""
  m = memory(model_cfg, optimizer, abstract_state)
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  lc = model_cfg.lora
  return (f"LoRA rank {lc.rank} (alpha {lc.alpha:g}, dropout {lc.dropout:g}) on "
          f"{','.join(lc.targets)}: {m['trainable']:,} trainable parameters "
          f"({100 * m['trainable'] / m['base']:.2f}% of {m['base']:,}); parameters + optimizer "
          f"state {mib(m['lora_bytes'])} vs {mib(m['full_bytes'])} for full fine-tuning "
          f"({100 * m['lora_bytes'] / m['full_bytes']:.0f}%); with gradients "
          f"{mib(m['lora_bytes'] + m['lora_grad_bytes'])} vs "
          f"{mib(m['full_bytes'] + m['full_grad_bytes'])}")


def main():
  """`python -m llm_jax.train.lora_state --config=configs/sft.py:minimind-26m
  --config.lora.rank=8 --config.model.vocab_size=6400`: what LoRA saves, from shapes alone."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from llm_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from llm_jax.train import optimizer as opt_lib  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  lora_cfg = lora.LoraConfig.from_config(config.lora)
  if lora_cfg is None:
    raise ValueError("config.lora.rank=0: set --config.lora.rank to the adapters' rank")
  model_cfg = ModelConfig.from_config(
      config.model, vocab_size=config.model.vocab_size or config.data.tokenizer.vocab_size)
  model_cfg = lora.with_lora(model_cfg, lora_cfg)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.sharding_rules)
  optimizer = opt_lib.make_optimizer(config.train)
  abstract, _ = state_shardings(model_cfg, optimizer, mesh, rules)
  print(summary(model_cfg, optimizer, abstract))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from llm_jax import console  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file.", lock_config=True)
  console.cli(main)
