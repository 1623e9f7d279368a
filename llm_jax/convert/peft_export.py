"""Export a LoRA run's adapter in PEFT's format, beside its base model in Hugging Face form.

  python -m llm_jax.convert.peft_export --workdir=runs/lora --out=export/lora

  export/lora/base/     the base model (`hf_export` of the run's init_from at its recorded step)
  export/lora/adapter/  adapter_config.json + adapter_model.safetensors (PEFT LoRA)

  from peft import PeftModel
  from transformers import AutoModelForCausalLM
  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("export/lora/base"),
                                    "export/lora/adapter")

The tensors use PEFT's names and torch's Linear layout: `base_model.model.<module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r] (ours are A [in..., r] and B [r, out...] with the head axes
split out, flattened in the same order as the base weights in hf_weights.py); the embedding's are
`lora_embedding_A` [r, vocab] and `lora_embedding_B` [dim, r]. With tied embeddings an "embed"
adapter adapts the head too, which PEFT reproduces with `ensure_weight_tying` (the head's tied
lora_A/lora_B are written as well, as PEFT itself saves them).
"""

import json
import math
import os

import jax
import numpy as np
from absl import flags, logging

from llm_jax import console, rundir
from llm_jax.convert import hf_export, hf_weights
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _module(spec: hf_weights.Spec) -> str:
  return spec.hf[:-len(".weight")]


def adapter_tensors(cfg: ModelConfig, adapters) -> dict[str, np.ndarray]:
  """PEFT tensor name -> float32 array in PEFT's layout, for every adapter in `adapters`."""
  out = {}

  def put(module: str, a: np.ndarray, b: np.ndarray, embedding: bool):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rank = a.shape[-1]
    a_rxin = np.ascontiguousarray(a.reshape(-1, rank).T)
    b_outxr = np.ascontiguousarray(b.reshape(rank, -1).T)
    if embedding:  # lookup of A.T's columns: A [r, vocab], B [dim, r]
      out[f"{_PREFIX}{module}.lora_embedding_A"] = a_rxin
      out[f"{_PREFIX}{module}.lora_embedding_B"] = b_outxr
    else:
      out[f"{_PREFIX}{module}.lora_A.weight"] = a_rxin
      out[f"{_PREFIX}{module}.lora_B.weight"] = b_outxr

  for s in hf_weights.global_specs(cfg):
    node = adapters.get(s.path[0])
    if node is not None:
      put(_module(s), node["lora_a"], node["lora_b"], embedding=s.path[0] == "embed")
  for s in hf_weights.layer_specs(cfg):
    if s.path[-1] != "kernel":
      continue
    for i in range(cfg.n_layers):
      try:
        node = hf_weights.get_path(adapters, hf_weights.layer_prefix(cfg, i) + s.path[:-1])
      except KeyError:
        break  # this projection is not a target
      a, b = node["lora_a"], node["lora_b"]
      if cfg.scan_layers:
        a, b = a[i], b[i]
      put(_module(s).format(i=i), a, b, embedding=False)
  return out


def tied_head_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """With tied embeddings, the head's copy of the embedding adapter, as PEFT saves it with
  `ensure_weight_tying`: lm_head's lora_A = lora_embedding_B.T, lora_B = lora_embedding_A.T."""
  emb = f"{_PREFIX}model.embed_tokens.lora_embedding_"
  if not cfg.tie_embeddings or emb + "A" not in tensors:
    return {}
  return {f"{_PREFIX}lm_head.lora_A.weight": np.ascontiguousarray(tensors[emb + "B"].T),
          f"{_PREFIX}lm_head.lora_B.weight": np.ascontiguousarray(tensors[emb + "A"].T)}


def adapter_config(lora_cfg: lora.LoraConfig, cfg: ModelConfig, base_dir: str) -> dict:
  modules = {"embed": "embed_tokens", "lm_head": "lm_head"}
  targets = sorted(modules.get(t, lora.TARGET_MODULES[t]) for t in lora_cfg.targets)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": os.path.abspath(base_dir),
      "r": lora_cfg.rank,
      "lora_alpha": lora_cfg.alpha,
      "lora_dropout": lora_cfg.dropout,
      "target_modules": targets,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True if lora_cfg.init == "kaiming" else "gaussian",
      "modules_to_save": None,
      "layers_to_transform": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "inference_mode": True,
      # The adapted shared table is the tied head too (model/lora.py), as PEFT's tying makes it.
      "ensure_weight_tying": bool(cfg.tie_embeddings and "embed" in lora_cfg.targets),
  }


def export_peft(workdir: str, out: str, step: int = -1, max_shard_bytes: int = 2 << 30
                ) -> tuple[str, str]:
  """Writes out/base (the HF base model) and out/adapter (PEFT); returns both directories."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  config = rundir.read_config(workdir)
  lora_cfg = rundir.lora_config(config, workdir)
  adapters, _ = rundir.load_params(workdir, step, merge_lora=False)
  cfg = ModelConfig.from_config(config.model)
  tensors = adapter_tensors(cfg, adapters)
  n_found = sum(math.prod(x.shape) for x in tensors.values())
  n_saved = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(adapters))
  if n_found != n_saved:  # every stored adapter has a PEFT name, none is dropped
    raise ValueError(f"{workdir}: {n_saved} adapter parameters stored but {n_found} exported")
  tensors.update(tied_head_tensors(cfg, tensors))
  base_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
  hf_export.export_hf(config.init_from, base_dir, config.init_step,
                      max_shard_bytes=max_shard_bytes)
  with open(os.path.join(base_dir, "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
  if cfg.vocab_size != vocab:
    raise ValueError(f"{workdir}: config.model.vocab_size={cfg.vocab_size} but its base "
                     f"{config.init_from} has {vocab} rows")
  os.makedirs(adapter_dir, exist_ok=True)
  save_file(tensors, os.path.join(adapter_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(adapter_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(adapter_config(lora_cfg, cfg, base_dir), f, indent=2)
  logging.info("exported the rank-%d adapter of %s (%d tensors) to %s, its base to %s",
               lora_cfg.rank, workdir, len(tensors), adapter_dir, base_dir)
  return base_dir, adapter_dir


def main():
  f = flags.FLAGS
  export_peft(f.workdir, f.out, f.step, max_shard_bytes=int(f.max_shard_gb * (1 << 30)))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "the LoRA run directory (config.json + checkpoints/)")
  flags.DEFINE_string("out", None, "directory to write base/ and adapter/ to")
  flags.DEFINE_integer("step", -1, "the adapters' checkpoint step; -1 is the latest")
  flags.DEFINE_float("max_shard_gb", 2.0, "largest safetensors file of the base, in GiB")
  flags.mark_flags_as_required(["workdir", "out"])
  console.cli(main)
