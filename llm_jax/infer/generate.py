"""Batched generation over a fixed-size KV cache: a jitted prefill, then jitted chunks of decode steps.

Compiled shapes are bucketed so a chat session compiles a handful of programs, not one per token
or per prompt: prompts are right-padded to a power of two (at least `min_bucket`), the cache length
is the power of two >= longest prompt + max_new_tokens, and the batch is padded to a multiple of
the mesh's batch shards. Sampling settings are traced arrays (no recompilation when they change).

The first token is sampled straight from the prefill's logits (time to first token is the prefill
and a sampling call, no decoding step); then `Generator.chunk` tokens per device call (a scan of
the decoding step: the last token through the model, then the next one sampled). The host loop
dispatches chunk c+1 before it reads chunk c's tokens back, so the device never waits for Python
(stop checks, streaming) except on the last.
"""

import dataclasses
import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.infer.sampling import row_keys, sample, SamplingConfig, stack_settings
from llm_jax.infer.text import Detokenizer, StopMatcher
from llm_jax.model import cpu
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder, init_cache, unstack_layers


@dataclasses.dataclass
class Generation:
  tokens: list[int]  # generated ids; an end token that stopped generation is not included
  text: str | None  # decode_fn(tokens) cut before the first stop string (None without decode_fn)
  finish_reason: str  # "stop" (end token or stop string), "length" (max_new_tokens) or "interrupted"
  logprobs: list[float] | None  # log p(token) under the model's unmodified distribution, if asked


def bucket(n: int, minimum: int = 16) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return 1 << (max(n, minimum) - 1).bit_length()


def _sample_next(logits_BxV, state, settings):
  """Samples each row's next token from `logits_BxV` under its settings: (state with the token
  fed next and counted, token [B], log p(token) [B] under the unmodified distribution).
  `state` needs "seen", "counts" and "generated"; other entries pass through."""
  keys_B = row_keys(settings["seed"], state["generated"])
  token_B = sample(keys_B, logits_BxV, state["seen"], state["counts"], settings)
  rows_B = jnp.arange(token_B.shape[0])
  logprob_B = jax.nn.log_softmax(logits_BxV, axis=-1)[rows_B, token_B]
  state = {**state, "token": token_B, "seen": state["seen"].at[rows_B, token_B].set(True),
           "counts": state["counts"].at[rows_B, token_B].add(1), "generated": state["generated"] + 1}
  return state, token_B, logprob_B


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(variables, tokens_BxP, lengths_B, *, cfg: ModelConfig, cache_len: int):
  """The prompts through the model: (state, each row's logits after its last prompt token [B, V]).
  `variables`: {"params": ...}, with LoRA adapters also {"lora": ...} (see Generator)."""
  batch, length = tokens_BxP.shape
  idx_P = jnp.arange(length, dtype=jnp.int32)
  positions_BxP = jnp.broadcast_to(idx_P, (batch, length))
  segment_ids_BxP = (idx_P[None] < lengths_B[:, None]).astype(jnp.int32)  # 0 on right padding
  cache = init_cache(cfg, batch, cache_len, per_layer=not cfg.scan_layers)  # unrolled on the CPU
  logits_Bx1xV, cache = Decoder(cfg, fresh_cache=True).apply(
      variables, tokens_BxP, positions_BxP, segment_ids_BxP, cache=cache,
      logits_at_BxK=(lengths_B - 1)[:, None])
  rows_Bx1 = jnp.arange(batch)[:, None]
  seen_BxV = jnp.zeros((batch, cfg.vocab_size), jnp.bool_).at[rows_Bx1, tokens_BxP].max(segment_ids_BxP > 0)
  state = {"cache": cache, "positions": lengths_B, "seen": seen_BxV,
           "counts": jnp.zeros((batch, cfg.vocab_size), jnp.int32),
           "generated": jnp.zeros((batch,), jnp.int32)}
  return state, logits_Bx1xV[:, 0]


