"""Next-token selection from logits: penalties, then temperature / top-k / top-p / min-p, then a draw.

Every setting is a traced array (per row, [B]), not a static argument, so changing them between
requests never recompiles. Conventions:
  repetition_penalty  HF/CTRL-style over prompt + generated tokens: a seen token's logit is divided by
                      the penalty when positive and multiplied by it when negative, so a penalty > 1
                      always lowers that token's probability (minimind multiplies positive and
                      negative alike, which raises negative ones).
  presence_penalty    OpenAI-style over generated tokens only: logit -= presence * (count > 0)
  frequency_penalty   OpenAI-style over generated tokens only: logit -= frequency * count
  temperature 0       greedy (argmax of the penalised logits)
  top_k 0, top_p 1, min_p 0 switch the corresponding filter off.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30  # a finite "minus infinity": a filtered row can never become all-NaN


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = off
  min_p: float = 0.0  # keep tokens with prob >= min_p * max prob; 0 = off
  repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the answer so far
  presence_penalty: float = 0.0  # subtracted once from every token already generated
  frequency_penalty: float = 0.0  # subtracted per occurrence of a generated token
  max_new_tokens: int = 256  # generated tokens per prompt at most
  seed: int = 0  # the same seed, prompts and settings give the same sample

  def validate(self) -> "SamplingConfig":
    def bad(field, why):
      raise ValueError(f"sampling setting {field}={getattr(self, field)!r}: {why}")
    if self.temperature < 0:
      bad("temperature", "must be >= 0 (0 means greedy)")
    if self.top_k < 0:
      bad("top_k", "must be >= 0 (0 turns it off)")
    if not 0 < self.top_p <= 1:
      bad("top_p", "must be in (0, 1] (1 turns it off)")
    if not 0 <= self.min_p < 1:
      bad("min_p", "must be in [0, 1) (0 turns it off)")
    if self.repetition_penalty <= 0:
      bad("repetition_penalty", "must be > 0 (1 turns it off)")
    if self.max_new_tokens <= 0:
      bad("max_new_tokens", "must be positive")
    return self

  def arrays(self, batch: int) -> dict:
    """The per-row traced settings the jitted sampler takes (every row gets this seed)."""
    f = lambda v, dt=np.float32: np.full((batch,), v, dt)
    return {"temperature": f(self.temperature), "top_k": f(self.top_k, np.int32), "top_p": f(self.top_p),
            "min_p": f(self.min_p), "repetition_penalty": f(self.repetition_penalty),
            "presence_penalty": f(self.presence_penalty), "frequency_penalty": f(self.frequency_penalty),
            "seed": f(self.seed & 0x7FFFFFFF, np.int32)}


def prompt_seed(seed: int, position: int) -> int:
  """The seed of the `position`-th prompt (0-based) of a prompts file sampled with `seed`: its
  own random stream, so two prompts never draw the same numbers (with one shared seed, two poem
  prompts at temperature 0.8 continued almost alike), yet the same file and seed give the same
  answers whatever the batch size. A hash of both (numpy's SeedSequence, the same on every
  platform), not seed + position, so that seed 1's first prompt does not replay seed 0's second."""
  state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(position)]).generate_state(1)
  return int(state[0]) & 0x7FFFFFFF


def stack_settings(per_row: list[dict]) -> dict:
  """Row-wise settings of several requests (each `SamplingConfig.arrays(1)`) as one batch."""
  return {k: np.concatenate([r[k] for r in per_row]) for k in per_row[0]}


def apply_penalties(logits_BxV, seen_BxV, counts_BxV, settings):
  """Repetition penalty on `seen` (prompt + generated) tokens; presence/frequency on `counts`."""
  rep_Bx1 = settings["repetition_penalty"][:, None]
  penalised = jnp.where(logits_BxV > 0, logits_BxV / rep_Bx1, logits_BxV * rep_Bx1)
  logits_BxV = jnp.where(seen_BxV, penalised, logits_BxV)
  counts_BxV = counts_BxV.astype(jnp.float32)
  logits_BxV = logits_BxV - settings["presence_penalty"][:, None] * (counts_BxV > 0)
  return logits_BxV - settings["frequency_penalty"][:, None] * counts_BxV


def filter_logits(logits_BxV, settings):
  """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf.

  The sort that top-k/top-p need is skipped (lax.cond) when no row uses either.
  """
  temp_Bx1 = jnp.maximum(settings["temperature"], 1e-6)[:, None]
  logits_BxV = logits_BxV.astype(jnp.float32) / temp_Bx1
  needs_sort = jnp.any(settings["top_k"] > 0) | jnp.any(settings["top_p"] < 1)
  keep_BxV = jax.lax.cond(needs_sort, _top_k_top_p_keep, lambda x, _: jnp.ones(x.shape, jnp.bool_),
                          logits_BxV, settings)
  # min-p: relative to the most likely token (after temperature, as in HF's MinPLogitsWarper).
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  keep_BxV &= probs_BxV >= settings["min_p"][:, None] * jnp.max(probs_BxV, axis=-1, keepdims=True)
  return jnp.where(keep_BxV, logits_BxV, _NEG)


def _top_k_top_p_keep(logits_BxV, settings):
  vocab = logits_BxV.shape[-1]
  sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)  # descending
  # top-k: keep logits >= the k-th largest.
  k_B = jnp.where(settings["top_k"] > 0, jnp.minimum(settings["top_k"], vocab), vocab)
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
  keep_BxV = logits_BxV >= kth_Bx1
  # top-p on the top-k survivors: sorted token i stays iff the mass before it is < p, i.e. the
  # smallest prefix whose mass reaches p (the most likely token always stays).
  rank_V = jnp.arange(vocab)
  sorted_BxV = jnp.where(rank_V[None] < k_B[:, None], sorted_BxV, _NEG)
  probs_sorted_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_sorted_BxV, axis=-1) - probs_sorted_BxV
  kept_sorted_BxV = mass_before_BxV < settings["top_p"][:, None]
  n_kept_B = jnp.maximum(jnp.sum(kept_sorted_BxV, axis=-1), 1)
  pth_Bx1 = jnp.take_along_axis(sorted_BxV, (n_kept_B - 1)[:, None], axis=-1)
  return keep_BxV & (logits_BxV >= pth_Bx1)


def row_keys(seeds_B, steps_B):
  """One PRNG key per row: fold_in(key(seed), step). A row's draws depend only on its own seed
  and how many tokens it has generated, never on which other rows share the batch."""
  return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds_B, steps_B)


def sample(keys, logits_BxV, seen_BxV, counts_BxV, settings):
  """Next token ids [B] int32: greedy where temperature == 0, else a draw from the filtered logits.

  keys: [B] per-row keys (see `row_keys`), or one key that is split into B.
  When every row is greedy the filtering and the draw are skipped (lax.cond).
  """
  batch = logits_BxV.shape[0]
  keys_B = jax.random.split(keys, batch) if keys.ndim == 0 else keys
  penalised_BxV = apply_penalties(logits_BxV.astype(jnp.float32), seen_BxV, counts_BxV, settings)
  greedy_B = jnp.argmax(penalised_BxV, axis=-1).astype(jnp.int32)

  def draw(_):
    filtered_BxV = filter_logits(penalised_BxV, settings)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
    return jnp.where(settings["temperature"] > 0, drawn_B, greedy_B)

  return jax.lax.cond(jnp.all(settings["temperature"] == 0), lambda _: greedy_B, draw, None)
