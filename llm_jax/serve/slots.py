"""The device side of continuous batching: one KV cache of `n_slots` rows, each row a request.

  state = init_state(cfg, n_slots, cache_len)
  state, out = prefill_chunk(params, state, slot, tokens_C, start, length, targets_C, cfg=, top_n=)
  state, out = decode_step(params, state, settings_B, rows_B, active_B, cfg=, window=, top_n=)

A request owns a slot from admission to its last token. Its prompt is written into that row in
chunks (`prefill_chunk`, one row, the other rows untouched), then every `decode_step` samples one
token for each of a bucket of rows (the active ones, padded) and runs it through the model. Rows never need clearing: a query at
position p only sees cache slots j <= p, all of which the current request has written.

Every per-row quantity is a traced array: the slot index, positions, sampling settings and seeds.
Compiled shapes depend only on the chunk length C (a power of two), the number of rows decoded
together B (a power of two up to the slot count), the attention window (a bucket covering the
longest active row, or the whole cache) and whether top log-probs are wanted, so a bounded set of
programs serves every request.
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
def decode_step(params, state, settings, rows_B, active_B, *, cfg: ModelConfig, window: int, top_n: int = 0):
  """One token for each of the rows `rows_B` (distinct slot indices; `settings` are theirs, [B]):
  samples from the row's logits and runs the token through the model, attending over the first
  `window` cache positions (>= every active row's position + 1).

  Rows with active_B False are padding: computed, but nothing of theirs is written back (no cache
  entry, no position step). Returns the new state and {"token", "logprob"[, "top_logprob", "top_id"]}
  per row of rows_B; log-probs are under the model's unmodified distribution (before penalties and
  temperature), as OpenAI reports them.
  """
  logits_BxV = state["logits"][rows_B]
  seen_BxV, counts_BxV = state["seen"][rows_B], state["counts"][rows_B]
  positions_B, generated_B = state["positions"][rows_B], state["generated"][rows_B]
  keys_B = row_keys(settings["seed"], generated_B)
  token_B = sample(keys_B, logits_BxV, seen_BxV, counts_BxV, settings)
  logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  out = {"token": token_B, "logprob": jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]}
  if top_n:
    out["top_logprob"], out["top_id"] = _top(logp_BxV, top_n)

  # The rows' first `window` positions, gathered ([L, B, W, K, H]) and scattered back after.
  window_cache = {k: c[:, rows_B, :window] for k, c in state["cache"].items()}
  logits_Bx1xV, window_cache = Decoder(cfg).apply(
      {"params": params}, token_B[:, None], positions_B[:, None], active_B.astype(jnp.int32)[:, None],
      cache=window_cache)
  cache = {k: state["cache"][k].at[:, rows_B, :window].set(window_cache[k]) for k in state["cache"]}
  step_B = active_B.astype(jnp.int32)
  new_state = {"cache": cache,
               "logits": state["logits"].at[rows_B].set(jnp.where(active_B[:, None], logits_Bx1xV[:, 0], logits_BxV)),
               "positions": state["positions"].at[rows_B].add(step_B),
               "seen": state["seen"].at[rows_B, token_B].max(active_B),
               "counts": state["counts"].at[rows_B, token_B].add(step_B),
               "generated": state["generated"].at[rows_B].add(step_B)}
  return new_state, out
