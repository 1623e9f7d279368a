"""The device side of continuous batching: one KV cache of `n_slots` rows, each row a request.

  state = init_state(cfg, n_slots, cache_len)
  state, out = prefill_chunk(params, state, slot, tokens_C, start, length, targets_C, cfg=, top_n=)
  state, out = decode_step(params, state, settings, active_S, cfg=, window=, top_n=)

A request owns a slot from admission to its last token. Its prompt is written into that row in
chunks (`prefill_chunk`, one row, the other rows untouched), then every `decode_step` samples one
token for every active row and runs it through the model. Rows never need clearing: a query at
position p only sees cache slots j <= p, all of which the current request has written.

Every per-row quantity is a traced array: the slot index, positions, sampling settings and seeds.
Compiled shapes depend only on the chunk length C (a power of two), the attention window (a power
of two covering the longest active row, or the whole cache) and whether top log-probs are wanted,
so a bounded set of programs serves every request.
"""

import functools

import jax
import jax.numpy as jnp

from llm_jax.infer.sampling import row_keys, sample
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder, init_cache


def init_state(cfg: ModelConfig, n_slots: int, cache_len: int) -> dict:
  vocab = cfg.vocab_size
  return {"cache": init_cache(cfg, n_slots, cache_len),
          "logits": jnp.zeros((n_slots, vocab), jnp.float32),  # next-token logits of each row
          "positions": jnp.zeros((n_slots,), jnp.int32),  # where each row's next token goes
          "seen": jnp.zeros((n_slots, vocab), jnp.bool_),  # prompt + generated (repetition penalty)
          "counts": jnp.zeros((n_slots, vocab), jnp.int32),  # generated (presence/frequency)
          "generated": jnp.zeros((n_slots,), jnp.int32)}  # tokens generated (the sampling key's step)


def _top(logp_XxV, top_n: int):
  if not top_n:
    return None, None
  values, ids = jax.lax.top_k(logp_XxV, min(top_n, logp_XxV.shape[-1]))
  return values, ids.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "top_n"), donate_argnames=("state",))
def prefill_chunk(params, state, slot, tokens_C, start, length, targets_C, *, cfg: ModelConfig,
                  top_n: int = 0):
  """Writes tokens_C[:length] (positions start..start+length-1) into row `slot`.

  start == 0 starts a new request in the row (its penalties' history is reset). The row's logits
  become those after its last written token. With top_n > 0 ("echo": scoring a prompt), also
  returns per chunk position i the log-prob of targets_C[i] (the token that follows) and the top_n
  log-probs, all under the model's unmodified distribution; else those are None.
  """
  chunk = tokens_C.shape[0]
  idx_C = jnp.arange(chunk, dtype=jnp.int32)
  positions_1xC = (start + idx_C)[None]
  segment_ids_1xC = (idx_C < length).astype(jnp.int32)[None]
  row_cache = {k: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1) for k, c in state["cache"].items()}
  logits_at_1xK = None if top_n else (length - 1)[None, None]
  logits_1xKxV, row_cache = Decoder(cfg).apply({"params": params}, tokens_C[None], positions_1xC,
                                               segment_ids_1xC, cache=row_cache, logits_at_BxK=logits_at_1xK)
  cache = {k: jax.lax.dynamic_update_slice_in_dim(state["cache"][k], row_cache[k], slot, axis=1)
           for k in state["cache"]}
  last_V = logits_1xKxV[0, length - 1] if top_n else logits_1xKxV[0, 0]

  fresh = start == 0
  vocab = cfg.vocab_size
  new_V = jnp.zeros((vocab,), jnp.bool_).at[tokens_C].max(idx_C < length)
  seen_V = jnp.where(fresh, False, state["seen"][slot]) | new_V
  new_state = {"cache": cache,
               "logits": state["logits"].at[slot].set(last_V),
               "positions": state["positions"].at[slot].set(start + length),
               "seen": state["seen"].at[slot].set(seen_V),
               "counts": state["counts"].at[slot].set(jnp.where(fresh, 0, state["counts"][slot])),
               "generated": state["generated"].at[slot].set(jnp.where(fresh, 0, state["generated"][slot]))}
  out = {}
  if top_n:
    logp_CxV = jax.nn.log_softmax(logits_1xKxV[0], axis=-1)
    out["target_logprob"] = jnp.take_along_axis(logp_CxV, targets_C[:, None], axis=-1)[:, 0]
    out["top_logprob"], out["top_id"] = _top(logp_CxV, top_n)
  return new_state, out


@functools.partial(jax.jit, static_argnames=("cfg", "window", "top_n"), donate_argnames=("state",))
def decode_step(params, state, settings, active_S, *, cfg: ModelConfig, window: int, top_n: int = 0):
  """Samples one token for every row from its logits and runs the active rows' tokens through the
  model, attending over the first `window` cache positions (>= every active row's position + 1).

  Inactive rows are computed but nothing of theirs is written: no cache entry, no position step.
  Returns the new state and {"token", "logprob"[, "top_logprob", "top_id"]} per row; log-probs are
  under the model's unmodified distribution (before penalties and temperature), as OpenAI reports.
  """
  keys_S = row_keys(settings["seed"], state["generated"])
  token_S = sample(keys_S, state["logits"], state["seen"], state["counts"], settings)
  logp_SxV = jax.nn.log_softmax(state["logits"], axis=-1)
  rows_S = jnp.arange(token_S.shape[0])
  out = {"token": token_S, "logprob": logp_SxV[rows_S, token_S]}
  if top_n:
    out["top_logprob"], out["top_id"] = _top(logp_SxV, top_n)

  positions_S = state["positions"]
  window_cache = {k: c[:, :, :window] for k, c in state["cache"].items()}
  logits_Sx1xV, window_cache = Decoder(cfg).apply(
      {"params": params}, token_S[:, None], positions_S[:, None], active_S.astype(jnp.int32)[:, None],
      cache=window_cache)
  cache = {k: jax.lax.dynamic_update_slice_in_dim(state["cache"][k], window_cache[k], 0, axis=2)
           for k in state["cache"]}
  step_S = active_S.astype(jnp.int32)
  new_state = {"cache": cache,
               "logits": jnp.where(active_S[:, None], logits_Sx1xV[:, 0], state["logits"]),
               "positions": positions_S + step_S,
               "seen": state["seen"].at[rows_S, token_S].max(active_S),
               "counts": state["counts"].at[rows_S, token_S].add(step_S),
               "generated": state["generated"] + step_S}
  return new_state, out
