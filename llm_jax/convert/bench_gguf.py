"""What each GGUF type costs, measured in llama.cpp itself (needs llama-cpp-python):

  python -m llm_jax.convert.bench_gguf --workdir=runs/sft [--types=f32,f16,bf16,q8_0,q4_0]

For every type: file size, export time, held-out perplexity in llama.cpp next to llm_jax's float32
(gguf_quality), the largest next-token log-prob difference, and how many of 10 held-out prompts
llama.cpp's greedy sampler continues for 32 tokens exactly as llm_jax's generator
(`python -m llm_jax.chat --temperature=0`). Figures measured here are in docs/gguf.md.
"""

import math
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
_TOKENS = flags.DEFINE_integer("ppl_tokens", 2000, "held-out target tokens for perplexity")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train"],
                           "text and prompts: the run's held-out set (eval) or its training set "
                           "(train: for a model that memorised its data, as the quick start's)")


def _prompts(run, n: int, source: str) -> list[list[int]]:
  out = []
  for r in builtin.records(source, run.config.data.synthetic):
    if "messages" not in r:
      continue
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


def _ppl(logprobs, seqs) -> tuple[float, int]:
  nll, n = 0.0, 0.0
  for lp, (ids, weights) in zip(logprobs, seqs):
    a, b = gguf_quality.nll_sum(lp, ids, weights)
    nll, n = nll + a, n + b
  return math.exp(nll / n), int(n)


def main():
  run = rundir.load(_WORKDIR.value)
  out_dir = _OUT_DIR.value or tempfile.mkdtemp(prefix="bench_gguf_")
  rows = run.params["embed"]["embedding"].shape[0]
  cfg = gguf_export.ModelConfig.from_config(run.config.model, vocab_size=rows)
  seqs = gguf_quality.heldout_sequences(run.tokenizer, run.config, _TOKENS.value, run.context,
                                        _SPLIT.value)
  ours = [gguf_quality.llm_jax_logprobs(run.params, cfg, i, pad_to=run.context) for i, _ in seqs]
  ppl, n_targets = _ppl(ours, seqs)
  source = gguf_quality.heldout_source(run.config, _SPLIT.value)
  # Chat prompts from the same set; a text set (pretraining) has none: the QA chats then.
  chats = source if source.endswith(("_qa_train", "_qa_heldout")) else (
      "builtin:bios_qa_train" if _SPLIT.value == "train" else "builtin:bios_qa_heldout")
  prompts = _prompts(run, _PROMPTS.value, chats)
  greedy = [g.tokens for g in Generator(run.params, run.model_cfg).generate(
      prompts, SamplingConfig(temperature=0.0, max_new_tokens=_NEW.value))]
  print(f"{_WORKDIR.value}: {cfg.n_layers} layers, dim {cfg.dim}, vocab {rows}; llm_jax float32 "
        f"perplexity {ppl:.4f} on {n_targets} tokens in {len(seqs)} rows ({source}); "
        f"greedy prompts from {chats}")
  print("| type | size (MiB) | export (s) | perplexity in llama.cpp | gap | max log-prob diff "
        f"| greedy {_NEW.value} tokens equal | where they differ: our top-2 log-prob gap |")
  print("|---|---|---|---|---|---|---|---|")
  for t in _TYPES.value:
    res = gguf_export.export_gguf(_WORKDIR.value, os.path.join(out_dir, f"model-{t}.gguf"), t)
    llm = gguf_quality.load_llama(res.path, run.context)
    theirs = [gguf_quality.llama_cpp_logprobs(llm, i) for i, _ in seqs]
    p, _ = _ppl(theirs, seqs)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
    same, gaps = 0, []
    for q, g in zip(prompts, greedy):
      got = _greedy(llm, q, _NEW.value)
      if got == g:
        same += 1
        continue
      # How close our own choice was where llama.cpp's first differs: a near-tie or not.
      k = next(i for i, (a, b) in enumerate(zip(got, g)) if a != b)
      lp = gguf_quality.llm_jax_logprobs(run.params, cfg, q + g[:k + 1])[-1]
      gaps.append(f"{np.sort(lp)[-1] - np.sort(lp)[-2]:.3f}")
    print(f"| {t} | {res.size / 2**20:.2f} | {res.seconds:.1f} | {p:.4f} "
          f"| {100 * (p / ppl - 1):+.3f}% "
          f"| {diff:.2e} | {same}/{len(prompts)} | {', '.join(gaps)} |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  console.cli(main)
