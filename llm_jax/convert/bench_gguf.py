"""What each GGUF type costs, measured in llama.cpp itself (needs llama-cpp-python):

  python -m llm_jax.convert.bench_gguf --workdir=runs/sft [--types=f32,f16,bf16,q8_0,q4_0]

For every type: file size, export time, held-out perplexity in llama.cpp next to llm_jax's float32
(gguf_quality), the largest next-token log-prob difference, and how many of 10 held-out prompts
llama.cpp's greedy sampler continues for 32 tokens exactly as llm_jax's generator
(`python -m llm_jax.chat --temperature=0`). Figures measured here are in docs/gguf.md.
"""

import os
import tempfile

from absl import flags
import numpy as np

from llm_jax import console, rundir
from llm_jax.convert import gguf_export, gguf_quality
from llm_jax.data import builtin
from llm_jax.data.chat_template import encode_chat
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "llm_jax run directory to export")
_TYPES = flags.DEFINE_list("types", list(gguf_export.TYPES), "GGUF types to measure")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "where the files go (default: a temporary directory)")
_PROMPTS = flags.DEFINE_integer("prompts", 10, "held-out chat prompts for the greedy comparison")
_NEW = flags.DEFINE_integer("new_tokens", 32, "greedy tokens per prompt")
_TOKENS = flags.DEFINE_integer("ppl_tokens", 512,
                               "held-out tokens for perplexity (at most the context)")


def _prompts(run, n: int) -> list[list[int]]:
  out = []
  for r in builtin.records("builtin:bios_qa_heldout", run.config.data.synthetic):
    msgs = r["messages"]
    k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    out.append(encode_chat(run.tokenizer, msgs[:k], add_generation_prompt=True)[0].tolist())
    if len(out) == n:
      return out
  return out


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
  out = []
  for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
    out.append(int(t))
    if len(out) == n:
      break
  return out


def main():
  run = rundir.load(_WORKDIR.value)
  out_dir = _OUT_DIR.value or tempfile.mkdtemp(prefix="bench_gguf_")
  rows = run.params["embed"]["embedding"].shape[0]
  cfg = gguf_export.ModelConfig.from_config(run.config.model, vocab_size=rows)
  ids = gguf_quality.heldout_ids(run.tokenizer, run.config, min(_TOKENS.value, run.context))
  ours = gguf_quality.llm_jax_logprobs(run.params, cfg, ids)
  ppl = gguf_quality.perplexity(ours, ids)
  prompts = _prompts(run, _PROMPTS.value)
  greedy = [g.tokens for g in Generator(run.params, run.model_cfg).generate(
      prompts, SamplingConfig(temperature=0.0, max_new_tokens=_NEW.value))]
  print(f"{_WORKDIR.value}: {cfg.n_layers} layers, dim {cfg.dim}, vocab {rows}; llm_jax float32 "
        f"perplexity {ppl:.4f} on {len(ids) - 1} held-out tokens (builtin:bios_eval)")
  print("| type | size (MiB) | export (s) | perplexity in llama.cpp | gap | max log-prob diff "
        f"| greedy {_NEW.value} tokens equal |")
  print("|---|---|---|---|---|---|---|")
  for t in _TYPES.value:
    res = gguf_export.export_gguf(_WORKDIR.value, os.path.join(out_dir, f"model-{t}.gguf"), t)
    llm = gguf_quality.load_llama(res.path, max(len(ids), run.context))
    theirs = gguf_quality.llama_cpp_logprobs(llm, ids)
    p = gguf_quality.perplexity(theirs, ids)
    same = sum(_greedy(llm, q, _NEW.value) == g for q, g in zip(prompts, greedy))
    print(f"| {t} | {res.size / 2**20:.2f} | {res.seconds:.1f} | {p:.4f} "
          f"| {100 * (p / ppl - 1):+.3f}% "
          f"| {np.abs(ours - theirs).max():.2e} | {same}/{len(prompts)} |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  console.cli(main)
