"""Held-out accuracy of a policy on a prompt set with a checkable reward: pass@1 of greedy
decoding, and pass@k of k samples per prompt (the share of prompts with at least one completion
whose reward reaches `threshold`; with n = k samples this is the unbiased estimator of Chen et
al. 2021 at n = k)."""

from __future__ import annotations

import dataclasses

import numpy as np

from llm_jax.data.prompts import PromptSet
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig


def _fields(ps: PromptSet, rows: list[int], gens) -> dict:
  fields = {}
  for k in ps.records[rows[0]]:
    if k not in ("prompt", "messages"):
      fields[k] = [ps.records[i].get(k) for i in rows]
  fields["completion_tokens"] = [len(g.tokens) for g in gens]
  fields["finish_reasons"] = [g.finish_reason for g in gens]
  return fields


def scores(gen: Generator, tok, ps: PromptSet, reward_fn, sampling: SamplingConfig, *,
           k: int = 1, seed: int = 0, batch_rows: int = 256) -> np.ndarray:
  """Rewards [n_prompts, k]: k completions per prompt (greedy when sampling.temperature == 0),
  the j-th of prompt i sampled with seed (seed, i, j)."""
  rows = [i for i in range(len(ps.ids)) for _ in range(k)]
  out = []
  for start in range(0, len(rows), batch_rows):
    chunk = rows[start:start + batch_rows]
    per_row = [dataclasses.replace(sampling, seed=int(np.random.SeedSequence(
        [seed, i, (start + j) % k]).generate_state(1)[0] & 0x7FFFFFFF))
               for j, i in enumerate(chunk)]
    gens = gen.generate([ps.ids[i].tolist() for i in chunk], per_row,
                        stop_token_ids=[tok.im_end_id], decode_fn=tok.decode)
    out += reward_fn([ps.texts[i] for i in chunk], [g.text for g in gens],
                     **_fields(ps, chunk, gens))
  return np.asarray(out, np.float64).reshape(len(ps.ids), k)


def pass_at_1_greedy(gen, tok, ps, reward_fn, max_new_tokens: int, threshold: float = 1.0
                     ) -> float:
  s = scores(gen, tok, ps, reward_fn, SamplingConfig(temperature=0.0,
                                                     max_new_tokens=max_new_tokens))
  return float(np.mean(s[:, 0] >= threshold))


def pass_at_k(gen, tok, ps, reward_fn, k: int, max_new_tokens: int, temperature: float = 1.0,
              seed: int = 0, threshold: float = 1.0) -> float:
  s = scores(gen, tok, ps, reward_fn, SamplingConfig(temperature=temperature,
                                                     max_new_tokens=max_new_tokens), k=k,
             seed=seed)
  return float(np.mean(np.any(s >= threshold, axis=1)))
