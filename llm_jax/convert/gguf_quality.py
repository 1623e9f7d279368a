"""What a GGUF file costs in quality: its next-token log-probs in llama.cpp (llama-cpp-python)
next to llm_jax's own float32 forward pass of the same run, on held-out text.

  from llm_jax.convert import gguf_quality
  print(gguf_quality.report("runs/sft", "model-q8_0.gguf"))

llama.cpp runs with an F32 KV cache and no flash attention, so an F32 file differs from llm_jax
only by summation order; F16 / Q8_0 / Q4_0 files then show the cost of their weights alone.
The held-out text is the run's own built-in held-out set (config.data.eval: chats about people
an SFT run never saw questions about, ...) or else the encyclopedia's held-out biographies, for
the run's own config.data.synthetic, so nothing is downloaded.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import rundir
from llm_jax.data import builtin
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder

_GGML_TYPE_F32 = 0  # ggml_type of an F32 KV cache (llama.cpp's default is F16)


def heldout_source(config, split: str = "eval") -> str:
  """The run's own held-out set (config.data.eval) where it is a built-in one, else the
  encyclopedia's held-out biographies. split "train": the run's built-in training set instead
  (what a model that memorised its data knows; its held-out text measures only guessing)."""
  if split not in ("eval", "train"):
    raise ValueError(f"split={split!r}: use eval or train")
  name = str(config.data.get(split, "") or "")
  return name if builtin.is_builtin(name) and name[len(builtin.PREFIX):] in builtin.BUILTINS \
      else "builtin:bios_eval"


def heldout_sequences(tok, config, n_targets: int, max_len: int, split: str = "eval"
                      ) -> list[tuple[list[int], np.ndarray]]:
  """Held-out records (heldout_source(config, split)) one per row (ids, weights as heldout_ids
  gives them, each cut to `max_len`) until `n_targets` weighted targets are collected."""
  from llm_jax.data.chat_template import encode_chat  # pylint: disable=g-import-not-at-top
  out, total = [], 0
  for r in builtin.records(heldout_source(config, split), config.data.synthetic):
    if "messages" in r:
      i, w = encode_chat(tok, r["messages"])
      ids, weights = i.tolist()[:max_len], np.asarray(w[:max_len], np.float64)
    elif "text" in r:
      ids = (tok.encode(r["text"]) + ([tok.eos_id] if tok.eos_id is not None else []))[:max_len]
      weights = np.ones(len(ids))
    else:
      continue
    out.append((ids, weights))
    total += int(weights[1:].sum())
    if total >= n_targets:
      break
  return out


def heldout_ids(tok, config, n_tokens: int) -> tuple[list[int], np.ndarray]:
  """The first `n_tokens` ids of the run's held-out set (heldout_source, for the run's own
  config.data.synthetic) and their loss weights: texts joined by <|endoftext|> as in pretraining
  (every token counts), chats rendered as the SFT job renders them (ChatML; only the answers
  count, as in its eval loss: a model fine-tuned from scratch never learned the questions)."""
  from llm_jax.data.chat_template import encode_chat  # pylint: disable=g-import-not-at-top
  ids: list[int] = []
  weights: list[float] = []
  for r in builtin.records(heldout_source(config), config.data.synthetic):
    if "messages" in r:
      i, w = encode_chat(tok, r["messages"])
      ids, weights = ids + i.tolist(), weights + w.tolist()
    elif "text" in r:
      i = tok.encode(r["text"]) + ([tok.eos_id] if tok.eos_id is not None else [])
      ids, weights = ids + i, weights + [1.0] * len(i)
    else:  # preference pairs
      continue
    if len(ids) >= n_tokens:
      break
  return ids[:n_tokens], np.asarray(weights[:n_tokens])


def llm_jax_logprobs(params, cfg: ModelConfig, ids: list[int], pad_to: int = 0) -> np.ndarray:
  """[len(ids) - 1, vocab] float64 log-probs of each next token from llm_jax's decoder, in
  float32 whatever the run's compute dtype. `pad_to`: run the row padded to that length (padding
  is segment 0, which no real position attends to), so rows of any length share one compile."""
  cfg32 = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
  params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  n, total = len(ids), max(pad_to, len(ids))
  row = np.zeros((1, total), np.int32)
  segments = np.zeros((1, total), np.int32)
  row[0, :n], segments[0, :n] = ids, 1
  logits = _forward(cfg32, params32, row, np.arange(total)[None], segments)
  x = np.asarray(logits[0, :n - 1], np.float64)
  return x - _logsumexp(x)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, positions, segments):
  # One compiled call (op by op, every op of the decoder would compile on its own).
  return Decoder(cfg).apply({"params": params}, ids, positions, segments)


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


def nll_sum(logprobs_NxV: np.ndarray, ids: list[int], weights: np.ndarray) -> tuple[float, float]:
  """(sum of the weighted negative log-probs of ids[1:], sum of their weights)."""
  targets = np.asarray(ids[1:])
  w = np.asarray(weights[1:], np.float64)
  return float((-logprobs_NxV[np.arange(len(targets)), targets] * w).sum()), float(w.sum())


def perplexity(logprobs_NxV: np.ndarray, ids: list[int],
               weights: np.ndarray | None = None) -> float:
  """exp of the mean negative log-prob of ids[1:], over the targets whose weight is 1."""
  targets = np.asarray(ids[1:])
  nll = -logprobs_NxV[np.arange(len(targets)), targets]
  w = np.ones(len(targets)) if weights is None else np.asarray(weights[1:], np.float64)
  return math.exp(float((nll * w).sum() / w.sum()))


def report(workdir: str, gguf_path: str, n_tokens: int = 512) -> str:
  """One line: perplexity of held-out text under llm_jax and under llama.cpp with `gguf_path`."""
  run = rundir.load(workdir)
  n = min(n_tokens, run.context)
  ids, weights = heldout_ids(run.tokenizer, run.config, n)
  rows = run.params["embed"]["embedding"].shape[0]  # may exceed the tokenizer's size
  cfg = ModelConfig.from_config(run.config.model, vocab_size=rows)
  ours = llm_jax_logprobs(run.params, cfg, ids)
  theirs = llama_cpp_logprobs(load_llama(gguf_path, len(ids)), ids)
  p_ours, p_theirs = perplexity(ours, ids, weights), perplexity(theirs, ids, weights)
  return (f"held-out perplexity over {int(weights[1:].sum())} tokens "
          f"({heldout_source(run.config)}): llm_jax float32 "
          f"{p_ours:.4f}, llama.cpp {gguf_path} {p_theirs:.4f} "
          f"({100 * (p_theirs / p_ours - 1):+.2f}%)"
          f"; largest next-token log-prob difference {np.abs(ours - theirs).max():.4f}")
