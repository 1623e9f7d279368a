"""Export a run as one GGUF file for llama.cpp, Ollama and LM Studio, plus an Ollama Modelfile.

  python -m llm_jax.convert.gguf_export --workdir=runs/sft --out=model.gguf --type=q8_0
  ollama create my-model -f Modelfile && ollama run my-model

Written with the `gguf` package (GGUFWriter; its quants module for BF16 / Q8_0 / Q4_0): no
llama.cpp checkout is needed. What is written, and why:
  architecture   "llama" (no bias, no q/k norm), "qwen2" (q/k/v bias) or "qwen3" (q/k norm), the
                 same choice as the Hugging Face export (hf_config.family), with the tensors of
                 its name table (hf_weights) renamed by gguf's TensorNameMap. llama.cpp's "llama"
                 rotates adjacent pairs (GPT-J RoPE) where we rotate halves (NeoX, as Hugging Face
                 and llama.cpp's qwen2/qwen3 do), so for "llama" the rows of q and k are permuted
                 within each head (`permute_qk`, the permutation of llama.cpp's own converter);
                 nothing else is changed. A tied head is written once (token_embd; llama.cpp
                 reuses it when `output` is absent).
  types          f32 / f16 / bf16: matrices in that type, norms and biases in F32 (as llama.cpp's
                 converter does). q8_0: every matrix Q8_0. q4_0: layer matrices Q4_0, the
                 embedding and the untied head Q8_0 (their error reaches every token, as
                 llama-quantize's Q4_0 mix keeps them wider). A matrix whose rows are not a
                 multiple of the 32-value block stays F16.
  tokenizer      the run's own, with its real settings (gguf_vocab.py), refused where llama.cpp
                 would tokenize differently.
  chat           our ChatML template (tokenizer.chat_template) so llama.cpp's and Ollama's chat
                 render what the model was trained on; context length = rundir.context_length.
Refused before anything is written, with one line saying why: MoE runs, scaled RoPE other than
linear, a model whose q/k norm and bias are both on, a Qwen2 shape whose heads do not span dim
(llama.cpp's qwen2 has no separate head size), tokenizers llama.cpp cannot reproduce. The
file is written to a temporary name beside --out and renamed when complete, so --out is either
the whole new file or untouched.
"""

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np

from llm_jax import packages, rundir
from llm_jax.convert import gguf_vocab, hf_config, hf_weights
from llm_jax.data.chat_template import CHAT_TEMPLATE
from llm_jax.model.config import ModelConfig

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
MODELFILE = "Modelfile"
_QBLOCK = 32  # values per Q8_0 / Q4_0 block: a quantized matrix's rows must be a multiple
# Tensors written in Q8_0 when the file is Q4_0 (see the module docstring).
_WIDE_IN_Q4 = ("token_embd.weight", "output.weight")


class Unsupported(gguf_vocab.Unsupported):
  """The run cannot be exported to GGUF as it is; the message says why in one line."""


@dataclasses.dataclass
class Result:
  path: str
  modelfile: str
  arch: str
  type: str
  size: int  # bytes
  seconds: float
  n_tensors: int
  fallbacks: list[str]  # matrices kept F16 in a quantized file (rows not a block multiple)

  def summary(self) -> str:
    extra = (f"; kept F16 (rows not a multiple of {_QBLOCK}): {self.fallbacks}"
             if self.fallbacks else "")
    return (f"wrote {self.path}: {self.size / 2**20:.2f} MiB, type {self.type}, architecture "
            f"{self.arch}, {self.n_tensors} tensors, in {self.seconds:.1f} s{extra}; Ollama: "
            f"{self.modelfile}")