@jax.jit
def _first_token(logits_BxV, sampler_state, settings):
  """The first token sampled from the prefill's logits: (sampler_state, tokens [1, B], log-probs
  [1, B]), as a chunk of one. sampler_state is the state's "seen", "counts" and "generated" only,
  so the cache is neither passed nor copied. Its own program, not part of the prefill: compiled
  once per batch size, where the prefill compiles once per prompt bucket (sampling's sort and
  draw took 0.6 s of XLA's time on every new bucket)."""
  sampler_state, token_B, logprob_B = _sample_next(logits_BxV, sampler_state, settings)
  return sampler_state, token_B[None], logprob_B[None]


def _decode(variables, state, settings, cfg: ModelConfig):
  """Runs each row's last sampled token through the model and samples the one after it."""
  token_B, positions_B = state["token"], state["positions"]
  logits_Bx1xV, cache = Decoder(cfg).apply(variables, token_B[:, None], positions_B[:, None],
                                           jnp.ones_like(token_B)[:, None], cache=state["cache"])
  state = {**state, "cache": cache, "positions": positions_B + 1}
  return _sample_next(logits_Bx1xV[:, 0], state, settings)


@functools.partial(jax.jit, static_argnames=("cfg", "n"), donate_argnames=("state",))
def _steps(variables, state, settings, *, cfg: ModelConfig, n: int):
  """`n` decoding steps in one call (a scan of `_decode`): (state, tokens [n, B], log-probs [n, B]).
  The same tokens as n calls with n=1 (a row's random key depends on its count of generated
  tokens only), without the host's dispatch of every token."""
  def body(state, _):
    state, token_B, logprob_B = _decode(variables, state, settings, cfg)
    return state, (token_B, logprob_B)
  state, (tokens_NxB, logprobs_NxB) = jax.lax.scan(body, state, None, length=n)
  return state, tokens_NxB, logprobs_NxB


