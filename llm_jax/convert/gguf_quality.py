"""What a GGUF file costs in quality: its next-token log-probs in llama.cpp (llama-cpp-python)
next to llm_jax's own float32 forward pass of the same run, on held-out text.

  from llm_jax.convert import gguf_quality
  print(gguf_quality.report("runs/sft", "model-q8_0.gguf"))

llama.cpp runs with an F32 KV cache and no flash attention, so an F32 file differs from llm_jax
only by summation order; F16 / Q8_0 / Q4_0 files then show the cost of their weights alone.
The held-out text is the built-in encyclopedia's `bios_eval` split for the run's own
config.data.synthetic (other biographies than those it trained on), so nothing is downloaded.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import rundir
from llm_jax.data import builtin
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder

_GGML_TYPE_F32 = 0  # ggml_type of an F32 KV cache (llama.cpp's default is F16)


def heldout_ids(tok, config, n_tokens: int) -> list[int]:
  """The first `n_tokens` ids of held-out biographies (config.data.synthetic's bios_eval),
  documents joined by <|endoftext|> as in pretraining."""
  records = builtin.records("builtin:bios_eval", config.data.synthetic)
  ids: list[int] = []
  for r in records:
    ids += tok.encode(r["text"]) + ([tok.eos_id] if tok.eos_id is not None else [])
    if len(ids) >= n_tokens:
      break
  return ids[:n_tokens]


def llm_jax_logprobs(params, cfg: ModelConfig, ids: list[int]) -> np.ndarray:
  """[len(ids) - 1, vocab] float64 log-probs of each next token from llm_jax's decoder, in
  float32 whatever the run's compute dtype."""
  cfg32 = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
  params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  n = len(ids)
  # One compiled call (op by op, every op of the decoder would compile on its own).
  logits = jax.jit(lambda p, i: Decoder(cfg32).apply({"params": p}, i, jnp.arange(n)[None],
                                                     jnp.ones((1, n), jnp.int32)))(
      params32, jnp.asarray([ids], jnp.int32))
  x = np.asarray(logits[0, :-1], np.float64)
  return x - _logsumexp(x)


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def load_llama(gguf_path: str, n_ctx: int):
  """A llama_cpp.Llama over `gguf_path` that keeps every position's logits, with an F32 KV cache."""
  import llama_cpp  # pylint: disable=g-import-not-at-top
  return llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                         logits_all=True, verbose=False, type_k=_GGML_TYPE_F32,
                         type_v=_GGML_TYPE_F32, flash_attn=False, seed=0)


def llama_cpp_logprobs(llm, ids: list[int]) -> np.ndarray:
  """[len(ids) - 1, vocab] float64 next-token log-probs of `ids` computed by llama.cpp."""
  llm.reset()
  llm.eval(ids)
  x = np.asarray(llm.scores[:len(ids) - 1], np.float64)
  return x - _logsumexp(x)


def perplexity(logprobs_NxV: np.ndarray, ids: list[int]) -> float:
  targets = np.asarray(ids[1:])
  return math.exp(-float(logprobs_NxV[np.arange(len(targets)), targets].mean()))


def report(workdir: str, gguf_path: str, n_tokens: int = 512) -> str:
  """One line: perplexity of held-out text under llm_jax and under llama.cpp with `gguf_path`."""
  run = rundir.load(workdir)
  n = min(n_tokens, run.context)
  ids = heldout_ids(run.tokenizer, run.config, n)
  rows = run.params["embed"]["embedding"].shape[0]  # may exceed the tokenizer's size
  cfg = ModelConfig.from_config(run.config.model, vocab_size=rows)
  ours = llm_jax_logprobs(run.params, cfg, ids)
  theirs = llama_cpp_logprobs(load_llama(gguf_path, len(ids)), ids)
  p_ours, p_theirs = perplexity(ours, ids), perplexity(theirs, ids)
  return (f"held-out perplexity over {len(ids) - 1} tokens (builtin:bios_eval): llm_jax float32 "
          f"{p_ours:.4f}, llama.cpp {gguf_path} {p_theirs:.4f} "
          f"({100 * (p_theirs / p_ours - 1):+.2f}%)"
          f"; largest next-token log-prob difference {np.abs(ours - theirs).max():.4f}")
