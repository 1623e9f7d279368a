"""Export an llm_jax checkpoint as a Hugging Face model directory (no custom code needed).

  python -m llm_jax.convert.hf_export --workdir=runs/sft --out=exported/ [--step=-1]

  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("exported/")  # Llama / Qwen2 / Qwen3ForCausalLM
  tok = AutoTokenizer.from_pretrained("exported/")           # apply_chat_template renders our ChatML

Writes config.json (LlamaForCausalLM; Qwen2ForCausalLM with q/k/v bias; Qwen3ForCausalLM with
q/k norm; Qwen3MoeForCausalLM / Qwen2MoeForCausalLM for MoE runs, experts as per-expert Hub keys;
scaled RoPE as rope_scaling / rope_parameters), generation_config.json (stops on <|im_end|> and <|endoftext|>), the weights as
safetensors (numpy only: neither torch nor transformers is needed to export; split into
shards of at most `max_shard_bytes` with model.safetensors.index.json), tokenizer.json (converted
from a SentencePiece run's tokenizer.model, which is copied too) and tokenizer_config.json with
the ChatML chat template llm_jax trains with (llm_jax/data/chat_template.py).
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from absl import flags, logging
import ml_collections
import numpy as np

from llm_jax import console, rundir
from llm_jax.convert import hf_config, hf_import, hf_weights, sp_to_hf
from llm_jax.data.chat_template import CHAT_TEMPLATE
from llm_jax.data.hf_tokenizer import HFTokenizer, TOKENIZER_CONFIG, TOKENIZER_JSON
from llm_jax.model.config import ModelConfig

_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}

# A function that rewrites the parameter tree before it is written, given the run's config. The
# place where adapter weights get folded in (LoRA: kernel + scale * A @ B) once LoRA exists.
ParamsTransform = Callable[[Any, ml_collections.ConfigDict], Any]


def _dtype_name(x) -> str:
  return "bfloat16" if x.dtype.name == "bfloat16" else _DTYPE_NAMES[np.dtype(x.dtype)]


def write_safetensors(cfg: ModelConfig, params: Any, out_dir: str, max_shard_bytes: int) -> list[str]:
  """Writes the weights shard by shard: tensors are copied to host one at a time and only the
  current shard's are held, so host memory peaks at one shard, not the whole model."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  specs = hf_weights.hf_tensor_list(cfg)
  itemsize = np.dtype(hf_weights.get_path(params, ("embed", "embedding")).dtype).itemsize
  shards, size = [[]], 0
  for name, s in specs:
    nbytes = int(np.prod(s.one_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  n = len(shards)
  file_of = {}
  for k, names in enumerate(shards):
    f = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    file_of.update({name: f for name in names})
  total, shard, current = 0, {}, None
  for name, _, x in hf_weights.iter_hf_tensors(cfg, params):
    f = file_of[name]
    if current is not None and f != current:
      save_file(shard, os.path.join(out_dir, current), metadata={"format": "pt"})
      shard = {}
    current = f
    shard[name] = x
    total += x.nbytes
  save_file(shard, os.path.join(out_dir, current), metadata={"format": "pt"})
  if n > 1:
    with open(os.path.join(out_dir, hf_weights.INDEX_FILE), "w") as fh:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))},
                fh, indent=2)
  return sorted(set(file_of.values()))