def permute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Rows of a q or k projection ([heads * head_dim, in], Hugging Face layout) reordered from
  rotate-half pairs (i, i + head_dim/2) to adjacent pairs (2i, 2i + 1) within each head, which is
  what llama.cpp's "llama" RoPE rotates (its convert_hf_to_gguf.py does the same)."""
  o = w_OxI.shape[0]
  return np.ascontiguousarray(
      w_OxI.reshape(n_heads, 2, o // n_heads // 2, *w_OxI.shape[1:]).swapaxes(1, 2)
      .reshape(w_OxI.shape))


def unpermute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of permute_qk (for reading a "llama" GGUF back)."""
  o = w_OxI.shape[0]
  return np.ascontiguousarray(
      w_OxI.reshape(n_heads, o // n_heads // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2)
      .reshape(w_OxI.shape))


def _check_model(cfg: ModelConfig, where: str) -> str:
  """The llama.cpp architecture name for `cfg`, or Unsupported."""
  if cfg.moe.enabled:
    raise Unsupported(f"{where}: config.model.moe is a mixture-of-experts model; GGUF export "
                      "covers dense Llama / Qwen2 / Qwen3 shapes only (llama.cpp's qwen2moe / "
                      "qwen3moe make every layer sparse and always renormalise the top-k weights)")
  if cfg.qkv_bias and cfg.qk_norm:
    raise Unsupported(f"{where}: config.model has both qkv_bias and qk_norm; no llama.cpp "
                      "architecture has both (qwen2 has the bias, qwen3 the norm)")
  if cfg.rope_scaling.type not in ("none", "linear"):
    raise Unsupported(f"{where}: config.model.rope_scaling.type={cfg.rope_scaling.type!r}; GGUF "
                      "export supports unscaled and linear RoPE only")
  if cfg.head_dim % 2:
    raise Unsupported(f"{where}: config.model.head_dim={cfg.head_dim} is odd; RoPE needs pairs")
  arch = hf_config.family(cfg)
  if arch == "qwen2" and cfg.n_heads * cfg.head_dim != cfg.dim:
    raise Unsupported(f"{where}: config.model.n_heads * head_dim = {cfg.n_heads * cfg.head_dim} "
                      f"!= dim = {cfg.dim}; llama.cpp's qwen2 sizes q as dim x dim (as every Qwen2 "
                      "checkpoint is)")
  return arch


def _gguf():
  packages.require("gguf")  # one line naming the pip command when it is missing
  import gguf  # pylint: disable=g-import-not-at-top
  return gguf


def _tensor_plan(gguf, cfg: ModelConfig, arch: str, out_type: str):
  """[(gguf name, hf name, ggml type)] in the order hf_weights.iter_hf_tensors yields them, and
  the matrices that fall back to F16."""
  q = gguf.GGMLQuantizationType
  matrix_type = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0,
                 "q4_0": q.Q4_0}[out_type]
  arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
               "qwen3": gguf.MODEL_ARCH.QWEN3}[arch]
  names = gguf.get_tensor_name_map(arch_enum, cfg.n_layers)
  plan, fallbacks = [], []
  for hf_name, spec in hf_weights.hf_tensor_list(cfg):
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
      raise Unsupported(f"tensor {hf_name} has no {arch} GGUF name")
    shape = spec.hf_shape
    kind = q.F32 if len(shape) == 1 else matrix_type
    if kind == q.Q4_0 and name in _WIDE_IN_Q4:
      kind = q.Q8_0
    if kind in (q.Q8_0, q.Q4_0) and shape[-1] % _QBLOCK:
      kind = q.F16
      fallbacks.append(name)
    plan.append((name, hf_name, kind, shape))
  return plan, fallbacks


def _encode(gguf, x: np.ndarray, kind) -> np.ndarray:
  q = gguf.GGMLQuantizationType
  x = np.asarray(x, np.float32)
  if kind == q.F32:
    return x
  if kind == q.F16:
    return x.astype(np.float16)
  return gguf.quants.quantize(x, kind)


def _nbytes(gguf, shape: tuple[int, ...], kind) -> tuple[tuple[int, ...], Any, int]:
  """(shape as passed to add_tensor_info, its numpy dtype, bytes) of a tensor of `kind`."""
  q = gguf.GGMLQuantizationType
  if kind == q.F32:
    return shape, np.dtype(np.float32), 4 * int(np.prod(shape))
  if kind == q.F16:
    return shape, np.dtype(np.float16), 2 * int(np.prod(shape))
  byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
  return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def ollama_modelfile(gguf_name: str, stops: list[str], context: int) -> str:
  """An Ollama Modelfile for the GGUF file `gguf_name` (beside it): our ChatML as a Go template
  (what CHAT_TEMPLATE renders with add_generation_prompt), its stop tokens, the run's context."""
  lines = [f"FROM ./{gguf_name}",
           'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
           "{{ .Content }}<|im_end|>",
           "{{ end }}<|im_start|>assistant",
           '"""']
  lines += [f'PARAMETER stop "{s}"' for s in stops]
  lines.append(f"PARAMETER num_ctx {context}")
  return "\n".join(lines) + "\n"


def _atomic_text(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".modelfile-")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def export_gguf(workdir: str, out: str, out_type: str = "f16", step: int = -1, *,
                log: Callable[[str], None] = lambda s: None) -> Result:
  """Writes the run at `workdir` (checkpoint `step`, -1 the latest; LoRA merged) to the GGUF file
  `out` and an Ollama Modelfile beside it. Every check runs before the file is opened."""
  start = time.time()
  if out_type not in TYPES:
    raise Unsupported(f"--type={out_type!r}; choose one of {list(TYPES)}")
  if os.path.isdir(out):
    raise Unsupported(f"--out={out!r} is a directory; give the .gguf file name to write")
  out_dir = os.path.dirname(os.path.abspath(out))
  gguf = _gguf()
  config = rundir.read_config(workdir)
  where = os.path.join(workdir, rundir.CONFIG_FILE)
  cfg = ModelConfig.from_config(config.model)
  arch = _check_model(cfg, where)
  tok_path = rundir.tokenizer_path(workdir, config)
  if not tok_path:
    raise Unsupported(f"{workdir} has no tokenizer (tokenizer.model or tokenizer/) and "
                      "config.data.tokenizer.path is empty")
  tok = rundir.load_tokenizer(workdir, config)
  vocab = gguf_vocab.from_run_tokenizer(tok_path, tok.pad_id)
  context = rundir.context_length(workdir)

  params, config, step = rundir.load_params(workdir, step, with_step=True)
  rows = hf_weights.get_path(params, ("embed", "embedding")).shape[0]
  cfg = ModelConfig.from_config(config.model, vocab_size=rows)
  vocab.pad_to(rows)
  plan, fallbacks = _tensor_plan(gguf, cfg, arch, out_type)

  os.makedirs(out_dir, exist_ok=True)  # only now: a refused export creates nothing
  tmp_fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
  os.close(tmp_fd)
  try:
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(os.path.basename(os.path.abspath(workdir)))
    w.add_description(f"llm_jax run {workdir} step {step}")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(context)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling.type == "linear":
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(rows)

    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
      w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
      w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
      w.add_token_merges(vocab.merges)
    w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_add_bos_token(False)  # llm_jax's encode adds neither; prompts are ChatML-rendered
    w.add_add_eos_token(False)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
               "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
    for key, i in vocab.special.items():
      setters[key](i)
    w.add_chat_template(CHAT_TEMPLATE)

    for name, _, kind, shape in plan:
      info_shape, dtype, nbytes = _nbytes(gguf, shape, kind)
      w.add_tensor_info(name, info_shape, dtype, nbytes,
                        raw_dtype=None if dtype != np.uint8 else kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    kinds = {hf: (name, kind) for name, hf, kind, _ in plan}
    for hf_name, _, x in hf_weights.iter_hf_tensors(cfg, params):
      name, kind = kinds[hf_name]
      if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        x = permute_qk(x, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
      w.write_tensor_data(_encode(gguf, x, kind))
    w.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)  # atomic: --out is the old file or the whole new one
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  modelfile = os.path.join(out_dir, MODELFILE)
  _atomic_text(modelfile, ollama_modelfile(os.path.basename(out), vocab.stops, context))
  result = Result(out, modelfile, arch, out_type, os.path.getsize(out), time.time() - start,
                  len(plan), fallbacks)
  log(result.summary())
  return result


# What the quantised types cost on the models measured in docs/gguf.md (llama.cpp against
# llm_jax's float32, 2026-12-07): said after a quantised export without --measure.
EXPECTED_COST = {
    "q8_0": "expect perplexity within 0.1% of float32 (measured -0.10% to +0.002%) and greedy "
            "answers that differ only where the top two tokens are close (measured: within 0.1 "
            "in log-prob)",
    "q4_0": "expect perplexity up to about 1% worse (measured +0.05% to +1.1%) and about half of "
            "32-token greedy continuations to differ (3 to 6 of 10 equal)",
}


def main():
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  # A refusal (gguf_vocab.Unsupported, a ValueError) is one line "error: ..." from console.cli.
  result = export_gguf(f.workdir, f.out, f.type, f.step, log=print)
  if f.type in ("q8_0", "q4_0"):
    if f.measure:
      from llm_jax.convert import gguf_quality  # pylint: disable=g-import-not-at-top
      print(gguf_quality.report(f.workdir, result.path))
    else:
      print(f"{f.type} costs quality: {EXPECTED_COST[f.type]} (docs/gguf.md); --measure "
            "prints this file's own perplexity in llama.cpp next to llm_jax's")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from llm_jax import console  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "llm_jax run directory (config.json + checkpoints/)")
  flags.DEFINE_string("out", None, "the .gguf file to write (a Modelfile is written beside it)")
  flags.DEFINE_enum("type", "f16", TYPES, "tensor type of the matrices")
  flags.DEFINE_integer("step", -1, "checkpoint step to export; -1 is the latest")
  flags.DEFINE_bool("measure", False, "after a q8_0 / q4_0 export, measure its perplexity in "
                    "llama.cpp (needs llama-cpp-python) against llm_jax's on held-out text")
  flags.mark_flags_as_required(["workdir", "out"])
  console.cli(main)