class Generator:
  """Generates from `params` (plain or sharded arrays). With a mesh, every jitted call is traced
  inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, so the KV cache is sharded by the
  cache_* rules and activations as in training.

  `adapters`: LoRA adapters (model/lora.py's "lora" collection, `cfg.lora` set) applied over
  `params` as the base, unmerged: what a LoRA run's rollouts sample from (rl/rollout.py)."""

  # Tokens decoded per device call after the first (which comes with the prefill).
  # On a 2-core CPU, 16 per call decoded 8-18% more tokens/s than one per call;
  # streaming then arrives in bursts of up to this many tokens, and a stop (end token, stop string,
  # should_stop) wastes at most a burst's compute.
  chunk = 16

  def __init__(self, params, cfg: ModelConfig, *, mesh=None, rules=(), min_bucket: int = 16,
               adapters=None):
    if cpu.on_cpu():  # per-layer weight arrays: no copies out of a stacked tree at every token
      if adapters is not None:
        adapters, _ = unstack_layers(adapters, cfg)
      params, cfg = unstack_layers(params, cfg)
    self.params, self.cfg, self.mesh, self.rules, self.min_bucket = params, cfg, mesh, rules, min_bucket
    self.variables = {"params": params} if adapters is None else {"params": params,
                                                                  "lora": adapters}
    self.batch_multiple = 1
    if mesh is not None:
      batch_axes = nn.logical_to_mesh_axes(("cache_batch",), rules)[0] or ()
      batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
      self.batch_multiple = int(np.prod([mesh.shape[a] for a in batch_axes]))

  def _context(self):
    if self.mesh is None:
      return _NullContext()
    return _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(), *,
               stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
               decode_fn: Callable[[list[int]], str] | None = None,
               callback: Callable[[int, int], None] | None = None,
               return_logprobs: bool = False,
               should_stop: Callable[[], bool] | None = None) -> list[Generation]:
    """Continues each prompt (a list of token ids).

    Stops a row at a token in `stop_token_ids` (not returned), when `decode_fn(tokens)` contains a
    stop string (the completing token is returned; `text` is cut before the stop string), or after
    `sampling.max_new_tokens`. `callback(row, token_id)` is called for every returned token, in order,
    as soon as it is known on the host. `should_stop()` is polled after every token; when it returns
    True the unfinished rows end with finish_reason "interrupted" (Ctrl-C in chat, a client gone).

    `sampling` is one config for every row or one per prompt. A row's tokens depend only on its
    prompt and its own settings (seed included), never on the other rows of the batch.
    """
    per_row = [sampling] * len(prompts) if isinstance(sampling, SamplingConfig) else list(sampling)
    if len(per_row) != len(prompts):
      raise ValueError(f"{len(per_row)} sampling configs for {len(prompts)} prompts")
    for s in per_row:
      s.validate()
    if stop_strings and decode_fn is None:
      raise ValueError("stop_strings need decode_fn (the tokenizer's decode) to be checked")
    n_rows = len(prompts)
    if n_rows == 0:
      return []
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token")
      if max(p) >= self.cfg.vocab_size or min(p) < 0:
        raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={self.cfg.vocab_size})")
    batch = -(-n_rows // self.batch_multiple) * self.batch_multiple
    lengths = [len(p) for p in prompts] + [1] * (batch - n_rows)  # filler rows are dropped at the end
    row_max_new = [s.max_new_tokens for s in per_row]
    max_new = max(row_max_new)
    prompt_len = bucket(max(lengths), self.min_bucket)
    cache_len = bucket(max(lengths) + max_new, self.min_bucket)
    tokens = np.zeros((batch, prompt_len), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    settings = stack_settings([s.arrays(1) for s in per_row] + [per_row[0].arrays(batch - n_rows)])
    stop_ids = set(int(t) for t in stop_token_ids)

    out_tokens: list[list[int]] = [[] for _ in range(n_rows)]
    out_logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    reasons: list[str | None] = [None] * n_rows
    texts: list[str | None] = [None] * n_rows
    # Each row's text, decoded a token at a time, and where its first stop string begins.
    detoks = [Detokenizer(decode_fn) for _ in range(n_rows)] if stop_strings else []
    matchers = [StopMatcher(stop_strings) for _ in range(n_rows)] if stop_strings else []

    def accept(row: int, token: int, logprob: float) -> None:
      if token in stop_ids:
        reasons[row] = "stop"
        return
      out_tokens[row].append(token)
      out_logprobs[row].append(logprob)
      if callback is not None:
        callback(row, token)
      if stop_strings:
        detok = detoks[row]
        detok.add(token)
        if len(out_tokens[row]) >= row_max_new[row]:
          detok.finish()  # the row's last token: text held back (a partial character) counts now
        at = matchers[row].find(detok.text)
        if at is not None:
          texts[row], reasons[row] = detok.text[:at], "stop"
          return
      if len(out_tokens[row]) >= row_max_new[row]:
        reasons[row] = "length"

    with self._context():
      settings = jax.device_put(settings)  # once, not at every step
      state, logits = _prefill(self.variables, tokens, np.asarray(lengths, np.int32), cfg=self.cfg,
                               cache_len=cache_len)
      sampler_state, *current = _first_token(
          logits, {k: state[k] for k in ("seen", "counts", "generated")}, settings)
      state = {**state, **sampler_state}  # the first token: fed to the first decoding step
      done = 1
      while True:
        pending = None
        if done < max_new:  # queue the next chunk before blocking on this one's tokens
          # The last few one by one: two programs in all, none compiled per tail length.
          n = self.chunk if max_new - done >= self.chunk else 1
          state, *pending = _steps(self.variables, state, settings, cfg=self.cfg, n=n)
          done += n
        tokens_np, logprobs_np = np.asarray(current[0]), np.asarray(current[1])
        for token_np, logprob_np in zip(tokens_np, logprobs_np):
          for row in range(n_rows):
            if reasons[row] is None:
              accept(row, int(token_np[row]), float(logprob_np[row]))
          if should_stop is not None and should_stop():
            reasons = [r or "interrupted" for r in reasons]
          if all(r is not None for r in reasons):
            break
        if all(r is not None for r in reasons) or pending is None:
          break
        current = pending

    return [Generation(tokens=out_tokens[i],
                       text=texts[i] if texts[i] is not None else (decode_fn(out_tokens[i]) if decode_fn else None),
                       finish_reason=reasons[i], logprobs=out_logprobs[i] if return_logprobs else None)
            for i in range(n_rows)]


class _NullContext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


class _Both:
  def __init__(self, *contexts):
    self.contexts = contexts

  def __enter__(self):
    for c in self.contexts:
      c.__enter__()
    return self

  def __exit__(self, *exc):
    for c in reversed(self.contexts):
      c.__exit__(*exc)
    return False