def gate_shared_experts(params: Any, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
  """Qwen2-MoE scales its shared expert by sigmoid(x @ w_gate). An ungated shared expert (minimind,
  DeepSeek) is written exactly as a zero gate (sigmoid(0) = 1/2) and a doubled down projection:
  both factors are powers of two, so every product and sum rounds as before."""
  m = cfg.moe
  if not (m.enabled and m.n_shared_experts and not m.shared_expert_gate):
    return params, cfg

  def replace(tree, path, fn):
    if not path:
      return fn(tree)
    return {**tree, path[0]: replace(tree[path[0]], path[1:], fn)}

  def gate(moe):
    down = moe["shared_expert"]["down_proj"]["kernel"]
    lead = down.shape[:-2]  # the stacked-layers axis of a scanned model, if any
    shared = {**moe["shared_expert"], "down_proj": {"kernel": down * 2}}
    return {**moe, "shared_expert": shared,
            "shared_expert_gate": {"kernel": np.zeros(lead + (cfg.dim, 1), down.dtype)}}

  for g in hf_weights.layer_groups(cfg):
    if g.sparse:
      params = replace(params, g.prefix + ("moe",), gate)
  return params, dataclasses.replace(cfg, moe=dataclasses.replace(m, shared_expert_gate=True))


def write_tokenizer(tok_path: str, out_dir: str, max_len: int) -> HFTokenizer:
  """tokenizer.json (+ tokenizer.model for SentencePiece) and tokenizer_config.json."""
  hf_cfg: dict[str, Any] = {}
  if tok_path.endswith(".model"):
    sp_to_hf.convert(tok_path).save(os.path.join(out_dir, TOKENIZER_JSON))
    shutil.copyfile(tok_path, os.path.join(out_dir, "tokenizer.model"))
    hf_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  else:
    src_dir = tok_path if os.path.isdir(tok_path) else os.path.dirname(tok_path)
    if not os.path.isfile(os.path.join(src_dir, TOKENIZER_JSON)):
      raise FileNotFoundError(f"the run's tokenizer {tok_path!r} is neither a SentencePiece "
                              ".model nor a directory with tokenizer.json")
    for name in hf_import.TOKENIZER_FILES:
      if os.path.isfile(os.path.join(src_dir, name)):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    if os.path.isfile(os.path.join(src_dir, TOKENIZER_CONFIG)):
      with open(os.path.join(src_dir, TOKENIZER_CONFIG)) as f:
        hf_cfg = json.load(f)
  tok = HFTokenizer(out_dir)

  def text(i):
    return None if i is None else tok.id_to_token(i)

  # The run was trained on our ChatML, so that template replaces any the source model had.
  hf_cfg["chat_template"] = CHAT_TEMPLATE
  eos = tok.im_end_id if tok.im_end_id is not None else tok.eos_id
  hf_cfg.update(eos_token=text(eos), pad_token=text(tok.pad_id), add_bos_token=False,
                add_eos_token=False, model_max_length=max_len, clean_up_tokenization_spaces=False)
  hf_cfg.setdefault("bos_token", text(tok.bos_id))
  hf_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
  with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w") as f:
    json.dump(hf_cfg, f, indent=2, ensure_ascii=False)
  return HFTokenizer(out_dir)


def export_hf(workdir: str, out_dir: str, step: int = -1, *,
              transform_params: ParamsTransform | None = None,
              max_shard_bytes: int = 2 << 30) -> str:
  """Writes the checkpoint of `workdir` at `step` (-1: latest) to `out_dir` in Hugging Face form.

  transform_params: applied to (params, config) before writing; the hook for merging adapters.
  Returns out_dir.
  """
  params, config = rundir.load_params(workdir, step)
  if transform_params is not None:
    params = transform_params(params, config)
  vocab = hf_weights.get_path(params, ("embed", "embedding")).shape[0]
  cfg = ModelConfig.from_config(config.model, vocab_size=vocab)
  params, cfg = gate_shared_experts(params, cfg)
  os.makedirs(out_dir, exist_ok=True)
  max_len = rundir.context_length(workdir)
  tok_path = rundir.tokenizer_path(workdir, config)
  if not tok_path:
    raise FileNotFoundError(f"{workdir} has no tokenizer (tokenizer.model or tokenizer/) and "
                            "config.data.tokenizer.path is empty")
  tok = write_tokenizer(tok_path, out_dir, max_len)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} ids but the model's embedding "
                     f"has {cfg.vocab_size} rows")
  dtype = _dtype_name(hf_weights.get_path(params, ("embed", "embedding")))
  eos = tok.im_end_id if tok.im_end_id is not None else tok.eos_id
  hf = hf_config.hf_config_from_model(cfg, dtype=dtype, max_position_embeddings=max_len,
                                      bos_id=tok.bos_id, eos_id=eos, pad_id=tok.pad_id)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  stop = [i for i in dict.fromkeys((tok.im_end_id, tok.eos_id)) if i is not None]
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": tok.bos_id, "eos_token_id": stop, "pad_token_id": tok.pad_id},
              f, indent=2)
  files = write_safetensors(cfg, params, out_dir, max_shard_bytes)
  logging.info("exported %s (%s) to %s: %s", workdir, hf["architectures"][0], out_dir, files)
  if tok_path.endswith(".model") and hf.get("model_type") == "qwen2":
    # transformers 5 maps model_type qwen2 to its byte-level Qwen2Tokenizer whatever
    # tokenizer_config.json declares, and that encodes a SentencePiece vocabulary's text to nothing.
    logging.warning("%s: this %s model uses the run's SentencePiece tokenizer; transformers' "
                    "AutoTokenizer would replace it with Qwen2Tokenizer (model_type %s) and encode "
                    "text wrongly. Load it with transformers.PreTrainedTokenizerFast"
                    ".from_pretrained(%r).", out_dir, hf["architectures"][0], hf["model_type"],
                    out_dir)
  return out_dir


def main():
  f = flags.FLAGS
  export_hf(f.workdir, f.out, f.step, max_shard_bytes=int(f.max_shard_gb * (1 << 30)))


if __name__ == "__main__":
  # Defined here, not at import, so importing this module never clashes with other flags.
  flags.DEFINE_string("workdir", None, "llm_jax run directory (config.json + checkpoints/)")
  flags.DEFINE_string("out", None, "directory to write the Hugging Face model to")
  flags.DEFINE_integer("step", -1, "checkpoint step to export; -1 is the latest")
  flags.DEFINE_float("max_shard_gb", 2.0, "largest safetensors file, in GiB")
  flags.mark_flags_as_required(["workdir", "out"])
  console.cli(main)
